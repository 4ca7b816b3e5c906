"""The search behind ``deft-cli autotune``: one tuned (or predicted) table for one card.

For every strategy and workload (each workload stands for its tree's bucket; a second workload
of a bucket already tuned is skipped), measured:

1. sizes: the strategy's sizes ranked by the IO model (`autotune.space.rank_sizes`); the
   `TOP_K` best predicted and the defaults, measured with the kernel's tile, and the configs
   chosen for the bucket in every readable table of chosen configs (`stored_configs`), with
   their own tiles;
2. tiles: at the fastest, a coordinate descent from its tile: for each knob group of
   `DESCENT` in turn, the tiles that fit the card and differ in those knobs alone are measured
   together and the fastest kept;
3. chunks: the chunk sizes `CHUNK_STEPS` places either side of the fastest, at its group and
   the descent's tile;
4. leaders: the `LEADERS` fastest so far and the defaults are re-timed together
   (`autotune.measure.LEADER_ROUNDS` interleaved rounds); the fastest re-timed is chosen, and its
   speedup over the defaults comes from those same rounds.

deft_flatten's search keeps to what the lookup runs: `deft.kernels.tuned.tuned_config` moves
a stored chunk to the tree's waves (`deft.kernels.tuned.flatten_chunk`), so its sizes are group
sizes at their wave chunks on the tuning tree and the card's programs (`card_programs`,
`autotune.space.rank_wave_sizes`), in steps 1 (the stored configs' groups too) and 4; step 3
measures the other groups at the descent's tile instead. Looking the stored entry up for the
same tree then runs the chunk, group and tile chosen.

``exhaustive`` measures every size in step 1 and every fitting tile at the fastest size in
step 2. The time budget is shared evenly by the (strategy, workload) jobs still to run; a job
past its share skips the rest of steps 2 and 3 (steps 1 and 4 always run, so the budget is
soft).

``predict`` ranks the sizes with the IO model only, on the card's spec, and keeps the kernel's
tile: a table marked ``"source": "predicted"``.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from autotune.measure import LEADER_ROUNDS, PAGE_SIZE, ROUNDS, Measurement
from autotune.space import (
    CHUNK_SIZES,
    Candidate,
    default_candidate,
    default_sizes,
    fits,
    neighbours,
    rank_sizes,
    rank_wave_sizes,
    tile_space,
)
from autotune.store import CAPABILITIES, Table, detect_device, sanitise
from deft.kernels.buckets import bucket_of
from deft.kernels.fill import PROGRAMS_PER_SM
from deft.kernels.tuned import WAVE_STRATEGY, current_versions, flatten_chunk, readable_configs
from harness.inputs import TREE_DTYPE, with_dtype
from deft.strategies import USES_CHUNK_SIZE
from deft.tree import Tree
from iomodel.gpus import BUILTIN, GpuSpec, builtin_gpu

TOP_K = 8
"""Sizes measured per bucket (the IO model's best predicted)."""

CHUNK_STEPS = 2
"""After the tile descent, chunk sizes this many places either side of the best are measured
at the best group and tile (the IO model's top sizes can miss the size that balances the
persistent grid, e.g. 384 or 1536)."""

LEADERS = 3
"""Candidates re-timed at the end of a bucket, besides the defaults."""

DESCENT = (("block_m",), ("block_n",), ("num_warps",), ("num_stages", "prefetch"),
           ("programs_per_sm", "max_registers"))
"""The knobs of the tile descent, in order (`autotune.space.TILE_KNOBS` fields; the slot
prefetch moves with the stages: it pays at 3 stages, not at 5; programs per SM with the
register cap that lets them fit; ``lean`` keeps the default's)."""

class Reporter:
    """Progress hooks of a tuning run; this base class ignores them (the CLI draws a bar)."""

    def expect(self, count: int) -> None:
        """`count` more candidates are about to be prepared."""

    def advance(self, text: str) -> None:
        """One candidate was prepared (planned, compiled, checked, captured)."""

    def log(self, line: str) -> None:
        """One line of news (a job starts, ends, or fails)."""


def card_spec(device_name: str):
    """The built-in spec (`iomodel.gpus.BUILTIN`) of a device name: the exact name, else the
    alias among the name's words (``NVIDIA H100 PCIe`` -> h100's); None for other cards."""
    words = sanitise(device_name).split("-")
    return builtin_gpu(device_name) or next(
        (spec for alias, spec in BUILTIN.items() if alias in words), None)


def card_programs(device: dict) -> int:
    """Resident programs of the card a table is for: its ``sm_count`` x
    `deft.kernels.fill.PROGRAMS_PER_SM`, what `deft.kernels.fill.resident_programs` gives the
    lookup on that card (the detected card's SMs; the spec's where the IO model predicts)."""
    return PROGRAMS_PER_SM * device["sm_count"]


def stored_configs(strategy: str, tree: Tree) -> list:
    """The chosen (chunk_size, group_size, TileConfig or None) of the tree's bucket in every
    readable table of `deft.kernels.tuned`, any card (tuning starts from them: a card's best is
    often its sibling's)."""
    bucket = bucket_of(tree)
    found = [match[1] for _, configs in readable_configs()
             if (match := configs.entry(strategy, bucket)) is not None]
    return list(dict.fromkeys(found))


def resolve_card(gpu: str, predict: bool = False) -> tuple:
    """The spec and the table's ``device`` of the card to tune.

    Parameters
    ----------
    gpu : str
        ``a100``, ``h100``, ``h200`` or ``auto`` (the card present).
    predict : bool
        Whether the IO model ranks instead of the card measuring: then the named card need not
        be present.

    Returns
    -------
    (GpuSpec, dict)

    Raises
    ------
    ValueError
        Saying what was found, when the card asked for is not the one present (or none is)
        and `predict` is off, or when ``auto`` finds no GPU or one without a built-in spec.
    """
    found = detect_device()
    if gpu == "auto":
        if found is None:
            raise ValueError("--gpu auto found no CUDA GPU (torch sees none); name the card "
                             "(a100, h100, h200) to rank for it with --predict")
        spec = card_spec(found["name"])
        if spec is None:
            raise ValueError(f"found {found['name']!r}, which has no built-in spec "
                             f"({', '.join(BUILTIN)}): the IO model cannot rank for it")
        return spec, found
    spec = BUILTIN[gpu]
    if found is not None and card_spec(found["name"]) == spec:
        return spec, found
    if predict:
        return spec, {"name": spec.name, "capability": list(CAPABILITIES[spec.name]),
                      "sm_count": spec.sm_count}
    what = "no CUDA GPU (torch sees none)" if found is None else repr(found["name"])
    raise ValueError(f"--gpu {gpu} asks for {spec.name!r} but this machine has {what}: run on "
                     f"that card, use --gpu auto, or add --predict to rank with the IO model")


def autotune(workloads, strategies, gpu: GpuSpec, device: dict, make_bench, *,
             budget_s: float = 150.0, exhaustive: bool = False, top_k: int = TOP_K,
             tiles: bool = True, dtype=torch.float16, reporter: Reporter | None = None) -> Table:
    """Measure and choose a config per strategy and bucket.

    Parameters
    ----------
    workloads : list of (str, Tree)
        Named trees; each stands for its bucket.
    strategies : list of str
        Strategies of `deft.kernels.KERNELS`.
    gpu : GpuSpec
        The card's spec (IO-model ranking and the shared-memory filter).
    device : dict
        The table's ``device`` (`autotune.store.detect_device`).
    make_bench : callable
        ``make_bench(strategy, tree, reference) -> autotune.measure.Workbench`` (or anything
        with its ``measure`` and ``close``).
    budget_s : float
        Soft time budget of the whole run, seconds.
    exhaustive : bool
    top_k : int
    tiles : bool
        Whether step 2 (the tile descent) runs; without it every candidate keeps the kernel's
        tile (a quick run: one compilation per head shape).
    dtype : torch.float16 or torch.bfloat16
        Of the measured inputs (and of the trees' buckets).
    reporter : Reporter, optional

    Returns
    -------
    Table
        ``source`` ``measured``, ``tuning_s`` the run's wall time.
    """
    reporter = reporter or Reporter()
    start = time.perf_counter()
    jobs = _jobs(workloads, strategies, dtype, reporter)
    programs = card_programs(device)
    table = Table("measured", device, current_versions(), settings=_settings(
        workloads, strategies, dtype, budget_s=budget_s, exhaustive=exhaustive, top_k=top_k,
        tiles=tiles, rounds=ROUNDS, leader_rounds=LEADER_ROUNDS, leaders=LEADERS,
        programs=programs))
    for done, (strategy, name, tree) in enumerate(jobs):
        left = budget_s - (time.perf_counter() - start)
        deadline = time.perf_counter() + max(0.0, left) / (len(jobs) - done)
        reporter.log(f"{strategy} on {name} ({bucket_of(tree).key})")
        seeds = [Candidate(c, g, t) for c, g, t in stored_configs(strategy, tree)
                 if t is not None and fits(t, gpu, tree.attention.head_dim,
                                           tree.attention.element_bytes)]
        try:
            entry = tune_workload(strategy, name, tree, gpu, make_bench, top_k=top_k,
                                  exhaustive=exhaustive, deadline=deadline, reporter=reporter,
                                  seeds=seeds if tiles else (), tiles=tiles,
                                  programs=programs, capability=tuple(device["capability"]))
        except Exception as error:  # noqa: BLE001 - one failing job never stops the run
            reporter.log(f"  failed: {type(error).__name__}: {error}")
            continue
        table.strategies.setdefault(strategy, {})[bucket_of(tree).key] = entry
        reporter.log(f"  chosen {entry['chosen_label']}: {entry['chosen']['us']:.1f} µs, "
                     f"{entry['speedup']:.2f}x the defaults")
    table.tuning_s = time.perf_counter() - start
    return table


def neighbour_chunks(chunk: int, steps: int = CHUNK_STEPS) -> list[int]:
    """The chunk sizes of `CHUNK_SIZES` up to `steps` places either side of `chunk`."""
    if chunk not in CHUNK_SIZES:
        return []
    at = CHUNK_SIZES.index(chunk)
    return [c for c in CHUNK_SIZES[max(0, at - steps): at + steps + 1] if c != chunk]


def tune_workload(strategy, name, tree, gpu, make_bench, *, top_k=TOP_K, exhaustive=False,
                  deadline=float("inf"), reporter=None, seeds=(), tiles=True,
                  programs=None, capability=(9, 0)) -> dict:
    """Steps 1-4 (module docstring) on one tree: the bucket's table entry. `seeds` (configs
    stored for the bucket, e.g. a sibling card's) are measured with the sizes, so the tile
    descent starts from the best of both; without `tiles` step 2 is skipped. deft_flatten
    needs `programs` (`card_programs`) and the card's `capability` for its wave chunks
    (`deft.kernels.tuned.flatten_chunk`)."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    ranked = rank_sizes(strategy, tree, gpu, PAGE_SIZE)
    prediction = {r.sizes: r for r in ranked}
    default = default_candidate(strategy, tree)
    records = {}
    waves = strategy == WAVE_STRATEGY
    searched = rank_wave_sizes(tree, gpu, PAGE_SIZE, programs, capability) if waves else ranked
    prediction.update((r.sizes, r) for r in searched)
    if waves:
        seeds = [Candidate(flatten_chunk(tree, s.group_size, programs, capability), s.group_size,
                           s.tile) for s in seeds]

    def runs(c) -> bool:  # whether the lookup, given c's sizes, runs them on this tree
        return not waves or c.chunk_size == flatten_chunk(tree, c.group_size, programs,
                                                           capability)

    def run(candidates, stage, rounds=ROUNDS):
        reporter.expect(len([c for c in dict.fromkeys(candidates) if c not in records]))
        measured = bench.measure(candidates, rounds, lambda c: reporter.advance(c.label()))
        for candidate, measurement in measured.items():
            record = records.setdefault(candidate, {"stage": stage, "rounds_us": [],
                                                    "measurement": measurement})
            record["rounds_us"] += measurement.rounds_us
        return {c: m.us for c, m in measured.items() if m.status == "ok"}

    bench = make_bench(strategy, tree, default)
    try:
        sizes = searched if exhaustive else searched[:top_k]
        run([default, *seeds] + [Candidate(*r.sizes, default.tile) for r in sizes], "sizes")
        best = _leaders(records, runs, 1)[0]
        space = tile_space(tree, gpu)
        if exhaustive:
            run([Candidate(*best.sizes, tile) for tile in space], "tiles")
        else:
            current = best.tile
            for knobs in DESCENT if tiles else ():
                if time.perf_counter() > deadline:
                    break
                times = run([Candidate(*best.sizes, t) for t in neighbours(current, knobs, space)],
                            "tiles")
                if times:
                    current = min(times, key=times.get).tile
            if waves:
                others = [c for r in sizes if (c := Candidate(*r.sizes, current)) not in records]
                if others and time.perf_counter() <= deadline:
                    run(others, "groups")
            elif strategy in USES_CHUNK_SIZE and time.perf_counter() <= deadline:
                run([Candidate(c, best.group_size, current)
                     for c in neighbour_chunks(best.chunk_size)], "chunks")
        retimed = run([default] + _leaders(records, runs), "leaders", LEADER_ROUNDS)
    finally:
        bench.close()
    chosen = min((c for c in retimed if runs(c)), key=retimed.get)

    def config(candidate, us=None):
        sizes = prediction.get(candidate.sizes)
        return {**candidate.to_dict(), "us": us,
                "predicted_us": sizes.predicted_us if sizes else None}

    candidates = []
    for candidate, record in records.items():
        measurement: Measurement = record["measurement"]
        sizes = prediction.get(candidate.sizes)
        candidates.append({
            **candidate.to_dict(), "stage": record["stage"],
            "predicted_us": sizes.predicted_us if sizes else None,
            "predicted_rank": sizes.rank if sizes else None,
            "status": measurement.status,
            "us": statistics.median(record["rounds_us"]) if record["rounds_us"] else None,
            "rounds_us": record["rounds_us"], "retimed_us": retimed.get(candidate),
            "rel_err": measurement.rel_err, "reason": measurement.reason,
        })
    return {
        "workload": name,
        "stats": {k: tree.stats()[k] for k in ("queries", "unique_tokens", "sharing_ratio")},
        "chosen": config(chosen, retimed[chosen]),
        "chosen_label": chosen.label(),
        "default": config(default, retimed.get(default)),
        "speedup": retimed[default] / retimed[chosen] if default in retimed else None,
        "seconds": time.perf_counter() - start,
        "candidates": candidates,
    }


def predict(workloads, strategies, gpu: GpuSpec, device: dict, *,
            dtype=torch.float16, fit: dict | None = None) -> Table:
    """The IO model's ranking of every strategy's sizes per bucket: a predicted table.

    The chosen config of a bucket is the fastest predicted (for deft_flatten, of the group sizes
    at their wave chunks on the card's programs, `card_programs`: what the lookup runs); its
    ``tile`` is null (the kernel's own), and every size searched is listed with its prediction.
    With `fit` (a ``deft-refit/1`` result, `harness.bench.calibrate.calibrate_sweep`, of this
    card or another) the model runs with its constants, and the table's ``settings.model`` says
    which card they were fitted on and the error they have there on held-out trees.
    """
    jobs = _jobs(workloads, strategies, dtype, Reporter())
    extra = {}
    if fit is not None:
        gpu = dataclasses.replace(gpu, calibration=fit["constants"])
        extra["model"] = model_note(fit)
    table = Table("predicted", device, current_versions(), settings=_settings(
        workloads, strategies, dtype, programs=card_programs(device), **extra))
    for strategy, name, tree in jobs:
        ranked = rank_sizes(strategy, tree, gpu, PAGE_SIZE)
        default = {r.sizes: r for r in ranked}[default_sizes(strategy)]
        if strategy == WAVE_STRATEGY:
            ranked = rank_wave_sizes(tree, gpu, PAGE_SIZE, card_programs(device),
                                     tuple(device["capability"]))

        def config(r):
            return {"chunk_size": r.chunk_size, "group_size": r.group_size, "tile": None,
                    "predicted_us": r.predicted_us}

        table.strategies.setdefault(strategy, {})[bucket_of(tree).key] = {
            "workload": name,
            "stats": {k: tree.stats()[k] for k in ("queries", "unique_tokens", "sharing_ratio")},
            "chosen": config(ranked[0]),
            "chosen_label": f"c{ranked[0].chunk_size or '-'} g{ranked[0].group_size or '-'}",
            "default": config(default),
            "speedup": default.predicted_us / ranked[0].predicted_us,
            "candidates": [{**config(r), "predicted_rank": r.rank} for r in ranked],
        }
    return table


def model_note(fit: dict) -> dict:
    """What a predicted table records of the refit it ranked with: the card it was fitted on
    and its error there on held-out trees (None where the fit had none)."""
    held = fit.get("held_out") or {}
    return {"fitted_on": fit["card"], "constants": fit["constants"],
            "held_out_median_abs_err": held.get("median_abs_err"),
            "held_out_worst_err": held.get("worst_err"),
            "held_out_min_spearman": held.get("min_spearman")}


def _jobs(workloads, strategies, dtype, reporter) -> list:
    """(strategy, name, tree) per strategy and workload, one workload per bucket."""
    trees = [(name, with_dtype(tree, dtype)) for name, tree in workloads]
    jobs, seen = [], {}
    for strategy in strategies:
        for name, tree in trees:
            key = (strategy, bucket_of(tree).key)
            if key in seen:
                reporter.log(f"{strategy} on {name}: skipped (bucket {key[1]} is {seen[key]}'s)")
                continue
            seen[key] = name
            jobs.append((strategy, name, tree))
    return jobs


def _settings(workloads, strategies, dtype, **extra) -> dict:
    return {"workloads": [name for name, _ in workloads], "strategies": list(strategies),
            "dtype": TREE_DTYPE[dtype], "page_size": PAGE_SIZE, **extra}


def _leaders(records, runs, count: int = LEADERS) -> list[Candidate]:
    """The `count` fastest measured candidates that `runs` admits, fastest first; ValueError
    where none measured ok."""
    ok = sorted((c for c, r in records.items() if r["measurement"].status == "ok" and runs(c)),
                key=lambda c: statistics.median(records[c]["rounds_us"]))
    if not ok:
        raise ValueError("no candidate the lookup would run measured ok")
    return ok[:count]
