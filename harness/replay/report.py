"""What a replay shows: a rich table of one result, and the paper's Tables 3 and 4 of saved
results in Markdown (``python -m harness.replay RESULT.json ...``)."""

from __future__ import annotations

import json
import sys

from rich.table import Table


def render(result: dict):
    """A rich table of one replay: a row per method, the upper bound last."""
    w, env, config = result["workload"], result["env"], result["config"]
    sampled = (f"{w['replayed']} of {w['steps']} steps replayed, totals "
               f"x{w['steps'] / w['replayed']:.2f}" if w["replayed"] < w["steps"]
               else f"all {w['steps']} steps")
    table = Table(
        title=f"{w['name']} on {env['card']}: {config['layers']} layers, {config['dtype']}, "
              f"{config['timing']} timing; {sampled}",
        caption=f"seconds over the whole run; speedups over {result['baseline'] or '(no baseline)'}"
                "; KV GB, total GB: the IO model's traffic of the run (the strategy's "
                "accounting: bit masks, page tables); read GB: what this project's kernels read "
                "and write (int32 slots and Euler intervals instead)")
    for column in ("method", "timing", "attention s", "plan s", "KV GB", "total GB", "read GB",
                   "attn speedup", "decode s", "decode speedup", "rel_err", "note"):
        table.add_column(column, justify="left" if column in ("method", "timing", "note")
                         else "right")
    for e in result["methods"]:
        speed = result["speedups"].get(e["method"], {})
        table.add_row(
            e["method"], e["timing"] or "", _fmt(e["attention_s_run"], ".3f"),
            _fmt(e["plan_s_run"], ".3f"),
            _fmt(e["kv_bytes_run"] and e["kv_bytes_run"] / 1e9, ".1f"),
            _fmt(e["total_bytes_run"] and e["total_bytes_run"] / 1e9, ".1f"),
            _fmt(e.get("kernel_bytes_run") and e["kernel_bytes_run"] / 1e9, ".1f"),
            _fmt(speed.get("attention"), ".2f"), _fmt(e["e2e_s_run"], ".2f"),
            _fmt(speed.get("e2e"), ".2f"), _fmt(e["rel_err"], ".1e"),
            e["reason"] or e["capture_error"] or "",
            style={"skipped": "dim", "error": "red"}.get(e["status"]))
    upper = result["upper_bound"]
    if upper:
        table.add_row("upper bound (no attention)", upper["timing"] or "", "", "", "", "", "", "",
                      _fmt(upper["e2e_s_run"], ".2f"), "", "", upper["reason"] or "",
                      style="dim")
    return table


TABLES = (
    # title, key of a method's entry, divisor, with the no-attention row, speedup kind
    ("Table 3: decoding latency (s)", "e2e_s_run", 1, True, "e2e"),
    ("Table 4: attention latency (s)", "attention_s_run", 1, False, "attention"),
    ("Planning time (s, host; not in Table 4)", "plan_s_run", 1, False, None),
    ("KV cache traffic (TB, IO model, all layers)", "kv_bytes_run", 1e12, False, None),
)
"""The Markdown tables of `markdown_tables`."""


def markdown_tables(results: list) -> str:
    """Tables 3 (decoding latency) and 4 (attention latency), planning time and KV traffic of
    saved replays, in Markdown.

    One row per result (a workload), one column per method that ran in any of them, totals of
    the whole run (extrapolated where steps were sampled; "-" where a method did not run), then
    ``deft_flatten``'s speedup over the baseline.
    """
    methods = list(dict.fromkeys(e["method"] for r in results for e in r["methods"]
                                 if e["status"] == "ok"))
    cards = sorted({f"{r['env']['card']} ({r['config']['dtype']}, {r['config']['timing']})"
                    for r in results})
    lines = [f"Measured on {', '.join(cards)}; totals over the whole run."]
    for title, key, divisor, upper, speedup in TABLES:
        header = ["workload", "steps", *methods]
        header += ["upper bound (no attention)"] if upper else []
        header += ["DeFT-Flatten speedup"] if speedup else []
        lines += ["", f"**{title}**", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for r in results:
            by_name = {e["method"]: e for e in r["methods"]}
            w = r["workload"]
            row = [w["name"], f"{w['replayed']}/{w['steps']}"]
            for m in methods:
                value = by_name[m][key] if m in by_name and by_name[m][key] is not None else None
                row.append("-" if value is None else f"{value / divisor:.2f}")
            if upper:
                row.append(_fmt((r["upper_bound"] or {}).get("e2e_s_run"), ".2f") or "-")
            if speedup:
                speed = r["speedups"].get("deft_flatten", {}).get(speedup)
                row.append(f"{speed:.2f}x over {r['baseline']}" if speed else "-")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(paths: list) -> None:
    """Print the Markdown tables of the saved replays at `paths` (``python -m harness.replay``)."""
    if not paths:
        sys.exit("usage: python -m harness.replay RESULT.json ... (prints Tables 3 and 4)")
    print(markdown_tables([json.loads(open(path).read()) for path in paths]), end="")
