"""What a replay shows: a rich table of one result, and the paper's Tables 3 and 4 of saved
results in Markdown, beside the paper's numbers (``python -m harness.replay RESULT.json ...``;
step-range parts of one run are merged first, `harness.replay.merge`)."""

from __future__ import annotations

import json
import sys

from rich.table import Table

from harness.replay import paper as p
from harness.replay.merge import combine

FLATTEN = "deft_flatten"


def coverage(workload: dict) -> str:
    """How much of the run a result measured: "full run", "sampled", or a partial range."""
    if workload["complete"]:
        return f"full run, {workload['steps']} steps"
    if workload["sampled"]:
        return (f"SAMPLED: {workload['replayed']} of {workload['steps']} steps, totals "
                "extrapolated (not a full run)")
    start, stop = workload["step_range"]
    return f"PARTIAL: steps {start}:{stop} of {workload['steps']} (not a full run)"


def render(result: dict):
    """A rich table of one replay: a row per method, the upper bound last."""
    w, env, config = result["workload"], result["env"], result["config"]
    table = Table(
        title=f"{w['name']} on {env['card']}: {config['layers']} layers, {config['dtype']}, "
              f"{config['timing']} timing; {coverage(w)}",
        caption=f"seconds over the whole run; speedups over {result['baseline'] or '(no baseline)'}"
                "; decode: no planning / planning in line / planning overlapped (next step "
                "planned while this one runs); hidden: share of planning the overlap hides; "
                "KV GB: the IO model's KV traffic; read GB: what this project's kernels read")
    for column in ("method", "timing", "attention s", "plan s", "KV GB", "read GB",
                   "attn speedup", "decode s", "in line s", "overlapped s", "hidden",
                   "decode speedup", "rel_err", "note"):
        table.add_column(column, justify="left" if column in ("method", "timing", "note")
                         else "right")
    for e in result["methods"]:
        speed = result["speedups"].get(e["method"], {})
        table.add_row(
            e["method"], e["timing"] or "", _fmt(e["attention_s_run"], ".3f"),
            _fmt(e["plan_s_run"], ".3f"),
            _fmt(e["kv_bytes_run"] and e["kv_bytes_run"] / 1e9, ".1f"),
            _fmt(e.get("kernel_bytes_run") and e["kernel_bytes_run"] / 1e9, ".1f"),
            _fmt(speed.get("attention"), ".2f"), _fmt(e["e2e_s_run"], ".2f"),
            _fmt(e["inline_s_run"], ".2f"), _fmt(e["overlap_s_run"], ".2f"),
            _fmt(e["plan_hidden"], ".0%"), _fmt(speed.get("e2e"), ".2f"),
            _fmt(e["rel_err"], ".1e"), e["reason"] or e["capture_error"] or "",
            style={"skipped": "dim", "error": "red"}.get(e["status"]))
    upper = result["upper_bound"]
    if upper:
        table.add_row("upper bound (no attention)", upper["timing"] or "", *[""] * 5,
                      _fmt(upper["e2e_s_run"], ".2f"), *[""] * 5, upper["reason"] or "",
                      style="dim")
    return table


