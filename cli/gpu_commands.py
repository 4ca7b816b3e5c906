"""`deft-cli bench`, `replay` and `autotune`: the commands that time kernels on a GPU."""

from __future__ import annotations

import json
import os

import click

from cli import check_output, fail, main, stderr, stdout
from cli.options import build_run, run_options


# ---------------------------------------------------------------------------- bench
@main.command()
@click.option("--workloads", "workload_list", default="all", show_default=True,
              help="Anchor and off-anchor names, tree.json paths, run steps "
                   "KIND:key=value:step=N and trees KIND:key=value, comma-separated; groups: "
                   "all (the six anchors), offanchor, heldout, tunable (docs/benchmarks.md).")
@click.option("--methods", "method_list", default="all", show_default=True,
              help="Strategies and peers, comma-separated; groups: all, strategies, peers.")
@click.option("--heads", "heads_list", metavar="Q/KV[/D],...",
              help="Run every workload at each of these head shapes, e.g. 32/8,16/2,8/1,4/1 or "
                   "32/8/64 (head dim 128 when left out); default: each tree's own shape "
                   "(32/8/128 for anchors and the suite).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--timing", type=click.Choice(["graph", "eager"]), default="graph", show_default=True,
              help="graph: one CUDA graph over 4 KV copies, replayed; eager: do_bench, L2 flushed.")
@click.option("--json", "json_path", metavar="OUT", help="Write every number as JSON.")
@click.option("--plot", "plot_path", metavar="OUT.png", help="Plot time / floor (needs matplotlib).")
@click.option("--page-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens per page of this project's paged cache (the peers use 1).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random Q, K, V.")
@click.option("--calibrate", "calibrate_path", metavar="BENCH.json",
              help="Instead of running: fit the IO model's latency constants to a saved bench "
                   "JSON (no GPU needed); --json writes the fit and a GPU spec.")
@click.option("--verdicts", "verdict_paths", metavar="A.json,B.json",
              help="Instead of running: merge saved bench JSONs of one dtype and timing (no "
                   "cell in two) and print their tables and the verdicts (no GPU needed); "
                   "--json writes the merged result.")
@click.option("--dry-run", is_flag=True,
              help="Instead of running: build every tree at every shape and list the cells "
                   "(no GPU needed).")
def bench(workload_list, method_list, heads_list, dtype, timing, json_path, plot_path, page_size,
          seed, calibrate_path, verdict_paths, dry_run):
    """Time every strategy and peer on each workload, against a floor measured in the same run.

    Measures the floor first (a large copy and a large GEMM), then, per shape, workload and
    method, checks the output against the float64 oracle before timing it; the tables and
    summaries come per shape, then the verdict of each target clause. Progress goes to
    stderr, the tables to stdout. Needs a CUDA GPU, except with --calibrate.
    """
    from harness import bench as b

    for path in (json_path, plot_path):
        if path:
            check_output(path)
    if calibrate_path:
        try:
            with open(calibrate_path) as file:
                fit = b.calibrate(json.load(file))
        except (OSError, ValueError, KeyError) as error:
            fail(f"{calibrate_path}: {error}")
        _print_and_write(b.render_calibration(fit), fit, json_path)
        return
    if verdict_paths:
        try:
            parts = []
            for path in (p.strip() for p in verdict_paths.split(",") if p.strip()):
                with open(path) as file:
                    parts.append(json.load(file))
            result = b.merge_results(parts)
        except (OSError, ValueError, KeyError) as error:
            fail(f"--verdicts: {error}")
        _print_and_write(b.render(result), result, json_path)
        return
    try:
        specs = b.parse_workloads(workload_list)
        methods = b.parse_methods(method_list)
        shapes = b.parse_heads(heads_list)
    except ValueError as error:
        fail(str(error))
    if dry_run:
        _print_cells(b.cells(specs, shapes), methods)
        return
    import torch

    if not torch.cuda.is_available():
        fail(f"bench needs a CUDA GPU, and torch {torch.__version__} sees none: run it on a GPU "
             "machine (scripts/bench_gpu.sh), or fit a saved result with --calibrate BENCH.json")
    result = b.run_bench(specs, methods, shapes=shapes, dtype=b.DTYPES[dtype], timing=timing,
                         page_size=page_size, seed=seed,
                         log=lambda line: stderr.print(line, markup=False, highlight=False))
    _print_and_write(b.render(result), result, json_path)
    if plot_path:
        try:
            b.plot_result(result, plot_path)
            stderr.print(f"wrote {plot_path}", highlight=False)
        except ImportError:
            stderr.print("--plot needs matplotlib (pip install matplotlib): no plot written",
                         highlight=False)


