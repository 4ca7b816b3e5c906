"""Fit the IO model's latency constants to measured bench times, per card.

`iomodel.latency.predict_latency` predicts a strategy's time from its plan and a GPU spec,
with named constants (`iomodel.latency.Constants`: launch and program overheads, memory and
compute efficiency, one SM's bandwidth share) that a spec's ``calibration`` overrides. This
module rebuilds the plan of every measured row of this project's strategies in a
``deft-bench/1`` or ``/2`` JSON (trees and sizes are in it), and fits the constants its
strategies use (`iomodel.latency.constants_used`: the roofline's, or for deft_flatten those of
`iomodel.kernel_model`) at once by bounded least squares on the log of predicted / measured
time, so that a 2x miss counts the same on a 10 µs and a 1 ms call. The model is a max of
rooflines and chains, piecewise linear in the constants: the fit uses finite differences and
reports how well it does per strategy (median and worst relative error, before and after)
rather than trusting a single cost.

The result carries a ``deft-gpu/1`` spec with the fitted ``calibration``: save it as a file
and pass its path wherever a GPU spec is taken (`iomodel.resolve_gpu`).

`calibrate_sweep` fits the same constants to size sweeps of the shipping kernel
(``deft-sweep/1``, `autotune.heldout`: many chunk x group candidates per tree) on the tuning
trees only, and judges the fit on the held-out trees: median and worst error (also per tree
and per workload family), and Spearman's rank correlation between predicted and measured
candidates per tree (``deft-cli autotune
--refit``; the fit is kept in ``iomodel/fits/<card>.json``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from deft.tree_format import tree_from_dict
from iomodel.gpus import GpuSpec, builtin_gpu
from iomodel.kernel_model import TILED_STRATEGIES, per_query
from iomodel.latency import Constants, constants_for, constants_used, predict_latency
from iomodel.traffic import traffic_of_plan
from deft.plan import build_plan
from deft.strategies import STRATEGIES

FORMAT = "deft-calibration/1"

BOUNDS = {
    "launch_us": (1e-3, 100.0),
    "program_us": (1e-3, 100.0),
    "memory_efficiency": (0.05, 1.0),
    "compute_efficiency": (0.05, 1.0),
    "sm_bandwidth_fraction": (1e-3, 1.0),
    "query_tile_us": (1e-3, 100.0),
    "tile_us": (1e-3, 100.0),
    "small_grid_tile_us": (1e-3, 100.0),
    "contention": (0.0, 10.0),
    "pair_speedup": (1.0, 2.0),
    "merge_step_us": (1e-3, 100.0),
    "overlap_softness": (0.05, 1.0),
    "kv_overlap_softness": (0.05, 1.0),
    "merge_query_step_us": (1e-3, 100.0),
}
"""Search range of each constant; a constant not listed here is fitted in (1e-3, 1e3)."""

STANDS_FOR = {"kv_overlap_softness": "overlap_softness", "merge_query_step_us": "merge_step_us"}
"""Constants whose negative value means another's (`iomodel.constants.Constants`): a fit starts
them at that one's value."""


