"""A plan's per-partition aggregates without its partitions: what the IO model reads, at any size.

`build_plan` lists every partition's queries and segments, which for a million queries over a
million-token prefix is billions of entries. The IO model needs only t(p), q(p), pages(p) and
work(p) (`deft.plan.Plan`), and partitions come in few distinct kinds: `plan_aggregates` gives
them as *classes*, rows of equal (tokens, queries, pages, work) with the number of partitions
each stands for, in closed form per chunk, node or query, never per (query, token).

Closed forms cover every strategy and size: KV-guided strategies per chunk (their query groups
in `deft.group_aggregates`), flash_attention, flash_decoding and radix per node and query,
tree_attention_s per query node and query. radix with a page size that does not divide the
chunk builds its plan. Trees past `QUERY_LIMIT` queries (query-guided strategies) or
`ENTRY_LIMIT` chunk segments, ancestor pairs or plan entries are refused before anything that
size is allocated (ValueError naming the size and the limit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The plan builder's chunk sequences: the aggregates cut exactly the chunks `build_plan` cuts.
from deft.group_aggregates import group_classes
from deft.plan import _cut, _flattened, _Sequences, _trees_flattened, build_plan, check_parameters
from deft.strategies import PAGED
from deft.strategies import strategy as strategy_record
from deft.tree import Tree

QUERY_LIMIT = 2**22
"""Most queries of a tree whose query-guided aggregates are computed (a few int64 per query)."""

ENTRY_LIMIT = 2**23
"""Most chunk segments, (query node, ancestor) pairs or materialised plan entries per call."""


@dataclass(frozen=True)
class PlanAggregates:
    """The partitions of `strategy` over `tree` as classes of equal aggregates.

    Attributes
    ----------
    tokens, queries, pages, work : int64 [K]
        t(p), q(p), distinct pages (paged strategies; 0 for the others) and visible
        (query, token) pairs of the partitions of each class.
    count : int64 [K]
        Partitions in each class (at least 1).
    """

    tree: Tree
    strategy: str
    chunk_size: int | None
    group_size: int | None
    page_size: int
    tokens: np.ndarray
    queries: np.ndarray
    pages: np.ndarray
    work: np.ndarray
    count: np.ndarray

    @property
    def num_partitions(self) -> int:
        return int(self.count.sum())

    @property
    def mask(self) -> str:
        return strategy_record(self.strategy).mask

    @property
    def has_reduction(self) -> bool:
        return strategy_record(self.strategy).reduction


def plan_aggregates(strategy: str, tree: Tree, chunk_size=None, group_size=None,
                    page_size=1) -> PlanAggregates:
    """The aggregates of ``build_plan(strategy, tree, chunk_size, group_size, page_size)``.

    Raises ValueError for a size the strategy refuses, and for a tree too large to aggregate
    (the message gives the size and the limit).
    """
    chunk, group, page = check_parameters(strategy, chunk_size, group_size, page_size)
    params = dict(tree=tree, strategy=strategy, chunk_size=chunk, group_size=group,
                  page_size=page)
    paged = strategy in PAGED
    if strategy in ("flash_attention", "flash_decoding", "radix", "tree_attention_s"):
        _check_size(strategy, "queries", tree.num_queries, QUERY_LIMIT)
    if strategy == "tree_attention_s":
        return PlanAggregates(**params, **_tree_chunk_classes(tree, chunk))
    if strategy == "radix" and page > 1 and chunk % page:
        return _radix_plan(params, tree)
    if strategy in ("flash_attention", "flash_decoding", "radix"):
        return PlanAggregates(**params, **_query_path_classes(strategy, tree, chunk, page))
    chunks = _kv_chunks(strategy, tree, chunk)
    _check_size(strategy, "chunk segments", len(chunks.node), ENTRY_LIMIT)
    seeing, work = _kv_seeing(tree, chunks)
    tokens = _segment_sums(chunks.length, chunks.ptr)
    pages = (_segment_sums(_pages(chunks.pos, chunks.length, page), chunks.ptr) if paged
             else np.zeros_like(tokens))
    if group is not None:
        holders = np.flatnonzero(tree.queries > 0)
        pairs = int(tree.depth[holders].sum())
        _check_size(strategy, "(query node, ancestor) pairs", pairs, ENTRY_LIMIT)
        classes = group_classes(tree, chunks, seeing, tokens, pages, group,
                                *_ancestor_pairs(tree, holders))
        return PlanAggregates(**params, **classes)
    kept = seeing > 0
    return PlanAggregates(**params, tokens=tokens[kept], queries=seeing[kept], pages=pages[kept],
                          work=work[kept], count=np.ones(int(kept.sum()), dtype=np.int64))


def aggregates_of_plan(plan) -> PlanAggregates:
    """A built plan's aggregates, one class a partition."""
    pages = plan.pages if plan.strategy in PAGED else np.zeros(plan.num_partitions, np.int64)
    return PlanAggregates(plan.tree, plan.strategy, plan.chunk_size, plan.group_size,
                          plan.page_size, plan.tokens, plan.queries, pages, plan.work,
                          np.ones(plan.num_partitions, dtype=np.int64))


