"""The estimate-io tables: one call's traffic and latency per strategy, and a whole run's sums.

`deft-cli estimate-io` prints these (rich Tables); the numbers come from `iomodel.estimate` and
`iomodel.run_totals`, docs/iomodel.md explains the columns.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

from iomodel.latency import best_strategy
from iomodel.traffic import total_bytes


def megabytes(nbytes) -> str:
    """Bytes as decimal MB, in at most 5 characters where below 100 GB."""
    value = nbytes / 1e6
    if value == 0:
        return "0"
    if value < 0.01:
        return "<0.01"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def estimate_table(result: dict, limit: dict) -> Table:
    """The estimate-io table: a row a strategy, the floor last, the fastest marked."""
    state = "calibrated" if result["calibrated"] else "uncalibrated"
    table = Table(
        title=f"HBM traffic (MB) and predicted latency on {result['gpu']} ({state})",
        caption="* fastest predicted; sizes: chunk/group; x floor: total / floor bytes; "
                "balance: max / mean partition work",
        box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0),
    )
    for column in ("strategy", "sizes", "KV", "Q", "mask", "partial", "score", "out", "total",
                   "x floor", "parts", "waves", "balance", "µs", "bound"):
        table.add_column(column, justify="left" if column in ("strategy", "bound") else "right",
                         no_wrap=column in ("strategy", "sizes"))
    best = best_strategy(result)
    for name, row in result["strategies"].items():
        sizes = f"{row['chunk_size'] or '-'}/{row['group_size'] or '-'}"
        total = total_bytes(row)
        table.add_row(
            f"{name}*" if name == best else name, sizes,
            *(megabytes(row[key]) for key in ("kv_bytes", "q_bytes", "mask_bytes",
                                              "partial_bytes", "score_bytes", "output_bytes")),
            megabytes(total), f"{total / result['floor_bytes']:.1f}", str(row["partitions"]),
            str(row["waves"]), f"{row['balance']:.2f}", f"{row['predicted_us']:.1f}",
            row["bound"], style="bold green" if name == best else None,
        )
    table.add_row(
        "floor", "", megabytes(limit["kv_bytes"]), megabytes(limit["q_bytes"]), "0", "0", "0",
        megabytes(limit["output_bytes"]), megabytes(limit["floor_bytes"]), "1.0", "", "", "",
        f"{limit['floor_us']:.1f}", limit["bound"], style="dim", end_section=True,
    )
    return table


def run_table(result: dict) -> Table:
    """The whole-run table: each strategy's traffic summed over the steps, KV against radix."""
    state = "calibrated" if result["calibrated"] else "uncalibrated"
    table = Table(
        title=f"{result['workload']}: {result['steps']} steps summed on {result['gpu']} ({state})",
        caption="KV IO reduction = 1 - KV bytes / radix's KV bytes (the paper's 73-99% claim)",
        box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
    )
    for column in ("strategy", "sizes", "KV GB", "total GB", "KV vs radix", "KV IO reduction",
                   "partitions", "predicted ms"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, row in result["strategies"].items():
        ratio = row.get("kv_vs_radix")
        table.add_row(
            name, f"{row['chunk_size'] or '-'}/{row['group_size'] or '-'}",
            f"{row['kv_bytes'] / 1e9:.2f}", f"{total_bytes(row) / 1e9:.2f}",
            "" if ratio is None else f"{ratio:.3f}",
            "" if ratio is None else f"{100 * (1 - ratio):.1f}%",
            str(row["partitions"]), f"{row['predicted_us'] / 1e3:.2f}",
        )
    table.add_row("floor", "", "", f"{result['floor_bytes'] / 1e9:.2f}", "", "", "",
                  f"{result['floor_us'] / 1e3:.2f}", style="dim")
    return table