def calibrate(bench: dict, gpu: GpuSpec | None = None, max_evaluations: int = 200) -> dict:
    """Fit the latency constants of `gpu` to the measured rows of a bench result.

    Parameters
    ----------
    bench : dict
        A ``deft-bench/1`` or ``/2`` result (`harness.bench.run_bench`, or its JSON file loaded).
    gpu : GpuSpec, optional
        The card's spec (default: the built-in spec named like ``bench["env"]["card"]``).
    max_evaluations : int
        Most model evaluations of the fit (each predicts every row once).

    Returns
    -------
    dict
        ``format`` ``deft-calibration/1``, ``card``, ``timing``, ``points``, ``constants_before``,
        ``constants`` (fitted), ``per_strategy`` ({strategy: ``n``, ``median_abs_err_before``,
        ``worst_err_before``, ``median_abs_err``, ``worst_err``}; errors are predicted /
        measured - 1, "worst" the largest in size, with its sign), ``rows`` (each measured row
        with both predictions), ``spec`` (the ``deft-gpu/1`` dict with the fitted calibration)
        and ``note``.

    Raises
    ------
    ValueError
        Without a spec for the card, or without any measured row of this project's strategies.
    """
    card = bench["env"].get("card")
    gpu = gpu or (builtin_gpu(card) if card else None)
    if gpu is None:
        raise ValueError(f"no built-in GPU spec for card {card!r}: call harness.bench.calibrate "
                         "with gpu=iomodel.load_gpu_spec(path)")
    points = measured_points(bench)
    if not points:
        raise ValueError("the bench result has no measured row of this project's strategies "
                         f"({', '.join(STRATEGIES)}) to fit")
    constants, before, predicted_before, predicted_after, note = fit_constants(
        points, gpu, max_evaluations)
    rows = [
        {"workload": p["workload"], "strategy": p["strategy"], "measured_us": p["measured_us"],
         "predicted_before_us": float(b), "predicted_us": float(a)}
        for p, b, a in zip(points, predicted_before, predicted_after)
    ]
    return {
        "format": FORMAT,
        "card": gpu.name,
        "timing": bench["config"]["timing"],
        "dtype": bench["config"]["dtype"],
        "points": len(points),
        "constants_before": before,
        "constants": constants,
        "per_strategy": per_strategy_errors(rows),
        "rows": rows,
        "spec": _calibrated(gpu, constants).to_dict(),
        "note": note,
    }


def fit_constants(points: list[dict], gpu: GpuSpec, max_evaluations: int = 200) -> tuple:
    """Fit the latency constants the points' strategies use (`iomodel.latency.constants_used`)
    at once to `points` (each with ``plan``, ``traffic`` and ``measured_us``) by bounded least
    squares on log(predicted / measured); the others keep their values.

    Returns
    -------
    (constants, constants_before, predicted_before, predicted_after, note)
        The fitted and starting constants (dicts by name, the fitted ones only), the
        predictions [points] with each, and the optimiser's message (noting an
        underdetermined fit).
    """
    from scipy.optimize import least_squares

    used = {name for p in points for name in constants_used(p["strategy"])}
    if not any(p["strategy"] in TILED_STRATEGIES and per_query(p["plan"], gpu) for p in points):
        used.discard("merge_query_step_us")  # no point runs the per-query merge: nothing to fit
    names = [f.name for f in dataclasses.fields(Constants) if f.name in used]
    low = np.array([BOUNDS.get(name, (1e-3, 1e3))[0] for name in names])
    high = np.array([BOUNDS.get(name, (1e-3, 1e3))[1] for name in names])
    every = dataclasses.asdict(constants_for(gpu))
    before = {name: every[name] for name in names}
    start = np.clip([every[STANDS_FOR[name]] if name in STANDS_FOR and before[name] < 0
                     else before[name] for name in names], low, high)
    measured = np.array([p["measured_us"] for p in points])

    def predict(values) -> np.ndarray:
        spec = _calibrated(gpu, dict(zip(names, map(float, values))))
        return np.array([predict_latency(p["plan"], spec, p["traffic"])["predicted_us"]
                         for p in points])

    fit = least_squares(lambda x: np.log(predict(x) / measured), start, bounds=(low, high),
                        diff_step=1e-3, x_scale="jac", max_nfev=max_evaluations)
    constants = {name: float(f"{value:.4g}") for name, value in zip(names, fit.x)}
    note = fit.message
    if len(points) < len(names):
        note += f"; only {len(points)} points for {len(names)} constants: underdetermined"
    return (constants, before, predict([before[name] for name in names]),
            predict([constants[name] for name in names]), note)


def _calibrated(gpu: GpuSpec, constants: dict) -> GpuSpec:
    """`gpu` with `constants` over its calibration."""
    return dataclasses.replace(gpu, calibration={**gpu.calibration, **constants})


