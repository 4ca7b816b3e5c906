"""What a bench run shows: per shape a rich table and a summary, the verdicts, the JSON with
every number, an optional plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {"ok": "", "skipped": "dim", "wrong": "bold red", "error": "red"}
VERDICT_STYLE = {"met": "green", "not met": "bold red", "not judged": "dim"}


def render(result: dict) -> Group:
    """The report of a ``deft-bench/2`` result: header, per shape the table of its rows and
    its summary, then the verdicts."""
    parts = [header(result)]
    for shape in shapes(result):
        parts += [results_table(result, shape), summary_table(result, shape)]
    return Group(*parts, verdict_text(result))


def shapes(result: dict) -> list:
    """The shapes of the run's workloads (``q/kv/head_dim`` labels), in run order."""
    return list(dict.fromkeys(w.get("shape") for w in result["workloads"]))


def header(result: dict) -> Text:
    """Card, versions, configuration and the measured rates, a few lines."""
    env, config = result["env"], result["config"]
    card = env["card"] or "unknown card"
    if env.get("sm_count"):
        card += f" ({env['sm_count']} SMs, {env['memory_gb']} GiB)"
    versions = ", ".join(
        f"{name} {env[name]}" for name in ("torch", "cuda", "triton", "flashinfer", "sglang")
        if env.get(name)
    )
    lines = [
        f"card: {card}",
        f"versions: {versions}; python {env['python']}; deft {env.get('deft_commit') or '?'}",
        f"dtype {config['dtype']}, timing {config['timing']} ({_timing_note(config)}), "
        f"deft page size {config['page_size']}, tolerance {config['tolerance']:g}",
    ]
    rates = result.get("floor_rates")
    if rates:
        lines.append(f"floor rates: copy {rates['copy_bandwidth_gb_s']:.0f} GB/s, "
                     f"{rates['dtype']} GEMM {rates['matmul_tflops']:.0f} TFLOP/s")
    else:
        lines.append("floor rates: not measured")
    return Text("\n".join(lines))


def _timing_note(config: dict) -> str:
    if config["timing"] == "graph":
        return f"one CUDA graph over {config['kv_copies']} KV copies, median replay / copies"
    return "triton do_bench median, L2 flushed"