def _check_size(strategy: str, what: str, size: int, limit: int) -> None:
    if size > limit:
        raise ValueError(f"{strategy}: the tree needs {size} {what}, beyond the {limit} the IO "
                         "model aggregates at once")


def _radix_plan(params: dict, tree: Tree) -> PlanAggregates:
    """radix with a page size that does not divide the chunk: the built plan's aggregates.

    (Its full chunks then hold varying page counts.) Refused past `ENTRY_LIMIT` partitions
    and path segments.
    """
    chunk, page = params["chunk_size"], params["page_size"]
    entries = int(tree.visible_token_sum // chunk + tree.num_queries * (tree.depth.max() + 2))
    if entries > ENTRY_LIMIT:
        raise ValueError(
            f"radix with page_size={page} not dividing chunk_size={chunk}: the plan needs "
            f"{entries} entries, beyond the {ENTRY_LIMIT} the IO model builds; a page size "
            "that divides the chunk size needs none"
        )
    return aggregates_of_plan(build_plan("radix", tree, chunk, None, page))


# ---------------------------------------------------------------------------- KV-guided
def _kv_chunks(strategy: str, tree: Tree, chunk: int | None) -> _Sequences:
    """The chunks `build_plan` cuts for a KV-guided strategy (one partition each, no group)."""
    if strategy == "tree_attention_m":
        return _trees_flattened(tree)
    if strategy in ("vanilla_tree", "deft_flatten"):
        return _cut(_flattened(tree, tree.preorder), chunk)
    nodes = np.arange(tree.num_nodes)
    return _cut(_Sequences(np.arange(tree.num_nodes + 1), nodes, np.zeros_like(nodes),
                           tree.tokens.copy()), chunk)


def _kv_seeing(tree: Tree, chunks: _Sequences) -> tuple[np.ndarray, np.ndarray]:
    """Queries that see each chunk and the visible pairs inside it. ([chunks], [chunks])

    A segment (u, a, len) is seen by every query below u and by u's queries on positions
    j >= a (those see min(j + 1 - a, len) of it). A chunk's segments run in preorder, so a
    segment whose node lies below an earlier segment's node adds no new query.
    """
    u, a, length = chunks.node, chunks.pos, chunks.length
    t, q = tree.tokens[u], tree.queries[u]
    below = tree.subtree_queries[u] - q
    first = t - q  # position of u's first query
    own_seeing = q - np.clip(a - first, 0, q)
    # own pairs: sum over j in [first, t) of clip(j + 1 - a, 0, len) = S(t - a) - S(first - a)
    work = below * length + _clipped_sum(t - a, length) - _clipped_sum(first - a, length)
    chunk_of = np.repeat(np.arange(len(chunks.ptr) - 1), np.diff(chunks.ptr))
    # the largest tout of the earlier segments of the same chunk (chunk ids keep it per chunk)
    span = tree.num_nodes + 1
    reach = np.maximum.accumulate(chunk_of * span + tree.tout[u])
    earlier = np.concatenate([[-1], reach[:-1]])
    covered = earlier - chunk_of * span >= tree.tin[u]
    covered &= np.concatenate([[False], chunk_of[1:] == chunk_of[:-1]])
    seeing = np.where(covered, 0, below + own_seeing)
    return _segment_sums(seeing, chunks.ptr), _segment_sums(work, chunks.ptr)


def _clipped_sum(y: np.ndarray, length: np.ndarray) -> np.ndarray:
    """sum over x = 1..y of min(x, length), 0 where y <= 0. [...]"""
    y = np.maximum(y, 0)
    inside = np.minimum(y, length)
    return inside * (inside + 1) // 2 + (y - inside) * length


# ---------------------------------------------------------------------------- query paths
def _query_path_classes(strategy: str, tree: Tree, chunk: int | None, page: int) -> dict:
    """flash_attention, flash_decoding and radix: each query's path cut into chunks.

    A chunk that closes inside node u (path offsets are multiples of `chunk`) is the same for
    every query below u; a query's own node adds at most three kinds: the chunk it shares with
    its ancestors' open tail, full chunks, and a last short one. Work equals tokens (a path
    holds only visible tokens) and every partition has one query.
    """
    paged = strategy in PAGED
    v, j = tree.query_node, tree.query_position
    before = tree.ancestor_tokens[v]
    if chunk is None:  # flash_attention: the whole path is one partition
        pages = (_ancestor_pages(tree, page)[v] + _pages(0, j + 1, page)) if paged else 0 * j
        return _one_query_classes([(before + j + 1, pages, 1)], paged, work_is_tokens=True)
    open_pages = _open_pages(tree, chunk, page) if paged else np.zeros(tree.num_nodes, np.int64)
    parent = tree.parent[v]
    tail_pages = np.where(parent >= 0, open_pages[np.maximum(parent, 0)], 0)
    tail = before % chunk
    first = np.minimum(chunk - tail, j + 1)  # own tokens in the chunk shared with the tail
    rest = j + 1 - first
    full, last = rest // chunk, rest % chunk
    kinds = [
        (tail + first, tail_pages + _pages(0, first, page), 1),
        (np.full_like(full, chunk), _pages(first, chunk, page), full),
        (last, _pages(first + full * chunk, last, page), last > 0),
    ]
    kinds.append(_closed_chunks(strategy, tree, chunk, page, open_pages))
    return _one_query_classes(kinds, paged, work_is_tokens=True)


def _closed_chunks(strategy: str, tree: Tree, chunk: int, page: int, open_pages: np.ndarray):
    """Chunks closing inside each node, counted once per query below it: (tokens, pages, count)."""
    start = tree.ancestor_tokens
    closing = tree.path_tokens // chunk - start // chunk  # chunk ends in (start, start + t]
    weight = tree.subtree_queries - tree.queries
    keep = (closing > 0) & (weight > 0)
    nodes = np.flatnonzero(keep)
    closing = closing[nodes]
    _check_size(strategy, "chunks closing inside nodes", int(closing.sum()), ENTRY_LIMIT)
    node = np.repeat(nodes, closing)
    rank = np.arange(len(node)) - np.repeat(np.cumsum(closing) - closing, closing)
    end = (start[node] // chunk + 1 + rank) * chunk - start[node]  # node offset where it ends
    begin = np.maximum(end - chunk, 0)
    parent = tree.parent[node]
    inherited = np.where((rank == 0) & (parent >= 0), open_pages[np.maximum(parent, 0)], 0)
    pages = inherited + _pages(begin, end - begin, page)
    return np.full(len(node), chunk), pages, weight[node]


def _open_pages(tree: Tree, chunk: int, page: int) -> np.ndarray:
    """Pages of the unfinished last chunk at the end of each node's path. [nodes]"""
    start, end = tree.ancestor_tokens, tree.path_tokens
    tail = end % chunk
    if page == 1:
        return tail
    inside = end - tail >= start  # the open chunk begins inside the node
    own = _pages(np.where(inside, tree.tokens - tail, 0), np.where(inside, tail, tree.tokens),
                 page)
    open_pages = own.copy()
    for v in tree.preorder:  # a chunk still open across the node carries the parent's pages
        p = tree.parent[v]
        if not inside[v] and p >= 0:
            open_pages[v] += open_pages[p]
    return open_pages


def _ancestor_pages(tree: Tree, page: int) -> np.ndarray:
    """Pages of the strict ancestors of each node, each node on its own pages. [nodes]"""
    if page == 1:
        return tree.ancestor_tokens
    node_pages = _pages(0, tree.tokens, page)
    above = np.zeros(tree.num_nodes, dtype=np.int64)
    for v in tree.preorder:
        p = tree.parent[v]
        if p >= 0:
            above[v] = above[p] + node_pages[p]
    return above


# ---------------------------------------------------------------------------- tree_attention_s
def _tree_chunk_classes(tree: Tree, chunk: int) -> dict:
    """tree_attention_s: every query against every chunk of its tree's flattened order.

    A query's path covers its ancestors' flattened runs (all before its own node's run) and
    the first j + 1 tokens of its own; per query node the ancestor runs give full chunks and
    boundary chunks, the own run up to four kinds (the chunk where it starts, full chunks, a
    short last one, and the untouched chunks).
    """
    roots = tree.roots[tree.tree_of]
    local = tree.flat_offset - tree.flat_offset[roots]  # flattened offset inside its tree
    size = np.bincount(tree.tree_of, tree.tokens).astype(np.int64)[tree.tree_of]  # tree tokens
    chunks = -(-size // chunk)
    last_tokens = size - (chunks - 1) * chunk

    def tokens_of(c, node):
        return np.where(c == chunks[node] - 1, last_tokens[node], chunk)

    # ancestor runs per query node
    holders = np.flatnonzero(tree.queries > 0)
    pairs = int(tree.depth[holders].sum())
    _check_size("tree_attention_s", "(query node, ancestor) pairs", pairs, ENTRY_LIMIT)
    holder, ancestor = _ancestor_pairs(tree, holders)
    home = local // chunk  # chunk where each node's own run starts
    s, e = local[ancestor], local[ancestor] + tree.tokens[ancestor]
    cs, ce = s // chunk, (e - 1) // chunk
    interior = np.maximum(ce - cs - 1, 0)
    split = ce > cs
    b_holder = np.concatenate([holder, holder[split]])
    b_chunk = np.concatenate([cs, ce[split]])
    b_work = np.concatenate([np.where(split, (cs + 1) * chunk, e) - s, (e - ce * chunk)[split]])
    at_home = b_chunk == home[b_holder]
    shared = np.bincount(b_holder[at_home], b_work[at_home], tree.num_nodes).astype(np.int64)
    b_holder, b_chunk, b_work = b_holder[~at_home], b_chunk[~at_home], b_work[~at_home]
    key, inverse = np.unique(b_holder * (int(chunks.max()) + 1) + b_chunk, return_inverse=True)
    merged_holder = key // (int(chunks.max()) + 1)
    merged_work = np.bincount(inverse, b_work, len(key)).astype(np.int64)
    touched = (np.bincount(merged_holder, minlength=tree.num_nodes)
               + np.bincount(holder, interior, tree.num_nodes).astype(np.int64))
    q = tree.queries
    kinds = [
        (np.full(1, chunk), np.full(1, chunk), np.array([int((interior * q[holder]).sum())])),
        (np.full(len(key), chunk), merged_work, q[merged_holder]),
    ]
    # the own run of each query
    v, j = tree.query_node, tree.query_position
    c0 = home[v]
    first = np.minimum((c0 + 1) * chunk - local[v], j + 1)
    rest = j + 1 - first
    full, last = rest // chunk, rest % chunk
    end_chunk = c0 + full + (last > 0)
    untouched = chunks[v] - (1 + full + (last > 0)) - touched[v]
    last_untouched = (end_chunk < chunks[v] - 1).astype(np.int64)
    kinds += [
        (tokens_of(c0, v), shared[v] + first, 1),
        (np.full_like(full, chunk), np.full_like(full, chunk), full),
        (tokens_of(end_chunk, v), last, last > 0),
        (np.full_like(full, chunk), 0 * full, untouched - last_untouched),
        (last_tokens[v], 0 * full, last_untouched),
    ]
    return _one_query_classes(kinds, paged=False, work_is_tokens=False)


def _ancestor_pairs(tree: Tree, holders: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (node, strict ancestor) pair of the given nodes, sorted by node. ([pairs], [pairs])"""
    holder, ancestor = [], []
    current, at = tree.parent[holders], holders
    while len(at):
        up = current >= 0
        at, current = at[up], current[up]
        holder.append(at)
        ancestor.append(current)
        current = tree.parent[current]
    holder, ancestor = np.concatenate(holder), np.concatenate(ancestor)
    order = np.argsort(holder, kind="stable")
    return holder[order], ancestor[order]


# ---------------------------------------------------------------------------- helpers
def _one_query_classes(kinds, paged: bool, work_is_tokens: bool) -> dict:
    """Classes of one-query partitions from (tokens, value, count) triples, equal rows merged.

    `value` is the pages (``work_is_tokens``: a query-guided path, which sees all its tokens)
    or the work (tree_attention_s, which pays no pages). Classes of count 0 are dropped.
    """
    shapes = [np.shape(t) or (1,) for t, _, _ in kinds]
    tokens = np.concatenate([np.broadcast_to(t, n) for (t, _, _), n in zip(kinds, shapes)])
    value = np.concatenate([np.broadcast_to(x, n) for (_, x, _), n in zip(kinds, shapes)])
    count = np.concatenate([np.broadcast_to(np.asarray(c, dtype=np.int64), n)
                            for (_, _, c), n in zip(kinds, shapes)])
    keep = count > 0
    tokens, value, count = tokens[keep], value[keep], count[keep]
    if work_is_tokens and not paged:
        value = np.zeros_like(value)
    radix = int(value.max(initial=0)) + 1
    key, inverse = np.unique(tokens * radix + value, return_inverse=True)
    count = np.bincount(inverse, count, len(key)).astype(np.int64)
    tokens, value = key // radix, key % radix
    zero = np.zeros_like(tokens)
    return {"tokens": tokens, "queries": np.ones_like(tokens),
            "pages": value if work_is_tokens else zero,
            "work": tokens if work_is_tokens else value, "count": count}


def _pages(pos, length, page: int):
    """Pages holding `length` tokens from position `pos` of a node (0 for no token)."""
    length = np.asarray(length)
    return np.where(length > 0, (pos + length - 1) // page - pos // page + 1, 0)


def _segment_sums(values: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Sums of consecutive runs ptr[k]:ptr[k+1] (all runs non-empty). [runs]"""
    return np.add.reduceat(values, ptr[:-1]).astype(np.int64)
