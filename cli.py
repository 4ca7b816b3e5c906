"""`deft-cli`: the command line of the DeFT toolkit.

Data goes to stdout, messages to stderr; bad input exits 2 with a one-line message; `NO_COLOR`
is honoured (rich reads it). Each command parses its options and dispatches to a library
function; the tables and views are rendered beside the reports (`harness.report_views`,
`iomodel.report`, `harness.bench.report`, `harness.replay.report`, `autotune.report`).
"""

from __future__ import annotations

import json
import os
import sys

import click
from rich.console import Console
from rich.text import Text

import deft
from deft.tree import TreeError
from deft.tree_format import tree_to_dict
from harness.report_views import stats_table, tree_view

# Tables are wide: when stdout is no terminal and COLUMNS is unset, rich would fold them at 80.
stdout = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160)
stderr = Console(stderr=True)


def fail(message: str) -> None:
    """Print an error to stderr and exit 2."""
    stderr.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    sys.exit(2)


def read_tree(path: str) -> deft.Tree:
    try:
        return deft.load_tree(path)
    except TreeError as error:
        fail(str(error))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deft-toolkit")
def main():
    """DeFT toolkit: tree-structured decoding attention, its IO model and kernels."""


# ---------------------------------------------------------------------------- inspect
@main.command()
@click.argument("tree_path", metavar="TREE")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@click.option("--max-nodes", default=40, show_default=True, help="Fold the view past this many nodes.")
def inspect(tree_path, as_json, max_nodes):
    """Show a tree.json file: its nodes (folded when large) and its statistics."""
    tree = read_tree(tree_path)
    stats = tree.stats()
    if as_json:
        click.echo(json.dumps(stats, indent=1))
        return
    stdout.print(tree_view(tree, max_nodes))
    stdout.print(stats_table(stats))


# ---------------------------------------------------------------------------- workloads
@main.group()
def workloads():
    """Decoding runs and synthetic trees: list them, export one step as tree.json."""


@workloads.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def workloads_list(as_json):
    """Each run kind and tree kind with its options, the anchors, and the real files found."""
    from harness.report_views import print_workload_listing, workload_listing

    listing = workload_listing()
    if as_json:
        click.echo(json.dumps(listing, indent=1))
        return
    print_workload_listing(stdout, listing)


@workloads.command("export", context_settings={"ignore_unknown_options": True})
@click.argument("kind")
@click.argument("options", nargs=-1)
@click.option("--step", default=0, show_default=True, help="Step of a run (negative: from the end).")
@click.option("-o", "--output", default="-", show_default=True, help="tree.json path ('-': stdout).")
def workloads_export(kind, options, step, output):
    """Write one step of a run (or a single tree) as tree.json.

    OPTIONS are KEY=VALUE pairs of the kind's options (see `workloads list`), e.g.
    `deft-cli workloads export fewshot width=50 --step 199 -o tree.json`.
    """
    from deft import workloads as w

    kind = kind.replace("-", "_")
    try:
        values = w.parse_options(kind, options)
    except ValueError as error:
        fail(str(error))
    builders = {**w.RUN_KINDS, **w.TREE_KINDS}
    if kind in w.TREE_KINDS and step != 0:
        fail(f"{kind} is a single tree: --step does not apply")
    if output != "-":
        check_output(output)
    try:
        built = builders[kind](**values)
        tree = built.tree(step) if kind in w.RUN_KINDS else built
    except (ValueError, TypeError, IndexError, OSError) as error:
        fail(str(error))
    if output == "-":
        click.echo(json.dumps(tree_to_dict(tree), indent=1))
    else:
        try:
            deft.save_tree(tree, output)
        except OSError as error:
            fail(f"{output}: {error.strerror or error}")
        stderr.print(f"wrote {output}: {tree!r}", highlight=False)


def check_output(path: str) -> None:
    """Refuse (exit 2) an output path that is a directory or lies in no existing directory."""
    if os.path.isdir(path):
        fail(f"{path}: is a directory; give a file path")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f"{path}: its directory does not exist")


def option_name(key: str) -> str:
    """The command-line spelling of the current command's parameter `key` (e.g. ``--path``)."""
    for param in click.get_current_context().command.params:
        if param.name == key:
            return param.opts[0]
    return key


