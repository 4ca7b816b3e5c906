"""What ``deft-cli autotune --held-out``, ``--check`` and ``--refit`` run (docs/autotune.md,
"Held out", "Check"; docs/iomodel.md, "Refit"): the runs of `autotune.heldout` on this card's
tables, and the latency model's refit to their sweeps; and `lookup_mismatches`, whether a
tuning run's table gives its tuning trees what it measured."""

from __future__ import annotations

import json
import time
from pathlib import Path

from autotune.heldout import (
    CHECK_TREES,
    HELD_OUT,
    evaluate,
    full_sweep,
    result,
    shaped,
    small_sweep,
)
from autotune.measure import PAGE_SIZE
from autotune.space import Candidate
from autotune.tune import Reporter, card_programs
from deft.kernels.tuned import current_versions, tuned_config
from deft.tree_format import tree_to_dict
from harness.inputs import TREE_DTYPE, with_dtype

REFERENCE_FIT = "nvidia-h200.json"
"""The refit `--predict` uses for a card without its own (the card the kernels are tuned on)."""


def parse_heads(text: str) -> tuple:
    """``32/8,4/1`` -> ((32, 8), (4, 1)); ValueError on anything else."""
    shapes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        try:
            q_heads, kv_heads = (int(n) for n in item.split("/"))
        except ValueError:
            raise ValueError(f"--heads: {item!r} is not Q/KV (e.g. 32/8)") from None
        if q_heads < 1 or kv_heads < 1 or q_heads % kv_heads:
            raise ValueError(f"--heads: {item!r}: query heads must be a multiple of KV heads")
        shapes.append((q_heads, kv_heads))
    if not shapes:
        raise ValueError("--heads: no head shape given")
    return tuple(shapes)


def table_lookup(device: dict):
    """The ``lookup`` of `autotune.heldout.evaluate` for this card: what `deft.TreeAttention`
    runs here (`deft.kernels.tuned.tuned_config` with the card's programs: the fill rung, and
    deft_flatten's chunk moved to the tree's waves)."""
    programs = card_programs(device)

    def lookup(strategy, tree):
        found = tuned_config(strategy, tree, device["name"], device["capability"], programs)
        return found.chunk_size, found.group_size, found.config, found.rung

    return lookup


def lookup_mismatches(table, workloads) -> list[str]:
    """Where a tuning run's chosen config is not what the lookup gives the tree it was tuned on.

    Each (strategy, bucket) entry of `table` (an `autotune.store.Table`, measured or predicted)
    is looked up for its workload's tree by `table_lookup` (the card's programs: deft_flatten's
    chunk moved to the tree's waves) in the tables `deft.kernels.tuned` reads, which must hold
    this table's configs (e.g. ``$DEFT_TUNED_CONFIGS`` pointing where it was written).

    Parameters
    ----------
    table : Table
    workloads : list of (str, Tree)
        The tuning run's workloads, by the names its entries record.

    Returns
    -------
    list of str
        One line per entry whose looked-up chunk, group or tile (None: the kernel's own) differs
        from the chosen one; empty when every entry reproduces.
    """
    dtype = {name: torch_dtype for torch_dtype, name in TREE_DTYPE.items()}[
        table.settings["dtype"]]
    trees, lookup, lines = dict(workloads), table_lookup(table.device), []
    for strategy, buckets in table.strategies.items():
        for key, entry in buckets.items():
            tree = with_dtype(trees[entry["workload"]], dtype)
            chunk, group, tile, rung = lookup(strategy, tree)
            chosen = entry["chosen"]
            tuned = (chosen["chunk_size"], chosen["group_size"], None if chosen["tile"] is None
                     else Candidate.from_dict(chosen).tile)
            if (chunk, group, tile) != tuned:
                lines.append(f"{strategy} on {entry['workload']} ({key}): chose c{tuned[0]} "
                             f"g{tuned[1]}, the lookup ({rung}) runs c{chunk} g{group}"
                             + ("" if tile == tuned[2] else " at another tile"))
    return lines


