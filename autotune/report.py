"""What `deft-cli autotune` shows: a progress bar while it tunes, then the chosen config of
every strategy and bucket."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from autotune.tune import Reporter


class ProgressBar(Reporter):
    """A rich progress bar of the candidates prepared, news printed above it; a context manager.

    Parameters
    ----------
    console : rich.console.Console
        Where the bar is drawn (the CLI: stderr).
    """

    def __init__(self, console: Console):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task("autotune", total=0)

    def __enter__(self) -> "ProgressBar":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def expect(self, count):
        self.progress.update(self.task, total=self.progress.tasks[self.task].total + count)

    def advance(self, text):
        self.progress.update(self.task, advance=1, description=text)

    def log(self, line):
        self.progress.console.print(line, markup=False, highlight=False)


def autotune_table(table) -> Table:
    """The chosen config of every strategy and bucket, and its speedup over the defaults."""
    measured = table.source == "measured"
    title = f"{table.source} configs for {table.device['name']}"
    if table.tuning_s is not None:
        title += f" (tuned in {table.tuning_s:.0f} s)"
    result = Table(title=title, box=box.SIMPLE_HEAD,
                   caption="chosen: c chunk, g group, m/n block_m/block_n, w warps, s stages, "
                           "p programs per SM; speedup over the defaults (chunk 128, no group "
                           "cap, the kernel's tile)" + ("" if measured else ", predicted"))
    model = (table.settings or {}).get("model") if not measured else None
    if model:  # the error the ranking model has where it was measured (issue #19)
        result.caption += "; " + model_caption(model)
    unit = "µs" if measured else "predicted µs"
    for column in ("strategy", "workload", "bucket", "chosen", unit, f"default {unit}",
                   "speedup", "candidates"):
        result.add_column(column, justify="right" if "µs" in column or column in (
            "speedup", "candidates") else "left", no_wrap=column in ("bucket", "chosen"))
    key = "us" if measured else "predicted_us"
    for strategy, buckets in table.strategies.items():
        for bucket, entry in buckets.items():
            result.add_row(strategy, entry["workload"], bucket, entry["chosen_label"],
                           f"{entry['chosen'][key]:.1f}", f"{entry['default'][key]:.1f}",
                           f"{entry['speedup']:.2f}x", str(len(entry["candidates"])))
    return result


def model_caption(model: dict) -> str:
    """One line on the refit a predicted table ranked with: its card and its error there on
    held-out trees (`autotune.tune.model_note`)."""
    def share(x, sign=""):  # the worst error keeps its sign: + over-predicts
        return "-" if x is None else f"{x:{sign}.0%}"

    rho = model.get("held_out_min_spearman")
    return (f"latency model fitted on {model['fitted_on']}: on its held-out trees there median "
            f"|err| {share(model.get('held_out_median_abs_err'))}, worst "
            f"{share(model.get('held_out_worst_err'), '+')}, Spearman min "
            f"{'-' if rho is None else f'{rho:.2f}'} (not measured on this card)")
