#!/usr/bin/env python3
"""Host time of one decode step's planning, over every step of whole runs.

    python scripts/plan_overhead.py [--workloads DIR] [--strategy deft_flatten] [--device cpu]
                                    [--runs NAMES] [--steps N] [--clock wall|cpu] [--check]

Runs: fewshot b20 and b50 over a 4000-token prompt, the reasoning runs keywordToT, set128ToT,
sorting128ToT and docmergeToT over 4000 tokens, speculative t64 and t256 over 4000 tokens, and
two trees of 256 queries and up to 64k tokens (speculative t256 over a 63000-token prompt, and
256 samples of a 55296-token prompt decoded for 40 steps). Per step, the host time of

- ``tree``: getting the step's tree from the run (``run.tree(i)``);
- ``apply``: syncing a `deft.cache.TreeCache` to it (the serving engine's page allocation);
- ``plan``: `TreeAttention.plan` with fixed sizes (the node planner, `deft.fast_plan`, compiled
  with numba: the run's first step, ``plan_first_us``, includes loading the compiled functions
  from numba's on-disk cache, or compiling them where it is cold, in the process's first run);
- ``fill``: the part of ``plan`` spent in `deft.plan_buffers.PlanBuffers.fill` (staging, the
  host-to-device copies' launch and the wait for the previous plan's copies); of it
  ``fill_write`` (the compiled staging writes, or on the CPU the buffers' writes) and, on a
  GPU, ``fill_wait`` (for the previous plan's copies), ``fill_upload`` (launching the copies)
  and ``fill_copies`` (how many: a count, not microseconds);
- ``plan_synced``: ``plan`` and then waiting for the device (its copies done; on the CPU the
  same as ``plan``), measured on a second TreeAttention of the same sizes;
- ``total``: the three summed;
- ``plan_tuned``: `TreeAttention.plan` taking its sizes from the tuned configs (on the CPU or
  an untuned GPU the defaults, the same sizes as ``plan``).

Both plans read the page table and refill the plan buffers; with ``--device cuda`` that is the
real plan(): pinned staging and the non-blocking host-to-device copies (host time, no sync).
``--check`` also reads the fixed-size plan's buffers back after every step (untimed) and
compares them with a from-scratch encoding of the step's reference plan
(`deft.plan_buffers.plan_arrays` of `deft.plan.build_plan`), exiting 1 on a difference.
Prints the median and 90th percentile over the run's steps in microseconds, a table last;
writes $OUT/plan_overhead.json when $OUT is set. ``--budget-us`` makes it exit 1 when a run's
median ``tree + plan`` exceeds it (the issue's 100 us). ``--clock cpu`` times the thread's CPU
time instead of the wall clock: steadier on a shared machine (time the process spends
descheduled is left out), but it leaves out waits too (``fill`` waiting for the last upload),
so the GPU host's numbers take the wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import plan_buffers, workloads as wl  # noqa: E402
from deft.cache import PagedKVCache, TreeCache, pages_for  # noqa: E402
from deft.plan import build_plan, check_parameters  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from harness.timing import synchronize  # noqa: E402

PAGE_SIZE = 16


def runs(workload_dir):
    """The measured runs: name -> Run."""
    found = {
        "fewshot_b20": wl.fewshot(4000, 20, 400),
        "fewshot_b50": wl.fewshot(4000, 50, 400),
    }
    wanted = [(name, lambda n=name: wl.reasoning(n, prompt_tokens=4000, workload_dir=workload_dir))
              for name in ("keywordToT", "set128ToT", "sorting128ToT", "docmergeToT")]
    wanted += [(f"spec_t{size}", lambda s=size: wl.speculative(s, 4000, workload_dir=workload_dir))
               for size in (64, 256)]
    wanted.append(("spec_t256_P63000",
                   lambda: wl.speculative(256, 63000, workload_dir=workload_dir)))
    for name, make in wanted:
        try:
            found[name] = make()
        except FileNotFoundError as missing:
            print(f"skipping {name}: {missing}", file=sys.stderr)
    found["fewshot_b256_P55296"] = wl.fewshot(55296, 256, 40)
    return found


CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}
clock = CLOCKS["wall"]


def timed(fn):
    """(result, host microseconds) of one call, on `clock`."""
    start = clock()
    result = fn()
    return result, (clock() - start) / 1e3


def measure(run, strategy: str, device: str, steps=None, check=False) -> dict:
    """Per-step host times of one run (lists of microseconds), over its first `steps` steps
    (default: all); with `check`, the fixed-size plan's buffers compared with the reference
    after each step (`held_as_planned`), raising on a difference."""
    largest = max(range(len(run)), key=lambda i: run.tree(i).num_tokens)
    biggest = run.tree(largest)
    queries = max(run.tree(i).num_queries for i in range(0, len(run), max(1, len(run) // 50)))
    queries = max(queries, biggest.num_queries, 256)
    capacity = dict(max_queries=queries, max_tokens=2 * biggest.num_tokens, device=device)
    chunk, group, _ = check_parameters(strategy, None, None, 1)
    if chunk is None:  # deft_node takes no chunk: a group cap no tree reaches fixes its
        group = 10**6  # sizes without changing its plan, so that it takes the node planner
    fast = TreeAttention(strategy, chunk, group, **capacity)
    synced = TreeAttention(strategy, chunk, group, **capacity)
    tuned = TreeAttention(strategy, **capacity)
    parts = {"fill": [], "fill_write": [], "fill_wait": [], "fill_upload": [], "fill_copies": []}

    def timed_part(name, method):
        def timed_method(*args):
            result, us = timed(lambda: method(*args))
            parts[name].append(us)
            return result
        return timed_method

    fast.buffers.fill = timed_part("fill", fast.buffers.fill)
    fast.buffers._write = timed_part("fill_write", fast.buffers._write)
    upload = fast.buffers._upload  # None on the CPU: the buffers are written directly
    if upload is not None:
        upload.wait = timed_part("fill_wait", upload.wait)
        upload_copies = timed_part("fill_upload", upload.upload)

        def counted_upload(copies):
            parts["fill_copies"].append(len(copies))
            upload_copies(copies)

        upload.upload = counted_upload
    device = torch.device(device)
    pool = PagedKVCache(4 * pages_for(biggest, PAGE_SIZE) + 64, PAGE_SIZE, 1, 16, device=device)
    cache = TreeCache(pool)
    times = {"tree": [], "apply": [], "plan": [], "plan_synced": [], "plan_tuned": []}
    for i in range(len(run) if steps is None else min(steps, len(run))):
        tree, us = timed(lambda: run.tree(i))
        times["tree"].append(us)
        times["apply"].append(timed(lambda: cache.apply(tree))[1])
        synchronize(device)
        times["plan"].append(timed(lambda: fast.plan(tree, cache))[1])
        synchronize(device)
        if check:
            held_as_planned(fast, tree, cache, strategy, chunk, group, i)
        times["plan_synced"].append(
            timed(lambda: (synced.plan(tree, cache), synchronize(device)))[1])
        times["plan_tuned"].append(timed(lambda: tuned.plan(tree, cache))[1])
    times.update((name, values) for name, values in parts.items() if values)
    times["tree_plus_plan"] = list(np.add(times["tree"], times["plan"]))
    times["total"] = list(np.add(times["tree_plus_plan"], times["apply"]))
    return times


def held_as_planned(attn, tree, cache, strategy, chunk, group, step) -> None:
    """Raise if ``attn``'s buffers do not hold the from-scratch encoding of the step's plan."""
    page_size = plan_buffers.cache_page_size(cache)
    page_ptr, pages = plan_buffers.host_node_pages(cache, tree)
    expected = plan_buffers.plan_arrays(build_plan(strategy, tree, chunk, group, page_size),
                                        page_ptr, pages, attn.flat, attn.rows_per_query)
    for name in plan_buffers.FIELDS:
        held = attn.buffers.read(name)[:len(expected[name])]
        if not np.array_equal(held, expected[name]):
            raise SystemExit(f"step {step}: the plan buffers' {name} differs from the reference")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--strategy", default="deft_flatten")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default=None, help="comma-separated subset of the run names")
    parser.add_argument("--steps", type=int, default=None,
                        help="measure only each run's first steps (a quick dry run)")
    parser.add_argument("--budget-us", type=float, default=None,
                        help="exit 1 when a run's median tree + plan exceeds this")
    parser.add_argument("--coalesce", type=int, default=None,
                        help="deft.plan_buffers.COALESCE for this run (the unused elements fill "
                             "copies along rather than issue another copy)")
    parser.add_argument("--check", action="store_true",
                        help="compare the plan buffers with the reference plan after every "
                             "step (untimed; exit 1 on a difference)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the thread's CPU time (steadier on a "
                             "shared machine, without waits)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.coalesce is not None:
        plan_buffers.COALESCE = args.coalesce
    records = []
    chosen = runs(args.workloads)
    if args.runs:
        chosen = {k: v for k, v in chosen.items() if k in args.runs.split(",")}
    for name, run in chosen.items():
        times = measure(run, args.strategy, args.device, args.steps, args.check)
        trees = [run.tree(i) for i in range(len(times["tree"]))]
        rec = dict(run=name, clock=args.clock, coalesce=plan_buffers.COALESCE, steps=len(trees),
                   max_tokens=max(t.num_tokens for t in trees),
                   max_queries=max(t.num_queries for t in trees),
                   plan_first_us=times["plan"][0])
        for what, values in times.items():
            unit = "" if what == "fill_copies" else "_us"  # a count
            rec[f"{what}_median{unit}"] = float(np.median(values))
            rec[f"{what}_p90{unit}"] = float(np.percentile(values, 90))
        records.append(rec)
        print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()},
              flush=True)
    columns = ("tree", "apply", "plan", "fill", "fill_write") + tuple(
        c for c in ("fill_wait", "fill_upload") if records and f"{c}_median_us" in records[0]) + (
        "tree_plus_plan", "total", "plan_synced", "plan_tuned")
    print(f"\nhost us per step, median / p90 over every step ({args.strategy}, {args.device}, "
          f"{args.clock} clock)")
    print(f"{'run':<20} {'steps':>5} {'tokens':>6} {'queries':>7} "
          + " ".join(f"{c:>13}" for c in columns))
    for r in records:
        print(f"{r['run']:<20} {r['steps']:>5} {r['max_tokens']:>6} {r['max_queries']:>7} "
              + " ".join(f"{r[c + '_median_us']:>6.0f}/{r[c + '_p90_us']:<6.0f}"
                         for c in columns))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "plan_overhead.json").write_text(json.dumps(
            dict(strategy=args.strategy, device=args.device, torch=torch.__version__,
                 numba=numba.__version__, records=records), indent=1))
    over = [r["run"] for r in records
            if args.budget_us is not None and r["tree_plus_plan_median_us"] > args.budget_us]
    if over:
        print(f"over the {args.budget_us:.0f} us budget (median tree + plan): "
              f"{', '.join(over)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
