#!/usr/bin/env python3
"""Host time of planning one decode step, over every step of whole runs.

    python scripts/plan_overhead.py [--workloads DIR] [--strategy deft_flatten] [--device cpu]

Per run (fewshot b20 and b50 over a 4000-token prompt, keywordToT and set128ToT tree 0 over
4000 tokens, speculative t64 and t256 over 4000 tokens) and per step: the host time of getting
the step's tree from the run (``run.tree(i)``), of syncing a `deft.cache.TreeCache` to it
(``apply``, the serving engine's page allocation: shown, not counted as planning), and of
`TreeAttention.plan` two ways: with fixed sizes (the node planner, `deft.fast_plan`) and as a
tuned `TreeAttention` plans today (`deft.plan.build_plan`, then `plan_arrays`; on the CPU or an
untuned GPU the tuned sizes are the defaults, the same sizes as the fixed ones). Both plans
include reading the page table and refilling the plan buffers. Prints the median over the
run's steps (and the 90th percentile) in microseconds, a table last; writes
$OUT/plan_overhead.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from deft.cache import PagedKVCache, TreeCache, pages_for  # noqa: E402
from deft.plan import check_parameters  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402

PAGE_SIZE = 16


def runs(workload_dir):
    """The measured runs: name -> Run."""
    found = {
        "fewshot_b20": wl.fewshot(4000, 20, 400),
        "fewshot_b50": wl.fewshot(4000, 50, 400),
    }
    for name in ("keywordToT", "set128ToT"):
        try:
            found[name] = wl.reasoning(name, 0, 4000, workload_dir)
        except FileNotFoundError as missing:
            print(f"skipping {name}: {missing}", file=sys.stderr)
    for size in (64, 256):
        try:
            found[f"spec_t{size}"] = wl.speculative(size, 4000, workload_dir=workload_dir)
        except FileNotFoundError as missing:
            print(f"skipping spec_t{size}: {missing}", file=sys.stderr)
    return found


def timed(fn):
    """(result, host microseconds) of one call."""
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1e6


def measure(run, strategy: str, device: str) -> dict:
    """Per-step host times of one run (lists of microseconds)."""
    largest = max(range(len(run)), key=lambda i: run.tree(i).num_tokens)
    biggest = run.tree(largest)
    queries = max(run.tree(i).num_queries for i in range(0, len(run), max(1, len(run) // 50)))
    queries = max(queries, biggest.num_queries, 256)
    capacity = dict(max_queries=queries, max_tokens=2 * biggest.num_tokens, device=device)
    chunk, group, _ = check_parameters(strategy, None, None, 1)
    if chunk is None:  # deft_node takes no chunk: a group cap no tree reaches fixes its
        group = 10**6  # sizes without changing its plan, so that it takes the node planner
    fast = TreeAttention(strategy, chunk, group, **capacity)
    tuned = TreeAttention(strategy, **capacity)
    pool = PagedKVCache(4 * pages_for(biggest, PAGE_SIZE) + 64, PAGE_SIZE, 1, 16, device=device)
    cache = TreeCache(pool)
    times = {"tree": [], "apply": [], "plan": [], "plan_build_plan": []}
    for i in range(len(run)):
        tree, us = timed(lambda: run.tree(i))
        times["tree"].append(us)
        times["apply"].append(timed(lambda: cache.apply(tree))[1])
        times["plan"].append(timed(lambda: fast.plan(tree, cache))[1])
        times["plan_build_plan"].append(timed(lambda: tuned.plan(tree, cache))[1])
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--strategy", default="deft_flatten")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default=None, help="comma-separated subset of the run names")
    args = parser.parse_args()
    records = []
    chosen = runs(args.workloads)
    if args.runs:
        chosen = {k: v for k, v in chosen.items() if k in args.runs.split(",")}
    for name, run in chosen.items():
        times = measure(run, args.strategy, args.device)
        rec = dict(run=name, steps=len(run), max_tokens=max(t.num_tokens for t in run),
                   max_queries=max(t.num_queries for t in run))
        for what, values in times.items():
            rec[f"{what}_median_us"] = float(np.median(values))
            rec[f"{what}_p90_us"] = float(np.percentile(values, 90))
        rec["tree_plus_plan_median_us"] = float(np.median(np.add(times["tree"], times["plan"])))
        records.append(rec)
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()},
              flush=True)
    header = (f"{'run':<12} {'steps':>5} {'tokens':>6} {'queries':>7} {'tree':>7} "
              f"{'apply':>7} {'plan':>7} {'tree+plan':>9} {'build_plan':>10}")
    print(f"\nhost us per step, median over every step ({args.strategy}, {args.device}; "
          "build_plan: today's tuned path)")
    print(header)
    for r in records:
        print(f"{r['run']:<12} {r['steps']:>5} {r['max_tokens']:>6} {r['max_queries']:>7} "
              f"{r['tree_median_us']:>7.0f} {r['apply_median_us']:>7.0f} "
              f"{r['plan_median_us']:>7.0f} {r['tree_plus_plan_median_us']:>9.0f} "
              f"{r['plan_build_plan_median_us']:>10.0f}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "plan_overhead.json").write_text(json.dumps(
            dict(strategy=args.strategy, device=args.device, torch=torch.__version__,
                 records=records), indent=1))


if __name__ == "__main__":
    main()
