#!/usr/bin/env python3
"""The waves rule's parameters chosen on tuning rows and judged on held-out rows, pooled over
several measured sweeps (no GPU).

    python3 scripts/scan_wave_rule.py SWEEP.json [SWEEP.json ...] [--json OUT.json]

Every row of each ``deft-sweep/1`` file (`autotune.heldout`: a tree's every chunk x group size
measured at its tuned tile) is replayed with `deft.kernels.waves.wave_chunk` at each grid
point of (least chunk, item overhead, small-grid cost): the group of the lookup as it ships
(its rung's, the fill rung's where no bucket applies: `select_on_sweeps.Context`), the chunk the
rule would pick with those parameters, and that size's measured time over the row's best
(`select_on_sweeps.Row`). A grid point is ranked on the tuning rows alone (the rows of ``--fit-trees``: most
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
sys.path.insert(0, str(ROOT / "scripts"))

from autotune.heldout import WITHIN  # noqa: E402
from autotune.space import CHUNK_SIZES  # noqa: E402
from deft.kernels import waves  # noqa: E402
from deft.kernels.tuned import TunedConfigWarning  # noqa: E402
from deft.tree_format import tree_from_dict  # noqa: E402
from select_on_sweeps import Context, Row  # noqa: E402  (its rows and the lookup as stored)

LEAST_CHUNKS = (64, 128, 256)
OVERHEADS = (64, 128, 192, 256, 384)
SMALL_GRID_COSTS = (0.55, 0.65, 0.75, 0.85)
SHIPPED = (waves.WAVE_CHUNKS[0], waves.ITEM_OVERHEAD, waves.SMALL_GRID_COST)
LOG = ROOT / "autotune/logs/nvidia-h200.json"
"""The tuning log `select_on_sweeps.Context` reads (its tuning trees; unused here)."""


def load_rows(paths) -> list:
    """(`select_on_sweeps.Row`, its sweep's `Context`, the group the lookup as stored gives
    the row's tree: its rung's, the fill rung's where no bucket applies) of every row."""
    log = json.loads(LOG.read_text())
    rows = []
    for path in paths:
        sweep = json.loads(Path(path).read_text())
        ctx = Context(sweep, log)
        for row in sweep["rows"]:
            tree = tree_from_dict(sweep["trees"][row["workload"]])
            rows.append((Row(row, tree, sweep["page_size"]), ctx, ctx.stored(tree)[1]))
    return rows


def judge(rows, least: int, overhead: int, small_grid_cost: float) -> dict:
    """Within-5% count and worst ratio per role of the rule with these parameters."""
    chunks = [c for c in CHUNK_SIZES if c >= least]
    result = {}
    for role in ("tuning", "held_out"):
        ratios = [row.ratio(waves.wave_chunk(row.tree, group, ctx.programs, chunks, overhead,
                                             ctx.small_grid_sms, small_grid_cost), group)
                  for row, ctx, group in rows if row.row["role"] == role]
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
    if not any(row.row["role"] == "tuning" for row, _, _ in rows):
        raise SystemExit("no tuning rows: sweep some trees with --fit-trees to choose on")
    points = {p: judge(rows, *p) for p in itertools.product(LEAST_CHUNKS, OVERHEADS,
                                                           SMALL_GRID_COSTS)}

    def on_tuning(point):
        t = points[point]["tuning"]
        return -t["within_5pct"], t["worst"]

    ranked = sorted(points, key=lambda p: (on_tuning(p), distance(p)))
    tied = [p for p in ranked if on_tuning(p) == on_tuning(ranked[0])]
    chosen = min(tied, key=distance)
    roles = [row.row["role"] for row, _, _ in rows]
    print(f"{len(rows)} rows: {roles.count('tuning')} tuning, {roles.count('held_out')} held out")
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
