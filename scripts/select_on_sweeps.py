#!/usr/bin/env python3
"""Which chunk and group a selection rule picks, replayed on measured size sweeps (no GPU).

    python3 scripts/select_on_sweeps.py [docs/autotune-h200-session8/heldout.json]
        [--configs deft/kernels/configs] [--log autotune/logs/nvidia-h200.json]
        [--json OUT.json] [--time]
    python3 scripts/select_on_sweeps.py --one-tile SWEEP.json [SWEEP.json ...] [--json OUT.json]

For every row of a ``deft-sweep/1`` file (`autotune.heldout`): what each rule picks for the
row's tree from what a plan knows (the tree and its heads, the card's programs: SMs from the
file x `deft.kernels.fill.PROGRAMS_PER_SM`, and a tuned table tuned on the tuning trees alone,
``--configs`` (default the shipped one, `deft/kernels/configs/`), with its log's tuning
trees), and the measured time of that pick over the sweep's best. The sweep timed every chunk x
group size whose plan differs, at the tuned tile, so a pick is read off the swept size with
the same plan. Rules:

- ``table``: the lookup as it shipped before session 7: the nearest bucket's chunk as stored
  and its group as the lookup gives it (since session 14 a stored "no cap" taken to a tree of
  more queries than its bucket is one query tile: every rule here shares that group), the
  fill rung where none applies. Where its pick is the size the row records as
  tuned, it reproduces the recorded ``tuned_over_best``; the script counts those rows.
- ``tokens``: the stored group; the stored chunk scaled by the tree's unique tokens over the
  tuning tree's (the nearest chunk from 64; the fill rung as in ``table``).
- ``items``: the stored group; the chunk whose work items are nearest the tuning tree's at its
  tuned chunk (`deft.kernels.waves.flatten_work_items`).
- ``waves``: the lookup as it ships (`deft.kernels.tuned.tuned_config` with the card's
  programs): the rung's group, the chunk of `deft.kernels.waves.wave_chunk` (on sm_90, items
  that fit the SMs cost `SMALL_GRID_COST`: the small-grid kernel).

The default sweep is session 8's, measured with the kernels and the table that ship (its
``tuned`` column is the waves rule with its small-grid term). Session 7's was measured with
the table tuned in session 5 (`docs/autotune-h200-session7/configs/`, pass it as
``--configs`` and its log as ``--log``; its ``tuned`` column is the waves rule before its
small-grid term); session 5's (`autotune-h200-session5/heldout.json`) predates the small-grid
kernel, so the rule's small-grid term does not hold there.

Then two checks that the waves rule's parameters (the item overhead, the least chunk) are not
fitted to the held-out rows: a scan on the tuning log (the rule's pick on each tuning tree,
among the candidates the tuner measured there, over the tuned choice), and a split (chosen on
some held-out tree kinds, judged on the others). ``--time`` times the lookup per plan, as
stored and with the waves rule (host time, this machine); ``--check`` exits 1 where the waves
rule holds fewer rows within 5% than the table rule (held out or tuning): the verdict on a new
GPU sweep (docs/autotune.md, "Session 7").

``--one-tile`` instead compares, on every row of one or more sweeps, the lookup without
`deft.kernels.tuned.ONE_TILE_AT_ONE_KV_HEAD` (the waves rule as it shipped until session 16)
with the lookup as it ships, the rule on (docs/autotune.md, sessions 14 and 16): each one's
pick and its time over the best per row, and the rows within 5% of each per dtype and role.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.pop("DEFT_TUNED_CONFIGS", None)  # the tables of --configs only

from autotune.heldout import WITHIN, with_heads  # noqa: E402
from autotune.space import CHUNK_SIZES, plan_signature  # noqa: E402
from deft.kernels.fill import PROGRAMS_PER_SM, fill_chunk, fill_group  # noqa: E402
from deft.kernels import tuned  # noqa: E402
from deft.kernels.tuned import TunedConfigWarning, tuned_config  # noqa: E402
from deft.kernels.waves import ITEM_OVERHEAD, WAVE_CHUNKS, flatten_work_items  # noqa: E402
from deft.kernels.waves import wave_chunk  # noqa: E402
from deft.plan import build_plan  # noqa: E402
from deft.tree_format import tree_from_dict, tree_to_dict  # noqa: E402
from harness.bench import parse_workloads  # noqa: E402
from harness.bench.calibrate import tree_family  # noqa: E402

STRATEGY = "deft_flatten"
OVERHEADS = (0, 64, 128, 256, 512, 768, 1024)
LEAST_CHUNKS = (64, 128, 256)
SPLITS = (("reasoning", "token"), ("speculative", "star", "random"), ("reasoning", "star"),
          ("speculative", "token", "random"))
"""Held-out tree kinds the waves parameters are chosen on, each judged on the other kinds."""


class Context:
    """What a rule may read: the card, the shipped table's lookup, the tuning log's trees."""

    def __init__(self, sweep: dict, log: dict):
        self.device = sweep["device"]
        self.programs = PROGRAMS_PER_SM * self.device["sm_count"]
        # Hopper's small-grid kernel, as `deft.kernels.tuned.tuned_config` counts it
        self.small_grid_sms = self.device["sm_count"] if self.device["capability"][0] == 9 else 0
        self.log = log["strategies"][STRATEGY]
        self._trees = {}

    def stored(self, tree):
        """(chunk, group, rung, matched bucket key or None) of the table: the chunk as stored,
        the group as `tuned_config` gives it (the stored one, or one query tile for a stored
        "no cap" on a tree of more queries than its bucket)."""
        found = tuned_config(STRATEGY, tree, self.device["name"], self.device["capability"])
        if found.rung == "default":
            return fill_chunk(STRATEGY, tree, self.programs), fill_group(tree), "fill", None
        return found.chunk_size, found.group_size, found.rung, found.matched

    def tuning_tree(self, key: str):
        """The tree the table's bucket `key` was tuned on (its log's workload, rebuilt)."""
        if key not in self._trees:
            name, heads = self.log[key]["workload"].split("@")
            q_heads, kv_heads = (int(n) for n in heads.split("/"))
            tree = with_heads(parse_workloads(name)[0].tree(), q_heads, kv_heads)
            assert tree.num_tokens == self.log[key]["stats"]["unique_tokens"], key
            self._trees[key] = tree
        return self._trees[key]


def table_rule(tree, ctx):
    return ctx.stored(tree)[:2]


def tokens_rule(tree, ctx):
    chunk, group, _, key = ctx.stored(tree)
    if key is None:
        return chunk, group
    target = chunk * tree.num_tokens / ctx.log[key]["stats"]["unique_tokens"]
    return min((c for c in CHUNK_SIZES if c >= 64), key=lambda c: abs(math.log(c / target))), group


def items_rule(tree, ctx):
    chunk, group, _, key = ctx.stored(tree)
    if key is None:
        return chunk, group
    tuned = flatten_work_items(ctx.tuning_tree(key), [chunk], group)[0]
    chunks = [c for c in CHUNK_SIZES if c >= 64]
    items = flatten_work_items(tree, chunks, group)
    return min(zip(chunks, items), key=lambda p: (abs(math.log(p[1] / tuned)), -p[0]))[0], group


def waves_rule(tree, ctx):
    found = tuned_config(STRATEGY, tree, ctx.device["name"], ctx.device["capability"],
                         ctx.programs)
    return found.chunk_size, found.group_size


def waves_with(overhead: int, least: int):
    """The waves rule with other parameters (the checks)."""
    chunks = [c for c in CHUNK_SIZES if c >= least]

    def rule(tree, ctx):
        chunk, group, _, _ = ctx.stored(tree)
        return wave_chunk(tree, group, ctx.programs, chunks, overhead, ctx.small_grid_sms), group

    return rule


RULES = {"table": table_rule, "tokens": tokens_rule, "items": items_rule, "waves": waves_rule}


class Row:
    """One sweep row: its tree and every swept size's time, by sizes and by plan."""

    def __init__(self, row: dict, tree, page_size: int):
        self.row, self.tree, self.page_size = row, tree, page_size
        self.kind = tree_family(row["workload"])
        self.heads = "/".join(map(str, row["heads"]))
        self.us = {(s["chunk_size"], s["group_size"]): s["us"] for s in row["sizes"]
                   if s["status"] == "ok"}
        self.by_plan = {self._signature(*size): us for size, us in self.us.items()}
        self.best = min(self.us.values())

    def _signature(self, chunk, group) -> bytes:
        return plan_signature(build_plan(STRATEGY, self.tree, chunk, group, self.page_size))

    def ratio(self, chunk, group) -> float:
        """Measured time of these sizes (the swept size of the same plan) over the best."""
        if (chunk, group) in self.us:
            return self.us[chunk, group] / self.best
        return self.by_plan[self._signature(chunk, group)] / self.best

    def picks_recorded(self, chunk, group) -> bool:
        """Whether these are the sizes the row records as tuned."""
        return (chunk, group) == (self.row["tuned"]["chunk_size"], self.row["tuned"]["group_size"])


