"""`deft-cli estimate-io`: the IO model's traffic and latency for a tree or a whole run."""

from __future__ import annotations

import json

import click

from cli import fail, main, option_name, read_tree, stderr, stdout
from cli.options import build_run, run_options


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
