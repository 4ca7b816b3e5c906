"""Does a tuned table generalise? The tuned choice against a size sweep on trees it never saw.

Per tree and head shape, in one interleaved measurement: the config `deft.TreeAttention` would
run (the ``lookup``: a table's bucket, the fill rung or the defaults) and every chunk x group
size whose plan differs (`autotune.space.rank_sizes`) at the tuned config's tile. Reported per
row: ``tuned_over_best`` (goal <= 1.05, issue #19), and every size's measured and predicted
time: the records the latency model is refitted to (`harness.bench.calibrate.calibrate_sweep`).

`HELD_OUT` names the trees outside the tuning set (the six anchors): real Tree-of-Thoughts
steps at several iterations, Medusa token trees with a root query (the speculative traces) and
without (a synthetic token tree), a star and a batch of trees, sized so the sweep of all of
them at four head shapes fits one GPU call. The bench's off-anchor suite has its own held-out
part (``deft.workloads.suites.HELD_OUT``, timed against the peers); neither is tuned on (the
tables are tuned on the six anchors and the suite's tunable part, ``TUNABLE``). `check` is the quick version: a few trees, a small sweep
around the tuned sizes.
"""

from __future__ import annotations

import statistics
import time

from autotune.measure import ROUNDS
from autotune.space import Candidate, default_candidate, default_tile, rank_sizes
from autotune.tune import Reporter, neighbour_chunks
from deft.kernels.buckets import bucket_of
from deft.tree import AttentionShape, Tree
from harness.inputs import with_dtype

FORMAT = "deft-sweep/1"
WITHIN = 1.05
"""The tuned choice holds when within 5% of the sweep's best."""

HEAD_SHAPES = ((32, 8), (16, 2), (8, 1), (4, 1))
"""(query heads, KV heads): Llama-3-8B and the per-GPU shards issue #19 asks about."""

HELD_OUT = (
    "reasoning:path=sorting128ToT:step=300", "reasoning:path=sorting128ToT:step=3400",
    "reasoning:path=docmergeToT:step=1200", "reasoning:path=keywordToT:step=500",
    "speculative:path=32:step=100", "speculative:path=128:step=300",
    "token_tree:seed=7:size=96:prompt_tokens=6000",
    "star:leaves=30:root_tokens=3000:leaf_tokens=300",
    "random:seed=5:nodes=200:max_tokens=256:roots=4:max_queries=2",
    "reasoning:path=docmergeToT:step=400", "token_tree:seed=3:size=48:prompt_tokens=2000",
    "star:leaves=100:root_tokens=8000:leaf_tokens=50",
    "random:seed=9:nodes=60:max_tokens=512:roots=2:max_queries=3",
    "token_tree:seed=11:size=64:prompt_tokens=3000",
    "star:leaves=60:root_tokens=5000:leaf_tokens=120",
    "random:seed=13:nodes=120:max_tokens=384:roots=3:max_queries=2",
    "speculative:path=128:step=150",
)
"""Held-out workloads (``--workloads`` syntax), none in any tuning set. Four (from
``docmergeToT:step=400``) joined after the first held-out run on an H200 (2026-12-01) had
shaped the fill rung's group cap, and the last four after session 7 chose the wave rule
(`deft.kernels.waves`) on the session-5 sweeps of the others, one per family it moved: so that
each next run judges the rules on trees no choice was made from."""

CHECK_TREES = ("fewshot_b20_P4000_L200", "reasoning:path=sorting128ToT:step=1800",
               "speculative:path=64:step=200")
"""The few trees of `check`."""

CHECK_GROUPS = (None, 8, 16, 32)
"""Group sizes of `check`'s small sweep."""


def with_heads(tree: Tree, q_heads: int, kv_heads: int) -> Tree:
    """The same tree with `q_heads` / `kv_heads` attention heads (head dim and dtype kept)."""
    shape = tree.attention
    attention = AttentionShape(q_heads, kv_heads, shape.head_dim, shape.dtype)
    parents = [None if p < 0 else int(tree.node_ids[p]) for p in tree.parent]
    return Tree(tree.node_ids.tolist(), parents, tree.tokens.tolist(), tree.queries.tolist(),
                attention)


def shaped(workloads, shapes=HEAD_SHAPES) -> list:
    """(``name@q/kv``, tree) per workload and head shape."""
    return [(f"{name}@{q}/{kv}", with_heads(tree, q, kv)) for q, kv in shapes
            for name, tree in workloads]


def full_sweep(strategy, tree, gpu, page_size, tuned: Candidate) -> list:
    """Every size whose plan differs, at the tuned tile: (Candidate, predicted µs)."""
    return [(Candidate(r.chunk_size, r.group_size, tuned.tile), r.predicted_us)
            for r in rank_sizes(strategy, tree, gpu, page_size)]


def small_sweep(strategy, tree, gpu, page_size, tuned: Candidate) -> list:
    """The tuned chunk and its neighbours one step either side, times `CHECK_GROUPS` and the
    tuned group, at the tuned tile; and the tuned sizes at the kernel's own tile."""
    chunks = [tuned.chunk_size] if tuned.chunk_size is None else [
        tuned.chunk_size, *neighbour_chunks(tuned.chunk_size, 1)]
    groups = list(dict.fromkeys((tuned.group_size, *CHECK_GROUPS)))
    sizes = [Candidate(c, g, tuned.tile) for c in chunks for g in groups]
    kernel = Candidate(tuned.chunk_size, tuned.group_size, default_tile(strategy, tree))
    return [(c, None) for c in dict.fromkeys(sizes + [kernel])]


