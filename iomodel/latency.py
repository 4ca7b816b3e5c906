"""Latency of one attention call per strategy (a roofline over the busiest SM) and the floor.

The model, step by step (docs/iomodel.md has the worked example):

1. Programs. A strategy's attention kernel runs partitions x kv_heads programs (docs/design.md);
   tree_attention_m is a PyTorch GEMM, so its partitions are further tiled into
   ``GEMM_TILE`` x ``GEMM_TILE`` (query x token) tiles. A program's bytes are its partition's
   KV, Q, mask, score and index bytes, plus the partials it writes (half of ``partial_bytes``)
   or, without a reduction, the output rows it writes, all split evenly over its kv heads and
   tiles. Its flops are 4 x work(p) x H_q x d split the same way (QK^T and PV over the visible
   pairs); the dense-mask strategies compute the full GEMM, so they count q(p) x t(p) pairs.
2. Time of one program alone: ``max(bytes / SM bandwidth, flops / SM rate) + program_us``,
   where one SM draws at most ``sm_bandwidth_fraction`` of the HBM bandwidth and computes at
   ``compute_efficiency`` x (tensor rate / SMs) (the fp32 rate for float32 trees).
3. Scheduling: programs sorted longest first and dealt to the SMs in waves, in snake order
   (wave 0 to SMs 0..S-1, wave 1 back from S-1 to 0, ...): a vectorised approximation of
   longest-processing-time-first list scheduling. The busiest SM's sum is the kernel's time,
   but never less than the whole kernel's bytes at ``memory_efficiency`` x HBM bandwidth or
   its flops at ``compute_efficiency`` x the tensor rate.
4. The reduction (strategies with partials) reads the partials and writes the output at
   ``memory_efficiency`` x HBM bandwidth, plus ``program_us``.
5. Every kernel launch costs ``launch_us`` (`LAUNCHES` per strategy).

deft_flatten, the strategy whose kernels ship, is instead timed by `iomodel.kernel_model`: its
persistent grid's work items, their serial chains of tile steps, and the merge's chain
(steps 1-4 there; launches as in step 5).

The constants are uncalibrated guesses until a GPU spec carries fitted values.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deft.tree import Tree
from iomodel.constants import Constants
from iomodel.gpus import GpuSpec
from iomodel.kernel_model import (KERNEL_CONSTANTS, TILED_STRATEGIES, merge_seconds,
                                  partials_seconds)
from iomodel.traffic import partition_bytes, traffic_of_plan
from deft.plan import Plan
from deft.plan_aggregates import PlanAggregates, plan_aggregates
from deft.strategies import STRATEGIES, USES_CHUNK_SIZE, USES_GROUP_SIZE


LAUNCHES = {
    "flash_attention": 1,  # one fused kernel, no reduction
    "flash_decoding": 2,  # attention + reduction
    "radix": 2,
    "tree_attention_s": 2,
    "tree_attention_m": 3,  # QK^T GEMM, masked softmax, PV GEMM
    "vanilla_tree": 1,  # one program per kv head, scores through HBM
    "deft_node": 2,
    "deft_node_chunk": 2,
    "deft_flatten": 2,
}
"""Kernel launches of one attention call."""

GEMM_TILE = 128
"""Query and token extent of one tile of tree_attention_m's GEMMs."""

DENSE_FLOPS = {"tree_attention_m", "vanilla_tree"}
"""Strategies that compute every (query, token) pair of a partition, visible or not."""


DEFAULTS = Constants()
"""The uncalibrated constants."""

ROOFLINE_CONSTANTS = ("launch_us", "program_us", "memory_efficiency", "compute_efficiency",
                      "sm_bandwidth_fraction")
"""The constants the roofline (steps 1-5) reads."""


def constants_used(strategy: str) -> tuple:
    """Names of the constants `predict_latency` reads for `strategy`."""
    return KERNEL_CONSTANTS if strategy in TILED_STRATEGIES else ROOFLINE_CONSTANTS


def constants_for(gpu: GpuSpec) -> Constants:
    """The model's constants for `gpu`: the defaults, overridden by its calibration."""
    return dataclasses.replace(DEFAULTS, **gpu.calibration) if gpu.calibration else DEFAULTS


