"""Verdicts: each clause of the performance target of issue #15, met or not, from a run's rows.

The clauses (docs/anchors.md#targets and issue #15), for this project's method (DeFT-Flatten
when it ran), graph timing, one run:

- 32/8/128, the six anchors: at most 2x the floor on each; at least 2x faster than the best
  peer by geometric mean, without and with the derived FastTree row;
- shard shapes 16/2/128, 8/1/128, 4/1/128, the six anchors: faster than every peer (FastTree
  included) on each, and at least 1.5x by geometric mean;
- head dim 64 (32/8/64), the six anchors, and each family of the off-anchor suite at 32/8/128
  (`deft.workloads.suites`): faster than every peer on each; the held-out workloads apart;
- bf16 within 5% of fp16: one run has one dtype, so this clause is never judged here.

A clause whose cells are not all in the run is ``not judged``; a cell where our method failed
or no peer ran counts against the clause. Every number is computed from the rows.
"""

from __future__ import annotations

import numpy as np

ANCHOR_SHAPE = "32/8/128"
SHARD_SHAPES = ("16/2/128", "8/1/128", "4/1/128")
HEAD_DIM_64 = "32/8/64"
PREFERRED_METHOD = "deft_flatten"

SPEEDUP = ("speedup_vs_best_peer", "")
SPEEDUP_INCL_FASTTREE = ("speedup_vs_best_peer_incl_fasttree", " (FastTree incl.)")


def verdicts(result: dict, method: str | None = None) -> list[dict]:
    """The verdict of every clause (module docstring) for `method` (default: deft_flatten if it
    ran, else the first of this project's methods; none without one).

    Returns
    -------
    list of dict
        ``{"target", "status" ("met", "not met" or "not judged"), "text", "value", "count",
        "of"}`` per clause; ``value`` is the worst ratio or the geometric mean.
    """
    from deft.workloads import ANCHORS
    from deft.workloads.suites import HELD_OUT, SUITE

    rows = result["results"]
    ours = [r["method"] for r in rows if r["kind"] == "deft"]
    method = method or (PREFERRED_METHOD if PREFERRED_METHOD in ours else next(iter(ours), None))
    if method is None:
        return []
    cells = {(r["workload"], r.get("shape")): r for r in rows if r["method"] == method}

    def values(shape, names, field):
        if not all((name, shape) in cells for name in names):
            return None
        return {name: _value(cells[(name, shape)], field) for name in names}

    out = [
        each(f"{ANCHOR_SHAPE} anchors: x floor <= 2", values(ANCHOR_SHAPE, ANCHORS,
             "ratio_to_floor"), lambda v: v <= 2, "worst {:.2f}", max),
    ]
    for field, label in (SPEEDUP, SPEEDUP_INCL_FASTTREE):
        out.append(mean(f"{ANCHOR_SHAPE} anchors: geomean vs best peer{label}",
                        values(ANCHOR_SHAPE, ANCHORS, field), 2.0))
    for shape in SHARD_SHAPES:
        found = values(shape, ANCHORS, SPEEDUP_INCL_FASTTREE[0])
        out.append(each(f"{shape} anchors: faster than every peer (FastTree incl.)", found,
                        lambda v: v > 1, "slowest {:.2f}x", min))
        out.append(mean(f"{shape} anchors: geomean vs best peer (FastTree incl.)", found, 1.5))
    out.append(each(f"{HEAD_DIM_64} anchors: faster than every peer",
                    values(HEAD_DIM_64, ANCHORS, SPEEDUP_INCL_FASTTREE[0]), lambda v: v > 1,
                    "slowest {:.2f}x", min))
    families = {}
    for workload in SUITE:
        families.setdefault(workload.name.split("_")[0], []).append(workload.name)
    for family, names in {**families, "held-out": list(HELD_OUT)}.items():
        out.append(each(f"{ANCHOR_SHAPE} {family} (off-anchor): faster than every peer",
                        values(ANCHOR_SHAPE, names, SPEEDUP_INCL_FASTTREE[0]), lambda v: v > 1,
                        "slowest {:.2f}x", min))
    out.append({"target": "bf16 within 5% of fp16", "status": "not judged", "value": None,
                "count": None, "of": None,
                "text": "bf16 within 5% of fp16: one run has one dtype; compare a --dtype bf16 "
                        "run's µs with an fp16 run's"})
    for verdict in out:
        verdict["method"] = method
    return out


def each(target: str, found: dict | None, passes, worst_text: str, worst) -> dict:
    """A clause that must hold on every cell: ``count`` of cells passing, the worst value."""
    if found is None:
        return _not_judged(target)
    good = [v for v in found.values() if v is not None]
    count = sum(bool(passes(v)) for v in good)
    value = worst(good) if good else None
    where = [name for name, v in found.items() if v is not None and v == value]
    detail = worst_text.format(value) + (f": {where[0]}" if where else "") if good else "none ok"
    missing = len(found) - len(good)
    if missing:
        detail += f"; {missing} without a number"
    met = count == len(found)
    return {"target": target, "status": "met" if met else "not met", "value": value,
            "count": count, "of": len(found),
            "text": f"{target} on {count}/{len(found)} ({detail}): {_word(met)}"}


def mean(target: str, found: dict | None, threshold: float) -> dict:
    """A clause on the geometric mean over the cells (every cell needs a number)."""
    if found is None:
        return _not_judged(target)
    good = [v for v in found.values() if v is not None]
    value = float(np.exp(np.mean(np.log(good)))) if good else None
    complete = len(good) == len(found)
    met = complete and value >= threshold
    shown = "n/a" if value is None else f"{value:.2f}"
    detail = "" if complete else f" (over {len(good)}/{len(found)} with a number)"
    return {"target": f"{target} >= {threshold:g}", "status": "met" if met else "not met",
            "value": value, "count": len(good), "of": len(found),
            "text": f"{target} {shown} >= {threshold:g}{detail}: {_word(met)}"}


def _not_judged(target: str) -> dict:
    return {"target": target, "status": "not judged", "value": None, "count": None, "of": None,
            "text": f"{target}: not judged (not every workload of it ran at this shape)"}


def _value(row: dict, field: str):
    return row.get(field) if row["status"] == "ok" else None


def _word(met: bool) -> str:
    return "met" if met else "not met"
