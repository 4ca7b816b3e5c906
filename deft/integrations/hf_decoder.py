"""`TreeDecoder`: one prompt's decoding tree over a transformers model, DeFT in every step.

The tree: node 0 is the prompt (a root); every other node holds a run of tokens under its parent
(a branch of sampling, a thought, a draft token). A token's position is the number of tokens on
its path before it. Each step feeds the new tokens of the touched nodes through the model in one
forward whose attention is DeFT over the paged tree cache (`deft.integrations.hf_attention`).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from deft.cache import OutOfPagesError
from deft.integrations.hf_attention import (
    ATTENTION_NAME,
    DeftCache,
    DeftStep,
    check_model,
    visible_tokens_limit,
)
from deft.tree import AttentionShape, Tree

CHUNKED = ("flash_decoding", "radix", "tree_attention_s", "deft_node_chunk", "deft_flatten")
"""Strategies that take a chunk size."""
TREE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class TreeDecoder:
    """Decode a tree of token runs over one prompt with a transformers model and DeFT.

    Parameters
    ----------
    model : LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM (in eval mode)
    max_tokens : int
        Most KV tokens the tree holds at once (prompt included).
    max_queries : int
        Most new tokens of one step (queries of one DeFT plan).
    page_size : int
        Tokens per page; every node starts on a fresh page.
    num_pages : int, optional
        Pages of the pools (default: enough for ``max_tokens`` plus a partial page for
        ``2 x max_queries`` nodes).
    strategy : str
        A `deft.TreeAttention` kernel strategy (default ``deft_flatten``).
    chunk_size, group_size : int, optional
        As for `deft.TreeAttention` (None on a GPU: the tuned table; on the CPU: 64 and the
        default group).
    """

    def __init__(self, model, *, max_tokens: int, max_queries: int = 64, page_size: int = 16,
                 num_pages: int | None = None, strategy: str = "deft_flatten",
                 chunk_size: int | None = None, group_size: int | None = None):
        self.spec = check_model(model)
        if model.training:
            raise ValueError("TreeDecoder decodes: put the model in eval mode (model.eval())")
        from deft.tree_attention import TreeAttention

        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if num_pages is None:
            num_pages = -(-max_tokens // page_size) + 2 * max_queries
        self.cache = DeftCache(self.spec.layers, num_pages, page_size)
        if chunk_size is None and group_size is None and self.device.type != "cuda" and \
                strategy in CHUNKED:
            chunk_size = 64  # no tuned table for the interpreter
        self.attention = TreeAttention(strategy, chunk_size, group_size, max_queries=max_queries,
                                       max_tokens=max_tokens, device=self.device)
        self.max_queries, self.max_tokens = max_queries, max_tokens
        self.tp_group = tensor_parallel_group(model)
        self.parent = {}  # node id -> parent id (None for the root), held nodes
        self.tokens = {}  # node id -> list of token ids on the node (fed through the model)
        self.logits = {}  # node id -> logits after the node's last token [vocab]
        self.live = set()
        self.trees = []  # the Tree of every DeFT step, in order
        self._next_id = 0

    # ------------------------------------------------------------------ structure
    @property
    def root(self) -> int:
        return 0

    def children(self, node) -> list:
        return sorted(c for c, p in self.parent.items() if p == node)

    def path(self, node) -> list:
        """Node ids from the root down to ``node``."""
        nodes = []
        while node is not None:
            nodes.append(node)
            node = self.parent[node]
        return nodes[::-1]

    def sequence(self, node) -> list:
        """Token ids on the path from the root through ``node`` (prompt included)."""
        return [t for v in self.path(node) for t in self.tokens[v]]

    def leaves(self) -> list:
        """Live nodes without a child, ascending."""
        inner = set(self.parent.values())
        return sorted(self.live - inner)

    def tree(self, queries=None) -> Tree:
        """The held nodes as a `deft.Tree` (default queries: one on each live leaf)."""
        ids = sorted(self.parent)
        leaves = set(self.leaves())
        if queries is None:
            queries = {v: 1 for v in leaves}
        return Tree(ids, [self.parent[v] for v in ids], [len(self.tokens[v]) for v in ids],
                    [queries.get(v, 0) for v in ids], self.attention_shape)

    @property
    def attention_shape(self) -> AttentionShape:
        s = self.spec
        return AttentionShape(s.q_heads, s.kv_heads, s.head_dim, TREE_DTYPES[self.dtype])

    def kv_bytes(self) -> int:
        """Bytes of K and V the tree holds on this rank (pages in use, every layer)."""
        return self.cache.kv_bytes()

    # ------------------------------------------------------------------ changes
    def prefill(self, input_ids) -> int:
        """Feed the prompt ``[1, P]`` or ``[P]`` (node 0, the root); its K/V go to the pages."""
        if self.parent:
            raise ValueError("this TreeDecoder already holds a prompt")
        ids = _token_list(input_ids)
        self._add_node(None)
        self._feed({0: ids})
        return 0

    def expand(self, parent, continuations) -> list:
        """New children of ``parent``, one per token run of ``continuations``, fed in one step.

        Returns the new node ids; each child's next-token logits are ``self.logits[child]``.
        """
        if parent not in self.live:
            raise ValueError(f"node {parent} is not a live node")
        runs = [_token_list(c) for c in continuations]
        if any(not r for r in runs):
            raise ValueError("every continuation needs at least one token")
        children = [self._add_node(parent) for _ in runs]
        self._feed(dict(zip(children, runs)))
        return children

    def extend(self, runs: dict) -> None:
        """Append token runs to live leaves ``{node: tokens}``, all fed in one step."""
        runs = {v: _token_list(r) for v, r in runs.items()}
        for v in runs:
            if v not in self.live or self.children(v):
                raise ValueError(f"node {v} is not a live leaf: only leaves grow")
        self._feed({v: r for v, r in runs.items() if r})

    def prune(self, node) -> None:
        """End ``node`` and its whole subtree; pages no live node needs go back to the pool."""
        if node not in self.parent:
            raise ValueError(f"node {node} is not in the tree")
        stack = [node]
        doomed = []
        while stack:
            v = stack.pop()
            doomed.append(v)
            stack.extend(self.children(v))
        for v in reversed(doomed):  # leaves first
            if v in self.live:
                self.live.discard(v)
                self.cache.tree_cache.prune(v)
            self.logits.pop(v, None)
        for v in list(self.parent):  # the subtree, and ancestors kept only for it
            if v not in self.cache.tree_cache:
                del self.parent[v], self.tokens[v]
                self.logits.pop(v, None)

    # ------------------------------------------------------------------ the step
    def _add_node(self, parent) -> int:
        node = self._next_id
        self._next_id += 1
        self.cache.tree_cache.add_node(node, parent, 0)
        self.parent[node], self.tokens[node] = parent, []
        self.live.add(node)
        return node

    def _feed(self, runs: dict) -> None:
        """One forward over the new tokens of ``runs`` ``{node: tokens}``; DeFT attention unless
        the step is the prompt's prefill."""
        if not runs:
            return
        nodes = sorted(runs)
        n = sum(len(runs[v]) for v in nodes)
        prefill = nodes == [0] and not self.tokens[0]
        if not prefill and n > self.max_queries:
            raise ValueError(f"the step feeds {n} tokens but this TreeDecoder was built with "
                             f"max_queries={self.max_queries}")
        held = sum(len(t) for t in self.tokens.values())
        if held + n > self.max_tokens:
            raise ValueError(f"the tree would hold {held + n} tokens, beyond max_tokens="
                             f"{self.max_tokens}")
        # Check everything before changing anything: the window, then the pages.
        # A token's position: the tokens on its path before it, an ancestor's new ones included.
        starts = {v: sum(len(self.tokens[u]) + len(runs.get(u, ())) for u in self.path(v))
                  - len(runs[v]) for v in nodes}
        visible_tokens_limit(self.spec, np.array([starts[v] + len(runs[v]) for v in nodes]))
        page_size, tree_cache = self.cache.page_size, self.cache.tree_cache
        needed = sum(-(-(len(self.tokens[v]) + len(runs[v])) // page_size)
                     - -(-len(self.tokens[v]) // page_size) for v in nodes)
        if needed > self.cache.allocator.num_free:
            raise OutOfPagesError(
                f"the step needs {needed} more pages but only {self.cache.allocator.num_free} "
                f"of {self.cache.num_pages} are free (pages of {page_size} tokens): prune "
                "branches or build the TreeDecoder with more num_pages")
        slots, positions, ids = [], [], []
        for v in nodes:
            before = len(self.tokens[v])
            tree_cache.grow(v, len(runs[v]))
            slots.append(tree_cache.slots(v, np.arange(before, before + len(runs[v]))))
            positions.extend(range(starts[v], starts[v] + len(runs[v])))
            ids.extend(runs[v])
            self.tokens[v].extend(runs[v])
        if prefill:
            plan = None
        else:
            tree = self._step_tree({v: len(runs[v]) for v in nodes})
            plan = self.attention.plan(tree, tree_cache)
            self.trees.append(tree)
        self.cache.slots = torch.cat(slots).to(self.device)
        step = DeftStep(self.cache, self.attention, plan)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        try:
            with torch.no_grad(), _attention_implementation(self.model, ATTENTION_NAME):
                out = self.model(input_ids=input_ids, position_ids=position_ids,
                                 use_cache=True, logits_to_keep=1 if prefill else 0,
                                 deft_step=step, **{self.spec.cache_keyword: self.cache})
        finally:
            self.cache.slots = None
        logits = out.logits[0]
        if prefill:
            self.logits[0] = logits[-1]
            self.last_step_logits = {0: logits}
            return
        # Keep every new token's logits of this step (verification reads them all).
        offset, self.last_step_logits = 0, {}
        for v in nodes:
            k = len(runs[v])
            self.last_step_logits[v] = logits[offset: offset + k]
            self.logits[v] = logits[offset + k - 1]
            offset += k

    def _step_tree(self, queries: dict) -> Tree:
        """The nodes on the paths of the queried nodes, with queries on their new tokens."""
        needed = set()
        for v in queries:
            needed.update(self.path(v))
        ids = sorted(needed)
        return Tree(ids, [self.parent[v] for v in ids], [len(self.tokens[v]) for v in ids],
                    [queries.get(v, 0) for v in ids], self.attention_shape)


@contextlib.contextmanager
def _attention_implementation(model, name):
    """The model's (and its sub-configs') attention implementation set to ``name`` meanwhile."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def _token_list(ids) -> list:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"input_ids must be one sequence [1, P], got {list(ids.shape)}")
            ids = ids[0]
        return [int(t) for t in ids.tolist()]
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(t) for t in ids]


def tensor_parallel_group(model):
    """The process group of a tensor-parallel model (its DTensor weights' 1-D mesh), else None."""
    for parameter in model.parameters():
        mesh = getattr(parameter, "device_mesh", None)
        if mesh is not None and mesh.ndim == 1 and mesh.size() > 1:
            return mesh.get_group()
    return None
