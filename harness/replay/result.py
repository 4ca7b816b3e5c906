"""The JSON-ready result of a replay (format ``deft-replay/2``, docs/reproduction.md): per
method every per-step time and the traffic summed over the steps replayed, and what
`summarise` derives from them (whole-run totals, the planning shares, the speedups).

Traffic comes twice: ``traffic`` / ``total_bytes_run`` is the IO model's accounting of the
method's strategy (the paper's), ``kernel_traffic`` / ``kernel_bytes_run`` what this project's
kernels read and write (`harness.kernel_traffic`; None for the other methods).

Coverage (``workload``): ``step_range`` [start, stop] of the run's steps replayed (None when
sampled), ``sampled`` (``max_steps``: evenly spaced steps, totals extrapolated), ``complete``
(every step of the run, none extrapolated: a full run)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from harness.bench.runner import environment

FORMAT = "deft-replay/2"

BASELINES = ("sglang", "radix")
"""Speedups are over the first of these that ran (the paper's Radix Attention)."""

TOTALS = {"attention": "attention_s", "plan": "plan_s", "e2e": "e2e_s", "inline": "inline_s",
          "overlap": "overlap_s"}
"""Per-step list -> total key (seconds; ``<key>_run`` is the whole run's)."""


def replay_result(run, indices, step_range, measured, upper, capacity, cache, device,
                  config) -> dict:
    """The JSON-ready result of a replay (see `harness.replay.replay`), summarised."""
    entries = []
    for entry in measured:
        replayed = bool(entry.per_step["attention"])
        entries.append({
            "method": entry.name, "kind": entry.kind, "strategy": entry.strategy,
            "status": entry.status, "reason": entry.reason, "timing": entry.timing,
            "e2e_timing": entry.e2e_timing if entry.per_step["e2e"] else None,
            "capture_error": entry.capture_error,
            "traffic": dict(entry.traffic) if replayed else None,
            "kernel_traffic": dict(entry.kernel_traffic) if replayed and entry.kernel_traffic
            else None,
            "rel_err": entry.rel_err,
            "per_step_ms": {key: list(values) for key, values in entry.per_step.items()},
        })
    upper_bound = None
    if upper is not None:
        upper_bound = {"status": upper.status, "reason": upper.reason,
                       "timing": upper.e2e_timing, "capture_error": upper.capture_error,
                       "per_step_ms": list(upper.per_step["e2e"])}
    sampled = step_range is None and len(indices) < len(run)
    return summarise({
        "format": FORMAT,
        "env": environment(device),
        "config": config,
        "workload": {"name": run.name, "description": run.description, "steps": len(run),
                     "replayed": len(indices), "step_indices": list(indices),
                     "step_range": None if step_range is None else list(step_range),
                     "sampled": sampled,
                     "complete": not sampled and len(indices) == len(run),
                     "capacity": asdict(capacity)},
        "methods": entries,
        "upper_bound": upper_bound,
        "cache": {"pages": capacity.pages,
                  "pages_in_use_at_end": cache.pool.num_pages - cache.pool.num_free,
                  "nodes_at_end": len(cache)},
    })


def summarise(result: dict) -> dict:
    """Fill in a result's totals, shares, baseline and speedups from its per-step times.

    ``<total>`` is the sum over the steps replayed, ``<total>_run`` the whole run's: the same
    for a full run, (mean x steps of the run) otherwise. ``plan_share_inline`` is planning's
    share of the decode latency with planning in line; ``plan_hidden`` the share of planning
    that overlapping hides, (inline - overlapped) / planning."""
    steps = result["workload"]["steps"]

    def seconds(ms_list):
        if not ms_list:
            return None, None
        return float(np.sum(ms_list)) / 1e3, float(np.mean(ms_list)) * steps / 1e3

    for e in result["methods"]:
        per_step = e["per_step_ms"]
        for key, total in TOTALS.items():
            e[total], e[total + "_run"] = seconds(per_step[key])
        replayed = len(per_step["attention"])
        for key, traffic in (("total_bytes_run", e["traffic"]),
                             ("kernel_bytes_run", e["kernel_traffic"])):
            e[key] = sum(traffic.values()) * steps / replayed if replayed and traffic else None
        e["kv_bytes_run"] = e["traffic"]["kv_bytes"] * steps / replayed if replayed else None
        inline, overlap, plan = e["inline_s"], e["overlap_s"], e["plan_s"]
        e["plan_share_inline"] = plan / inline if inline and plan is not None else None
        e["plan_hidden"] = (inline - overlap) / plan if inline and overlap is not None and plan \
            else None
    upper = result["upper_bound"]
    if upper is not None:
        upper["e2e_s"], upper["e2e_s_run"] = seconds(upper["per_step_ms"])
    ok = {e["method"]: e for e in result["methods"] if e["status"] == "ok" and e["attention_s"]}
    baseline = next((name for name in BASELINES if name in ok), None)
    speedups = {}
    if baseline is not None:
        base = ok[baseline]
        for name, e in ok.items():
            speedups[name] = {"attention": base["attention_s_run"] / e["attention_s_run"]}
            for key in ("e2e", "inline", "overlap"):
                total = TOTALS[key] + "_run"
                speedups[name][key] = base[total] / e[total] if base[total] and e[total] \
                    else None
    result["baseline"], result["speedups"] = baseline, speedups
    return result
