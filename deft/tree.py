"""The decoding tree: nodes of KV tokens, queries on node tails, and every derived view.

A `Tree` is immutable. Nodes are stored in ascending id order (the normative node order of
docs/design.md); all per-node arrays below are indexed by that position, called the node *index*,
not by the user's node id. Derived views are computed once, iteratively (a chain 100k nodes
deep works), with numpy; those the parents alone fix (preorder, Euler tour, depth) are shared
by the trees with the same parents (`deft.tree_structure`), so the steps of a decoding run,
which mostly keep their shape, walk it once. `Tree.trusted` builds a run's step trees from
arrays the run checked once.

Layouts (docs/design.md, "Orders"):
- test layout: KV tokens by node index then position; queries by node index then position;
- flattened layout: DFS preorder from each root in ascending id, children in ascending id.

Visibility: the query on token j of node v sees every token of v's ancestors and tokens 0..j of
v. With Euler-tour intervals a token of node u is visible to a query of node v iff
``tin[u] <= tin[v] <= tout[u]`` (plus the causal offset when u == v).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from deft.compiled_plan import compiled
from deft.tree_structure import Structure, is_known, structure_of

INDEX_LIMIT = 2**31 - 1
"""Token, query and page counts must stay below this: plans and page tables hold int32."""
ID_LIMIT = 2**63 - 1
"""Node ids are int64."""

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


class TreeError(ValueError):
    """A tree that does not satisfy the model; the message names the node and the field."""


@dataclass(frozen=True)
class AttentionShape:
    """Heads and head dim of one attention layer, and the dtype of Q, K, V and the output."""

    q_heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "float16"

    def __post_init__(self):
        for field in ("q_heads", "kv_heads", "head_dim"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TreeError(f"attention.{field} must be a positive integer, got {value!r}")
        if self.q_heads % self.kv_heads:
            raise TreeError(
                f"attention.q_heads ({self.q_heads}) must be a multiple of "
                f"attention.kv_heads ({self.kv_heads})"
            )
        if self.head_dim > 1024:
            raise TreeError(f"attention.head_dim must be at most 1024, got {self.head_dim}")
        if self.dtype not in DTYPE_BYTES:
            raise TreeError(
                f"attention.dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}"
            )

    @property
    def element_bytes(self) -> int:
        """Bytes of one element of Q, K, V or the output."""
        return DTYPE_BYTES[self.dtype]

    @property
    def group_ratio(self) -> int:
        """Query heads per KV head (the GQA ratio)."""
        return self.q_heads // self.kv_heads


def _structure_view(name: str, doc: str) -> property:
    """A `Tree` view read from its shared `deft.tree_structure.Structure`."""
    return property(lambda tree: getattr(tree._structure, name), doc=doc)


class Tree:
    """A forest of KV-token nodes with queries on node tails.

    Parameters
    ----------
    ids : sequence of int, [nodes]
        Distinct non-negative node ids, in any order.
    parents : sequence of int or None, [nodes]
        Parent id of each node, None for a root.
    tokens : sequence of int, [nodes]
        KV tokens of each node, at least 1.
    queries : sequence of int, [nodes], optional
        Queries on the last ``queries[i]`` tokens of each node (default: 1 on a leaf, 0 on an
        inner node).
    attention : AttentionShape, optional
        The attention layer's shape (default: Llama-3-8B, fp16).
    """

    def __init__(self, ids, parents, tokens, queries=None, attention=None):
        ids = [_check_int(i, f"node #{k}", "id") for k, i in enumerate(ids)]
        if not (len(ids) == len(parents) == len(tokens)):
            raise TreeError("ids, parents and tokens must have the same length")
        if not ids:
            raise TreeError("a tree needs at least one node")
        order = sorted(range(len(ids)), key=ids.__getitem__)
        position = {}
        for k in order:
            if ids[k] < 0:
                raise TreeError(f"node {ids[k]}: field 'id' must be non-negative")
            if ids[k] > ID_LIMIT:
                raise TreeError(f"node {ids[k]}: field 'id' is beyond the int64 limit {ID_LIMIT}")
            if ids[k] in position:
                raise TreeError(f"node {ids[k]}: field 'id' is a duplicate")
            position[ids[k]] = len(position)
        n = len(ids)
        self.attention = attention if attention is not None else AttentionShape()
        self.node_ids = np.array([ids[k] for k in order], dtype=np.int64)
        parent_index = np.full(n, -1, dtype=np.int64)
        token_count = np.zeros(n, dtype=np.int64)
        for k in order:
            node, p = ids[k], parents[k]
            if p is not None:
                p = _check_int(p, f"node {node}", "parent")
                if p not in position:
                    raise TreeError(f"node {node}: field 'parent' names unknown node {p}")
                parent_index[position[node]] = position[p]
            t = _check_int(tokens[k], f"node {node}", "tokens")
            if t < 1:
                raise TreeError(f"node {node}: field 'tokens' must be at least 1, got {t}")
            if t > INDEX_LIMIT:
                raise TreeError(
                    f"node {node}: field 'tokens' is {t}, beyond the int32 index limit "
                    f"{INDEX_LIMIT}"
                )
            token_count[position[node]] = t
        self.parent = parent_index
        self.tokens = token_count
        if not is_known(parent_index):  # a kept structure's parents were checked already
            self._check_acyclic()
        if queries is None:
            self.queries = (self.child_count == 0).astype(np.int64)
        else:
            if len(queries) != n:
                raise TreeError("queries must have one entry per node")
            query_count = np.zeros(n, dtype=np.int64)
            for k in order:
                node = ids[k]
                q = _check_int(queries[k], f"node {node}", "queries")
                t = token_count[position[node]]
                if q < 0 or q > t:
                    raise TreeError(
                        f"node {node}: field 'queries' must be between 0 and its tokens ({t}), "
                        f"got {q}"
                    )
                query_count[position[node]] = q
            self.queries = query_count
        total_tokens = int(self.tokens.sum())
        if total_tokens > INDEX_LIMIT:
            raise TreeError(
                f"the tree holds {total_tokens} tokens, beyond the int32 index limit {INDEX_LIMIT}"
            )
        if self.num_queries == 0:
            raise TreeError("the tree has no query: set 'queries' on at least one node")

    @classmethod
    def trusted(cls, node_ids, parent, tokens, queries, attention=None) -> "Tree":
        """A tree from node arrays that are known to be valid, checking only the int32 token
        limit (a total beyond it raises the checking constructor's TreeError).

        For callers that build every step's arrays from data they validated once (the
        decoding runs of `deft.workloads.runs`); the tests compare its trees with the checking
        constructor's.

        Parameters
        ----------
        node_ids : int64 [nodes]
            Distinct non-negative ids, ascending.
        parent : int64 [nodes]
            Parent node index of each node (-1: root), acyclic.
        tokens, queries : int64 [nodes]
            At least 1 token per node, queries between 0 and the node's tokens, at least one in
            all.
        attention : AttentionShape, optional
        """
        total = int(tokens.sum())
        if total > INDEX_LIMIT:
            ids = node_ids.tolist()
            parents = [None if p < 0 else ids[p] for p in parent.tolist()]
            return cls(ids, parents, tokens.tolist(), queries.tolist(), attention)  # raises
        tree = cls.__new__(cls)
        tree.num_tokens = total  # the cached property, filled
        tree.attention = attention if attention is not None else AttentionShape()
        tree.node_ids, tree.parent = node_ids, parent
        tree.tokens, tree.queries = tokens, queries
        return tree

    # ------------------------------------------------------------------ construction checks
    def _check_acyclic(self):
        """Raise TreeError naming a node on a cycle (a node its own parent included)."""
        n = len(self.parent)
        state = np.zeros(n, dtype=np.int8)  # 0 unseen, 1 on the current walk, 2 done
        for start in range(n):
            walk = []
            v = start
            while v != -1 and state[v] == 0:
                state[v] = 1
                walk.append(v)
                v = self.parent[v]
            if v != -1 and state[v] == 1:
                raise TreeError(
                    f"node {self.node_ids[v]}: field 'parent' closes a cycle "
                    f"(node {self.node_ids[v]} is its own ancestor)"
                )
            state[walk] = 2

    # ------------------------------------------------------------------ sizes
    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    @cached_property
    def num_tokens(self) -> int:
        """Unique KV tokens of the tree (N)."""
        return int(self.tokens.sum())

    @cached_property
    def num_queries(self) -> int:
        return int(self.queries.sum())

    # ------------------------------------------------------------------ structure
    @cached_property
    def _structure(self) -> Structure:
        """The views the parents alone fix, shared by every tree with the same parents."""
        return structure_of(self.parent)

    roots = _structure_view("roots", "Node indices of the roots, ascending. [roots]")
    child_count = _structure_view("child_count", "Children per node. [nodes]")
    child_ptr = _structure_view(
        "child_ptr", "CSR offsets into `child_index`: children of v are "
        "child_index[ptr[v]:ptr[v+1]]. [nodes+1]")
    child_index = _structure_view(
        "child_index", "Children of every node, grouped by parent, ascending within a parent. "
        "[nodes - roots]")
    preorder = _structure_view(
        "preorder", "Node indices in DFS preorder (roots ascending, children ascending). [nodes]")
    tin = _structure_view("tin", "Preorder position of each node. [nodes]")
    subtree_size = _structure_view("subtree_size",
                                   "Nodes in each node's subtree, itself included. [nodes]")
    tout = _structure_view("tout", "Last preorder position inside each node's subtree. [nodes]")
    depth = _structure_view("depth", "Depth of each node, 0 for a root. [nodes]")
    tree_of = _structure_view(
        "tree_of", "Position of each node's root in `roots` (which tree of the forest it is "
        "in). [nodes]")

    def children(self, v: int) -> np.ndarray:
        """Child node indices of node index v, ascending."""
        return self.child_index[self.child_ptr[v] : self.child_ptr[v + 1]]

    def path(self, v: int) -> np.ndarray:
        """Node indices from the root down to node index v, inclusive."""
        nodes = []
        while v >= 0:
            nodes.append(v)
            v = self.parent[v]
        return np.array(nodes[::-1], dtype=np.int64)

    @cached_property
    def ancestor_tokens(self) -> np.ndarray:
        """Tokens on the strict ancestors of each node, a parent's before its children's in
        preorder (one compiled pass: the numpy difference array took 7-16 µs a step). [nodes]"""
        return ancestor_token_sums(self.preorder, self.parent, self.tokens)

    @cached_property
    def path_tokens(self) -> np.ndarray:
        """Tokens from the root through the whole of each node. [nodes]"""
        return self.ancestor_tokens + self.tokens

    # ------------------------------------------------------------------ token layouts
    @cached_property
    def token_offset(self) -> np.ndarray:
        """First test-layout token of each node. [nodes]"""
        return np.concatenate([[0], np.cumsum(self.tokens)[:-1]])

    @cached_property
    def token_node(self) -> np.ndarray:
        """Node index of each test-layout token. [tokens]"""
        return np.repeat(np.arange(self.num_nodes), self.tokens)

    @cached_property
    def token_position(self) -> np.ndarray:
        """Position of each test-layout token inside its node. [tokens]"""
        return np.arange(self.num_tokens) - np.repeat(self.token_offset, self.tokens)

    @cached_property
    def flat_offset(self) -> np.ndarray:
        """First flattened-layout position of each node. [nodes]"""
        offset = np.empty(self.num_nodes, dtype=np.int64)
        ordered = self.tokens[self.preorder]
        offset[self.preorder] = np.concatenate([[0], np.cumsum(ordered)[:-1]])
        return offset

    @cached_property
    def flat_tokens(self) -> np.ndarray:
        """Test-layout token index at each flattened position. [tokens]"""
        order = self.preorder
        starts = np.repeat(self.token_offset[order], self.tokens[order])
        local = np.arange(self.num_tokens) - np.repeat(self.flat_offset[order], self.tokens[order])
        return starts + local

    # ------------------------------------------------------------------ queries
    @cached_property
    def query_offset(self) -> np.ndarray:
        """First query index of each node in the test layout. [nodes]"""
        return np.concatenate([[0], np.cumsum(self.queries)[:-1]])

    @cached_property
    def query_node(self) -> np.ndarray:
        """Node index of each query. [queries]"""
        return np.repeat(np.arange(self.num_nodes), self.queries)

    @cached_property
    def query_position(self) -> np.ndarray:
        """Token position, inside its node, that each query sits on. [queries]"""
        rank = np.arange(self.num_queries) - np.repeat(self.query_offset, self.queries)
        first = self.tokens - self.queries
        return np.repeat(first, self.queries) + rank

    @cached_property
    def query_token(self) -> np.ndarray:
        """Test-layout token index that each query sits on. [queries]"""
        return self.token_offset[self.query_node] + self.query_position

    @cached_property
    def visible_tokens(self) -> np.ndarray:
        """KV tokens each query attends. [queries]"""
        return self.ancestor_tokens[self.query_node] + self.query_position + 1

    @cached_property
    def node_visible_sum(self) -> np.ndarray:
        """Visible (query, token) pairs of each node's queries, in closed form
        (`visible_pairs`). [nodes]"""
        return node_visible_pairs(self.ancestor_tokens, self.tokens, self.queries)

    @cached_property
    def visible_token_sum(self) -> int:
        """``visible_tokens.sum()``, from node sums, in one compiled pass (the tuned lookup
        reads it every step; summing `node_visible_sum` cost 2-4 µs more)."""
        return int(visible_pair_sum(self.ancestor_tokens, self.tokens, self.queries))

    @cached_property
    def visible_token_max(self) -> int:
        """``visible_tokens.max()``, from node sizes."""
        return int(self.path_tokens[self.queries > 0].max())

    @cached_property
    def subtree_queries(self) -> np.ndarray:
        """Queries on each node and its descendants (a preorder range of nodes). [nodes]"""
        before = np.concatenate([[0], np.cumsum(self.queries[self.preorder])])
        return before[self.tout + 1] - before[self.tin]

    @cached_property
    def seen_tokens(self) -> int:
        """KV tokens some query attends: all of each node with a query on or below it."""
        return int(self.tokens[self.subtree_queries > 0].sum())

    def visible(self, query_index: np.ndarray, token_index: np.ndarray) -> np.ndarray:
        """Whether each query sees each token, by Euler-tour intervals.

        query_index [...], token_index [...] broadcastable; returns bool of the broadcast shape.
        """
        v = self.query_node[query_index]
        u = self.token_node[token_index]
        inside = (self.tin[u] <= self.tin[v]) & (self.tin[v] <= self.tout[u])
        causal = (u != v) | (self.token_position[token_index] <= self.query_position[query_index])
        return inside & causal

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict:
        """Summary numbers of the tree (all plain Python values)."""
        return {
            "nodes": self.num_nodes,
            "roots": int(len(self.roots)),
            "leaves": int((self.child_count == 0).sum()),
            "queries": self.num_queries,
            "unique_tokens": self.num_tokens,
            "sum_visible_tokens": self.visible_token_sum,
            "max_visible_tokens": self.visible_token_max,
            "sharing_ratio": float(self.visible_token_sum / self.num_tokens),
            "depth": int(self.depth.max()),
            "max_fanout": int(self.child_count.max()),
            "q_heads": self.attention.q_heads,
            "kv_heads": self.attention.kv_heads,
            "head_dim": self.attention.head_dim,
            "dtype": self.attention.dtype,
        }

    def __repr__(self):
        return (
            f"Tree(nodes={self.num_nodes}, roots={len(self.roots)}, tokens={self.num_tokens}, "
            f"queries={self.num_queries})"
        )


def _check_int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TreeError(f"{where}: field '{field}' must be an integer, got {value!r}")
    return int(value)


@compiled
def ancestor_token_sums(preorder, parent, tokens):
    """Tokens on the strict ancestors of each node. preorder, parent (-1 for a root),
    tokens : int64 [nodes]; returns int64 [nodes]"""
    above = np.zeros(len(parent), np.int64)
    for v in preorder:
        if parent[v] >= 0:
            above[v] = above[parent[v]] + tokens[parent[v]]
    return above


@compiled
def visible_pairs(queries, ancestor_tokens, tokens):
    """Visible (query, token) pairs of one node's queries: its q queries sit on positions
    ``t - q .. t - 1`` and see the ancestors' tokens and j + 1 of their own."""
    return queries * ancestor_tokens + queries * (2 * tokens - queries + 1) // 2


@compiled
def node_visible_pairs(ancestor_tokens, tokens, queries):
    """`visible_pairs` of each node. int64 [nodes] each; returns int64 [nodes]"""
    pairs = np.empty(len(tokens), np.int64)
    for v in range(len(tokens)):
        pairs[v] = visible_pairs(queries[v], ancestor_tokens[v], tokens[v])
    return pairs


@compiled
def visible_pair_sum(ancestor_tokens, tokens, queries):
    """`visible_pairs` summed over the nodes. int64 [nodes] each; returns an int"""
    total = 0
    for v in range(len(tokens)):
        total += visible_pairs(queries[v], ancestor_tokens[v], tokens[v])
    return total
