"""Plans: the partitions of one strategy over one tree (docs/design.md, "Normative plan and accounting").

A partition is a set of queries and a set of KV tokens that one program handles: it computes
the partial result of those queries over those tokens (masked by the tree's visibility). The
token set is stored as *segments*: runs of consecutive tokens inside one node, ``(node, pos,
len)``, so a plan of a 20k-token prefix stays small. A partition never holds two segments of
one node, so its pages are the sum of its segments' pages (a page never holds two nodes).

The reference executes plans; the IO model reads their aggregates; the GPU planner must build
the same partitions (`Plan.partition_sets` is what the equality tests compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from deft.strategies import DEFAULT_CHUNK_SIZE, DENSE_MASK
from deft.strategies import strategy as strategy_record
from deft.tree import Tree

BYTE_KEYS = ("kv_bytes", "q_bytes", "mask_bytes", "partial_bytes", "score_bytes", "output_bytes",
             "index_bytes")
"""The byte counts of a traffic dict (docs/design.md, "Bytes"): counted by the reference, predicted
by the IO model."""


@dataclass(frozen=True, eq=False)
class Plan:
    """The partitions of `strategy` over `tree`.

    Attributes
    ----------
    query_ptr : int64 [P+1]
        Queries of partition p are ``query_index[query_ptr[p]:query_ptr[p+1]]``.
    query_index : int64 [sum q(p)]
        Query indices (test layout), ascending inside a partition.
    segment_ptr : int64 [P+1]
        Segments of partition p are ``segment_ptr[p]:segment_ptr[p+1]``.
    segment_node, segment_pos, segment_len : int64 [S]
        Node index, first position inside the node, and length of each segment.
    """

    tree: Tree
    strategy: str
    chunk_size: int | None
    group_size: int | None
    page_size: int
    query_ptr: np.ndarray
    query_index: np.ndarray
    segment_ptr: np.ndarray
    segment_node: np.ndarray
    segment_pos: np.ndarray
    segment_len: np.ndarray

    @property
    def num_partitions(self) -> int:
        return len(self.query_ptr) - 1

    @property
    def mask(self) -> str:
        """How the kernel gets visibility: 'causal' (position arithmetic, no bytes), 'bit' or 'dense'."""
        return strategy_record(self.strategy).mask

    @property
    def has_reduction(self) -> bool:
        """Whether partial results are written and merged by a global reduction."""
        return strategy_record(self.strategy).reduction

    # ------------------------------------------------------------------ per-partition aggregates
    @cached_property
    def count(self) -> np.ndarray:
        """Partitions each row stands for: 1 here, many in `deft.plan_aggregates`. [P]"""
        return np.ones(self.num_partitions, dtype=np.int64)

    @cached_property
    def queries(self) -> np.ndarray:
        """q(p): queries per partition. [P]"""
        return np.diff(self.query_ptr)

    @cached_property
    def segment_partition(self) -> np.ndarray:
        """Partition of each segment. [S]"""
        return np.repeat(np.arange(self.num_partitions), np.diff(self.segment_ptr))

    @cached_property
    def tokens(self) -> np.ndarray:
        """t(p): KV tokens per partition. [P]"""
        return _segment_sum(self.segment_len, self.segment_ptr)

    @cached_property
    def pages(self) -> np.ndarray:
        """Distinct pages holding each partition's tokens. [P]"""
        first = self.segment_pos // self.page_size
        last = (self.segment_pos + self.segment_len - 1) // self.page_size
        return _segment_sum(last - first + 1, self.segment_ptr)

    @cached_property
    def work(self) -> np.ndarray:
        """Visible (query, token) pairs inside each partition. [P]

        Query-guided path chunks hold only visible pairs and dense-mask partitions hold whole
        trees with all their queries, so their work is read off directly; the other strategies
        count every (query, segment) pair.
        """
        if self.strategy in ("flash_attention", "flash_decoding", "radix"):
            return self.tokens  # one query and a chunk of its own path: all visible
        if self.strategy in DENSE_MASK:  # whole trees with all their queries
            return _segment_sum(self.tree.visible_tokens[self.query_index], self.query_ptr)
        pair_query, pair_segment, pair_partition = self._pairs()
        counts = visible_in_segments(self.tree, pair_query, pair_segment, self)
        return np.bincount(pair_partition, weights=counts, minlength=self.num_partitions).astype(
            np.int64
        )

    def _pairs(self):
        """Every (query, segment) pair sharing a partition: query [pairs], segment [pairs], partition [pairs]."""
        q_count = self.queries
        s_count = np.diff(self.segment_ptr)
        pairs_per = q_count * s_count
        partition = np.repeat(np.arange(self.num_partitions), pairs_per)
        rank = ranks(pairs_per)
        s_of = rank % np.repeat(s_count, pairs_per)
        q_of = rank // np.repeat(s_count, pairs_per)
        query = self.query_index[self.query_ptr[partition] + q_of]
        segment = self.segment_ptr[partition] + s_of
        return query, segment, partition

    # ------------------------------------------------------------------ materialised views
    def segment_tokens(self, segments: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Test-layout token indices of the given segments, concatenated in order."""
        node = self.segment_node[segments]
        length = self.segment_len[segments]
        start = self.tree.token_offset[node] + self.segment_pos[segments]
        return ranges(start, length)

    def partition_tokens(self, p: int) -> np.ndarray:
        """Test-layout token indices of partition p, in load order. [t(p)]"""
        return self.segment_tokens(slice(self.segment_ptr[p], self.segment_ptr[p + 1]))

    def partition_queries(self, p: int) -> np.ndarray:
        """Query indices of partition p. [q(p)]"""
        return self.query_index[self.query_ptr[p] : self.query_ptr[p + 1]]

    def partition_sets(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Every partition as (queries, tokens) tuples: the form plan-equality tests compare."""
        return [
            (tuple(self.partition_queries(p).tolist()), tuple(self.partition_tokens(p).tolist()))
            for p in range(self.num_partitions)
        ]


def visible_in_segments(tree: Tree, query: np.ndarray, segment: np.ndarray, plan: Plan) -> np.ndarray:
    """Tokens of each segment that each query sees (pairwise, same shape as `query`)."""
    v = tree.query_node[query]
    j = tree.query_position[query]
    u = plan.segment_node[segment]
    a = plan.segment_pos[segment]
    length = plan.segment_len[segment]
    inside = (tree.tin[u] <= tree.tin[v]) & (tree.tin[v] <= tree.tout[u])
    own = np.clip(j + 1 - a, 0, length)
    return np.where(inside, np.where(u == v, own, length), 0)


# ---------------------------------------------------------------------------- parameters
def check_parameters(strategy: str, chunk_size, group_size, page_size):
    """Resolve defaults and refuse parameters the strategy does not take (ValueError)."""
    record = strategy_record(strategy)
    for name, value in (("chunk_size", chunk_size), ("group_size", group_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise ValueError(f"page_size must be a positive integer, got {page_size!r}")
    if chunk_size is not None and not record.takes_chunk_size:
        raise ValueError(f"{strategy} takes no chunk_size (it does not split KV into chunks)")
    if group_size is not None and not record.takes_group_size:
        raise ValueError(f"{strategy} takes no group_size (only the DeFT strategies group queries)")
    if record.takes_chunk_size and chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    return (
        None if chunk_size is None else int(chunk_size),
        None if group_size is None else int(group_size),
        int(page_size),
    )


# ---------------------------------------------------------------------------- building blocks
@dataclass
class _Sequences:
    """Token sequences made of node segments: sequence k is segments ptr[k]:ptr[k+1]."""

    ptr: np.ndarray
    node: np.ndarray
    pos: np.ndarray
    length: np.ndarray
    source: np.ndarray | None = None  # after `_cut`: the sequence each chunk came from


def _cut(seq: _Sequences, chunk: int | None) -> _Sequences:
    """Cut every sequence into chunks of `chunk` tokens (the last one shorter); None: no cut.

    Returns the chunks as sequences, ordered by source sequence then position, with
    `source` [chunks] naming each chunk's sequence.
    """
    if chunk is None:
        return _Sequences(seq.ptr, seq.node, seq.pos, seq.length, np.arange(len(seq.ptr) - 1))
    count = np.diff(seq.ptr)
    seq_of = np.repeat(np.arange(len(count)), count)
    start = _exclusive_cumsum(seq.length)
    start = start - start[seq.ptr[:-1]][seq_of]  # offset of each segment inside its sequence
    end = start + seq.length
    first_chunk = start // chunk
    last_chunk = (end - 1) // chunk
    pieces = last_chunk - first_chunk + 1
    segment = np.repeat(np.arange(len(start)), pieces)
    chunk_id = ranges(first_chunk, pieces)
    lo = np.maximum(start[segment], chunk_id * chunk)
    hi = np.minimum(end[segment], (chunk_id + 1) * chunk)
    piece_seq = seq_of[segment]
    # a new chunk starts where the sequence or the chunk id changes
    new = np.ones(len(segment), dtype=bool)
    new[1:] = (piece_seq[1:] != piece_seq[:-1]) | (chunk_id[1:] != chunk_id[:-1])
    chunk_starts = np.flatnonzero(new)
    return _Sequences(
        ptr=np.append(chunk_starts, len(segment)),
        node=seq.node[segment],
        pos=seq.pos[segment] + (lo - start[segment]),
        length=hi - lo,
        source=piece_seq[chunk_starts],
    )


def _seeing_queries(tree: Tree, chunks: _Sequences) -> tuple[np.ndarray, np.ndarray]:
    """Queries that see any token of each chunk, in query order: (ptr [chunks+1], index)."""
    num_chunks = len(chunks.ptr) - 1
    chunk_of = np.repeat(np.arange(num_chunks), np.diff(chunks.ptr))
    v = tree.query_node
    j = tree.query_position
    ptr = [0]
    index = []
    # Rows of a [chunks x queries] boolean matrix, in batches to bound memory.
    batch = max(1, 2**24 // max(1, tree.num_queries))
    for lo in range(0, num_chunks, batch):
        hi = min(num_chunks, lo + batch)
        segments = slice(chunks.ptr[lo], chunks.ptr[hi])
        u = chunks.node[segments, None]
        a = chunks.pos[segments, None]
        sees = (tree.tin[u] <= tree.tin[v]) & (tree.tin[v] <= tree.tout[u]) & ((u != v) | (j >= a))
        seen = np.zeros((hi - lo, tree.num_queries), dtype=bool)
        np.logical_or.at(seen, chunk_of[segments] - lo, sees)
        rows, cols = np.nonzero(seen)
        index.append(cols)
        ptr.extend((np.cumsum(np.bincount(rows, minlength=hi - lo)) + ptr[-1]).tolist())
    return np.array(ptr, dtype=np.int64), np.concatenate(index).astype(np.int64)


def _split_groups(query_ptr: np.ndarray, group: int | None):
    """Split each query run into groups of at most `group`; returns (ptr, run_of_group)."""
    count = np.diff(query_ptr)
    if group is None:
        keep = count > 0
        return np.append(query_ptr[:-1][keep], query_ptr[-1]), np.flatnonzero(keep)
    groups = -(-count // group)
    run = np.repeat(np.arange(len(count)), groups)
    return np.append(query_ptr[run] + ranks(groups) * group, query_ptr[-1]), run


def _kv_guided(tree: Tree, chunks: _Sequences, group: int | None, **params) -> Plan:
    """Partitions = chunk x group of the queries that see it (DeFT-Node, -Node-Chunk, -Flatten)."""
    seen_ptr, seen = _seeing_queries(tree, chunks)
    query_ptr, chunk_of = _split_groups(seen_ptr, group)
    return _assemble(tree, chunks, chunk_of, query_ptr, seen, **params)


def _query_guided(tree: Tree, chunks: _Sequences, query_of_chunk: np.ndarray, **params) -> Plan:
    """Partitions = one query x one chunk (Flash-Attention, Flash-Decoding, Radix, Tree-S)."""
    num = len(query_of_chunk)
    return _assemble(
        tree, chunks, np.arange(num), np.arange(num + 1), query_of_chunk.astype(np.int64), **params
    )


def _assemble(tree, chunks, chunk_of, query_ptr, query_index, **params) -> Plan:
    """A Plan whose partition k has the queries query_ptr[k]:.. and the segments of chunk chunk_of[k]."""
    seg_count = np.diff(chunks.ptr)[chunk_of]
    segment = ranges(chunks.ptr[:-1][chunk_of], seg_count)
    return Plan(
        tree=tree,
        query_ptr=np.asarray(query_ptr, dtype=np.int64),
        query_index=np.asarray(query_index, dtype=np.int64),
        segment_ptr=np.concatenate([[0], np.cumsum(seg_count)]).astype(np.int64),
        segment_node=chunks.node[segment],
        segment_pos=chunks.pos[segment],
        segment_len=chunks.length[segment],
        **params,
    )


def _query_paths(tree: Tree) -> _Sequences:
    """Each query's visible tokens, root first, as one sequence per query.

    Vectorised over queries: one step up the tree per level of the deepest query.
    """
    v = tree.query_node.copy()
    count = tree.depth[v] + 1
    ptr = np.concatenate([[0], np.cumsum(count)])
    node = np.empty(ptr[-1], dtype=np.int64)
    at = ptr[1:] - 1  # fill each path from its own node up to the root
    active = np.arange(len(v))
    while len(active):
        node[at[active]] = v[active]
        v[active] = tree.parent[v[active]]
        at[active] -= 1
        active = active[v[active] >= 0]
    length = tree.tokens[node]
    length[ptr[1:] - 1] = tree.query_position + 1
    return _Sequences(ptr, node, np.zeros_like(node), length)


def _flattened(tree: Tree, nodes: np.ndarray) -> _Sequences:
    """The given nodes' whole token runs as one sequence, in the order given."""
    nodes = np.asarray(nodes, dtype=np.int64)
    return _Sequences(np.array([0, len(nodes)]), nodes, np.zeros_like(nodes), tree.tokens[nodes])


def _trees_flattened(tree: Tree) -> _Sequences:
    """One sequence per tree of the forest, each in flattened (DFS preorder) order."""
    order = tree.preorder
    tree_of = tree.tree_of[order]
    ptr = np.searchsorted(tree_of, np.arange(len(tree.roots) + 1))
    return _Sequences(ptr, order, np.zeros_like(order), tree.tokens[order])


# ---------------------------------------------------------------------------- the planners
def build_plan(strategy: str, tree: Tree, chunk_size=None, group_size=None, page_size=1) -> Plan:
    """The partitions of `strategy` over `tree` (docs/design.md's partition table).

    Raises ValueError for an unknown strategy or a parameter the strategy refuses.
    """
    chunk, group, page_size = check_parameters(strategy, chunk_size, group_size, page_size)
    params = dict(strategy=strategy, chunk_size=chunk, group_size=group, page_size=page_size)
    if strategy in ("flash_attention", "flash_decoding", "radix"):
        chunks = _cut(_query_paths(tree), chunk)
        return _query_guided(tree, chunks, chunks.source, **params)
    if strategy == "tree_attention_s":
        # every query takes every chunk of its own tree; a tree's chunks are consecutive
        per_tree = _cut(_trees_flattened(tree), chunk)
        first = np.searchsorted(per_tree.source, np.arange(len(tree.roots) + 1))
        tree_of_query = tree.tree_of[tree.query_node]
        start, count = first[tree_of_query], np.diff(first)[tree_of_query]
        chunks = _select(per_tree, ranges(start, count))
        return _query_guided(tree, chunks, np.repeat(np.arange(tree.num_queries), count), **params)
    if strategy == "tree_attention_m":
        return _kv_guided(tree, _trees_flattened(tree), None, **params)
    if strategy == "vanilla_tree":
        return _kv_guided(tree, _flattened(tree, tree.preorder), None, **params)
    if strategy in ("deft_node", "deft_node_chunk"):
        nodes = np.arange(tree.num_nodes)
        per_node = _Sequences(np.arange(tree.num_nodes + 1), nodes, np.zeros_like(nodes), tree.tokens.copy())
        return _kv_guided(tree, _cut(per_node, chunk), group, **params)
    # deft_flatten: the whole forest's flattened order cut into even blocks
    return _kv_guided(tree, _cut(_flattened(tree, tree.preorder), chunk), group, **params)


def _select(seq: _Sequences, chosen: np.ndarray) -> _Sequences:
    """The sequences `chosen` (with repeats), in that order."""
    count = np.diff(seq.ptr)[chosen]
    segment = ranges(seq.ptr[:-1][chosen], count)
    return _Sequences(
        np.concatenate([[0], np.cumsum(count)]), seq.node[segment], seq.pos[segment], seq.length[segment]
    )


def ranks(counts: np.ndarray) -> np.ndarray:
    """0..count-1 for each count, concatenated. [sum(counts)]"""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) - np.repeat(ends - counts, counts)


def ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """start..start+count-1 for each pair, concatenated. [sum(counts)]"""
    return np.repeat(starts, counts) + ranks(counts)


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


def _segment_sum(values: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    return np.add.reduceat(np.append(values, 0), ptr[:-1]) * (np.diff(ptr) > 0)
