"""Masked tile steps of DeFT-Flatten: the (query tile, KV tile) steps the kernel masks.

The Gluon kernel (`deft.kernels.deft_flatten_sm90`, ``MASK_FREE``; its small-grid form alike)
skips the Euler-tour mask on a KV tile that every real row of the query tile sees whole, by
one branch per tile (`deft.kernels.deft_flatten_sm90_tiles.mask_unless_whole`): a tile whose
first flattened position is ``a`` is mask-free iff ``a + kv_tile - 1 <= min F`` and ``max F <
min subtree_end[a : a + kv_tile]`` over the query tile's query positions F. A partition's
tiles start at its first flattened position and step by ``kv_tile``; columns past the
partition read subtree_end 0, so its last tile, when short, is always masked. A query tile is
``queries_per_tile`` consecutive entries of the partition (its queries in plan order). The
portable Triton kernel masks every tile.

`masked_steps` counts them on a built plan; `PlanAggregates` hold no positions, so
`kernel_model` counts on the plan the aggregates stand for (`partitions_of`), built when its
entries are at most `PLAN_LIMIT`, and past that bounds the count from the aggregates
(`masked_steps_bound`).
"""

from __future__ import annotations

import weakref

import numpy as np

from deft.plan import Plan, build_plan, ranks
from deft.plan_aggregates import PlanAggregates

PLAN_LIMIT = 2**20
"""Most entries (partition x query pairs) of a plan `partitions_of` builds from aggregates."""

_COUNTED = weakref.WeakKeyDictionary()
"""Counts already made, per plan and (queries_per_tile, kv_tile): the refit predicts each plan
hundreds of times."""


def masked_steps(plan: Plan, queries_per_tile: int, kv_tile: int) -> np.ndarray:
    """Masked (query tile, KV tile) steps of each partition's work item under the Gluon
    kernel's rule (the module docstring). [P]"""
    key = (queries_per_tile, kv_tile)
    counted = _COUNTED.setdefault(plan, {})
    if key not in counted:
        counted[key] = _count(plan, queries_per_tile, kv_tile)
    return counted[key]


def _count(plan: Plan, queries_per_tile: int, kv_tile: int) -> np.ndarray:
    tree = plan.tree
    first = plan.segment_ptr[:-1]
    start = tree.flat_offset[plan.segment_node[first]] + plan.segment_pos[first]  # [P]
    # query tiles: blocks of queries_per_tile entries, each its lowest and highest position
    q_tiles = -(-plan.queries // queries_per_tile)  # [P]
    block = plan.query_ptr[:-1].repeat(q_tiles) + ranks(q_tiles) * queries_per_tile
    query_flat = (tree.flat_offset[tree.query_node] + tree.query_position)[plan.query_index]
    lowest = np.minimum.reduceat(query_flat, block) if len(block) else block
    highest = np.maximum.reduceat(query_flat, block) if len(block) else block
    # KV tiles: each one's first position and, when whole, its lowest subtree_end
    kv_tiles = -(-plan.tokens // kv_tile)  # [P]
    steps = q_tiles * kv_tiles
    partition = np.repeat(np.arange(plan.num_partitions), steps)
    local = ranks(steps)
    q_tile = np.repeat(np.cumsum(q_tiles) - q_tiles, steps) + local // np.repeat(kv_tiles, steps)
    k = local % np.repeat(kv_tiles, steps)
    whole = (k + 1) * kv_tile <= plan.tokens[partition]
    first_pos = start[partition] + k * kv_tile
    window = _window_min(subtree_end(tree), kv_tile)  # [tokens - kv_tile + 1]
    end = np.where(whole, window[np.where(whole, first_pos, 0)], 0) if len(window) else 0
    free = whole & (first_pos + kv_tile - 1 <= lowest[q_tile]) & (highest[q_tile] < end)
    return np.bincount(partition, weights=~free, minlength=plan.num_partitions).astype(np.int64)


def subtree_end(tree) -> np.ndarray:
    """The flattened position just past the subtree of each flattened position's node (the
    plan buffers' ``subtree_end``, `deft.plan_buffers.plan_arrays`, but for the tree's end where
    the buffers hold `deft.compiled_plan.REACHES_END`: every comparison with a query position
    reads the same). [tokens]"""
    order = tree.preorder
    last = order[tree.tout]  # the last node, in preorder, of each node's subtree
    node_end = tree.flat_offset[last] + tree.tokens[last]
    return np.repeat(node_end[order], tree.tokens[order])


def _window_min(values: np.ndarray, width: int) -> np.ndarray:
    """min(values[i : i + width]) for every i with a whole window, by doubling spans (width a
    power of two). [len(values) - width + 1]"""
    span, out = 1, values
    while span < width:
        out = np.minimum(out[:-span], out[span:])
        span *= 2
    return out


def masked_steps_bound(plan: PlanAggregates, queries_per_tile: int, kv_tile: int) -> np.ndarray:
    """An upper bound of `masked_steps` from the aggregates alone: a partition whose queries
    see all its tokens (work = queries x tokens) masks only its short last tile, once per query
    tile; any other masks every step. [K]"""
    q_tiles = -(-plan.queries // queries_per_tile)
    seen_whole = plan.work == plan.queries * plan.tokens
    short = (plan.tokens % kv_tile > 0).astype(np.int64)
    return np.where(seen_whole, q_tiles * short, q_tiles * -(-plan.tokens // kv_tile))


def partitions_of(plan: Plan | PlanAggregates) -> Plan | None:
    """The built plan of `plan`: itself, or the plan its aggregates stand for when it has at
    most `PLAN_LIMIT` entries (None past that)."""
    if isinstance(plan, Plan):
        return plan
    if int(plan.queries @ plan.count) > PLAN_LIMIT:
        return None
    return build_plan(plan.strategy, plan.tree, plan.chunk_size, plan.group_size,
                      plan.page_size)
