"""Latency of the shipped DeFT-Flatten kernels: work items over a persistent grid, then the merge.

deft_flatten runs the Hopper Gluon kernel on sm_90 and the portable Triton kernel elsewhere,
and on sm_90 too for shapes the Gluon kernel does not take (fp32, head dims other than 64 and
128, more than 64 query heads per KV head: `gluon`; docs/iomodel.md, "The kernel model").
Both are persistent: ``PROGRAMS_PER_SM`` x SMs programs, program j taking work items j,
j + programs, ... (a static stride), where the work items are the partitions x KV heads in plan
order. On Hopper a plan of at most one work item per SM runs the
small-grid form instead (`small_grid`): ``SMALL_GRID_PROGRAMS_PER_SM`` program per SM, its
consumer software-pipelined over a deeper ring, at the same 64-token KV tile. A work item loads
its query tile (the partition's queries x the KV head's query heads, packed into
``QUERY_TILE_ROWS`` rows), streams its partition's KV through shared memory one KV tile at a
time, and writes its partial rows; a partition with more queries than one tile holds repeats the
stream once per query tile. So, with the constants of `iomodel.constants.Constants`:

1. A work item of t tokens and q queries costs ``tiles x query_tile_us + steps x tile_us x (1 +
   contention x busy)``: ``tiles = ceil(q / queries per tile)`` query tiles, each loaded, its KV
   stream started afresh and its partial rows written at a fixed cost, ``steps = tiles x
   ceil(t / KV tile)`` its serial chain of tile steps (a step costs the same however many of
   the tile's rows are real queries), and ``busy`` the fraction of SMs with a work item (more
   SMs streaming at once load memory more, so each step waits longer). ``tile_us`` is a step of
   the Gluon kernel's 64-token tile, ``small_grid_tile_us`` one of its small-grid form; a step
   of the portable kernel's 32-token tile is taken to cost half of ``tile_us`` (the same per
   token). Each masked step costs ``masked_tile_us`` more (half that on the portable kernel):
   on the Gluon kernel the steps of KV tiles not every row of the query tile sees whole, on
   the portable kernel every step (`iomodel.mask_tiles`, counted on the built plan; on
   aggregates, on the plan they stand for, or a bound past its size limit).
2. A program's time is the sum of its items, dealt longest first one per program in turn (the
   kernel's static stride over plan order, where the shared prefix's items come first; a plan
   and its aggregates, which keep no order, predict the same). SM s hosts programs s and
   s + SMs, which share it: its time is ``max(a, b, (a + b) / pair_speedup)``; the small-grid
   kernel's one program has its SM to itself. The kernel's time joins the busiest SM's time
   and its HBM bytes at ``memory_efficiency`` x bandwidth (every KV token some query sees read
   once: query groups of one chunk run side by side and share it through L2; plus Q, mask,
   page indices and the partial rows written) by `overlapped`: ``(chain^k + bytes^k)^(1/k)``,
   ``k = 1 / s`` (0: the larger of the two), s the byte-weighted mean of
   ``kv_overlap_softness`` over the KV bytes and ``overlap_softness`` over the rest.
3. The merge reads every partial row and writes the output: its bytes at ``memory_efficiency`` x
   bandwidth and a merge program's serial chain over one query's partial rows, `overlapped`,
   ``merge_step_us`` per loop step (`merge_block` rows a step for the per-head merge, 16 to 64
   as the most rows of a query need, or the fixed block ``merge_block_rows`` a sweep was
   timed with), or ``merge_query_step_us`` per row for the per-query merge (chosen as
   `deft.kernels.reduction.per_query_merge` does), the mean partial rows per query standing in
   for the most.

The kernels' shapes are copied here as plain numbers so the IO model needs neither torch nor
triton; tests/test_iomodel_kernel.py checks them against the kernel modules.
"""

from __future__ import annotations

import numpy as np

from deft.plan import Plan
from deft.plan_aggregates import PlanAggregates
from deft.tree import AttentionShape
from iomodel import mask_tiles
from iomodel.constants import Constants
from iomodel.gpus import GpuSpec

