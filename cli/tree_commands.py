"""`deft-cli inspect` and `deft-cli workloads`: show a tree.json file; list and export workloads."""

from __future__ import annotations

import json

import click

import deft
from cli import check_output, fail, main, read_tree, stderr, stdout
from deft.tree_format import tree_to_dict
from harness.report_views import stats_table, tree_view


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