def replay(rows, rule, ctx) -> list:
    """(row, chunk, group, ratio) per row."""
    picks = []
    for row in rows:
        chunk, group = rule(row.tree, ctx)
        picks.append((row, chunk, group, row.ratio(chunk, group)))
    return picks


def summary(picks) -> dict:
    ratios = [p[3] for p in picks]
    return {"rows": len(ratios), "within_5pct": sum(r <= WITHIN for r in ratios),
            "median": statistics.median(ratios), "worst": max(ratios)} if ratios else {}


def sizes(chunk, group) -> str:
    return f"c{chunk}/g{group or '-'}"


def text(s: dict) -> str:
    return f"{s['within_5pct']:>2} of {s['rows']:<2} within 5%, median {s['median']:.3f}, worst " \
           f"{s['worst']:.3f}"


def split_by(picks, attribute) -> dict:
    return {value: summary([p for p in picks if getattr(p[0], attribute) == value])
            for value in dict.fromkeys(getattr(p[0], attribute) for p in picks)}


def tuning_log_scan(ctx, overhead: int, least: int) -> dict:
    """The waves rule on each tuning tree, among the chunks the tuner measured at its chosen
    group: that candidate's time over the chosen one's."""
    ratios = []
    for key, entry in ctx.log.items():
        group = entry["chosen"]["group_size"]
        measured = {c["chunk_size"]: c["us"] for c in entry["candidates"]
                    if c["status"] == "ok" and c.get("us") and c["group_size"] == group
                    and c["chunk_size"] >= least}
        chunks = sorted(measured)
        pick = wave_chunk(ctx.tuning_tree(key), group, ctx.programs, chunks, overhead,
                          ctx.small_grid_sms)
        ratios.append(measured[pick] / entry["chosen"]["us"])
    return {"buckets": len(ratios), "within_5pct": sum(r <= WITHIN for r in ratios),
            "worst": max(ratios)}