def measured_points(bench: dict) -> list[dict]:
    """Every ok row of this project's strategies, with its plan rebuilt from the JSON.

    Rows timed otherwise than the run (eager fallbacks of a graph run) are left out: their
    launch costs are another model's.
    """
    trees = {(w["name"], w.get("shape")): w["tree"] for w in bench["workloads"] if "tree" in w}
    timing = bench["config"]["timing"]
    built = {}
    points = []
    for row in bench["results"]:
        if row["kind"] != "deft" or row["status"] != "ok" or row["method"] not in STRATEGIES:
            continue
        if row.get("timing", timing) != timing:
            continue
        cell = (row["workload"], row.get("shape"))
        if cell not in trees:
            continue
        if cell not in built:
            built[cell] = tree_from_dict(trees[cell])
        params = row.get("params") or {}
        plan = build_plan(row["method"], built[cell], params.get("chunk_size"),
                          params.get("group_size"),
                          params.get("page_size", bench["config"]["page_size"]))
        points.append({"workload": row["workload"], "strategy": row["method"], "plan": plan,
                       "traffic": traffic_of_plan(plan), "measured_us": row["us"]})
    return points


def per_strategy_errors(rows: list[dict]) -> dict:
    """Median |error| and worst error of predicted vs measured, per strategy, before and after."""
    summary = {}
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        mine = [r for r in rows if r["strategy"] == strategy]
        entry = {"n": len(mine)}
        for key, suffix in (("predicted_before_us", "_before"), ("predicted_us", "")):
            errors = np.array([r[key] / r["measured_us"] - 1 for r in mine])
            entry[f"median_abs_err{suffix}"] = float(np.median(np.abs(errors)))
            entry[f"worst_err{suffix}"] = float(errors[np.argmax(np.abs(errors))])
        summary[strategy] = entry
    return summary


# ---------------------------------------------------------------------------- size sweeps
SWEEP_FORMAT = "deft-sweep/1"
REFIT_FORMAT = "deft-refit/1"

FITS_DIR = Path(__file__).resolve().parents[2] / "iomodel" / "fits"
"""Where refits are kept, one ``<card>.json`` per card, beside the built-in GPU specs."""

GOALS = {"median_abs_err": 0.15, "worst_abs_err": 0.30, "spearman": 0.8}
"""Issue #19's goals on held-out trees: predicted within 15% median and 30% worst of measured,
Spearman >= 0.8 between predicted and measured rankings of a tree's candidates."""


def sweep_points(sweeps: list[dict]) -> list[dict]:
    """Every ok size of every row of ``deft-sweep/1`` results (`autotune.heldout.result`),
    with its plan rebuilt from the tree stored in the result."""
    points = []
    for sweep in sweeps:
        if sweep.get("format") != SWEEP_FORMAT:
            raise ValueError(f"format is {sweep.get('format')!r}, expected {SWEEP_FORMAT!r}")
        trees = {name: tree_from_dict(data) for name, data in sweep["trees"].items()}
        for row in sweep["rows"]:
            for size in row["sizes"]:
                if size["status"] != "ok" or not size["us"]:
                    continue
                plan = build_plan(sweep["strategy"], trees[row["workload"]], size["chunk_size"],
                                  size["group_size"], sweep["page_size"])
                points.append({"workload": row["workload"], "role": row["role"],
                               "strategy": sweep["strategy"], "plan": plan,
                               "traffic": traffic_of_plan(plan), "measured_us": size["us"]})
    return points