def _print_and_write(table, data: dict, json_path) -> None:
    """Print a command's table to stdout and, with ``--json``, write its numbers there."""
    from harness.bench import write_json

    stdout.print(table)
    if json_path:
        write_json(data, json_path)
        stderr.print(f"wrote {json_path}", highlight=False)


def _print_cells(found: list, methods: list) -> None:
    """The ``--dry-run`` listing: one line per cell, then the count of cells x methods."""
    for cell in found:
        tree = cell.get("tree")
        what = (f"{tree.num_nodes} nodes, {tree.num_tokens} tokens, {tree.num_queries} queries"
                if tree is not None else f"error: {cell['error']}")
        stdout.print(f"{cell['shape']}  {cell['workload']}: {what}", highlight=False)
    stdout.print(f"{len(found)} cells x {len(methods)} methods "
                 f"({', '.join(m.name for m in methods)})", highlight=False)


# ---------------------------------------------------------------------------- replay
@main.command("replay")
@click.option("--workload", type=click.Choice(["fewshot", "reasoning", "speculative"]),
              required=True, help="The decoding run to replay.")
@run_options
@click.option("--methods", "method_list", default="all", show_default=True,
              help="Comma-separated: deft_flatten, deft_node_chunk, deft_node, radix, "
                   "flash_decoding, tree_attention_s, sglang, ref:<strategy> (PyTorch); groups "
                   "all, strategies.")
@click.option("--step-range", metavar="START:STOP",
              help="Replay only these steps of the run (default: all); `python -m "
                   "harness.replay` merges the ranges of one run into a full-run record.")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Debugging only: this many steps, evenly spaced, totals extrapolated; the "
                   "result is marked sampled and never reported as a full run.")
@click.option("--layers", default=32, show_default=True, type=click.IntRange(min=1),
              help="Attention layers, each with its own KV cache (and decoder layers).")
@click.option("--e2e", is_flag=True,
              help="Also time every step through a Llama-3-8B-shaped model (random weights), "
                   "per method three ways (no planning, planning in line, planning "
                   "overlapped) and without attention.")
@click.option("--e2e-methods", metavar="NAMES",
              help="With --e2e, only these methods (comma-separated) go through the model; the "
                   "others are timed for attention only (default: all).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--page-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens per page of the paged cache.")
@click.option("--timing", type=click.Choice(["graph", "eager"]), default="graph",
              show_default=True, help="graph: a CUDA graph per method, replayed every step.")
@click.option("--check-steps", default=1, show_default=True, type=click.IntRange(min=0),
              help="Steps (the last first) whose outputs are checked against the oracle.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", metavar="OUT", help="Write every number as JSON.")
