"""The chunk that runs DeFT-Flatten's work items in the fewest, shortest waves.

The partials kernel runs a persistent grid of ``programs`` (SMs x programs per SM) over
partitions x KV heads work items, program p taking items p, p + programs, ... in plan order
(chunk after chunk, every partition of a chunk as long as the chunk, the tree's last chunk the
rest of its tokens). An item streams its partition's KV tokens and pays a fixed cost worth
about `ITEM_OVERHEAD` tokens. The kernel ends with its busiest program, program 0, which takes
``ceil(items / programs)`` items, ``ceil(items before the last chunk's / programs)`` of them
full chunks. So `wave_chunk` takes, of `WAVE_CHUNKS`, the chunk with the least such load,
counting the items of the tree at hand exactly (`flatten_work_items`): a tuned table's chunk,
tuned on a tree of other tokens per work item, does not carry over (docs/autotune.md, "Session
7"), its group size does.

On Hopper a plan of at most one work item per SM runs the small-grid kernel, whose items do
not share an SM: such a chunk's cost is counted at `SMALL_GRID_COST` (``small_grid_sms``).

Measured on an H200 (docs/autotune.md): the rule as session 7 first wrote it (every item a full
chunk, no small-grid term) held 41 of 49 held-out tree-shapes within 5% of the best chunk x
group (the stored chunks: 28); with the small-grid term, session 8's sweep with the table
tuned for it, 61 of 63. Counting the last chunk's items at their length (session 8) picks the
same chunk on every one of those rows and mends spec_t256 at 32/8 and 16/2, where the last
chunk's short items filled the second wave (c768 ran 1.23x the best, c2048, on its own tuning
tree). `ITEM_OVERHEAD` and the least chunk were chosen on the tuning run's log alone.
"""

from __future__ import annotations

import numpy as np

from deft.compiled_plan import compiled
from deft.tree import Tree

WAVE_CHUNKS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
"""Chunks `wave_chunk` chooses from: the tuner's from 64. Chosen on tuning rows of today's
kernel (`scripts/scan_wave_rule.py`, docs/autotune.md, session 13): from 64, 34 of 36 within
5% of the best (from 128: 28; one-KV-head reasoning steps of short branches want 64), held
out 86 of 94 (from 128: 82). On an older kernel's tuning log (session 7) 64 had lost, 38 of 52
against 50: its partials' merge then outweighed the fuller grid."""

ITEM_OVERHEAD = 256
"""Fixed cost of one work item, in KV tokens streamed in the same time."""

SMALL_GRID_COST = 0.65
"""Time of a work item where the plan has at most one per SM (Hopper's small-grid kernel: one
CTA per SM, its consumer pipelined, `deft.kernels.deft_flatten_sm90`) over its time in a wave of
two CTAs per SM, which share the SM. Measured on an H200 (session 7, docs/autotune.md): the
one-CTA kernel over the two-CTA one on anchors of 132-264 items, two rounds against one, gives
0.57-0.62; the fresh sweep's tuning rows are all within 5% for 0.6-0.7 (this is its middle)."""


def flatten_work_items(tree: Tree, chunks, group_size: int | None) -> np.ndarray:
    """Work items (partitions x KV heads) of deft_flatten's plan of `tree` at each chunk size,
    exactly as `deft.plan.build_plan` partitions it: `work_items`' first array."""
    return work_items(tree, chunks, group_size)[0]


def work_items(tree: Tree, chunks, group_size: int | None) -> tuple:
    """Work items (partitions x KV heads) of deft_flatten's plan of `tree` at each chunk size,
    and those of its last chunk, exactly as `deft.plan.build_plan` partitions it.

    A chunk is a run ``[a, b)`` of the flattened (DFS preorder) tokens; a query at flattened
    position F sees it iff ``a <= F < max(subtree end of its nodes)``, and its seeing queries
    split into ``ceil(seen / group_size)`` partitions (one where no group cap, none where no
    query sees it).

    Parameters
    ----------
    tree : Tree
    chunks : sequence of int
        Chunk sizes (tokens), each >= 1.
    group_size : int or None

    Returns
    -------
    (all, last) : int64 [len(chunks)] each
        Every chunk's work items, and the last chunk's (the tree's last tokens).
    """
    order = tree.preorder
    sizes = np.asarray(chunks, dtype=np.int64)
    return chunk_items(tree.tokens[order], tree.queries[order], tree.tout[order], sizes,
                       group_size or 0, tree.attention.kv_heads)


