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
    tokens = tree.tokens[order]
    queries = tree.queries[order]
    token_end = np.cumsum(tokens)  # flattened end of each node's tokens, in preorder
    total, nodes = int(token_end[-1]), len(tokens)
    subtree_last = np.append(tree.tout[order], nodes)  # preorder position of its last node
    queries_before = np.cumsum(queries)  # queries at flattened positions below token_end
    sizes = np.asarray(chunks, dtype=np.int64)
    counts = -(-total // sizes)
    ends = np.cumsum(counts)  # past the last chunk of each size
    size_of = np.repeat(np.arange(len(sizes)), counts)
    start = (np.arange(ends[-1]) - (ends - counts)[size_of]) * sizes[size_of]
    first_node = np.searchsorted(token_end, start, side="right")
    # a chunk's last node: the next chunk's first, one before where that chunk starts a node
    next_first = first_node[1:]
    last_node = np.append(next_first - (start[1:] == (token_end - tokens)[next_first]), 0)
    last_node[ends - 1] = nodes - 1
    # the farthest subtree end over first_node..last_node: one reduceat over every size's
    # chunks, each size's run closed by a stop at the padding past the last node
    slot = np.arange(ends[-1]) + size_of
    index = np.full(ends[-1] + len(sizes), nodes)
    index[slot] = first_node
    reach = np.maximum(np.maximum.reduceat(subtree_last, index)[slot], subtree_last[last_node])
    # a node's queries sit on its last tokens: those at or past the chunk's start see it
    on_first = np.minimum(queries[first_node], token_end[first_node] - start)
    seen = queries_before[reach] - queries_before[first_node] + on_first
    parts = ((seen > 0) if group_size is None else -(-seen // group_size)).astype(np.int64)
    heads = tree.attention.kv_heads
    return np.add.reduceat(parts, ends - counts) * heads, parts[ends - 1] * heads


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
    rest = tree.num_tokens - (-(-tree.num_tokens // sizes) - 1) * sizes  # the last chunk's
    load = (-(-items // programs) * (rest + overhead)
            + -(-(items - last) // programs) * (sizes - rest))
    cost = load * np.where(items <= small_grid_sms, small_grid_cost, 1.0)
    return int(chunks[int(np.argmin(cost))])