def results_table(result: dict, shape=None) -> Table:
    """One row per workload x method at `shape`, the floor first in each workload."""
    table = Table(title=f"{_shape_title(shape)}: per-call time (µs); x floor = time / floor; "
                        "vs peer = best peer / time (FT: FastTree's derived row counted)")
    for column, justify in (("workload", "left"), ("method", "left"), ("µs", "right"),
                            ("x floor", "right"), ("vs peer", "right"),
                            ("vs peer FT", "right"), ("rel_err", "right"), ("plan µs", "right"),
                            ("note", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    best_peer = result.get("best_peer", {}).get(shape, {})
    for workload in (w for w in result["workloads"] if w.get("shape") == shape):
        name = workload["name"]
        if "error" in workload:
            table.add_row(name, "-", "", "", "", "", "", "", Text(workload["error"], "red"))
            table.add_section()
            continue
        floor = workload.get("floor")
        if floor:
            table.add_row(name, Text("floor", "bold"), f"{floor['floor_us']:.1f}", "1.0", "", "",
                          "", "", f"{floor['bound']} bound: bytes {floor['memory_us']:.1f} / "
                                  f"flops {floor['compute_us']:.1f}")
        rows = (r for r in result["results"]
                if r["workload"] == name and r.get("shape") == shape)
        for row in rows:
            best = best_peer.get(name, {}).get("method") == row["method"]
            table.add_row(
                "" if floor else name,
                Text(row["method"], "bold" if best else ""),
                _number(row["us"], ".1f"),
                _number(row.get("ratio_to_floor"), ".2f"),
                _number(row.get("speedup_vs_best_peer"), ".2f"),
                _number(row.get("speedup_vs_best_peer_incl_fasttree"), ".2f"),
                _number(row["rel_err"], ".1e"),
                _number(row["plan_us"], ".0f"),
                Text(_note(row), STATUS_STYLE.get(row["status"], "")),
            )
        table.add_section()
    return table


def _shape_title(shape) -> str:
    return "each tree's own shape" if shape is None else f"heads {shape}"


def _note(row: dict) -> str:
    parts = []
    if row["status"] != "ok":
        parts.append(f"{row['status']}: {row['reason']}")
    if row["variant"]:
        parts.append(row["variant"])
    if row["timing"] == "eager-fallback":
        parts.append(f"eager (graph capture failed: {row['capture_error']})")
    return "; ".join(parts)


def summary_table(result: dict, shape=None) -> Table:
    """Per method at `shape`: workloads run, geometric-mean and worst ratio to the floor,
    speedup over the best peer and how often it beat it, without and with FastTree."""
    table = Table(title=f"{_shape_title(shape)}: summary over workloads (geometric means)")
    for column in ("method", "ok", "x floor", "worst x floor", "vs best peer",
                   "faster than best peer", "vs best peer FT", "faster FT"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, s in result.get("summary", {}).get(shape, {}).items():
        deft = s["kind"] == "deft"
        table.add_row(
            name, f"{s['ok']}/{s['workloads']}", _number(s["geomean_ratio_to_floor"], ".2f"),
            _number(s["worst_ratio_to_floor"], ".2f"),
            _number(s["geomean_speedup_vs_best_peer"], ".2f"),
            f"{s['faster_than_best_peer']}/{s['compared_to_peers']}" if deft else "",
            _number(s["geomean_speedup_vs_best_peer_incl_fasttree"], ".2f"),
            f"{s['faster_than_best_peer_incl_fasttree']}/{s['compared_incl_fasttree']}"
            if deft else "",
        )
    return table


def verdict_text(result: dict) -> Text:
    """One line per target clause (`harness.bench.verdicts`): met, not met or not judged."""
    found = result.get("verdicts", [])
    runs = result["config"].get("merged_from")
    where = f"{runs} runs merged" if runs else "this run"
    text = Text(f"verdicts ({found[0]['method']}, {where}):\n" if found else "verdicts: none "
                "(no method of this project ran)\n")
    for verdict in found:
        text.append(f"  {verdict['text']}\n", VERDICT_STYLE[verdict["status"]])
    return text


def _number(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_json(result: dict, path) -> None:
    """Write the result with every number (NaN and infinities as null: strict JSON)."""
    Path(path).write_text(json.dumps(_finite(result), indent=1) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def plot_result(result: dict, path) -> None:
    """Grouped bars of the ratio to the floor per workload and method (log scale), to a PNG.

    Needs matplotlib (``pip install deft-toolkit[plot]``); raises ImportError without it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(shapes(result)) > 1
    cells = [(w["name"], w.get("shape")) for w in result["workloads"] if "floor" in w]
    workloads = [f"{name} {shape}" if several else name for name, shape in cells]
    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    ratio = {(r["workload"], r.get("shape"), r["method"]): r.get("ratio_to_floor")
             for r in result["results"]}
    width = 0.8 / max(1, len(methods))
    figure, axes = plt.subplots(figsize=(max(8, 1.6 * len(workloads)), 5))
    for m, method in enumerate(methods):
        xs = [w + (m - (len(methods) - 1) / 2) * width for w in range(len(workloads))]
        ys = [ratio.get((name, shape, method)) or 0 for name, shape in cells]
        axes.bar(xs, ys, width, label=method,
                 hatch="//" if method in _deft_methods(result) else None)
    for level, style in ((1, "-"), (2, "--")):
        axes.axhline(level, color="black", linestyle=style, linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xticks(range(len(workloads)), workloads, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("time / floor (log); lines at 1x and 2x")
    env, config = result["env"], result["config"]
    axes.set_title(f"{env['card']}, {config['dtype']}, {config['timing']} timing")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _deft_methods(result: dict) -> set:
    return {r["method"] for r in result["results"] if r["kind"] == "deft"}


def render_calibration(fit: dict) -> Group:
    """The report of a `harness.bench.calibrate` result: fitted constants and errors per strategy."""
    constants = Table(title=f"latency constants fitted on {fit['card']} "
                            f"({fit['timing']} timing, {fit['points']} points)")
    for column in ("constant", "before", "fitted"):
        constants.add_column(column, justify="left" if column == "constant" else "right")
    for name, value in fit["constants"].items():
        constants.add_row(name, f"{fit['constants_before'][name]:.4g}", f"{value:.4g}")
    errors = Table(title="predicted / measured - 1, per strategy")
    for column in ("strategy", "n", "median |err| before", "worst before", "median |err|",
                   "worst"):
        errors.add_column(column, justify="left" if column == "strategy" else "right")
    for strategy, e in fit["per_strategy"].items():
        errors.add_row(strategy, str(e["n"]), f"{e['median_abs_err_before']:.1%}",
                       f"{e['worst_err_before']:+.1%}", f"{e['median_abs_err']:.1%}",
                       f"{e['worst_err']:+.1%}")
    return Group(constants, errors, Text(f"fit: {fit['note']}"))
