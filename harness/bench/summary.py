"""What a bench result adds to its rows once measured: the derived FastTree rows, ratios to the
floor, speedups over the best peer, and per shape and method the geometric means.

Cells are (workload, shape): a workload run at several ``--heads`` shapes has a floor, a best
peer and a summary per shape. "Best peer" is the fastest measured peer (kind ``peer``); "best
peer incl. FastTree" also counts the derived ``fasttree (derived)`` row (kind ``derived``,
`harness.bench.fasttree`), which is never a measurement of this run.
"""

from __future__ import annotations

import numpy as np

from harness.bench import fasttree
from harness.bench.verdicts import verdicts


def new_row(method: str, kind: str) -> dict:
    """A result row's fields but its cell's (``workload``, ``shape``), nothing measured yet
    (status ``ok``)."""
    return {"method": method, "kind": kind, "status": "ok", "reason": None, "us": None,
            "p10_us": None, "p90_us": None, "timing": None, "capture_error": None,
            "variant": "", "variants": {}, "rel_err": None, "graph_rel_err": None,
            "plan_us": None, "params": {}}


def finish(result: dict) -> None:
    """Add the derived FastTree rows, per row ``ratio_to_floor``, ``speedup_vs_best_peer`` and
    ``speedup_vs_best_peer_incl_fasttree``, then ``best_peer``, ``best_peer_incl_fasttree``
    (``{shape: {workload: {method, us}}}``), ``summary`` (`summarize`) and ``verdicts``."""
    if fasttree.applies(result["config"]):
        result["results"].extend(derived_fasttree_rows(result["results"]))
    floors = {(w["name"], w.get("shape")): w["floor"]["floor_us"]
              for w in result["workloads"] if "floor" in w}
    best_peer = _fastest(result["results"], ("peer",))
    best_incl = _fastest(result["results"], ("peer", "derived"))
    for row in result["results"]:
        ok = row["status"] == "ok"
        shape, name = row.get("shape"), row["workload"]
        floor = floors.get((name, shape))
        peer = best_peer.get(shape, {}).get(name)
        peer_incl = best_incl.get(shape, {}).get(name)
        row["ratio_to_floor"] = row["us"] / floor if ok and floor else None
        row["speedup_vs_best_peer"] = peer["us"] / row["us"] if ok and peer else None
        row["speedup_vs_best_peer_incl_fasttree"] = (
            peer_incl["us"] / row["us"] if ok and peer_incl else None)
    result["best_peer"] = best_peer
    result["best_peer_incl_fasttree"] = best_incl
    result["summary"] = summarize(result)
    result["verdicts"] = verdicts(result)


def derived_fasttree_rows(rows: list[dict]) -> list[dict]:
    """One ``fasttree (derived)`` row per cell with a published FastTree number
    (`harness.bench.fasttree.PUBLISHED`): its ratio x this run's ``fi_mask`` µs, or skipped
    with the reason (``fi_mask`` not ok in this run, or FastTree wrong in the outside run)."""
    derived = []
    base = {(r["workload"], r.get("shape")): r for r in rows
            if r["method"] == fasttree.BASE_METHOD}
    for (name, shape), base_row in base.items():
        ratio = fasttree.published_ratio(name, shape)
        if ratio is None:
            continue
        row = {"workload": name, "shape": shape, **new_row(fasttree.METHOD, "derived")}
        if ratio == fasttree.WRONG:
            row.update(status="skipped", reason="FastTree's output failed the check in the "
                                                "outside run (docs/anchors.md)")
        elif base_row["status"] != "ok":
            row.update(status="skipped", reason=f"needs {fasttree.BASE_METHOD} measured")
        else:
            row.update(us=ratio * base_row["us"], timing=base_row["timing"],
                       variant=f"{ratio:.3f} x {fasttree.BASE_METHOD}",
                       params={"published_ratio": ratio, "base_method": fasttree.BASE_METHOD,
                               "base_us": base_row["us"]})
        derived.append(row)
    return derived


