"""The bench loop: the floor first, then every workload x method, checked before it is timed.

For each workload: random inputs (`harness.inputs`), the float64 oracle on copy 0, computed on
the bench device (on a GPU a fraction of a second where the CPU took seconds). For each
method: skip it with the reason when it cannot run; else prepare it (plans, outside timing),
make its first call on output buffers filled with NaN and compare to the oracle (`rel_err`;
this call also pays JIT compilation), and time only a correct method. In graph mode the
graph's own output is checked too. Nothing a method or a workload raises stops the run: the
error is recorded in its row and the loop goes on. Progress goes to `log` (the CLI: stderr).

With ``shapes`` (``--heads``) every workload runs at every shape, shape by shape; a row's
``shape`` (``q_heads/kv_heads/head_dim``) and its workload name make its cell. The result is
one JSON-ready dict, ``format`` ``deft-bench/2`` (docs/benchmarks.md lists its fields);
`harness.bench.summary.finish` adds the ratios, summaries and verdicts.
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

import torch

from harness.bench.floor import measure_rates, workload_floor
from harness.bench.select import shape_label
from harness.bench.summary import finish, new_row
from harness.inputs import make_inputs, with_heads
from harness.timing import CudaTimer, GraphCaptureError, one_line
from deft.tree_format import tree_to_dict

FORMAT = "deft-bench/2"

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
"""Largest accepted rel_err against the float64 oracle (the peers of docs/anchors.md reach <= 4e-4 in fp16)."""

GRAPH_COPIES = 4
"""KV copies rotated in graph mode (docs/anchors.md: at least 4, more than L2 holds)."""


def run_bench(workloads, methods, *, shapes=None, dtype=torch.float16, timing="graph",
              device="cuda", page_size=16, copies=GRAPH_COPIES, seed=0, tolerance=None,
              timer=None, rates=None, log: Callable[[str], None] | None = None) -> dict:
    """Benchmark every workload x method, at every shape.

    Parameters
    ----------
    workloads : list of WorkloadSpec
    methods : list of Method
    shapes : list of AttentionShape, optional
        Heads and head dim to run every workload at (their dtype is ignored); None: each
        tree's own shape.
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
        ``best_peer``, ``best_peer_incl_fasttree``, ``summary`` and ``verdicts``
        (docs/benchmarks.md).
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
            "shapes": None if shapes is None else [shape_label(s) for s in shapes],
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

    cells = [(shape, spec) for shape in (shapes or [None]) for spec in workloads]
    for c, (shape, spec) in enumerate(cells):
        label = None if shape is None else shape_label(shape)
        entry = {"name": spec.text, "shape": label}
        result["workloads"].append(entry)
        log(f"[{c + 1}/{len(cells)}] {spec.text}" + (f" at {label}" if label else ""))
        try:
            tree = spec.tree()
            tree = tree if shape is None else with_heads(tree, shape)
            entry["shape"] = label = shape_label(tree.attention)
            inputs = make_inputs(tree, dtype, copies, device, seed, page_size)
            tree = inputs.tree
            entry.update(stats=tree.stats(), tree=tree_to_dict(tree))
            if rates is not None:
                entry["floor"] = workload_floor(tree, rates.copy_bandwidth, rates.matmul_rate)
            start = time.perf_counter()
            reference = oracle_attention(tree, inputs.q, inputs.k[0], inputs.v[0],
                                         inputs.sm_scale)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the logged time is the oracle's, not its launch
            log(f"  {tree!r}; oracle in {time.perf_counter() - start:.1f} s")
        except Exception as error:  # noqa: BLE001
            entry["error"] = one_line(error)
            log(f"  workload failed: {entry['error']}")
            continue

        def check(out):
            return rel_err(out.detach().to(reference.device), reference)

        for method in methods:
            row = bench_method(method, inputs, check, timer, timing, tolerance, log)
            result["results"].append({"workload": spec.text, "shape": label, **row})
        del inputs, reference
        _release_memory(device)
    finish(result)
    return result


def bench_method(method, inputs, check, timer, timing: str, tolerance: float, log) -> dict:
    """One result row: status ``ok``, ``skipped``, ``wrong`` or ``error``, and the numbers."""
    row = new_row(method.name, method.kind)
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