def calibrate_sweep(sweeps: list[dict], gpu: GpuSpec | None = None,
                    max_evaluations: int = 200) -> dict:
    """Fit the latency constants to the sizes measured on the tuning trees of size sweeps, and
    judge the fit on the held-out trees.

    Parameters
    ----------
    sweeps : list of dict
        ``deft-sweep/1`` results of one card (``deft-cli autotune --held-out --json``).
    gpu : GpuSpec, optional
        Default: the built-in spec of the sweeps' device.
    max_evaluations : int

    Returns
    -------
    dict
        ``format`` ``deft-refit/1``, ``card``, ``dtype``, ``points``, ``constants_before``,
        ``merge_block`` (the per-head merge's row block the sweeps timed, `merge_block_of`;
        "plan" for each plan's own), ``constants`` (the fitted ones), ``tuning`` and
        ``held_out`` (each: ``points``,
        ``median_abs_err``, ``worst_err``, the same ``_before`` the fit, ``spearman`` per tree,
        ``min_spearman``, ``median_spearman``, ``worst_err_per_tree``,
        ``worst_err_per_family``), ``goals``, ``meets_goals`` (held out), ``spec`` and
        ``note``.

    Raises
    ------
    ValueError
        Without a spec, or without measured sizes on tuning trees to fit.
    """
    card = sweeps[0]["device"]["name"] if sweeps else None
    gpu = gpu or (builtin_gpu(card) if card else None)
    if gpu is None:
        raise ValueError(f"no built-in GPU spec for card {card!r}")
    timed = timed_as(gpu, sweeps)
    points = sweep_points(sweeps)
    train = [p for p in points if p["role"] == "tuning"]
    if not train:
        raise ValueError("no measured size on a tuning tree (role 'tuning') to fit")
    constants, before, _, _, note = fit_constants(train, timed, max_evaluations)
    judged = {}
    for role in ("tuning", "held_out"):
        mine = [p for p in points if p["role"] == role]
        judged[role] = _judge(mine, _calibrated(timed, before),
                              _calibrated(timed, constants)) if mine else None
    held = judged["held_out"]
    return {
        "format": REFIT_FORMAT, "card": gpu.name, "dtype": sweeps[0].get("dtype"),
        "strategy": sweeps[0].get("strategy"), "points": len(points),
        "merge_block": merge_block_of(sweeps) or "plan",
        "constants_before": before, "constants": constants, **judged, "goals": GOALS,
        "meets_goals": held is not None and held["median_abs_err"] <= GOALS["median_abs_err"]
        and abs(held["worst_err"]) <= GOALS["worst_abs_err"]
        and (held["min_spearman"] or 0.0) >= GOALS["spearman"],
        "spec": _calibrated(gpu, constants).to_dict(), "note": note,
    }


def cross_validate(sweeps: list[dict], gpu: GpuSpec | None = None,
                   max_evaluations: int = 200) -> dict:
    """Leave-one-tree-out on the tuning trees only: fit on all tuning trees but one, judge on
    that one, for each; the held-out trees are not read.

    Returns
    -------
    dict
        ``per_tree`` ({tree: ``median_abs_err``, ``worst_err``, ``spearman``}) and, over all
        the left-out predictions, ``median_abs_err``, ``worst_err``, ``min_spearman`` and
        ``median_spearman``.
    """
    gpu = timed_as(gpu or builtin_gpu(sweeps[0]["device"]["name"]), sweeps)
    tuning = [dict(s, rows=[r for r in s["rows"] if r["role"] == "tuning"]) for s in sweeps]
    points = sweep_points(tuning)
    per_tree, errors = {}, []
    for tree in dict.fromkeys(p["workload"] for p in points):
        rest = [p for p in points if p["workload"] != tree]
        mine = [p for p in points if p["workload"] == tree]
        constants = fit_constants(rest, gpu, max_evaluations)[0]
        judged = _judge(mine, gpu, _calibrated(gpu, constants))
        per_tree[tree] = {"median_abs_err": judged["median_abs_err"],
                          "worst_err": judged["worst_err"], "spearman": judged["spearman"][tree]}
        spec = _calibrated(gpu, constants)
        errors += [predict_latency(p["plan"], spec, p["traffic"])["predicted_us"]
                   / p["measured_us"] - 1 for p in mine]
    errors = np.array(errors)
    rhos = [entry["spearman"] for entry in per_tree.values()]
    return {"per_tree": per_tree, "median_abs_err": float(np.median(np.abs(errors))),
            "worst_err": float(errors[np.argmax(np.abs(errors))]),
            "min_spearman": float(min(rhos)), "median_spearman": float(np.median(rhos))}


