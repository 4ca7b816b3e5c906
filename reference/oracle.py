"""The oracle: dense masked attention in float64, visibility from parent pointers.

Independent of everything the strategies share: no plan, no Euler tour, no partials. A query
sees the tokens of the nodes met walking parent pointers up from its node, except the tokens
of its own node beyond its position (docs/design.md, "Visibility").
"""

from __future__ import annotations

import numpy as np
import torch

from deft.tree import Tree

ORACLE_ELEMENTS = 2**24
"""Score elements computed at once (queries are taken in chunks that fit)."""


def visible_by_parents(tree: Tree, queries: np.ndarray) -> np.ndarray:
    """Whether each of the given queries sees each token: bool [len(queries), tokens].

    Walks parent pointers from every query's node to its root, all queries in step.
    """
    rows = np.arange(len(queries))
    on_path = np.zeros((len(queries), tree.num_nodes), dtype=bool)
    node = tree.query_node[queries].copy()
    while (node >= 0).any():
        walking = node >= 0
        on_path[rows[walking], node[walking]] = True
        node[walking] = tree.parent[node[walking]]
    own_node = tree.token_node[None, :] == tree.query_node[queries][:, None]
    ahead = tree.token_position[None, :] > tree.query_position[queries][:, None]
    return on_path[:, tree.token_node] & ~(own_node & ahead)


def oracle_attention(tree: Tree, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale=None):
    """Masked tree attention in float64, in the test layout.

    Parameters
    ----------
    tree : Tree
    q : [queries, q_heads, head_dim]
    k, v : [tokens, kv_heads, head_dim]
        Any float dtype; converted to float64 as given (fp16 inputs stay fp16-rounded).
    sm_scale : float, optional
        Default 1 / sqrt(head_dim).

    Returns
    -------
    out : float64 [queries, q_heads, head_dim], on q's device (the GPU checks run it there)
        Query head h attends with KV head h // (q_heads / kv_heads).
    """
    num_queries, q_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if sm_scale is None else float(sm_scale)
    k = k.to(torch.float64)
    v = v.to(torch.float64)
    out = torch.empty((num_queries, q_heads, head_dim), dtype=torch.float64, device=q.device)
    step = max(1, ORACLE_ELEMENTS // (q_heads * tree.num_tokens))
    for start in range(0, num_queries, step):
        queries = np.arange(start, min(num_queries, start + step))
        q_chunk = q[start : start + step].to(torch.float64).view(len(queries), kv_heads, group, head_dim)
        scores = torch.einsum("qhgd,nhd->qhgn", q_chunk, k) * scale
        visible = torch.from_numpy(visible_by_parents(tree, queries)).to(q.device)
        visible = visible[:, None, None, :]
        probabilities = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1)
        rows = torch.einsum("qhgn,nhd->qhgd", probabilities, v)
        out[start : start + step] = rows.reshape(len(queries), q_heads, head_dim)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest over queries of ||out_q - ref_q|| / ||ref_q|| (norm over heads and head dim).

    out, ref : [queries, q_heads, head_dim]; computed in float64.
    """
    out = out.to(torch.float64).flatten(1)
    ref = ref.to(torch.float64).flatten(1)
    return float(((out - ref).norm(dim=1) / ref.norm(dim=1)).max())
