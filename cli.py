"""`deft-cli`: the command line of the DeFT toolkit.

Data goes to stdout, messages to stderr; bad input exits 2 with a one-line message; `NO_COLOR`
is honoured (rich reads it). Each command is a thin shell over a library function.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree as RichTree

import deft
from deft.tree import TreeError

stdout = Console()
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
    table = Table(title="statistics", show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    stdout.print(table)


def tree_view(tree: deft.Tree, max_nodes: int) -> RichTree:
    """A rich tree of the first `max_nodes` nodes in preorder; the rest folded into counts."""
    view = RichTree(f"[bold]{tree!r}[/]")
    shown = {}
    for v in tree.preorder[:max_nodes]:
        p = tree.parent[v]
        label = f"node {tree.node_ids[v]}: {tree.tokens[v]} tokens"
        if tree.queries[v]:
            label += f", [cyan]{tree.queries[v]} queries[/]"
        shown[v] = (shown[p] if p >= 0 else view).add(label)
    hidden = tree.num_nodes - len(shown)
    if hidden:
        view.add(f"[dim]... {hidden} more nodes (raise --max-nodes to see them)[/]")
    return view


if __name__ == "__main__":
    main()