# ---------------------------------------------------------------------------- estimate-io
def run_options(command):
    """Add the options that pick a decoding run (estimate-io --workload, replay)."""
    options = [
        click.option("--prompt-tokens", type=click.IntRange(min=1), help="Run: prompt tokens."),
        click.option("--width", type=click.IntRange(min=1), help="fewshot: samples (default 20)."),
        click.option("--iterations", type=click.IntRange(min=1),
                     help="fewshot: steps (default 400)."),
        click.option("--path", "workload_path",
                     help="reasoning: file or name (default sorting128ToT); speculative: file or "
                          "tree size (default 64)."),
        click.option("--tree-index", type=int,
                     help="reasoning: tree of the file (default: the first complete one)."),
        click.option("--record", type=click.IntRange(min=0),
                     help="speculative: record (default 0)."),
        click.option("--steps", type=click.IntRange(min=1),
                     help="speculative: steps (default: all)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("estimate-io")
@click.argument("tree_path", metavar="[TREE]", required=False)
@click.option("--gpu", default="h100", show_default=True,
              help="a100, h100, h200, auto (detect this machine's) or a GPU spec file (.json).")
@click.option("--strategies", help="Comma-separated strategies (default: all nine).")
@click.option("--chunk-size", type=click.IntRange(min=1),
              help="KV tokens per chunk, for the strategies that take one (default 128).")
@click.option("--group-size", type=click.IntRange(min=1),
              help="Most queries per group, for the DeFT strategies (default: no cap).")
@click.option("--page-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="KV tokens per page (index bytes of the paged strategies).")
@click.option("--workload", type=click.Choice(["fewshot", "reasoning", "speculative"]),
              help="Sum over every step of a run instead of reading TREE.")
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def estimate_io(tree_path, gpu, strategies, chunk_size, group_size, page_size, workload,
                as_json, **run_options):
    """Predict every strategy's HBM traffic, load balance and latency for TREE (a tree.json),
    or, with --workload, the traffic summed over every decode step of a run.

    Sizes apply only to the strategies that take them. Latencies come from an uncalibrated
    roofline model (docs/iomodel.md) until the GPU spec carries fitted constants.
    """
    from rich.progress import Progress

    import iomodel
    from deft.strategies import STRATEGIES
    from iomodel.report import estimate_table, run_table

    names = STRATEGIES if strategies is None else [s.strip() for s in strategies.split(",")]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        fail(f"unknown strategy {', '.join(unknown)!r}; choose from {', '.join(STRATEGIES)}")
    try:
        spec = iomodel.resolve_gpu(gpu)
    except iomodel.GpuSpecError as error:
        fail(str(error))
    sizes = dict(chunk_size=chunk_size, group_size=group_size, page_size=page_size)
    given = [name for name, value in run_options.items() if value is not None]
    if workload is None:
        if tree_path is None:
            fail("give a TREE file or --workload fewshot|reasoning|speculative")
        if given:
            fail(f"{option_name(given[0])} applies only with --workload")
        tree = read_tree(tree_path)
        try:
            result = iomodel.estimate(tree, spec, names, **sizes)
        except ValueError as error:  # TreeError too
            fail(str(error))
        if as_json:
            click.echo(json.dumps(result, indent=1))
        else:
            stdout.print(estimate_table(result, iomodel.floor(tree, spec)))
        return
    if tree_path is not None:
        fail("give either a TREE file or --workload, not both")
    run = build_run(workload, run_options)
    with Progress(console=stderr, transient=True, disable=as_json) as progress:
        task = progress.add_task(f"{run.name}", total=len(run))
        try:
            totals = iomodel.run_totals(
                run, spec, names, **sizes,
                progress=lambda done: progress.update(task, completed=done))
        except ValueError as error:  # TreeError too: a step's tree beyond the limits
            fail(f"{run.name}: {error}")
    result = {"format": "deft-estimate-run/1", "workload": run.name, "gpu": spec.name,
              "calibrated": spec.calibrated, **totals}
    if as_json:
        click.echo(json.dumps(result, indent=1))
    else:
        stdout.print(run_table(result))


def build_run(kind: str, options: dict):
    """The deft.workloads run of `kind` with the --workload options given (None: default)."""
    from deft import workloads as w

    accepted = {
        "fewshot": ("prompt_tokens", "width", "iterations"),
        "reasoning": ("workload_path", "tree_index", "prompt_tokens"),
        "speculative": ("workload_path", "prompt_tokens", "record", "steps"),
    }[kind]
    extra = [k for k, v in options.items() if v is not None and k not in accepted]
    if extra:
        fail(f"{option_name(extra[0])} does not apply to --workload {kind}")
    values = {k: v for k, v in options.items() if v is not None}
    path = values.pop("workload_path", None)
    try:
        if kind == "fewshot":
            return w.fewshot(**values)
        if kind == "speculative":
            return w.speculative(64 if path is None else path, **values)
        return w.reasoning("sorting128ToT" if path is None else path, **values)
    except (ValueError, OSError) as error:
        fail(str(error))


# ---------------------------------------------------------------------------- bench
@main.command()
@click.option("--workloads", "workload_list", default="all", show_default=True,
              help="Anchor names, tree.json paths, run steps KIND:key=value:step=N and trees "
                   "KIND:key=value, comma-separated; all = the six anchors (docs/benchmarks.md).")
@click.option("--methods", "method_list", default="all", show_default=True,
              help="Strategies and peers, comma-separated; groups: all, strategies, peers.")
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
def bench(workload_list, method_list, dtype, timing, json_path, plot_path, page_size, seed,
          calibrate_path):
    """Time every strategy and peer on each workload, against a floor measured in the same run.

    Measures the floor first (a large copy and a large GEMM), then, per workload and method,
    checks the output against the float64 oracle before timing it. Progress goes to stderr,
    the table to stdout. Needs a CUDA GPU, except with --calibrate.
    """
    from harness import bench as b

    for path in (json_path, plot_path):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            fail(f"{path}: its directory does not exist")
    if calibrate_path:
        try:
            with open(calibrate_path) as file:
                fit = b.calibrate(json.load(file))
        except (OSError, ValueError, KeyError) as error:
            fail(f"{calibrate_path}: {error}")
        stdout.print(b.render_calibration(fit))
        if json_path:
            b.write_json(fit, json_path)
            stderr.print(f"wrote {json_path}", highlight=False)
        return
    try:
        specs = b.parse_workloads(workload_list)
        methods = b.parse_methods(method_list)
    except ValueError as error:
        fail(str(error))
    import torch

    if not torch.cuda.is_available():
        fail(f"bench needs a CUDA GPU, and torch {torch.__version__} sees none: run it on a GPU "
             "machine (scripts/bench_gpu.sh), or fit a saved result with --calibrate BENCH.json")
    result = b.run_bench(specs, methods, dtype=b.DTYPES[dtype], timing=timing,
                         page_size=page_size, seed=seed,
                         log=lambda line: stderr.print(line, markup=False, highlight=False))
    stdout.print(b.render(result))
    if json_path:
        b.write_json(result, json_path)
        stderr.print(f"wrote {json_path}", highlight=False)
    if plot_path:
        try:
            b.plot_result(result, plot_path)
            stderr.print(f"wrote {plot_path}", highlight=False)
        except ImportError:
            stderr.print("--plot needs matplotlib (pip install matplotlib): no plot written",
                         highlight=False)


# ---------------------------------------------------------------------------- replay
@main.command("replay")
@click.option("--workload", type=click.Choice(["fewshot", "reasoning", "speculative"]),
              required=True, help="The decoding run to replay.")
@run_options
@click.option("--methods", "method_list", default="all", show_default=True,
              help="Comma-separated: deft_flatten, deft_node_chunk, deft_node, radix, "
                   "flash_decoding, tree_attention_s, sglang, ref:<strategy> (PyTorch); groups "
                   "all, strategies.")
@click.option("--max-steps", type=click.IntRange(min=1),
              help="Replay this many steps, evenly spaced; totals are extrapolated to the run.")
@click.option("--layers", default=32, show_default=True, type=click.IntRange(min=1),
              help="Attention layers, each with its own KV cache (and decoder layers).")
@click.option("--e2e", is_flag=True,
              help="Also time whole decoding steps of a Llama-3-8B-shaped model (random "
                   "weights), per method and without attention.")
@click.option("--e2e-steps", type=click.IntRange(min=1),
              help="Of the replayed steps, run this many through the model (default: all).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--page-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Tokens per page of the paged cache.")
@click.option("--timing", type=click.Choice(["graph", "eager"]), default="graph",
              show_default=True, help="graph: a CUDA graph per method, replayed every step.")
@click.option("--check-steps", default=1, show_default=True, type=click.IntRange(min=0),
              help="Steps (the last first) whose outputs are checked against the oracle.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", metavar="OUT", help="Write every number as JSON.")
def replay_command(workload, method_list, max_steps, layers, e2e, e2e_steps, dtype, page_size,
                   timing, check_steps, seed, json_path, **run_options):
    """Replay a whole decoding run step by step and time each method's attention over it.

    The paged tree cache grows, branches and prunes as the run did; each step every method plans
    once (timed apart) and runs attention in every layer (CUDA events around the step's layers).
    With --e2e the step also goes through a Llama-3-8B-shaped decoder (the paper's Table 3).
    Progress goes to stderr, the table to stdout; docs/reproduction.md explains the numbers.
    """
    from dataclasses import replace

    import torch
    from rich.progress import Progress

    from harness import replay as r
    from harness.bench import DTYPES, write_json
    from harness.decoder import LLAMA3_8B
    from harness.registry import parse_methods

    if json_path and not os.path.isdir(os.path.dirname(os.path.abspath(json_path))):
        fail(f"{json_path}: its directory does not exist")
    try:
        methods = parse_methods(method_list, steps=True)
    except ValueError as error:
        fail(str(error))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if e2e and device == "cpu":
        fail("--e2e runs a Llama-3-8B-shaped model (16 GB of weights): it needs a CUDA GPU")
    if all(m.unavailable(torch.device(device)) for m in methods):
        fail(f"replay needs a CUDA GPU for these methods, and torch {torch.__version__} sees "
             "none: run it on a GPU machine (scripts/replay_gpu.sh), or replay the PyTorch "
             "references on the CPU with --methods ref:<strategy>")
    run = build_run(workload, run_options)
    with Progress(console=stderr, transient=True) as progress:
        task = progress.add_task(run.name, total=None)
        result = r.replay(
            run, methods, model=replace(LLAMA3_8B, layers=layers), e2e=e2e, max_steps=max_steps,
            e2e_steps=e2e_steps, dtype=DTYPES[dtype], page_size=page_size, timing=timing,
            check_steps=check_steps, seed=seed, device=device,
            progress=lambda done, total: progress.update(task, completed=done, total=total))
    stdout.print(r.render(result))
    if json_path:
        write_json(result, json_path)
        stderr.print(f"wrote {json_path}", highlight=False)


# ---------------------------------------------------------------------------- autotune
@main.command("autotune")
@click.option("--gpu", required=True, type=click.Choice(["a100", "h100", "h200", "auto"]),
              help="The card to tune; it must be the one present (auto: whichever is), "
                   "unless --predict.")
@click.option("--workloads", "workload_list", default="all", show_default=True,
              help="As for bench: anchors, tree.json paths, run steps, trees, comma-separated; "
                   "all = the six anchors. Each stands for its tree's bucket.")
@click.option("--strategies", default="deft_flatten", show_default=True,
              help="Kernel strategies, comma-separated; all = every one with a kernel.")
@click.option("--budget-s", type=click.FloatRange(min=0), default=150, show_default=True,
              help="Soft time budget of the measurements, seconds, shared by the buckets.")
@click.option("--exhaustive", is_flag=True,
              help="Measure every size and every tile that fits at the best size (slow), "
                   "instead of the IO model's top 8 sizes and a tile descent.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True)
@click.option("--output", metavar="PATH",
              help="Configs file (its log goes to logs/ beside it), or a directory for "
                   "<device>.json (default: deft/kernels/configs/<device>.json, the log in "
                   "autotune/logs/).")
@click.option("--predict", is_flag=True,
              help="Rank with the IO model on the card's spec instead of measuring (no GPU "
                   "needed): a table marked predicted, <device>.predicted.json; never over "
                   "a measured one.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def autotune_command(gpu, workload_list, strategies, budget_s, exhaustive, dtype, output,
                     predict, as_json):
    """Tune chunk size, group size and tiles per tree bucket on this GPU, and write the table
    deft.TreeAttention reads (docs/autotune.md).

    Sizes are ranked by the IO model and the best measured (CUDA graphs over rotating KV
    copies, interleaved rounds), then tiles, then the leaders re-timed against the defaults.
    Progress goes to stderr, the chosen configs to stdout. Exits 2 when the GPU present is
    not the one asked for, unless --predict, and when --predict would replace a measured
    table.
    """
    from pathlib import Path

    from autotune import store, tune
    from autotune.measure import workbenches
    from autotune.report import ProgressBar, autotune_table
    from harness.bench import DTYPES, parse_workloads
    from deft.strategies import KERNEL_STRATEGIES as KERNELS

    names = list(KERNELS) if strategies.strip() == "all" else [
        s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in names if s not in KERNELS]
    if unknown or not names:
        fail(f"unknown strategy {', '.join(unknown)!r}; choose from {', '.join(KERNELS)} or all")
    try:
        spec, device = tune.resolve_card(gpu, predict)
        workloads = [(w.text, w.tree()) for w in parse_workloads(workload_list)]
    except (ValueError, OSError) as error:
        fail(str(error))
    path = Path(output) if output else store.table_path(device["name"], predicted=predict)
    if path.is_dir() or output and output.endswith(("/", os.sep)):
        path = store.table_path(device["name"], path, predicted=predict)
    try:
        store.check_writable(path, "predicted" if predict else "measured")
    except ValueError as error:
        fail(str(error))
    if predict:
        table = tune.predict(workloads, names, spec, device, dtype=DTYPES[dtype])
    else:
        with ProgressBar(stderr) as reporter:
            table = tune.autotune(workloads, names, spec, device, workbenches(DTYPES[dtype]),
                                  budget_s=budget_s, exhaustive=exhaustive,
                                  dtype=DTYPES[dtype], reporter=reporter)
    configs, log = store.write_tuned(table, path)
    stderr.print(f"wrote {configs} ({table.source} configs) and {log} (log)", highlight=False)
    if as_json:
        click.echo(json.dumps(table.to_dict(), indent=1))
    else:
        stdout.print(autotune_table(table))


if __name__ == "__main__":
    main()