def markdown_tables(results: list) -> str:
    """Tables 3 (decoding latency, three ways) and 4 (attention latency) of saved replays, one
    column per run (the paper's column where it stands for one, `harness.replay.paper`), with
    DeFT-Flatten's speedups over the baseline beside the paper's and, for full runs, whether
    they beat the paper's; then planning per step and KV traffic. Totals of the whole run
    (extrapolated for sampled results, which say so); "-" where a method did not run."""
    results = combine(results)
    results = sorted(results, key=lambda r: _order(r["workload"]["name"]))
    columns, seen = [], set()
    for r in results:
        column = p.column_of(r["workload"]["name"])
        column = None if column in seen else column
        seen.add(column)
        columns.append(column)
    header = ["", *[c or r["workload"]["name"] for c, r in zip(columns, results)]]
    cards = sorted({f"{r['env']['card']} ({r['config']['dtype']}, {r['config']['timing']})"
                    for r in results})
    methods = list(dict.fromkeys(e["method"] for r in results for e in r["methods"]
                                 if e["status"] == "ok"))
    baselines = sorted({r["baseline"] for r in results if r["baseline"]})
    lines = [f"Measured on {', '.join(cards)}; seconds over the whole run; speedups of "
             f"DeFT-Flatten over {' / '.join(baselines) or '(no baseline)'} (Radix Attention)."]

    def table(title, rows):
        lines.extend(["", f"**{title}**", "", "| " + " | ".join(header) + " |",
                      "|" + "---|" * len(header)])
        lines.extend("| " + " | ".join(row) + " |" for row in rows)

    def per_result(label, value):
        return [label, *[value(r, c) for r, c in zip(results, columns)]]

    def method_total(method, key, divisor=1.0, spec=".2f"):
        def value(r, _):
            e = next((e for e in r["methods"] if e["method"] == method), None)
            return "-" if e is None or e.get(key) is None else format(e[key] / divisor, spec)
        return value

    def speedup(kind):
        def value(r, _):
            s = r["speedups"].get(FLATTEN, {}).get(kind)
            return "-" if s is None else f"{s:.2f}x"
        return value

    def paper_value(values):
        return lambda r, c: "-" if c is None else f"{p.paper(values, c):.2f}x"

    def verdict(kind, values):
        def value(r, c):
            s = r["speedups"].get(FLATTEN, {}).get(kind)
            if c is None or s is None:
                return "-"
            if not r["workload"]["complete"]:
                return "not a full run"
            diff = s - p.paper(values, c)
            return f"{'yes' if diff > 0 else 'no'}, by {diff:+.2f}x"
        return value

    def upper_speedup(r, _):
        base = next((e for e in r["methods"] if e["method"] == r["baseline"]), None)
        upper = (r["upper_bound"] or {}).get("e2e_s_run")
        return f"{base['e2e_s_run'] / upper:.2f}x" if base and base["e2e_s_run"] and upper \
            else "-"

    steps = per_result("steps", lambda r, c: _steps(r["workload"]))
    decoded = [m for m in methods if any(
        e["method"] == m and e["e2e_s"] for r in results for e in r["methods"])]
    rows = [steps]
    for m in decoded:
        rows += [per_result(f"{m}: no planning", method_total(m, "e2e_s_run")),
                 per_result(f"{m}: planning in line", method_total(m, "inline_s_run")),
                 per_result(f"{m}: planning overlapped", method_total(m, "overlap_s_run"))]
    rows += [per_result("upper bound (no attention)",
                        lambda r, c: _fmt((r["upper_bound"] or {}).get("e2e_s_run"), ".2f")
                        or "-"),
             per_result("ours: upper bound's speedup (no attention)", upper_speedup),
             per_result("paper: upper bound's speedup", paper_value(p.UPPER_BOUND_SPEEDUP)),
             per_result("ours: decoding speedup, no planning", speedup("e2e")),
             per_result("paper: decoding speedup", paper_value(p.DECODING_SPEEDUP)),
             per_result("beats the paper's decoding speedup", verdict("e2e", p.DECODING_SPEEDUP)),
             per_result("ours: decoding speedup, planning in line", speedup("inline")),
             per_result("ours: decoding speedup, planning overlapped", speedup("overlap"))]
    table("Table 3: decoding latency (s), three ways", rows)
    rows = [steps, *[per_result(m, method_total(m, "attention_s_run")) for m in methods],
            per_result("ours: attention speedup", speedup("attention")),
            per_result("paper: attention speedup", paper_value(p.ATTENTION_SPEEDUP)),
            per_result("beats the paper's attention speedup",
                       verdict("attention", p.ATTENTION_SPEEDUP))]
    table("Table 4: attention latency (s)", rows)
    rows = [steps]
    for m in methods:
        rows += [per_result(f"{m}: plan ms per step",
                            lambda r, c, m=m: _per_step(r, m, "plan_s")),
                 per_result(f"{m}: planning share, in line",
                            method_total(m, "plan_share_inline", 0.01, ".0f")),
                 per_result(f"{m}: planning hidden by the overlap",
                            method_total(m, "plan_hidden", 0.01, ".0f"))]
    table("Planning (host; shares in %)", rows)
    rows = [steps, *[per_result(m, method_total(m, "kv_bytes_run", 1e12)) for m in methods]]
    table("KV cache traffic (TB, IO model, all layers)", rows)
    return "\n".join(lines) + "\n"


def _order(name: str) -> tuple:
    column = p.column_of(name)
    return (p.COLUMNS.index(column) if column else len(p.COLUMNS), name)


def _steps(workload: dict) -> str:
    if workload["complete"]:
        return str(workload["steps"])
    if workload["sampled"]:
        return f"{workload['replayed']}/{workload['steps']} sampled"
    start, stop = workload["step_range"]
    return f"{start}:{stop} of {workload['steps']}"


def _per_step(result: dict, method: str, key: str) -> str:
    e = next((e for e in result["methods"] if e["method"] == method), None)
    if e is None or e.get(key) is None:
        return "-"
    return f"{e[key] * 1e3 / len(e['per_step_ms']['attention']):.2f}"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(paths: list) -> None:
    """Print the Markdown tables of the saved replays at `paths` (``python -m harness.replay``):
    step-range parts of a run are merged, refusing gaps and overlaps."""
    if not paths:
        sys.exit("usage: python -m harness.replay RESULT.json ... (prints Tables 3 and 4)")
    try:
        print(markdown_tables([json.loads(open(path).read()) for path in paths]), end="")
    except ValueError as error:
        sys.exit(f"error: {error}")