def compare_one_tile(sweeps, log) -> dict:
    """The lookup with `tuned.ONE_TILE_AT_ONE_KV_HEAD` off and on (as it ships), on every row
    of the ``deft-sweep/1`` dicts `sweeps`: per row its tree, heads, role, dtype and each one's
    (chunk, group, time over the best); per dtype and role the rows within 5% of each."""
    rows, counts = [], {}
    for sweep in sweeps:
        ctx = Context(sweep, log)
        for r in sweep["rows"]:
            row = Row(r, tree_from_dict(sweep["trees"][r["workload"]]), sweep["page_size"])
            picks, before = {}, tuned.ONE_TILE_AT_ONE_KV_HEAD
            for name, on in (("half_tile", False), ("one_tile", True)):
                tuned.ONE_TILE_AT_ONE_KV_HEAD = on
                try:
                    chunk, group = waves_rule(row.tree, ctx)
                finally:
                    tuned.ONE_TILE_AT_ONE_KV_HEAD = before
                picks[name] = (chunk, group, row.ratio(chunk, group))
            rows.append({"tree": r["workload"].split("@")[0], "heads": row.heads,
                         "role": r["role"], "dtype": sweep["dtype"], **picks})
            count = counts.setdefault(f"{sweep['dtype']} {r['role']}",
                                      {"rows": 0, "half_tile": 0, "one_tile": 0})
            count["rows"] += 1
            for name in ("half_tile", "one_tile"):
                count[name] += picks[name][2] <= WITHIN
    return {"rows": rows, "counts": counts}