def replay_command(workload, method_list, step_range, max_steps, layers, e2e, e2e_methods,
                   dtype, page_size, timing, check_steps, seed, json_path, **run_options):
    """Replay a whole decoding run step by step and time each method's attention over it.

    The paged tree cache grows, branches and prunes as the run did; each step every method plans
    and runs attention in every layer (CUDA events around the step's layers). With --e2e the
    step also goes through a Llama-3-8B-shaped decoder (the paper's Table 3), timed without
    planning, with planning in line and with the next step planned while this one runs.
    Progress lines (with elapsed seconds) go to stderr, the table to stdout;
    docs/reproduction.md explains the numbers.
    """
    import time
    from dataclasses import replace

    import torch

    from harness import replay as r
    from harness.bench import DTYPES
    from harness.decoder import LLAMA3_8B
    from harness.registry import parse_methods

    if json_path:
        check_output(json_path)
    if step_range and max_steps:
        fail("--step-range and --max-steps do not go together")
    try:
        methods = parse_methods(method_list, steps=True)
    except ValueError as error:
        fail(str(error))
    names = {m.name for m in methods}
    e2e_names = None if e2e_methods is None else [n for n in e2e_methods.split(",") if n]
    if e2e_names is not None and (not e2e or not set(e2e_names) <= names):
        fail("--e2e-methods needs --e2e and names among --methods: "
             f"{', '.join(sorted(set(e2e_names) - names)) or '(no --e2e)'}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if e2e and device == "cpu":
        fail("--e2e runs a Llama-3-8B-shaped model (16 GB of weights): it needs a CUDA GPU")
    if all(m.unavailable(torch.device(device)) for m in methods):
        fail(f"replay needs a CUDA GPU for these methods, and torch {torch.__version__} sees "
             "none: run it on a GPU machine (scripts/replay_gpu.sh), or replay the PyTorch "
             "references on the CPU with --methods ref:<strategy>")
    run = build_run(workload, run_options)
    steps = None
    if step_range:
        try:
            steps = r.parse_step_range(step_range, len(run))
        except ValueError as error:
            fail(str(error))
    began = time.perf_counter()

    def progress(done, total):
        if done == total or done % max(1, total // 10) == 0:
            stderr.print(f"{run.name} {step_range or ''}: {done}/{total} steps, "
                         f"{time.perf_counter() - began:.1f} s", highlight=False)

    result = r.replay(
        run, methods, model=replace(LLAMA3_8B, layers=layers), e2e=e2e, e2e_methods=e2e_names,
        steps=steps, max_steps=max_steps, dtype=DTYPES[dtype], page_size=page_size,
        timing=timing, check_steps=check_steps, seed=seed, device=device, progress=progress)
    _print_and_write(r.render(result), result, json_path)


# ---------------------------------------------------------------------------- autotune
@main.command("autotune")
@click.option("--gpu", type=click.Choice(["a100", "h100", "h200", "auto"]),
              help="The card to tune; it must be the one present (auto: whichever is), "
                   "unless --predict. Required but with --refit.")
@click.option("--workloads", "workload_list", default="all", show_default=True,
              help="As for bench: anchors, tree.json paths, run steps, trees, comma-separated; "
                   "all = the six anchors. Each stands for its tree's bucket.")
@click.option("--heads", "heads_list", metavar="Q/KV,...",
              help="Tune (or evaluate) every workload at each of these head shapes, e.g. "
                   "32/8,16/2,8/1,4/1 (default: the workloads' own; --held-out and --check: "
                   "all four).")
@click.option("--strategies", default="deft_flatten", show_default=True,
              help="Kernel strategies, comma-separated; all = every one with a kernel.")
@click.option("--budget-s", type=click.FloatRange(min=0), default=150, show_default=True,
              help="Soft time budget of the measurements, seconds, shared by the buckets "
                   "(--held-out, --check: no tree is started past it).")
@click.option("--exhaustive", is_flag=True,
              help="Measure every size and every tile that fits at the best size (slow), "
                   "instead of the IO model's top 8 sizes and a tile descent.")
@click.option("--tiles/--no-tiles", default=True, show_default=True,
              help="Whether the tile descent runs (--no-tiles: sizes only, the kernel's tile).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--output", metavar="PATH",
              help="Configs file (its log goes to logs/ beside it), or a directory for "
                   "<device>.json (default: deft/kernels/configs/<device>.json, the log in "
                   "autotune/logs/).")
@click.option("--predict", is_flag=True,
              help="Rank with the IO model on the card's spec instead of measuring (no GPU "
                   "needed): a table marked predicted, <device>.predicted.json; never over "
                   "a measured one. Uses the card's refit (iomodel/fits/), else the H200's.")
@click.option("--held-out", "held_out", is_flag=True,
              help="Instead of tuning: the tuned choice against a chunk x group sweep on the "
                   "held-out trees (autotune.heldout.HELD_OUT), tuned / best per tree.")
@click.option("--fit-trees", "fit_trees", metavar="LIST",
              help="With --held-out: also sweep these workloads, as tuning trees (the refit "
                   "fits on them).")
@click.option("--held-out-trees", "held_out_trees", metavar="LIST",
              help="With --held-out: sweep these workloads as the held-out trees instead of "
                   "autotune.heldout.HELD_OUT (fresh trees no fit has been judged on).")
@click.option("--check", "check", is_flag=True,
              help="Instead of tuning: whether the table on this machine still holds (its "
                   "choices within 5% of a small sweep on a few trees).")
@click.option("--refit", "refit_paths", metavar="SWEEP.json,...",
              help="Instead of tuning (no GPU needed): fit the latency model to --held-out "
                   "sweeps, judged on their held-out trees; writes iomodel/fits/<card>.json.")
@click.option("--report", "report_path", metavar="OUT.json",
              help="Where --held-out, --check and --refit write their JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def autotune_command(gpu, workload_list, heads_list, strategies, budget_s, exhaustive, tiles,
                     dtype, output, predict, held_out, fit_trees, held_out_trees, check,
                     refit_paths, report_path, as_json):
    """Tune chunk size, group size and tiles per tree bucket on this GPU, and write the table
    deft.TreeAttention reads (docs/autotune.md).

    Sizes are ranked by the IO model and the best measured (CUDA graphs over rotating KV
    copies, interleaved rounds), then tiles, then the leaders re-timed against the defaults.
    Progress goes to stderr, the chosen configs to stdout. Exits 2 when the GPU present is
    not the one asked for, unless --predict, and when --predict would replace a measured
    table. --held-out, --check and --refit judge a table and refit the IO model instead.
    """
    import dataclasses
    from pathlib import Path

    from autotune import evaluation, heldout, store, tune
    from autotune.measure import workbenches
    from autotune.report import ProgressBar, autotune_table
    from harness.bench import DTYPES, parse_workloads
    from deft.strategies import KERNEL_STRATEGIES as KERNELS

    if report_path:
        check_output(report_path)
    if refit_paths:
        try:
            fit = evaluation.refit([Path(p) for p in refit_paths.split(",") if p.strip()],
                                   report_path)
        except (OSError, ValueError, KeyError) as error:
            fail(f"--refit: {error}")
        click.echo(evaluation.fit_text(fit))
        return
    if gpu is None:
        fail("--gpu is required (a100, h100, h200 or auto), except with --refit")
    names = list(KERNELS) if strategies.strip() == "all" else [
        s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in KERNELS]
    if unknown or not names:
        fail(f"unknown strategy {', '.join(unknown)!r}; choose from {', '.join(KERNELS)} or all")
    try:
        shapes = evaluation.parse_heads(heads_list) if heads_list else None
        spec, device = tune.resolve_card(gpu, predict)
        fit = evaluation.fit_for(spec.name)
        if fit is not None:  # the IO model ranks with the refit (docs/iomodel.md, "Refit")
            spec = dataclasses.replace(spec, calibration=fit["constants"])
        workloads = [(w.text, w.tree()) for w in parse_workloads(workload_list)]
        if shapes:
            workloads = heldout.shaped(workloads, shapes)
        if held_out_trees and not held_out:
            raise ValueError("--held-out-trees goes with --held-out")
        if held_out or check:
            if predict:
                raise ValueError("--held-out and --check measure: they do not take --predict")
            with ProgressBar(stderr) as reporter:
                result = evaluation.judge(
                    "check" if check else "held_out", names[0], spec, device,
                    workbenches(DTYPES[dtype]), DTYPES[dtype], shapes or heldout.HEAD_SHAPES,
                    fit_trees=fit_trees, held_out_trees=held_out_trees, budget_s=budget_s,
                    reporter=reporter)
    except (ValueError, OSError) as error:
        fail(str(error))
    if held_out or check:
        if report_path:
            with open(report_path, "w") as file:
                json.dump(result, file, indent=1)
            stderr.print(f"wrote {report_path}", highlight=False)
        click.echo(evaluation.judge_text(result, check))
        return
    path = Path(output) if output else store.table_path(device["name"], predicted=predict)
    if path.is_dir() or output and output.endswith(("/", os.sep)):
        path = store.table_path(device["name"], path, predicted=predict)
    try:
        store.check_writable(path, "predicted" if predict else "measured")
    except ValueError as error:
        fail(str(error))
    if predict:
        table = tune.predict(workloads, names, spec, device, dtype=DTYPES[dtype], fit=fit)
    else:
        with ProgressBar(stderr) as reporter:
            table = tune.autotune(workloads, names, spec, device, workbenches(DTYPES[dtype]),
                                  budget_s=budget_s, exhaustive=exhaustive, tiles=tiles,
                                  dtype=DTYPES[dtype], reporter=reporter)
    configs, log = store.write_tuned(table, path)
    stderr.print(f"wrote {configs} ({table.source} configs) and {log} (log)", highlight=False)
    if as_json:
        click.echo(json.dumps(table.to_dict(), indent=1))
    else:
        stdout.print(autotune_table(table))
