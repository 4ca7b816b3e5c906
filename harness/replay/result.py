"""The JSON-ready result of a replay: per method the measured and extrapolated totals, the
upper bound, the baseline and the speedups (format ``deft-replay/1``, docs/reproduction.md).

Traffic comes twice: ``traffic`` / ``total_bytes_run`` is the IO model's accounting of the
method's strategy (the paper's), ``kernel_traffic`` / ``kernel_bytes_run`` what this project's
kernels read and write (`harness.kernel_traffic`; None for the other methods)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from harness.bench.runner import environment

FORMAT = "deft-replay/1"

BASELINES = ("sglang", "radix")
"""Speedups are over the first of these that ran (the paper's Radix Attention)."""


def replay_result(run, steps, e2e_at, measured, upper, capacity, cache, device, config) -> dict:
    """The JSON-ready result of a replay (see `replay`)."""

    def seconds(ms_list):
        """(measured sum, mean x steps of the run), in seconds; Nones when nothing was measured."""
        if not ms_list:
            return None, None
        return float(np.sum(ms_list)) / 1e3, float(np.mean(ms_list)) * len(run) / 1e3

    entries = []
    for entry in measured:
        attention, attention_run = seconds(entry.attention_ms)
        plan, plan_run = seconds(entry.plan_ms)
        e2e, e2e_run = seconds(entry.e2e_ms)
        replayed = len(entry.attention_ms)
        entries.append({
            "method": entry.name, "kind": entry.kind, "strategy": entry.strategy,
            "status": entry.status, "reason": entry.reason, "timing": entry.timing,
            "e2e_timing": entry.e2e_timing if entry.e2e_ms else None,
            "capture_error": entry.capture_error,
            "attention_s": attention, "attention_s_run": attention_run,
            "plan_s": plan, "plan_s_run": plan_run, "e2e_s": e2e, "e2e_s_run": e2e_run,
            "traffic": dict(entry.traffic) if replayed else None,
            "kv_bytes_run": entry.traffic["kv_bytes"] * len(run) / replayed if replayed else None,
            "total_bytes_run": sum(entry.traffic.values()) * len(run) / replayed
            if replayed else None,
            "kernel_traffic": dict(entry.kernel_traffic) if replayed and entry.kernel_traffic
            else None,
            "kernel_bytes_run": sum(entry.kernel_traffic.values()) * len(run) / replayed
            if replayed and entry.kernel_traffic else None,
            "rel_err": entry.rel_err,
            "per_step_ms": {"attention": entry.attention_ms, "plan": entry.plan_ms,
                            "e2e": entry.e2e_ms},
        })
    upper_bound = None
    if upper is not None:
        e2e, e2e_run = seconds(upper.e2e_ms)
        upper_bound = {"status": upper.status, "reason": upper.reason,
                       "timing": upper.e2e_timing,
                       "capture_error": upper.capture_error, "e2e_s": e2e, "e2e_s_run": e2e_run,
                       "per_step_ms": upper.e2e_ms}
    ok = {e["method"]: e for e in entries if e["status"] == "ok" and e["attention_s"]}
    baseline = next((name for name in BASELINES if name in ok), None)
    speedups = {}
    if baseline is not None:
        base = ok[baseline]
        for name, e in ok.items():
            speedups[name] = {
                "attention": base["attention_s_run"] / e["attention_s_run"],
                "e2e": base["e2e_s_run"] / e["e2e_s_run"] if base["e2e_s"] and e["e2e_s"]
                else None,
            }
    return {
        "format": FORMAT,
        "env": environment(device),
        "config": config,
        "workload": {"name": run.name, "description": run.description, "steps": len(run),
                     "replayed": len(steps), "step_indices": steps,
                     "e2e_steps": [steps[k] for k in e2e_at], "capacity": asdict(capacity)},
        "methods": entries,
        "upper_bound": upper_bound,
        "baseline": baseline,
        "speedups": speedups,
        "cache": {"pages": capacity.pages,
                  "pages_in_use_at_end": cache.pool.num_pages - cache.pool.num_free,
                  "nodes_at_end": len(cache)},
    }