def print_one_tile(report: dict) -> None:
    print(f"{'tree':<66} {'heads':<5} {'role':<8} {'rule off':>9} {'/best':>6} "
          f"{'one tile':>9} {'/best':>6}")
    for r in report["rows"]:
        (c0, g0, x0), (c1, g1, x1) = r["half_tile"], r["one_tile"]
        print(f"{r['tree'][:66]:<66} {r['heads']:<5} {r['role']:<8} {sizes(c0, g0):>9} "
              f"{x0:>6.3f} {sizes(c1, g1):>9} {x1:>6.3f}"
              + ("  changed" if (c0, g0) != (c1, g1) else ""))
    print()
    for key, count in report["counts"].items():
        print(f"{key:<18} within 5%: rule off {count['half_tile']} of {count['rows']}, "
              f"one tile {count['one_tile']} of {count['rows']}")


def lookup_us(rows, ctx, programs, repeats: int = 5, calls: int = 100) -> float:
    """Median over the rows of `tuned_config`'s host time per call on fresh trees (the best of
    `repeats` runs of `calls`), microseconds; `programs` None: the table as stored."""
    per_row = []
    for row in rows:
        tree_dict = tree_to_dict(row.tree)
        best = float("inf")
        for _ in range(repeats):
            trees = [tree_from_dict(tree_dict) for _ in range(calls)]
            start = time.perf_counter()
            for tree in trees:
                tuned_config(STRATEGY, tree, ctx.device["name"], ctx.device["capability"],
                             programs)
            best = min(best, (time.perf_counter() - start) / calls)
        per_row.append(best * 1e6)
    return statistics.median(per_row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="*",
                        default=[str(ROOT / "docs/autotune-h200-session8/heldout.json")],
                        help="one sweep (several with --one-tile)")
    parser.add_argument("--configs", default=str(tuned.CONFIG_DIR),
                        help="the tuned tables the sweep was measured with (a directory)")
    parser.add_argument("--log", default=str(ROOT / "autotune/logs/nvidia-h200.json"))
    parser.add_argument("--json", help="write the summaries here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless the waves rule has at least as many rows within 5%% "
                             "as the table rule, held out and tuning")
    parser.add_argument("--time", action="store_true",
                        help="also time the lookup per plan, as stored and with the waves rule")
    parser.add_argument("--one-tile", action="store_true",
                        help="only compare the lookup with ONE_TILE_AT_ONE_KV_HEAD off and on")
    args = parser.parse_args()
    if len(args.sweeps) > 1 and not args.one_tile:
        parser.error("several sweeps only with --one-tile")
    tuned.CONFIG_DIR = Path(args.configs)
    warnings.simplefilter("ignore", TunedConfigWarning)  # tiles of other versions: sizes stay
    sweeps = [json.loads(Path(p).read_text()) for p in args.sweeps]
    log = json.loads(Path(args.log).read_text())
    assert WAVE_CHUNKS == tuple(c for c in CHUNK_SIZES if c >= WAVE_CHUNKS[0])
    tuned_on = {w.split("@")[0] for w in log["settings"]["workloads"]}
    for sweep in sweeps:
        held = {r["workload"].split("@")[0] for r in sweep["rows"] if r["role"] == "held_out"}
        assert not tuned_on & held, "a held-out tree is in the tuning set"
    if args.one_tile:
        report = compare_one_tile(sweeps, log)
        print_one_tile(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return
    sweep = sweeps[0]
    ctx = Context(sweep, log)
    rows = [Row(r, tree_from_dict(sweep["trees"][r["workload"]]), sweep["page_size"])
            for r in sweep["rows"]]
    picks = {name: replay(rows, rule, ctx) for name, rule in RULES.items()}

    print(f"{'workload':<58} {'role':<8} {'rung':<6}"
          + "".join(f" {name + ' pick':>11} {'/best':>6}" for name in RULES))
    for i, row in enumerate(rows):
        print(f"{row.row['workload'][:58]:<58} {row.row['role']:<8} {ctx.stored(row.tree)[2]:<6}"
              + "".join(f" {sizes(p[1], p[2]):>11} {p[3]:>6.3f}"
                        for p in (picks[name][i] for name in RULES)))
    print()
    report = {"recorded": {}}
    for name in ("table", "waves"):
        recorded = [p for p in picks[name] if p[0].picks_recorded(p[1], p[2])]
        swept = [p for p in recorded if (p[1], p[2]) in p[0].us]
        same = sum(abs(p[3] - p[0].row["tuned_over_best"]) < 1e-9 for p in swept)
        report["recorded"][name] = {"picks": len(recorded), "swept": len(swept),
                                    "reproduced": same}
        print(f"{name} rule: picks the recorded tuned sizes on {len(recorded)} of {len(rows)} "
              f"rows, {len(swept)} of them swept as they are (the others share a swept size's "
              f"plan), and there reproduces the recorded tuned / best on {same}")
    for name, rule_picks in picks.items():
        report[name] = {}
        print(f"\n{name}:")
        for role in ("held_out", "tuning"):
            chosen = [p for p in rule_picks if p[0].row["role"] == role]
            if not chosen:  # a sweep of held-out trees alone has no tuning rows
                continue
            report[name][role] = {"all": summary(chosen), "kind": split_by(chosen, "kind"),
                                  "heads": split_by(chosen, "heads")}
            print(f"  {role:<9} {text(summary(chosen))}")
            for attribute in ("kind", "heads"):
                print("    " + "; ".join(f"{k} {s['within_5pct']}/{s['rows']}"
                                          for k, s in report[name][role][attribute].items()))

    grid = list(itertools.product(OVERHEADS, LEAST_CHUNKS))
    print(f"\nwaves parameters on the tuning log ({os.path.relpath(args.log, ROOT)}): within 5% "
          "of the tuned choice")
    scan = {f"{o}/{least}": tuning_log_scan(ctx, o, least) for o, least in grid}
    for least in LEAST_CHUNKS:
        print(f"  least chunk {least:>3}: " + ", ".join(
            f"overhead {o} {scan[f'{o}/{least}']['within_5pct']}/{scan[f'{o}/{least}']['buckets']}"
            for o in OVERHEADS))
    held_rows = [row for row in rows if row.row["role"] == "held_out"]
    by_params = {p: replay(held_rows, waves_with(*p), ctx) for p in grid}
    print("\nwaves parameters chosen on some held-out kinds, judged on the others:")
    report["split"] = []
    for train in SPLITS:
        def on(p, kinds):
            return summary([q for q in by_params[p] if q[0].kind in kinds])
        chosen = max(grid, key=lambda p: (on(p, train)["within_5pct"], -on(p, train)["worst"]))
        test = tuple(sorted({row.kind for row in held_rows} - set(train)))
        report["split"].append({"train": train, "overhead": chosen[0], "least": chosen[1],
                                "test": test, **on(chosen, test)})
        print(f"  on {'+'.join(train)}: overhead {chosen[0]}, least chunk {chosen[1]} -> "
              f"{'+'.join(test)}: {text(on(chosen, test))}")
    print(f"  shipped: overhead {ITEM_OVERHEAD}, least chunk {WAVE_CHUNKS[0]}")
    report["tuning_log_scan"] = scan
    if args.time:
        report["lookup_us"] = {"stored": lookup_us(rows, ctx, None),
                               "waves": lookup_us(rows, ctx, ctx.programs)}
        print(f"\nlookup per plan (tuned_config on fresh trees, median over the rows): as stored "
              f"{report['lookup_us']['stored']:.1f} us, with the waves rule "
              f"{report['lookup_us']['waves']:.1f} us")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.check:
        worse = [role for role in ("held_out", "tuning") if report["waves"][role]["all"] and
                 report["waves"][role]["all"]["within_5pct"]
                 < report["table"][role]["all"]["within_5pct"]]
        print("\ncheck: " + (f"the waves rule has fewer rows within 5% ({', '.join(worse)})"
                             if worse else "the waves rule holds at least as many rows"))
        sys.exit(1 if worse else 0)


if __name__ == "__main__":
    main()
