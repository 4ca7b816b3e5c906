#!/usr/bin/env python3
"""The waves rule's parameters chosen on tuning rows and judged on held-out rows, pooled over
several measured sweeps (no GPU).

    python3 scripts/scan_wave_rule.py SWEEP.json [SWEEP.json ...] [--json OUT.json]

Every row of each ``deft-sweep/1`` file (`autotune.heldout`: a tree's every chunk x group size
measured at its tuned tile) is replayed with `deft.kernels.waves.wave_chunk` at each grid
point of (least chunk, item overhead, small-grid cost): the lookup as it ships
(`deft.kernels.tuned.tuned_config` with the card's programs: its rung's group, the fill rung's
where no bucket applies), the
chunk the rule would pick with those parameters, and that size's measured time over the row's
best. A grid point is ranked on the tuning rows alone (the rows of ``--fit-trees``: most
within 5%, then the lowest worst); among points the tuning rows cannot tell apart the shipped
parameters are kept, else the one nearest them. The held-out rows are reported beside each
point and judge the chosen one: they choose nothing. docs/autotune.md (session 12) gives the
run on sessions 11-12's sweeps of today's kernel.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autotune.heldout import WITHIN  # noqa: E402
from autotune.space import CHUNK_SIZES, plan_signature  # noqa: E402
from deft.kernels import waves  # noqa: E402
from deft.kernels.fill import PROGRAMS_PER_SM  # noqa: E402
from deft.kernels.tuned import TunedConfigWarning, tuned_config  # noqa: E402
from deft.plan import build_plan  # noqa: E402
from deft.tree_format import tree_from_dict  # noqa: E402

STRATEGY = "deft_flatten"
LEAST_CHUNKS = (64, 128, 256)
OVERHEADS = (64, 128, 192, 256, 384)
SMALL_GRID_COSTS = (0.55, 0.65, 0.75, 0.85)
SHIPPED = (waves.WAVE_CHUNKS[0], waves.ITEM_OVERHEAD, waves.SMALL_GRID_COST)


class Row:
    """One sweep row: the tree, its role, the group the shipped lookup gives it, and every
    swept size's time (a size not swept is read off the swept size with the same plan)."""

    def __init__(self, row: dict, tree, device: dict, page_size: int):
        self.name, self.role, self.tree, self.page_size = row["workload"], row["role"], tree, \
            page_size
        self.programs = PROGRAMS_PER_SM * device["sm_count"]
        self.small_grid_sms = device["sm_count"] if device["capability"][0] == 9 else 0
        self.group = tuned_config(STRATEGY, tree, device["name"], device["capability"],
                                  self.programs).group_size  # the rung's (fill: fill_group)
        self.us = {(s["chunk_size"], s["group_size"]): s["us"] for s in row["sizes"]
                   if s["status"] == "ok"}
        self.best = min(self.us.values())
        self._by_plan = None

    def ratio(self, chunk: int) -> float:
        """The measured time of (chunk, the row's group) over the row's best."""
        size = (chunk, self.group)
        if size not in self.us:
            if self._by_plan is None:
                self._by_plan = {self._plan(*s): us for s, us in self.us.items()}
            return self._by_plan[self._plan(*size)] / self.best
        return self.us[size] / self.best

    def _plan(self, chunk, group) -> bytes:
        return plan_signature(build_plan(STRATEGY, self.tree, chunk, group, self.page_size))


def load_rows(paths) -> list:
    rows = []
    for path in paths:
        sweep = json.loads(Path(path).read_text())
        for row in sweep["rows"]:
            tree = tree_from_dict(sweep["trees"][row["workload"]])
            rows.append(Row(row, tree, sweep["device"], sweep["page_size"]))
    return rows


def judge(rows, least: int, overhead: int, small_grid_cost: float) -> dict:
    """Within-5% count and worst ratio per role of the rule with these parameters."""
    chunks = [c for c in CHUNK_SIZES if c >= least]
    result = {}
    for role in ("tuning", "held_out"):
        ratios = [r.ratio(waves.wave_chunk(r.tree, r.group, r.programs, chunks, overhead,
                                           r.small_grid_sms, small_grid_cost))
                  for r in rows if r.role == role]
        result[role] = {"rows": len(ratios), "within_5pct": sum(x <= WITHIN for x in ratios),
                        "worst": max(ratios) if ratios else None}
    return result


def distance(point) -> float:
    """How far a grid point is from the shipped parameters (for ties on the tuning rows)."""
    return sum(abs(a - b) / b for a, b in zip(point, SHIPPED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("--json", help="write every grid point's counts and the choice here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", TunedConfigWarning)
    rows = load_rows(args.sweeps)
    if not any(r.role == "tuning" for r in rows):
        raise SystemExit("no tuning rows: sweep some trees with --fit-trees to choose on")
    points = {p: judge(rows, *p) for p in itertools.product(LEAST_CHUNKS, OVERHEADS,
                                                           SMALL_GRID_COSTS)}

    def on_tuning(point):
        t = points[point]["tuning"]
        return -t["within_5pct"], t["worst"]

    ranked = sorted(points, key=lambda p: (on_tuning(p), distance(p)))
    tied = [p for p in ranked if on_tuning(p) == on_tuning(ranked[0])]
    chosen = min(tied, key=distance)
    print(f"{len(rows)} rows: {sum(r.role == 'tuning' for r in rows)} tuning, "
          f"{sum(r.role == 'held_out' for r in rows)} held out")
    print(f"{'least':>5} {'overhead':>8} {'small grid':>10}   tuning within / worst   "
          "held out within / worst")
    for p in ranked[:12]:
        t, h = points[p]["tuning"], points[p]["held_out"]
        mark = " <- chosen" if p == chosen else (" (shipped)" if p == SHIPPED else "")
        print(f"{p[0]:>5} {p[1]:>8} {p[2]:>10}   {t['within_5pct']:>6} of {t['rows']:<3} "
              f"{t['worst']:.3f}   {h['within_5pct']:>8} of {h['rows']:<3} "
              f"{h['worst'] or 0:.3f}{mark}")
    shipped = points[SHIPPED]
    print(f"shipped {SHIPPED}: tuning {shipped['tuning']['within_5pct']} of "
          f"{shipped['tuning']['rows']}, held out {shipped['held_out']['within_5pct']} of "
          f"{shipped['held_out']['rows']}; {len(tied)} grid points tie on the tuning rows; "
          f"chosen {chosen}{' (the shipped ones)' if chosen == SHIPPED else ''}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "sweeps": args.sweeps, "shipped": SHIPPED, "chosen": chosen,
            "tied_on_tuning": [list(p) for p in tied],
            "points": [{"least": p[0], "overhead": p[1], "small_grid_cost": p[2], **v}
                       for p, v in points.items()]}, indent=1))


if __name__ == "__main__":
    main()