TILED_STRATEGIES = ("deft_flatten",)
"""Strategies whose latency this model predicts (the others: `iomodel.latency`'s roofline)."""

KERNEL_CONSTANTS = ("launch_us", "memory_efficiency", "query_tile_us", "tile_us",
                    "small_grid_tile_us", "masked_tile_us", "contention", "pair_speedup",
                    "merge_step_us", "overlap_softness", "kv_overlap_softness",
                    "merge_query_step_us")
"""The constants this model reads (`iomodel.constants.Constants`)."""

QUERY_TILE_ROWS = 64
"""Rows of a query tile (``BLOCK_M`` of both kernels, `deft.kernels.fill.TILE_ROWS`)."""

KV_TILE_HOPPER = 64
"""KV tokens per tile of the Gluon kernel (`deft.kernels.deft_flatten_sm90.BLOCK_N`)."""

KV_TILE_PORTABLE = 32
"""KV tokens per tile of the Triton kernel's default tile (`deft.kernels.partials.TileConfig`)."""

PROGRAMS_PER_SM = 2
"""Resident programs per SM (`deft.kernels.fill.PROGRAMS_PER_SM`)."""

SMALL_GRID_PROGRAMS_PER_SM = 1
"""Resident programs per SM of the small-grid kernel (`deft.kernels.deft_flatten_sm90.launch_spec`
with ``small_grid``)."""

MERGE_BLOCK_ROWS = (16, 64)
"""The per-head merge's least and largest row block, partial rows a step reads
(`deft.kernels.reduction.BLOCK_E` and ``MAX_BLOCK_E``; `merge_block`)."""


def merge_block(most_rows: int) -> int:
    """The per-head merge's row block for queries of at most `most_rows` partial rows: the
    least power of two from ``MERGE_BLOCK_ROWS[0]`` that holds them, at most
    ``MERGE_BLOCK_ROWS[1]`` (`deft.kernels.reduction.merge_block`)."""
    block, largest = MERGE_BLOCK_ROWS
    while block < min(most_rows, largest):
        block *= 2
    return block

GLUON_DTYPES = ("float16", "bfloat16")
"""Dtypes the Gluon kernel takes (`deft.kernels.deft_flatten_sm90.takes`; others: portable)."""

GLUON_HEAD_DIMS = (64, 128)
"""Head dims the Gluon kernel takes (`deft.kernels.deft_flatten_sm90.takes`)."""

PER_QUERY_MAX_ROWS = 4
"""Mean partial rows per query up to which the merge runs per query
(`deft.kernels.reduction.PER_QUERY_MAX_ROWS`)."""


def hopper(gpu: GpuSpec) -> bool:
    """Whether `gpu` is a Hopper card (compute capability 9.x), where the Gluon kernel runs."""
    return 9.0 <= gpu.compute_capability < 10.0


