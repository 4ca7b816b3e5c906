"""The bench loop: the floor first, then every workload x method, checked before it is timed.

For each workload: random inputs (`harness.inputs`), the float64 oracle on copy 0. For each
method: skip it with the reason when it cannot run; else prepare it (plans, outside timing),
make its first call on output buffers filled with NaN and compare to the oracle (`rel_err`;
this call also pays JIT compilation), and time only a correct method. In graph mode the
graph's own output is checked too. Nothing a method or a workload raises stops the run: the
error is recorded in its row and the loop goes on. Progress goes to `log` (the CLI: stderr).

The result is one JSON-ready dict, ``format`` ``deft-bench/1`` (docs/benchmarks.md lists
its fields).
"""

from __future__ import annotations

import gc
import math
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from harness.bench.floor import measure_rates, workload_floor
from harness.inputs import make_inputs
from harness.timing import CudaTimer, GraphCaptureError, one_line
from deft.tree_format import tree_to_dict

FORMAT = "deft-bench/1"

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
"""Largest accepted rel_err against the float64 oracle (the peers of docs/anchors.md reach <= 4e-4 in fp16)."""

GRAPH_COPIES = 4
"""KV copies rotated in graph mode (docs/anchors.md: at least 4, more than L2 holds)."""


def run_bench(workloads, methods, *, dtype=torch.float16, timing="graph", device="cuda",
              page_size=16, copies=GRAPH_COPIES, seed=0, tolerance=None, timer=None,
              rates=None, log: Callable[[str], None] | None = None) -> dict:
    """Benchmark every workload x method.

    Parameters
    ----------
    workloads : list of WorkloadSpec
    methods : list of Method
    dtype : torch.float16 or torch.bfloat16
    timing : "graph" or "eager"
    device : str or torch.device
    page_size : int
        Tokens per page of this project's paged cache.
    copies : int
        KV copies rotated in graph mode (eager mode uses one: do_bench flushes L2).
    seed : int
    tolerance : float, optional
        Largest accepted rel_err (default `TOLERANCE` of the dtype).
    timer : optional
        `harness.timing.CudaTimer` by default; tests pass a `WallTimer`.
    rates : FloorRates, optional
        Use these instead of measuring (tests).
    log : callable, optional
        Receives one progress line at a time.

    Returns
    -------
    dict
        ``format``, ``env``, ``config``, ``floor_rates``, ``workloads``, ``results``,
        ``best_peer`` and ``summary`` (docs/benchmarks.md).
    """
    from reference import oracle_attention, rel_err

    log = log or (lambda line: None)
    device = torch.device(device)
    timer = timer or CudaTimer()
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    copies = copies if timing == "graph" else 1
    result = {
        "format": FORMAT,
        "env": environment(device),
        "config": {
            "dtype": str(dtype).removeprefix("torch."), "timing": timing, "kv_copies": copies,
            "page_size": page_size, "seed": seed, "tolerance": tolerance,
            "workloads": [spec.text for spec in workloads],
            "methods": [method.name for method in methods],
        },
        "floor_rates": None,
        "workloads": [],
        "results": [],
    }
    if rates is None:
        log("floor: measuring copy bandwidth and GEMM rate")
        try:
            rates = measure_rates(timer, device, dtype)
        except Exception as error:  # noqa: BLE001 - the run goes on without a floor
            log(f"floor: failed ({one_line(error)}); ratios to the floor are left out")
    if rates is not None:
        result["floor_rates"] = rates.to_dict()
        log(f"floor: copy {rates.copy_bandwidth / 1e9:.0f} GB/s, "
            f"GEMM {rates.matmul_rate / 1e12:.0f} TFLOP/s")

    for w, spec in enumerate(workloads):
        entry = {"name": spec.text}
        result["workloads"].append(entry)
        log(f"[{w + 1}/{len(workloads)}] {spec.text}")
        try:
            inputs = make_inputs(spec.tree(), dtype, copies, device, seed, page_size)
            tree = inputs.tree
            entry.update(stats=tree.stats(), tree=tree_to_dict(tree))
            if rates is not None:
                entry["floor"] = workload_floor(tree, rates.copy_bandwidth, rates.matmul_rate)
            start = time.perf_counter()
            reference = oracle_attention(tree, inputs.q.cpu(), inputs.k[0].cpu(),
                                         inputs.v[0].cpu(), inputs.sm_scale)
            log(f"  {tree!r}; oracle in {time.perf_counter() - start:.1f} s")
        except Exception as error:  # noqa: BLE001
            entry["error"] = one_line(error)
            log(f"  workload failed: {entry['error']}")
            continue

        def check(out):
            return rel_err(out.detach().cpu(), reference)

        for method in methods:
            row = bench_method(method, inputs, check, timer, timing, tolerance, log)
            result["results"].append({"workload": spec.text, **row})
        del inputs
        _release_memory(device)
    finish(result)
    return result