def evaluate(workloads, strategy: str, gpu, lookup, make_bench, *, page_size: int, dtype,
             sweep=full_sweep, rounds: int = ROUNDS, role: str = "held_out",
             deadline: float = float("inf"), reporter: Reporter | None = None) -> list:
    """Measure the tuned config and a size sweep on each tree; one row per tree.

    Parameters
    ----------
    workloads : list of (str, Tree)
    strategy : str
    gpu : GpuSpec
        Ranks the sweep's sizes (and predicts them: the refit's starting point).
    lookup : callable
        ``lookup(strategy, tree) -> (chunk_size, group_size, TileConfig or None, rung)``: what
        `deft.TreeAttention` runs (tile None: the kernel's own).
    make_bench : callable
        As for `autotune.tune.autotune`.
    page_size : int
    dtype : torch.dtype
    sweep : callable
        `full_sweep` or `small_sweep`.
    rounds : int
        Interleaved rounds.
    role : str
        ``held_out`` or ``tuning``: recorded per row (the refit fits on one, tests on the other).
    deadline : float
        ``time.perf_counter()`` past which no further tree is started.
    reporter : Reporter, optional

    Returns
    -------
    list of dict
        Per tree: ``workload``, ``role``, ``bucket``, ``heads``, ``rung``, ``tuned``,
        ``tuned_us``, ``best``, ``best_us``, ``tuned_over_best`` and ``sizes`` (each size's
        ``chunk_size``, ``group_size``, ``tile``, ``predicted_us``, ``status``, ``us``).
    """
    reporter = reporter or Reporter()
    rows = []
    for name, tree in workloads:
        if time.perf_counter() > deadline:
            reporter.log(f"{name}: skipped (budget spent)")
            continue
        tree = with_dtype(tree, dtype)
        chunk, group, tile, rung = lookup(strategy, tree)
        tuned = Candidate(chunk, group, tile or default_tile(strategy, tree))
        sizes = sweep(strategy, tree, gpu, page_size, tuned)
        candidates = list(dict.fromkeys([tuned] + [c for c, _ in sizes]))
        reporter.log(f"{strategy} on {name}: tuned {tuned.label()} ({rung}), "
                     f"{len(candidates)} candidates")
        reporter.expect(len(candidates))
        bench = make_bench(strategy, tree, default_candidate(strategy, tree))
        try:
            measured = bench.measure(candidates, rounds, lambda c: reporter.advance(c.label()))
        finally:
            bench.close()
        ok = {c: m.us for c, m in measured.items() if m.status == "ok"}
        best = min(ok, key=ok.get) if ok else None
        shape = tree.attention
        row = {"workload": name, "role": role, "bucket": bucket_of(tree).key,
               "heads": [shape.q_heads, shape.kv_heads], "rung": rung,
               "tuned": tuned.to_dict(), "tuned_us": ok.get(tuned),
               "best": best.to_dict() if best else None, "best_us": ok.get(best),
               "tuned_over_best": ok[tuned] / ok[best] if tuned in ok else None,
               "sizes": [{**c.to_dict(), "predicted_us": predicted,
                          "status": measured[c].status, "us": measured[c].us}
                         for c, predicted in sizes]}
        reporter.log(f"  tuned / best {_text(row['tuned_over_best'])}")
        rows.append(row)
    return rows


def summarize(rows: list) -> dict:
    """Median and worst tuned / best over the rows, per role, and how many hold (<= 1.05)."""
    summary = {}
    for role in dict.fromkeys(r["role"] for r in rows):
        ratios = [r["tuned_over_best"] for r in rows
                  if r["role"] == role and r["tuned_over_best"] is not None]
        summary[role] = {
            "trees": sum(r["role"] == role for r in rows), "compared": len(ratios),
            "median_tuned_over_best": statistics.median(ratios) if ratios else None,
            "worst_tuned_over_best": max(ratios) if ratios else None,
            "within_5pct": sum(r <= WITHIN for r in ratios)}
    return summary


def holds(rows: list) -> bool:
    """Whether every compared row's tuned choice is within `WITHIN` of its sweep's best (and
    at least one was compared)."""
    ratios = [r["tuned_over_best"] for r in rows if r["tuned_over_best"] is not None]
    return bool(ratios) and max(ratios) <= WITHIN


def result(rows: list, *, device: dict, versions: dict, strategy: str, dtype: str,
           page_size: int, trees: dict, seconds: float, complete: bool) -> dict:
    """The ``deft-sweep/1`` JSON: the rows, their summary, and every tree (``tree.json`` dicts,
    by workload name) so the refit can rebuild the plans."""
    return {"format": FORMAT, "device": device, "versions": versions, "strategy": strategy,
            "dtype": dtype, "page_size": page_size, "seconds": seconds, "complete": complete,
            "summary": summarize(rows), "holds": holds(rows), "rows": rows, "trees": trees}


def _text(value) -> str:
    return "-" if value is None else f"{value:.3f}"
