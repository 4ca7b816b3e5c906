"""Whole runs: traffic (and predicted time) summed over every decode step, per strategy.

A run is any iterable of trees, one per decode step (`deft.workloads` builds the paper's).
Each step costs one plan's aggregates per strategy (`deft.plan_aggregates`, vectorised numpy);
nothing is O(tokens) Python.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from deft.tree import Tree
from iomodel.gpus import GpuSpec
from iomodel.latency import floor, floor_traffic, predict_latency, strategy_sizes
from iomodel.traffic import BYTE_KEYS, traffic_of_plan
from deft.plan import check_parameters
from deft.plan_aggregates import plan_aggregates
from deft.strategies import STRATEGIES

BASELINE = "radix"
"""The strategy whose KV traffic the paper's "KV cache IO reduction" is measured against."""


def run_totals(
    trees: Iterable[Tree],
    gpu: GpuSpec | None = None,
    strategies=STRATEGIES,
    chunk_size=None,
    group_size=None,
    page_size=1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Traffic of every strategy summed over the steps of a run.

    Parameters
    ----------
    trees : iterable of Tree
        The tree of each decode step.
    gpu : GpuSpec, optional
        When given, predicted times and the floor are summed too.
    strategies : sequence of str
    chunk_size, group_size, page_size
        As for `iomodel.estimate`: sizes apply only to the strategies that take them.
    progress : callable, optional
        Called with the number of steps done after each step.

    Returns
    -------
    dict
        ``{"steps", "floor_bytes", ["floor_us"], "strategies": {name: {byte keys summed,
        "partitions" summed, "max_partition_work" (largest over steps), "chunk_size",
        "group_size", ["predicted_us" summed], "kv_vs_radix"}}}``; ``kv_vs_radix`` is the
        strategy's KV bytes over radix's, present when radix is among the strategies.
    """
    totals = {
        name: {key: 0 for key in (*BYTE_KEYS, "partitions", "max_partition_work")}
        for name in strategies
    }
    sizes = {name: strategy_sizes(name, chunk_size, group_size) for name in strategies}
    for name, total in totals.items():
        # the sizes each strategy runs with, defaults resolved (ValueError for a bad one)
        resolved = check_parameters(name, *sizes[name], page_size)
        total["chunk_size"], total["group_size"] = resolved[:2]
    result = {"steps": 0, "floor_bytes": 0}
    if gpu is not None:
        result["floor_us"] = 0.0
        for total in totals.values():
            total["predicted_us"] = 0.0
    for tree in trees:
        for name in strategies:
            plan = plan_aggregates(name, tree, *sizes[name], page_size)
            traffic = traffic_of_plan(plan)
            total = totals[name]
            for key in (*BYTE_KEYS, "partitions"):
                total[key] += traffic[key]
            total["max_partition_work"] = max(
                total["max_partition_work"], traffic["max_partition_work"]
            )
            if gpu is not None:
                total["predicted_us"] += predict_latency(plan, gpu, traffic)["predicted_us"]
        result["floor_bytes"] += floor_traffic(tree)["floor_bytes"]
        if gpu is not None:
            result["floor_us"] += floor(tree, gpu)["floor_us"]
        result["steps"] += 1
        if progress is not None:
            progress(result["steps"])
    for total in totals.values():
        if BASELINE in totals and totals[BASELINE]["kv_bytes"]:
            total["kv_vs_radix"] = total["kv_bytes"] / totals[BASELINE]["kv_bytes"]
    result["strategies"] = totals
    return result