def judge(mode: str, strategy: str, gpu, device: dict, make_bench, dtype, shapes, *,
          fit_trees: str | None = None, held_out_trees: str | None = None,
          budget_s: float = 150.0,
          reporter: Reporter | None = None, lookup=None) -> dict:
    """Run ``--held-out`` (`mode` ``held_out``) or ``--check`` (``check``).

    ``held_out``: the full size sweep on `HELD_OUT` (or on ``held_out_trees``, ``--workloads``
    syntax: trees no fit has seen) at each of `shapes`, then on `fit_trees` as tuning trees;
    ``check``: the small sweep on `CHECK_TREES`. The budget is shared by the trees, each list
    getting its share. Returns the ``deft-sweep/1``
    result (`autotune.heldout.result`).
    """
    from harness.bench import parse_workloads

    def trees(text):
        return shaped([(w.text, w.tree()) for w in parse_workloads(text)], shapes)

    start = time.perf_counter()
    lookup = lookup or table_lookup(device)
    if mode == "check":
        jobs = [(trees(",".join(CHECK_TREES)), "check", small_sweep)]
    else:
        jobs = [(trees(held_out_trees or ",".join(HELD_OUT)), "held_out", full_sweep)]
        if fit_trees:
            jobs.append((trees(fit_trees), "tuning", full_sweep))
    total = sum(len(workloads) for workloads, _, _ in jobs)
    rows, seen, deadline = [], {}, start
    for workloads, role, sweep in jobs:
        deadline += budget_s * len(workloads) / total
        rows += evaluate(workloads, strategy, gpu, lookup, make_bench, page_size=PAGE_SIZE,
                         dtype=dtype, sweep=sweep, role=role, deadline=deadline,
                         reporter=reporter)
        seen.update(workloads)
    done = {row["workload"] for row in rows}
    return result(rows, device=device, versions=current_versions(), strategy=strategy,
                  dtype=TREE_DTYPE[dtype], page_size=PAGE_SIZE,
                  trees={name: tree_to_dict(tree) for name, tree in seen.items() if name in done},
                  seconds=time.perf_counter() - start, complete=len(done) == total)


def judge_text(result: dict, check: bool) -> str:
    """Lines per tree (rung, tuned config, tuned / best), the summary, and for ``--check``
    whether the table holds."""
    lines = []
    for row in result["rows"]:
        ratio = row["tuned_over_best"]
        lines.append(f"{row['workload']:<60} {row['rung']:<8} "
                     f"c{row['tuned']['chunk_size']} g{row['tuned']['group_size'] or '-'}  "
                     f"tuned / best {'-' if ratio is None else f'{ratio:.3f}'}")
    for role, summary in result["summary"].items():
        median, worst = summary["median_tuned_over_best"], summary["worst_tuned_over_best"]
        lines.append(f"{role}: {summary['within_5pct']} of {summary['compared']} within 5%, "
                     f"median {'-' if median is None else f'{median:.3f}'}, worst "
                     f"{'-' if worst is None else f'{worst:.3f}'}")
    if not result["complete"]:
        lines.append("partial: the budget ran out before every tree")
    if check:
        tabled = [r for r in result["rows"] if r["rung"] in ("exact", "dtype", "sibling")]
        if not tabled:
            lines.append("no table applies on this machine (fill or default configs)")
        else:
            worst = max(r["tuned_over_best"] or 0.0 for r in tabled)
            lines.append(f"the table still holds (worst {worst:.3f})" if result["holds"]
                         else f"the table no longer holds (worst {worst:.3f} > 1.05): re-tune")
    return "\n".join(lines)


def refit(paths, report_path=None) -> dict:
    """Fit the latency model to the sweeps at `paths` (`harness.bench.calibrate
    .calibrate_sweep`) and write it (`report_path`, default ``iomodel/fits/<card>.json``)."""
    from harness.bench.calibrate import calibrate_sweep, write_fit

    sweeps = [json.loads(Path(path).read_text()) for path in paths]
    fit = calibrate_sweep(sweeps)
    fit["written_to"] = str(write_fit(fit, report_path))
    return fit


def fit_text(fit: dict) -> str:
    """The fitted constants and the errors, on the tuning and the held-out trees."""
    lines = [f"latency constants fitted on {fit['card']} ({fit['points']} points): "
             + ", ".join(f"{k} {v:.4g}" for k, v in fit["constants"].items())]
    for role in ("tuning", "held_out"):
        judged = fit.get(role)
        if judged:
            rho = judged["min_spearman"]
            lines.append(
                f"{role}: {judged['points']} points, median |err| {judged['median_abs_err']:.1%}"
                f" (before {judged['median_abs_err_before']:.1%}), worst "
                f"{judged['worst_err']:+.1%} (before {judged['worst_err_before']:+.1%}), "
                f"Spearman min {'-' if rho is None else f'{rho:.2f}'}")
    lines.append(f"goals (held out: 15% median, 30% worst, Spearman 0.8) "
                 f"{'met' if fit['meets_goals'] else 'not met'}; wrote {fit['written_to']}")
    return "\n".join(lines)


def fit_for(card_name: str) -> dict | None:
    """The refit `--predict` ranks with: the card's own in ``iomodel/fits/``, else
    `REFERENCE_FIT`, else None (the spec's built-in constants)."""
    from autotune.store import sanitise
    from harness.bench.calibrate import FITS_DIR, read_fit

    for name in (f"{sanitise(card_name)}.json", REFERENCE_FIT):
        if (FITS_DIR / name).is_file():
            return read_fit(FITS_DIR / name)
    return None