def _fastest(rows: list[dict], kinds: tuple) -> dict:
    """``{shape: {workload: {"method", "us"}}}``: the fastest ok row of `kinds` per cell."""
    best = {}
    for row in rows:
        if row["kind"] in kinds and row["status"] == "ok":
            cell = best.setdefault(row.get("shape"), {})
            current = cell.get(row["workload"])
            if current is None or row["us"] < current["us"]:
                cell[row["workload"]] = {"method": row["method"], "us": row["us"]}
    return best


def summarize(result: dict) -> dict:
    """Per shape, per method over the workloads it ran there: geometric means, worst cases and
    how many workloads it beat the best peer on (with and without FastTree).

    Returns
    -------
    dict
        ``{shape: {method: {"kind", "workloads", "ok", "geomean_ratio_to_floor",
        "worst_ratio_to_floor", "geomean_speedup_vs_best_peer", "faster_than_best_peer",
        "compared_to_peers", "geomean_speedup_vs_best_peer_incl_fasttree",
        "faster_than_best_peer_incl_fasttree", "compared_incl_fasttree"}}}``
    """
    summary = {}
    for row in result["results"]:
        by_method = summary.setdefault(row.get("shape"), {})
        by_method.setdefault(row["method"], []).append(row)
    return {shape: {name: method_summary(rows) for name, rows in by_method.items()}
            for shape, by_method in summary.items()}


def method_summary(rows: list[dict]) -> dict:
    """The summary of one method's rows at one shape (`summarize`)."""
    ok = [r for r in rows if r["status"] == "ok"]
    ratios = [r["ratio_to_floor"] for r in ok if r["ratio_to_floor"]]
    speedups = [r["speedup_vs_best_peer"] for r in ok if r["speedup_vs_best_peer"]]
    incl = [r["speedup_vs_best_peer_incl_fasttree"] for r in ok
            if r["speedup_vs_best_peer_incl_fasttree"]]
    return {
        "kind": rows[0]["kind"],
        "workloads": len(rows),
        "ok": len(ok),
        "geomean_ratio_to_floor": geomean(ratios),
        "worst_ratio_to_floor": max(ratios) if ratios else None,
        "geomean_speedup_vs_best_peer": geomean(speedups),
        "faster_than_best_peer": sum(s > 1 for s in speedups),
        "compared_to_peers": len(speedups),
        "geomean_speedup_vs_best_peer_incl_fasttree": geomean(incl),
        "faster_than_best_peer_incl_fasttree": sum(s > 1 for s in incl),
        "compared_incl_fasttree": len(incl),
    }


def geomean(values) -> float | None:
    """Geometric mean of positive numbers; None for none."""
    return float(np.exp(np.mean(np.log(values)))) if len(values) else None


def merge_results(parts: list[dict]) -> dict:
    """One result from several bench results of the same dtype and timing (e.g. the calls of
    one GPU lease that together cover every target): workloads and measured rows concatenated,
    each row keeping the floor of its own call; derived rows, ratios, summaries and verdicts
    recomputed. ``config["merged_from"]`` counts the parts.

    Raises ValueError when the parts differ in dtype or timing, or a cell repeats.
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]["config"]
    merged = {**parts[0], "config": {**first, "merged_from": len(parts)}, "workloads": [],
              "results": []}
    seen = set()
    for part in parts:
        config = part["config"]
        if (config["dtype"], config["timing"]) != (first["dtype"], first["timing"]):
            raise ValueError(f"cannot merge a {config['dtype']} {config['timing']} run with a "
                             f"{first['dtype']} {first['timing']} one")
        for workload in part["workloads"]:
            cell = (workload["name"], workload.get("shape"))
            if cell in seen:
                raise ValueError(f"{cell[0]} at {cell[1]} is in more than one result")
            seen.add(cell)
            merged["workloads"].append(workload)
        merged["results"] += [r for r in part["results"] if r["kind"] != "derived"]
    finish(merged)
    return merged
