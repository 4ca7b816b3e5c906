"""How good a tuned table is, measured (docs/autotune.md, "Quality").

Per workload, in one interleaved measurement (`autotune.measure.LEADER_ROUNDS` rounds):
every size of the strategy (the exhaustive sweep over chunk x group, the kernel's tile) and the
table's tuned config for the workload's bucket. Reported:

- ``tuned_over_best``: the tuned config's time over the fastest size's (goal <= 1.05);
- ``tuned_size_over_best``: the same for the tuned sizes with the kernel's tile (the IO model's
  pre-selection alone, tiles aside);
- ``spearman``: Spearman's rank correlation of the IO model's predicted times and the measured
  times over the sizes (`scipy.stats.spearmanr`; goal >= 0.8);
- the table's own ``tuning_s`` (goal < 180 s for the default workload set).

Run on the GPU (the tuning trees; `autotune.heldout` judges trees outside them)::

    python -m autotune.quality --table autotune/logs/nvidia-h100-80gb-hbm3.json --json q.json
"""

from __future__ import annotations

import json
import math

from autotune.measure import LEADER_ROUNDS
from autotune.space import Candidate, default_candidate, default_tile, rank_sizes
from autotune.store import Table, chosen_config
from autotune.tune import Reporter
from deft.kernels.buckets import bucket_of
from harness.inputs import with_dtype
from iomodel.gpus import GpuSpec

FORMAT = "deft-autotune-quality/1"
WITHIN = 1.05
"""Tuned within 5% of the exhaustive sweep's best."""


def study(workloads, strategy: str, gpu: GpuSpec, table: Table, make_bench, *, dtype,
          page_size: int, reporter: Reporter | None = None) -> dict:
    """Measure the exhaustive size sweep and the tuned config on each workload.

    Parameters
    ----------
    workloads : list of (str, Tree)
    strategy : str
    gpu : GpuSpec
    table : Table
        The tuned table to judge.
    make_bench : callable
        As for `autotune.tune.autotune`.
    dtype : torch.dtype
    page_size : int
    reporter : Reporter, optional

    Returns
    -------
    dict
        ``format``, ``device``, ``strategy``, ``tuning_s``, ``workloads`` (one dict each) and
        ``summary``.
    """
    from scipy.stats import spearmanr

    reporter = reporter or Reporter()
    rows = []
    for name, tree in workloads:
        tree = with_dtype(tree, dtype)
        bucket = bucket_of(tree)
        reporter.log(f"{strategy} on {name} ({bucket.key})")
        ranked = rank_sizes(strategy, tree, gpu, page_size)
        tile = default_tile(strategy, tree)
        sizes = [Candidate(r.chunk_size, r.group_size, tile) for r in ranked]
        found = table.entry(strategy, bucket)
        tuned = None
        if found is not None:
            chunk_size, group_size, tuned_tile = chosen_config(found[1])
            tuned = Candidate(chunk_size, group_size, tuned_tile or tile)
        reporter.expect(len(sizes) + 1)
        bench = make_bench(strategy, tree, default_candidate(strategy, tree))
        try:
            measured = bench.measure(sizes + ([tuned] if tuned else []), LEADER_ROUNDS,
                                     lambda c: reporter.advance(c.label()))
        finally:
            bench.close()
        times = [measured[c].us for c in sizes]
        ok = [i for i, us in enumerate(times) if us is not None]
        best = min(ok, key=lambda i: times[i])
        row = {"workload": name, "bucket": bucket.key, "matched": found[0] if found else None,
               "tuned": tuned.to_dict() if tuned else None,
               "tuned_us": measured[tuned].us if tuned else None,
               "best": sizes[best].to_dict(), "best_us": times[best],
               "sizes": [{**c.to_dict(), "predicted_us": r.predicted_us,
                          "predicted_rank": r.rank, **measured[c].to_dict()}
                         for c, r in zip(sizes, ranked)]}
        row["tuned_over_best"] = _ratio(row["tuned_us"], times[best])
        tuned_size = next((i for i, c in enumerate(sizes) if tuned and c.sizes == tuned.sizes),
                          None)
        row["tuned_size_over_best"] = _ratio(times[tuned_size] if tuned_size is not None
                                             else None, times[best])
        if len(ok) >= 3:
            result = spearmanr([ranked[i].predicted_us for i in ok], [times[i] for i in ok])
            row["spearman"], row["spearman_p"] = float(result.statistic), float(result.pvalue)
        else:
            row["spearman"] = row["spearman_p"] = None
        reporter.log(f"  tuned / best {_text(row['tuned_over_best'])}, tuned sizes / best "
                     f"{_text(row['tuned_size_over_best'])}, spearman {_text(row['spearman'])}")
        rows.append(row)
    return {"format": FORMAT, "device": table.device, "strategy": strategy,
            "tuning_s": table.tuning_s, "workloads": rows, "summary": summarize(rows)}


def summarize(rows: list) -> dict:
    """Worst and mean of the ratios and correlations over the workloads."""
    ratios = [r["tuned_over_best"] for r in rows if r["tuned_over_best"] is not None]
    rhos = [r["spearman"] for r in rows if r["spearman"] is not None and not math.isnan(
        r["spearman"])]
    return {
        "worst_tuned_over_best": max(ratios) if ratios else None,
        "tuned_within_5pct": sum(r <= WITHIN for r in ratios),
        "compared": len(ratios),
        "min_spearman": min(rhos) if rhos else None,
        "mean_spearman": sum(rhos) / len(rhos) if rhos else None,
        "spearman_at_least_0.8": sum(r >= 0.8 for r in rhos),
    }


def _ratio(a, b):
    return None if a is None or not b else a / b


def _text(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> None:
    """``python -m autotune.quality``: judge a table on this machine's GPU."""
    import click

    from autotune.measure import PAGE_SIZE, workbenches
    from autotune.store import read_table
    from autotune.tune import resolve_card
    from harness.bench import DTYPES, parse_workloads

    @click.command()
    @click.option("--table", "table_path", required=True,
                  help="The log of the tuning run to judge (autotune/logs/<card>.json).")
    @click.option("--workloads", "workload_list", default="all", show_default=True)
    @click.option("--strategy", default="deft_flatten", show_default=True)
    @click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp16", show_default=True)
    @click.option("--json", "json_path", required=True, help="Where to write the study.")
    def command(table_path, workload_list, strategy, dtype, json_path):
        gpu, _ = resolve_card("auto")
        table = read_table(table_path)
        if table is None:
            raise click.ClickException(f"{table_path}: no usable table (see the warning)")

        class Log(Reporter):
            def log(self, line):
                click.echo(line, err=True)

        workloads = [(spec.text, spec.tree()) for spec in parse_workloads(workload_list)]
        result = study(workloads, strategy, gpu, table,
                       workbenches(DTYPES[dtype], "cuda", PAGE_SIZE), dtype=DTYPES[dtype],
                       page_size=PAGE_SIZE, reporter=Log())
        with open(json_path, "w") as file:
            json.dump(result, file, indent=1)
        click.echo(json.dumps({"tuning_s": result["tuning_s"], **result["summary"]}, indent=1))

    command(argv)


if __name__ == "__main__":
    main()
