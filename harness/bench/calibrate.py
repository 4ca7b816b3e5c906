"""Fit the IO model's latency constants to measured bench times, per card.

`iomodel.latency.predict_latency` predicts a strategy's time from its plan and a GPU spec,
with named constants (`iomodel.latency.Constants`: launch and program overheads, memory and
compute efficiency, one SM's bandwidth share) that a spec's ``calibration`` overrides. This
module rebuilds the plan of every measured row of this project's strategies in a
``deft-bench/1`` or ``/2`` JSON (trees and sizes are in it), and fits all the constants at once by
bounded least squares on the log of predicted / measured time, so that a 2x miss counts the
same on a 10 µs and a 1 ms call. The model is a max of rooflines, piecewise linear in the
constants: the fit uses finite differences and reports how well it does per strategy
(median and worst relative error, before and after) rather than trusting a single cost.

The result carries a ``deft-gpu/1`` spec with the fitted ``calibration``: save it as a file
and pass its path wherever a GPU spec is taken (`iomodel.resolve_gpu`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from deft.tree_format import tree_from_dict
from iomodel.gpus import GpuSpec, builtin_gpu
from iomodel.latency import Constants, constants_for, predict_latency
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
}
"""Search range of each constant; a constant not listed here is fitted in (1e-3, 1e3)."""


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
    from scipy.optimize import least_squares

    card = bench["env"].get("card")
    gpu = gpu or (builtin_gpu(card) if card else None)
    if gpu is None:
        raise ValueError(f"no built-in GPU spec for card {card!r}: call harness.bench.calibrate "
                         "with gpu=iomodel.load_gpu_spec(path)")
    points = measured_points(bench)
    if not points:
        raise ValueError("the bench result has no measured row of this project's strategies "
                         f"({', '.join(STRATEGIES)}) to fit")
    names = [f.name for f in dataclasses.fields(Constants)]
    low = np.array([BOUNDS.get(name, (1e-3, 1e3))[0] for name in names])
    high = np.array([BOUNDS.get(name, (1e-3, 1e3))[1] for name in names])
    before = dataclasses.asdict(constants_for(gpu))
    start = np.clip([before[name] for name in names], low, high)
    measured = np.array([p["measured_us"] for p in points])

    def predict(values) -> np.ndarray:
        spec = dataclasses.replace(gpu, calibration=dict(zip(names, map(float, values))))
        return np.array([predict_latency(p["plan"], spec, p["traffic"])["predicted_us"]
                         for p in points])

    fit = least_squares(lambda x: np.log(predict(x) / measured), start, bounds=(low, high),
                        diff_step=1e-3, x_scale="jac", max_nfev=max_evaluations)
    constants = {name: float(f"{value:.4g}") for name, value in zip(names, fit.x)}
    predicted_before = predict([before[name] for name in names])
    predicted_after = predict([constants[name] for name in names])
    rows = [
        {"workload": p["workload"], "strategy": p["strategy"], "measured_us": p["measured_us"],
         "predicted_before_us": float(b), "predicted_us": float(a)}
        for p, b, a in zip(points, predicted_before, predicted_after)
    ]
    note = fit.message
    if len(points) < len(names):
        note += f"; only {len(points)} points for {len(names)} constants: underdetermined"
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
        "spec": dataclasses.replace(gpu, calibration=constants).to_dict(),
        "note": note,
    }


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