def bench_method(method, inputs, check, timer, timing: str, tolerance: float, log) -> dict:
    """One result row: status ``ok``, ``skipped``, ``wrong`` or ``error``, and the numbers."""
    row = {"method": method.name, "kind": method.kind, "status": "ok", "reason": None,
           "us": None, "p10_us": None, "p90_us": None, "timing": None, "capture_error": None,
           "variant": "", "variants": {}, "rel_err": None, "graph_rel_err": None,
           "plan_us": None, "params": {}}
    start = time.perf_counter()
    variants = []
    try:
        reason = method.unavailable(inputs.device, inputs.tree)
        if reason:
            row.update(status="skipped", reason=reason)
            log(f"  {method.name}: skipped ({reason})")
            return row
        log(f"  {method.name}: prepare, first call and check ({method.first_call})")
        variants = method.prepare(inputs)
        best = None
        for variant in variants:
            name = method.name + (f" [{variant.label}]" if variant.label else "")
            measured = _check_and_time(variant, check, timer, timing, tolerance)
            row["variants"][variant.label] = measured
            log(f"  {name}: " + _describe(measured))
            if measured["status"] == "ok" and (best is None or measured["us"] < best[1]["us"]):
                best = (variant, measured)
        if best is None:
            worst = min(row["variants"].values(), key=_badness)
            row.update({key: worst[key] for key in ("status", "reason", "rel_err",
                                                    "graph_rel_err")})
        else:
            variant, measured = best
            row.update({key: measured[key] for key in ("us", "p10_us", "p90_us", "timing",
                                                       "capture_error", "rel_err",
                                                       "graph_rel_err")})
            row.update(variant=variant.label, plan_us=variant.plan_us, params=variant.params)
    except Exception as error:  # noqa: BLE001 - one failing method never stops the run
        row.update(status="error", reason=one_line(error))
        log(f"  {method.name}: error ({row['reason']})")
    finally:
        row["seconds"] = time.perf_counter() - start
        del variants
        _release_memory(inputs.device)
    return row


def _check_and_time(variant, check, timer, timing, tolerance) -> dict:
    """Check one variant against the oracle, then time it: a dict of its status and numbers."""
    measured = {"status": "ok", "reason": None, "us": None, "p10_us": None, "p90_us": None,
                "timing": None, "capture_error": None, "rel_err": None, "graph_rel_err": None}
    try:
        for buffer in variant.poison:
            buffer.fill_(float("nan"))
        error = check(variant.calls[0]())
        measured["rel_err"] = error
        if not error <= tolerance:  # NaN fails too
            measured.update(status="wrong", reason=f"rel_err {error:.3g} > tolerance {tolerance:g}")
            return measured
        result = None
        if timing == "graph":
            try:
                result, outputs = timer.graph(variant.calls)
                measured["timing"] = "graph"
                graph_error = check(outputs[0])
                measured["graph_rel_err"] = graph_error
                if not graph_error <= tolerance:
                    measured.update(status="wrong", reason=f"graph replay rel_err {graph_error:.3g}")
                    return measured
            except GraphCaptureError as capture_error:
                measured.update(timing="eager-fallback", capture_error=str(capture_error))
        if result is None:
            result = timer.eager(variant.calls[0])
            measured["timing"] = measured["timing"] or "eager"
        measured.update(us=result.median_us, p10_us=result.p10_us, p90_us=result.p90_us)
    except Exception as error:  # noqa: BLE001
        measured.update(status="error", reason=one_line(error))
    return measured


