#!/usr/bin/env python3
"""What the latency model would choose, read off measured size sweeps (no GPU).

    python3 scripts/rank_on_sweeps.py docs/autotune-h200-session5/heldout.json [--role held_out]

For every row of a ``deft-sweep/1`` file (`autotune.heldout`) of the given role: the model's
ranking of deft_flatten's sizes (`autotune.space.rank_sizes` on the card's built-in spec with
its refit, `iomodel/fits/<card>.json`) restricted to the sizes the sweep measured; whether the
measured best is among the model's top 8 (the sizes the tuner measures), and the measured time
of the model's top 1 over the best. Prints one line per row and a summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune.evaluation import fit_for  # noqa: E402
from autotune.space import rank_sizes  # noqa: E402
from autotune.tune import TOP_K, card_spec  # noqa: E402
from deft.tree_format import tree_from_dict  # noqa: E402

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep")
    parser.add_argument("--role", default="held_out", choices=("held_out", "tuning"))
    args = parser.parse_args()
    data = json.loads(Path(args.sweep).read_text())
    spec = card_spec(data["device"]["name"])
    if spec is None:
        sys.exit(f"no built-in spec for {data['device']['name']}")
    fit = fit_for(spec.name)
    if fit is not None:
        spec = dataclasses.replace(spec, calibration=fit["constants"])
    in_top, top1 = 0, []
    for row in (r for r in data["rows"] if r["role"] == args.role):
        tree = tree_from_dict(data["trees"][row["workload"]])
        measured = {(s["chunk_size"], s["group_size"]): s["us"] for s in row["sizes"]
                    if s["status"] == "ok"}
        ranked = [(r.chunk_size, r.group_size)
                  for r in rank_sizes("deft_flatten", tree, spec, data["page_size"])]
        ranked = [size for size in ranked if size in measured]
        best = min(measured.values())
        found = min(measured[size] for size in ranked[:TOP_K]) <= best
        in_top += found
        top1.append(measured[ranked[0]] / best)
        print(f"{row['workload']:<70} best in top {TOP_K}: {'yes' if found else 'no ':3} "
              f"top 1 / best {top1[-1]:.3f}")
    model = f"refit of {fit['card']}" if fit else "built-in constants"
    print(f"{len(top1)} {args.role} rows ({model}): best in the model's top {TOP_K} on {in_top}; "
          f"its top 1 within 5% on "
          f"{sum(x <= 1.05 for x in top1)}, median {statistics.median(top1):.3f}, worst "
          f"{max(top1):.3f}")


if __name__ == "__main__":
    main()