def predict_latency(plan: Plan | PlanAggregates, gpu: GpuSpec, traffic: dict | None = None) -> dict:
    """Predicted time of one attention call of `plan` on `gpu`.

    Parameters
    ----------
    plan : deft.plan.Plan or deft.plan_aggregates.PlanAggregates
    gpu : GpuSpec
    traffic : dict, optional
        `traffic_of_plan(plan)`, when already computed.

    Returns
    -------
    dict
        ``predicted_us`` (total), ``attention_us``, ``reduction_us``, ``launch_us``,
        ``bound`` ("memory" or "compute", of the attention kernel; for deft_flatten
        "compute" is its chain of tile steps, `iomodel.kernel_model`), ``programs``, ``waves``
        (programs / SMs, rounded up), ``balance`` (max / mean partition work) and
        ``calibrated``.
    """
    traffic = traffic if traffic is not None else traffic_of_plan(plan)
    constants = constants_for(gpu)
    shape = plan.tree.attention
    row_bytes = shape.q_heads * shape.head_dim * shape.element_bytes
    per = partition_bytes(plan)
    written = per["partial_bytes"] // 2 if plan.has_reduction else plan.queries * row_bytes
    part_bytes = (
        per["kv_bytes"] + per["q_bytes"] + per["mask_bytes"] + per["score_bytes"]
        + per["index_bytes"] + written
    ).astype(np.float64)
    pairs = plan.queries * plan.tokens if plan.strategy in DENSE_FLOPS else plan.work
    part_flops = 4.0 * shape.q_heads * shape.head_dim * pairs
    split = shape.kv_heads * _tiles(plan)
    moved = traffic["partial_bytes"] / 2 + traffic["output_bytes"]
    if plan.strategy in TILED_STRATEGIES:
        # KV from HBM once per seen token (query groups of a chunk share it through L2)
        kv_bytes = floor_traffic(plan.tree)["kv_bytes"]
        hbm_bytes = float(part_bytes @ plan.count) - traffic["kv_bytes"] + kv_bytes
        attention_s, bound = partials_seconds(plan, gpu, constants, hbm_bytes, kv_bytes)
        reduction_s = merge_seconds(plan, gpu, constants, moved)
    else:
        attention_s, bound = _kernel_time(
            part_bytes / split, part_flops / split, split * plan.count, gpu, constants,
            shape.dtype)
        reduction_s = 0.0
        if plan.has_reduction:
            reduction_s = moved / (gpu.bandwidth * constants.memory_efficiency)
            reduction_s += constants.program_us * 1e-6
    launch_s = LAUNCHES[plan.strategy] * constants.launch_us * 1e-6
    programs = int(split @ plan.count)
    return {
        "predicted_us": float(attention_s + reduction_s + launch_s) * 1e6,
        "attention_us": float(attention_s) * 1e6,
        "reduction_us": float(reduction_s) * 1e6,
        "launch_us": float(launch_s) * 1e6,
        "bound": bound,
        "programs": programs,
        "waves": -(-programs // gpu.sm_count),
        "balance": traffic["max_partition_work"] / traffic["mean_partition_work"],
        "calibrated": gpu.calibrated,
    }


def _tiles(plan: Plan | PlanAggregates) -> np.ndarray:
    """Programs per partition and kv head: GEMM tiles for tree_attention_m, else 1. [P]"""
    if plan.strategy != "tree_attention_m":
        return np.ones_like(plan.tokens)
    return -(-plan.queries // GEMM_TILE) * -(-plan.tokens // GEMM_TILE)


def _kernel_time(program_bytes, program_flops, copies, gpu: GpuSpec, constants, dtype: str):
    """Seconds of one kernel, and its bound ("memory" or "compute").

    Partition (class) p launches copies[p] identical programs, each moving program_bytes[p]
    bytes and computing program_flops[p] flops. [P] each.
    """
    sms = gpu.sm_count
    rate = gpu.matmul_rate(dtype) * constants.compute_efficiency
    sm_bandwidth = gpu.bandwidth * constants.sm_bandwidth_fraction
    sm_rate = rate / sms
    alone = np.maximum(program_bytes / sm_bandwidth, program_flops / sm_rate)
    alone += constants.program_us * 1e-6
    # Programs longest first (sorting the partitions sorts their equal copies too), dealt in
    # waves of `sms`, odd waves reversed (snake order).
    order = np.argsort(-alone, kind="stable")
    dealt = _snake_counts(copies[order], sms)
    busy = dealt(alone[order])
    mine = busy.argmax()
    memory_s = max(
        float(program_bytes @ copies) / (gpu.bandwidth * constants.memory_efficiency),
        dealt(program_bytes[order], mine) / sm_bandwidth,
    )
    compute_s = max(
        float(program_flops @ copies) / rate, dealt(program_flops[order], mine) / sm_rate
    )
    bound = "memory" if memory_s >= compute_s else "compute"
    return max(busy.max(), memory_s, compute_s), bound


def _snake_counts(runs: np.ndarray, sms: int):
    """Sums per SM of values dealt in snake order, run k holding runs[k] copies of value k.

    Program i goes to SM ``i % sms`` in even waves and ``sms - 1 - i % sms`` in odd ones, so
    over a double wave (period 2 x sms) SM s gets the programs at offsets s and 2 sms - 1 - s:
    a run covering [a, b) gives SM s ``n(b, s) - n(a, s)`` copies with
    ``n(x, s) = 2 (x // 2sms) + [x % 2sms > s] + [x % 2sms > 2sms - 1 - s]``, in closed form
    however many copies a run has.

    Returns ``dealt(values, sm=None)``: the per-SM sums [sms] of values [runs], or SM sm's sum.
    """
    period = 2 * sms
    end = np.cumsum(runs)
    start = end - runs
    whole = 2 * (end // period - start // period)
    end_rest, start_rest = end % period, start % period
    s = np.arange(sms)

    def dealt(values, sm=None):
        base = float(values @ whole)
        # G(y) = sum of values of run ends (minus starts) whose offset in the period exceeds y
        marks = np.bincount(end_rest, values, period + 1) - np.bincount(start_rest, values,
                                                                           period + 1)
        beyond = np.concatenate([np.cumsum(marks[::-1])[::-1][1:], [0.0]])  # beyond[y]: m > y
        per_sm = base + beyond[s] + beyond[period - 1 - s]
        return per_sm if sm is None else float(per_sm[sm])

    return dealt


# ---------------------------------------------------------------------------- the floor
def floor_traffic(tree: Tree) -> dict:
    """Bytes of the floor: every KV token some query sees read once (K and V), Q read once, O
    written once (tokens no query attends need not be read at all).

    Returns
    -------
    dict
        ``kv_bytes``, ``q_bytes``, ``output_bytes`` and their sum ``floor_bytes``.
    """
    shape = tree.attention
    e = shape.element_bytes
    kv = tree.seen_tokens * shape.kv_heads * shape.head_dim * 2 * e
    rows = tree.num_queries * shape.q_heads * shape.head_dim * e
    return {"kv_bytes": kv, "q_bytes": rows, "output_bytes": rows, "floor_bytes": kv + 2 * rows}


def floor_flops(tree: Tree) -> int:
    """Flops of the floor: QK^T and PV over the visible (query, token) pairs of every q head."""
    shape = tree.attention
    return 4 * tree.visible_token_sum * shape.q_heads * shape.head_dim


def floor(tree: Tree, gpu: GpuSpec, copy_bandwidth=None, matmul_rate=None) -> dict:
    """The physical limit of one call (docs/anchors.md): max(bytes / copy rate, flops / matmul rate).

    Parameters
    ----------
    tree : Tree
    gpu : GpuSpec
        Supplies the peak HBM bandwidth and matmul rate where no measurement is given.
    copy_bandwidth : float, optional
        Measured device-to-device copy bandwidth, bytes (read + written) per second.
    matmul_rate : float, optional
        Measured rate of a large GEMM in the tree's dtype, flop/s.

    Returns
    -------
    dict
        ``floor_us``, ``floor_bytes`` (and its ``kv_bytes``, ``q_bytes``, ``output_bytes``),
        ``floor_flops``, ``memory_us``, ``compute_us``, ``bound``.
    """
    bandwidth = copy_bandwidth if copy_bandwidth is not None else gpu.bandwidth
    rate = matmul_rate if matmul_rate is not None else gpu.matmul_rate(tree.attention.dtype)
    moved, flops = floor_traffic(tree), floor_flops(tree)
    memory_us, compute_us = moved["floor_bytes"] / bandwidth * 1e6, flops / rate * 1e6
    return {
        "floor_us": max(memory_us, compute_us),
        **moved,
        "floor_flops": flops,
        "memory_us": memory_us,
        "compute_us": compute_us,
        "bound": "memory" if memory_us >= compute_us else "compute",
    }


# ---------------------------------------------------------------------------- per tree
def strategy_sizes(strategy: str, chunk_size=None, group_size=None) -> tuple:
    """The (chunk_size, group_size) to pass to `strategy`: sizes it does not take become None."""
    return (
        chunk_size if strategy in USES_CHUNK_SIZE else None,
        group_size if strategy in USES_GROUP_SIZE else None,
    )


def estimate(
    tree: Tree, gpu: GpuSpec, strategies=STRATEGIES, chunk_size=None, group_size=None, page_size=1
) -> dict:
    """Traffic and predicted latency of every strategy over `tree`, and the floor.

    `chunk_size` and `group_size` apply to the strategies that take them (the others use None).

    Returns
    -------
    dict
        ``{"format": "deft-estimate/1", "gpu", "calibrated", "floor_us", "floor_bytes",
        "strategies": {name: {traffic keys, "chunk_size", "group_size", "waves", "balance",
        "bound", "predicted_us"}}}``.
    """
    limit = floor(tree, gpu)
    result = {
        "format": "deft-estimate/1",
        "gpu": gpu.name,
        "calibrated": gpu.calibrated,
        "floor_us": limit["floor_us"],
        "floor_bytes": limit["floor_bytes"],
        "strategies": {},
    }
    for strategy in strategies:
        chunk, group = strategy_sizes(strategy, chunk_size, group_size)
        plan = plan_aggregates(strategy, tree, chunk, group, page_size)
        traffic = traffic_of_plan(plan)
        latency = predict_latency(plan, gpu, traffic)
        result["strategies"][strategy] = {
            **traffic,
            "chunk_size": plan.chunk_size,
            "group_size": plan.group_size,
            **{key: latency[key] for key in ("waves", "balance", "bound", "predicted_us")},
        }
    return result


def best_strategy(estimate_result: dict) -> str:
    """The strategy with the lowest predicted time in an `estimate` result."""
    strategies = estimate_result["strategies"]
    return min(strategies, key=lambda name: strategies[name]["predicted_us"])