def merge_block_of(sweeps: list[dict]) -> int:
    """The per-head merge's row block the sweeps were timed with, their ``merge_block``: a
    number of rows, or "plan" (the default) for each plan's own
    (`deft.kernels.reduction.merge_block`), returned as 0; ValueError when they differ."""
    blocks = {0 if s.get("merge_block", "plan") == "plan" else int(s["merge_block"])
              for s in sweeps}
    if len(blocks) > 1:
        raise ValueError(f"the sweeps were timed with different merge blocks: {sorted(blocks)}")
    return blocks.pop() if blocks else 0


def timed_as(gpu: GpuSpec, sweeps: list[dict]) -> GpuSpec:
    """`gpu` predicting the merge the sweeps timed (`merge_block_of`; the fitted spec a refit
    writes keeps each plan's own block)."""
    block = merge_block_of(sweeps)
    return _calibrated(gpu, {"merge_block_rows": block}) if block else gpu


def spearman(a, b) -> float:
    """Spearman's rank correlation of two sequences (ties ranked by their mean rank); NaN when
    either is constant."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _judge(points: list[dict], before: GpuSpec, after: GpuSpec) -> dict:
    """Errors (predicted / measured - 1) of both specs, and Spearman per tree with `after`."""
    measured = np.array([p["measured_us"] for p in points])
    result = {"points": len(points)}
    for spec, suffix in ((before, "_before"), (after, "")):
        predicted = np.array([predict_latency(p["plan"], spec, p["traffic"])["predicted_us"]
                              for p in points])
        errors = predicted / measured - 1
        result[f"median_abs_err{suffix}"] = float(np.median(np.abs(errors)))
        result[f"worst_err{suffix}"] = float(errors[np.argmax(np.abs(errors))])
    by_tree, worst, by_family = {}, {}, {}
    for p, value, error in zip(points, predicted, errors):
        by_tree.setdefault(p["workload"], ([], []))
        by_tree[p["workload"]][0].append(value)
        by_tree[p["workload"]][1].append(p["measured_us"])
        for table, key in ((worst, p["workload"]), (by_family, tree_family(p["workload"]))):
            if abs(error) > abs(table.get(key, 0.0)):
                table[key] = float(error)
    rhos = {name: spearman(*pair) for name, pair in by_tree.items() if len(pair[0]) >= 3}
    valid = [r for r in rhos.values() if not np.isnan(r)]
    result.update(spearman=rhos, min_spearman=min(valid) if valid else None,
                  median_spearman=float(np.median(valid)) if valid else None,
                  worst_err_per_tree=worst, worst_err_per_family=by_family)
    return result


def tree_family(workload: str) -> str:
    """The workload family of a tree's name: ``random:seed=5@32/8`` -> ``random``,
    ``fewshot_b20_P4000_L200@4/1`` -> ``fewshot``."""
    return re.split(r"[:_@]", workload, maxsplit=1)[0]


def write_fit(fit: dict, path=None) -> Path:
    """Write a refit as JSON (default: ``FITS_DIR/<sanitised card>.json``) and return the path."""
    import json

    path = Path(path) if path else FITS_DIR / (
        re.sub(r"[^a-z0-9]+", "-", fit["card"].lower()).strip("-") + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fit, indent=1) + "\n")
    return path


def read_fit(path) -> dict:
    """A refit written by `write_fit`; ValueError when it is not one."""
    import json

    fit = json.loads(Path(path).read_text())
    if not isinstance(fit, dict) or fit.get("format") != REFIT_FORMAT:
        raise ValueError(f"{path}: not a {REFIT_FORMAT} fit")
    return fit
