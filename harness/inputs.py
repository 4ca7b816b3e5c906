"""The inputs of one workload: random Q, K, V in the test layout, and the tree views peers need.

K and V come in several copies with different random data: graph-mode timing rotates over
them so that no call finds its KV in L2 (docs/anchors.md: the anchors' KV is 17 to 110 MB, an
H100's L2 50 MB). Copy 0 is the one checked against the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from deft.tree import AttentionShape, Tree
from deft.plan import ranges

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
"""The ``--dtype`` choices."""

TREE_DTYPE = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass
class Inputs:
    """Everything a method needs to run one workload.

    Attributes
    ----------
    tree : Tree
        With ``attention.dtype`` set to the bench dtype.
    q : [queries, q_heads, head_dim]
    k, v : list of [tokens, kv_heads, head_dim]
        The KV copies, test layout (by node index, then position).
    sm_scale : float
    page_size : int
        Tokens per page of this project's paged cache (the peers use page size 1).
    """

    tree: Tree
    q: torch.Tensor
    k: list
    v: list
    sm_scale: float
    page_size: int

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def copies(self) -> int:
        return len(self.k)


def with_dtype(tree: Tree, dtype: torch.dtype) -> Tree:
    """The same tree with ``attention.dtype`` set to `dtype` (the floor and the IO model read it)."""
    return with_attention(tree, replace(tree.attention, dtype=TREE_DTYPE[dtype]))


def with_heads(tree: Tree, shape: AttentionShape) -> Tree:
    """The same tree at the heads and head dim of `shape`, its dtype kept (``--heads``)."""
    return with_attention(tree, replace(shape, dtype=tree.attention.dtype))


def with_attention(tree: Tree, attention: AttentionShape) -> Tree:
    """The same tree (ids, parents, tokens, queries) with its ``attention`` replaced."""
    if tree.attention == attention:
        return tree
    parents = [None if p < 0 else int(tree.node_ids[p]) for p in tree.parent]
    return Tree(tree.node_ids.tolist(), parents, tree.tokens.tolist(), tree.queries.tolist(),
                attention)


def make_inputs(tree: Tree, dtype: torch.dtype, copies: int = 1, device="cuda", seed: int = 0,
                page_size: int = 16) -> Inputs:
    """Random standard-normal inputs for `tree` (seeded, generated on `device`)."""
    device = torch.device(device)
    tree = with_dtype(tree, dtype)
    shape = tree.attention
    generator = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=generator, device=device, dtype=dtype)

    kv = (tree.num_tokens, shape.kv_heads, shape.head_dim)
    return Inputs(
        tree=tree,
        q=randn(tree.num_queries, shape.q_heads, shape.head_dim),
        k=[randn(*kv) for _ in range(copies)],
        v=[randn(*kv) for _ in range(copies)],
        sm_scale=shape.head_dim**-0.5,
        page_size=page_size,
    )


def query_paths(tree: Tree) -> tuple[np.ndarray, np.ndarray]:
    """The visible tokens of each query, root first, as CSR over test-layout token indices.

    Returns
    -------
    indptr : int64 [queries + 1]
        Query q sees ``indices[indptr[q]:indptr[q + 1]]``.
    indices : int64 [sum of visible tokens]
        With page size 1 and the KV in the test layout, these are the page tables of
        one-request-per-query peers (SGLang, FlashInfer decode).
    """
    starts, lengths = [], []
    for q in range(tree.num_queries):
        path = tree.path(int(tree.query_node[q]))
        length = tree.tokens[path].copy()
        length[-1] = tree.query_position[q] + 1
        starts.append(tree.token_offset[path])
        lengths.append(length)
    start = np.concatenate(starts)
    length = np.concatenate(lengths)
    return np.concatenate([[0], np.cumsum(tree.visible_tokens)]), ranges(start, length)


def dense_mask(tree: Tree) -> np.ndarray:
    """Whether each query sees each token: bool [queries, tokens] (test layouts)."""
    return tree.visible(np.arange(tree.num_queries)[:, None], np.arange(tree.num_tokens)[None, :])