def gluon(shape: AttentionShape, gpu: GpuSpec) -> bool:
    """Whether attention of `shape` runs the Gluon kernel on `gpu`: a Hopper card and a shape
    the kernel takes (`deft.kernels.deft_flatten_sm90.takes`), else the portable one."""
    return (hopper(gpu) and shape.dtype in GLUON_DTYPES and shape.head_dim in GLUON_HEAD_DIMS
            and shape.q_heads // shape.kv_heads <= QUERY_TILE_ROWS)


def queries_per_tile(shape: AttentionShape, gpu: GpuSpec) -> int:
    """Queries one query tile holds, each with its query heads of one KV head."""
    group = shape.q_heads // shape.kv_heads
    padded = 1 << (group - 1).bit_length()
    if gluon(shape, gpu):
        return max(1, QUERY_TILE_ROWS // padded)
    return max(QUERY_TILE_ROWS, padded) // group


def small_grid(plan: Plan | PlanAggregates, gpu: GpuSpec) -> bool:
    """Whether `plan` runs the Gluon kernel's small-grid form: the Gluon kernel, work items
    (partitions x KV heads) at most the SMs (`deft.tree_plan.TreePlan.small_grid`)."""
    items = int(plan.count.sum()) * plan.tree.attention.kv_heads
    return gluon(plan.tree.attention, gpu) and items <= gpu.sm_count


def programs_per_sm(plan: Plan | PlanAggregates, gpu: GpuSpec) -> int:
    """Programs one SM hosts: one in the small-grid kernel, else `PROGRAMS_PER_SM`."""
    return SMALL_GRID_PROGRAMS_PER_SM if small_grid(plan, gpu) else PROGRAMS_PER_SM


def kv_tile(shape: AttentionShape, gpu: GpuSpec) -> int:
    """KV tokens per tile of the kernel attention of `shape` runs on `gpu`."""
    return KV_TILE_HOPPER if gluon(shape, gpu) else KV_TILE_PORTABLE


def query_tiles(plan: Plan | PlanAggregates, gpu: GpuSpec) -> np.ndarray:
    """Query tiles of each partition's work items (one per KV head). [P]"""
    return -(-plan.queries // queries_per_tile(plan.tree.attention, gpu))


def item_steps(plan: Plan | PlanAggregates, gpu: GpuSpec) -> np.ndarray:
    """Tile steps of each partition's work items (one per KV head): query tiles x KV tiles. [P]"""
    return query_tiles(plan, gpu) * -(-plan.tokens // kv_tile(plan.tree.attention, gpu))


def masked_item_steps(plan: Plan | PlanAggregates, gpu: GpuSpec) -> np.ndarray:
    """Masked tile steps of each partition's work items (one per KV head): every step on the
    portable kernel, those of tiles not every row of the query tile sees whole on the Gluon
    kernel (`iomodel.mask_tiles`; an upper bound on aggregates past its plan limit). [P]"""
    if not gluon(plan.tree.attention, gpu):
        return item_steps(plan, gpu)
    shape = (queries_per_tile(plan.tree.attention, gpu), KV_TILE_HOPPER)
    if isinstance(plan, Plan):
        return mask_tiles.masked_steps(plan, *shape)
    return mask_tiles.masked_steps_bound(plan, *shape)


def counted_form(plan: Plan | PlanAggregates, gpu: GpuSpec) -> Plan | PlanAggregates:
    """The form `program_loads` counts masked steps on: on the Gluon kernel, the built plan of
    aggregates that have one within `iomodel.mask_tiles.PLAN_LIMIT`; else `plan` itself."""
    if isinstance(plan, Plan) or not gluon(plan.tree.attention, gpu):
        return plan
    return mask_tiles.partitions_of(plan) or plan


def program_loads(plan: Plan | PlanAggregates, gpu: GpuSpec, c: Constants) -> np.ndarray:
    """Seconds of work of every program of the persistent grid. [programs_per_sm x SMs]

    The kernel deals work items (partitions x KV heads, in plan order) by a static stride;
    `deft.plan_aggregates.PlanAggregates` keep no order, and a plan and its aggregates must
    predict the same, so the items are dealt longest first, one per program in turn (the
    plans put a tree's shared prefix, the longest items, first, so the two mostly agree).
    """
    if c.masked_tile_us:
        plan = counted_form(plan, gpu)
    copies = plan.count * plan.tree.attention.kv_heads  # work items per partition (class)
    busy = min(int(copies.sum()), gpu.sm_count) / gpu.sm_count
    # tile_us is a Hopper tile's step; the portable kernel's smaller tiles cost the same per
    # token (an assumption: no card but the H200 has been measured)
    tile_us = c.small_grid_tile_us if small_grid(plan, gpu) else c.tile_us
    per_token = kv_tile(plan.tree.attention, gpu) / KV_TILE_HOPPER
    step_s = tile_us * per_token * (1.0 + c.contention * busy) * 1e-6
    cost = query_tiles(plan, gpu) * c.query_tile_us * 1e-6 + item_steps(plan, gpu) * step_s  # [P]
    if c.masked_tile_us:
        cost = cost + masked_item_steps(plan, gpu) * c.masked_tile_us * per_token * 1e-6
    order = np.argsort(-cost, kind="stable")
    return _dealt_in_turn(copies[order], cost[order], programs_per_sm(plan, gpu) * gpu.sm_count)


def _dealt_in_turn(runs: np.ndarray, values: np.ndarray, programs: int) -> np.ndarray:
    """Sums per program of items dealt one per program in turn (item i to program
    i % programs), run k holding runs[k] items of values[k], in closed form: a run covering
    items [a, b) gives program j ``n(b, j) - n(a, j)`` of them, ``n(x, j) = x // programs +
    [x % programs > j]``. [programs]"""
    end = np.cumsum(runs)
    start = end - runs
    base = float(values @ (end // programs - start // programs))
    marks = (np.bincount(end % programs, values, programs + 1)
             - np.bincount(start % programs, values, programs + 1))
    beyond = np.cumsum(marks[::-1])[::-1][1:]  # beyond[j]: marks at positions > j
    return base + beyond


def overlapped(chain: float, memory: float, softness: float) -> float:
    """A kernel's seconds from its chain of steps and its bytes' time: their p-norm with p =
    1 / `softness` (0: the larger, the two hidden behind each other; 1: the sum). Each step of
    the chain waits for loads that share the bandwidth with every other SM's, so near the
    crossover neither hides the other whole."""
    larger = max(chain, memory)
    if softness <= 0.0 or larger <= 0.0:
        return larger
    p = 1.0 / softness
    return larger * ((chain / larger) ** p + (memory / larger) ** p) ** softness


def partials_seconds(plan, gpu: GpuSpec, c: Constants, hbm_bytes: float,
                     kv_bytes: float) -> tuple:
    """Seconds of the partials kernel (`overlapped`) and its bound: ``"compute"`` (the busiest
    SM's chain of tile steps is the longer) or ``"memory"`` (`hbm_bytes` at the kernel's share
    of the bandwidth); `kv_bytes` of them are the KV stream (the softness's weights)."""
    loads = program_loads(plan, gpu, c)
    if len(loads) > gpu.sm_count:  # two programs per SM
        first, second = loads[:gpu.sm_count], loads[gpu.sm_count:]
        loads = np.maximum(np.maximum(first, second), (first + second) / c.pair_speedup)
    chain = float(loads.max())
    memory = hbm_bytes / (gpu.bandwidth * c.memory_efficiency)
    softness = c.overlap_softness
    if c.kv_overlap_softness >= 0.0 and hbm_bytes > 0.0:
        share = min(kv_bytes / hbm_bytes, 1.0)
        softness = (1.0 - share) * c.overlap_softness + share * c.kv_overlap_softness
    return overlapped(chain, memory, softness), "compute" if chain >= memory else "memory"


def per_query(plan: Plan | PlanAggregates, gpu: GpuSpec) -> bool:
    """Whether the plan's merge runs one program per query
    (`deft.kernels.reduction.per_query_merge`)."""
    queries = plan.tree.num_queries
    return queries >= gpu.sm_count and int(plan.queries @ plan.count) <= (
        PER_QUERY_MAX_ROWS * queries)


def merge_steps(plan: Plan | PlanAggregates, gpu: GpuSpec, block: int = 0) -> int:
    """Loop steps of a merge program over a query's partial rows, the mean rows per query
    rounded up standing in for the most (aggregates do not say which query has which rows);
    the per-head merge takes `block` rows a step, or with 0 the plan's own `merge_block`."""
    queries = plan.tree.num_queries
    most = -(-int(plan.queries @ plan.count) // max(queries, 1))
    return most if per_query(plan, gpu) else -(-most // (block or merge_block(most)))


def merge_seconds(plan, gpu: GpuSpec, c: Constants, moved_bytes: float) -> float:
    """Seconds of the merge: its bytes at the kernel share of the bandwidth and its longest
    chain of loop steps, `overlapped`."""
    steps = merge_steps(plan, gpu, int(c.merge_block_rows))
    step_us = c.merge_step_us  # a per-query step reads one row, a per-head one a block
    if c.merge_query_step_us >= 0.0 and per_query(plan, gpu):
        step_us = c.merge_query_step_us
    return overlapped(steps * step_us * 1e-6,
                      moved_bytes / (gpu.bandwidth * c.memory_efficiency), c.overlap_softness)