def _badness(measured: dict) -> tuple:
    """Order of failed variants: the one to report is the least bad (wrong before error)."""
    error = measured["rel_err"]
    return (measured["status"] != "wrong", math.inf if error is None or error != error else error)


def _describe(measured: dict) -> str:
    if measured["status"] != "ok":
        return f"{measured['status']} ({measured['reason']})"
    text = f"{measured['us']:.1f} µs ({measured['timing']}), rel_err {measured['rel_err']:.2g}"
    if measured["capture_error"]:
        text += f"; graph capture failed: {measured['capture_error']}"
    return text


def finish(result: dict) -> None:
    """Add ratios to the floor, speedups over the best peer, ``best_peer`` and ``summary``."""
    floors = {w["name"]: w["floor"]["floor_us"] for w in result["workloads"] if "floor" in w}
    best_peer = {}
    for row in result["results"]:
        if row["kind"] == "peer" and row["status"] == "ok":
            best = best_peer.get(row["workload"])
            if best is None or row["us"] < best["us"]:
                best_peer[row["workload"]] = {"method": row["method"], "us": row["us"]}
    for row in result["results"]:
        ok = row["status"] == "ok"
        floor = floors.get(row["workload"])
        peer = best_peer.get(row["workload"])
        row["ratio_to_floor"] = row["us"] / floor if ok and floor else None
        row["speedup_vs_best_peer"] = peer["us"] / row["us"] if ok and peer else None
    result["best_peer"] = best_peer
    result["summary"] = summarize(result)


def summarize(result: dict) -> dict:
    """Per method over the workloads it ran: geometric means and worst cases."""
    summary = {}
    names = dict.fromkeys(row["method"] for row in result["results"])
    for name in names:
        rows = [r for r in result["results"] if r["method"] == name]
        ok = [r for r in rows if r["status"] == "ok"]
        ratios = [r["ratio_to_floor"] for r in ok if r["ratio_to_floor"]]
        speedups = [r["speedup_vs_best_peer"] for r in ok if r["speedup_vs_best_peer"]]
        summary[name] = {
            "kind": rows[0]["kind"],
            "workloads": len(rows),
            "ok": len(ok),
            "geomean_ratio_to_floor": _geomean(ratios),
            "worst_ratio_to_floor": max(ratios) if ratios else None,
            "geomean_speedup_vs_best_peer": _geomean(speedups),
            "faster_than_best_peer": sum(s > 1 for s in speedups),
            "compared_to_peers": len(speedups),
        }
    return summary


def _geomean(values) -> float | None:
    return float(np.exp(np.mean(np.log(values)))) if values else None


# ---------------------------------------------------------------------------- environment
def environment(device: torch.device) -> dict:
    """The card and the software versions, for the report's header and the JSON."""
    env = {
        "device": device.type,
        "card": None,
        "sm_count": None,
        "memory_gb": None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "flashinfer": _version("flashinfer-python") or _version("flashinfer"),
        "sglang": _version("sglang"),
        "deft_commit": _commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, sm_count=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 2**30, 1))
    else:
        env["card"] = platform.processor() or platform.machine()
    return env


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The repository's commit (``+dirty`` with local changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - a broken context shows up in the next row
            pass
