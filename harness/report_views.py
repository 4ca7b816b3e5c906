"""Views of core data for `deft-cli`: a tree (`inspect`) and the workload kinds (`workloads
list`), rendered with rich beside the other reports (`iomodel.report`, `harness.bench.report`,
`harness.replay.report`, `autotune.report`)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.tree import Tree as RichTree

from deft.tree import Tree


def tree_view(tree: Tree, max_nodes: int) -> RichTree:
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


def stats_table(stats: dict) -> Table:
    """`Tree.stats()` as a two-column table, floats to three decimals."""
    table = Table(title="statistics", show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    return table


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring, on one line, without reST backquotes."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split()).replace("`", "")
    return paragraph.split(". ")[0].rstrip(".") + "."


def workload_listing() -> dict:
    """Every run and tree kind of `deft.workloads` with its options and description, the
    anchors, the off-anchor suite and its held-out names, and the real workload files found:
    ``{"kinds", "anchors", "offanchor", "held_out", "files"}``."""
    from deft import workloads as w

    kinds = {
        name: {
            "kind": "run" if name in w.RUN_KINDS else "tree",
            "options": w.kind_options(name),
            "description": first_sentence(builder.__doc__ or ""),
        }
        for name, builder in {**w.RUN_KINDS, **w.TREE_KINDS}.items()
    }
    files = {name: str(path) for name, path in w.found_workload_files().items()}
    return {"kinds": kinds, "anchors": list(w.ANCHORS), "offanchor": list(w.OFF_ANCHOR),
            "held_out": list(w.HELD_OUT), "files": files}


def print_workload_listing(console: Console, listing: dict) -> None:
    """Print a `workload_listing`: the kinds' table, then the anchors and the files found."""
    table = Table(title="workload kinds (export KIND key=value ...)")
    for column in ("kind", "type", "options (default)", "description"):
        table.add_column(column)
    for name, kind in listing["kinds"].items():
        options = ", ".join(f"{k}={'required' if v == 'required' else v}"
                            for k, v in kind["options"].items())
        table.add_row(name, kind["kind"], options, kind["description"])
    console.print(table)
    console.print("anchors: " + ", ".join(listing["anchors"]), highlight=False)
    console.print("off-anchor suite (offanchor:name=...): " + ", ".join(listing["offanchor"])
                  + "; held out of tuning: " + ", ".join(listing["held_out"]), highlight=False)
    files = listing["files"]
    if files:
        console.print("real files found:\n  " + "\n  ".join(f"{k}: {v}" for k, v in files.items()),
                      highlight=False)
    else:
        console.print("real files found: none (set DEFT_WORKLOADS to the workloads directory)")