@compiled
def chunk_items(tokens, queries, subtree_last, sizes, group_size, kv_heads):
    """`work_items` over the nodes in preorder: their tokens and queries, and the preorder
    position of each one's last descendant (int64 [nodes] each); ``group_size`` 0 for no cap.
    One pass over the chunks of each size, a node pointer moving along (no per-size arrays)."""
    nodes = len(tokens)
    token_end = np.cumsum(tokens)  # flattened end of each node's tokens
    queries_before = np.cumsum(queries)  # queries on the nodes up to each, inclusive
    total = token_end[-1]
    items = np.zeros(len(sizes), np.int64)
    last = np.zeros(len(sizes), np.int64)
    for k in range(len(sizes)):
        size = sizes[k]
        first = 0
        for start in range(0, total, size):
            while token_end[first] <= start:  # the node holding the chunk's first token
                first += 1
            end = min(start + size, total)
            reach = subtree_last[first]
            node = first
            while token_end[node] < end:  # through the node holding its last token
                node += 1
                reach = max(reach, subtree_last[node])
            # a node's queries sit on its last tokens: those at or past the chunk's start
            # see it, and every query of the nodes past it up to the farthest subtree end
            seen = queries_before[reach] - queries_before[first] \
                + min(queries[first], token_end[first] - start)
            if group_size:
                parts = (seen + group_size - 1) // group_size
            else:
                parts = 1 if seen > 0 else 0
            items[k] += parts * kv_heads
            last[k] = parts * kv_heads
    return items, last


def wave_chunk(tree: Tree, group_size: int | None, programs: int,
               chunks=WAVE_CHUNKS, overhead: int = ITEM_OVERHEAD, small_grid_sms: int = 0,
               small_grid_cost: float = SMALL_GRID_COST) -> int:
    """The chunk of `chunks` with the least load of program 0 (module docstring): its items'
    tokens plus `overhead` each, a full chunk but on the last chunk's items; that load times
    `small_grid_cost` where the items fit ``small_grid_sms``; the smaller chunk on a tie.

    Parameters
    ----------
    tree : Tree
    group_size : int or None
        The group cap the plan will use.
    programs : int
        Resident programs of the card (`deft.kernels.fill.resident_programs`).
    chunks : sequence of int, ascending
    overhead : int
        Fixed cost of a work item, in tokens (`ITEM_OVERHEAD`).
    small_grid_sms : int
        The SMs where plans of at most that many items run the small-grid kernel (0: none).
    small_grid_cost : float
        `SMALL_GRID_COST`, or another value to replay the rule with (scripts/scan_wave_rule.py).
    """
    programs = max(1, int(programs))
    groups = 1 if group_size is None else -(-tree.num_queries // group_size)
    most = -(-tree.num_tokens // chunks[0]) * groups * tree.attention.kv_heads
    if most <= (small_grid_sms or programs):
        return int(chunks[0])  # at most that many items: one wave at the least chunk, unbeaten
    sizes = np.asarray(chunks, dtype=np.int64)
    items, last = work_items(tree, sizes, group_size)
    return int(chunks[least_load(items, last, sizes, tree.num_tokens, programs, overhead,
                                 small_grid_sms, float(small_grid_cost))])


@compiled
def least_load(items, last, sizes, tokens, programs, overhead, small_grid_sms,
               small_grid_cost):
    """Index of the chunk size whose program 0 carries the least load (`wave_chunk`): every
    item of it ``rest + overhead`` tokens (``rest`` the last chunk's), those past the last
    chunk's ``size - rest`` more; times ``small_grid_cost`` where the items fit
    ``small_grid_sms``. The first on a tie. items, last, sizes : int64 [sizes]"""
    best, best_cost = 0, np.inf
    for k in range(len(sizes)):
        rest = tokens - ((tokens + sizes[k] - 1) // sizes[k] - 1) * sizes[k]
        load = (items[k] + programs - 1) // programs * (rest + overhead) \
            + (items[k] - last[k] + programs - 1) // programs * (sizes[k] - rest)
        cost = load * (small_grid_cost if items[k] <= small_grid_sms else 1.0)
        if cost < best_cost:
            best, best_cost = k, cost
    return best
