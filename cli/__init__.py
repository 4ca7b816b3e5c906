"""`deft-cli`: the command line of the DeFT toolkit.

Data goes to stdout, messages to stderr; bad input exits 2 with a one-line message; `NO_COLOR`
is honoured (rich reads it). Each command parses its options and dispatches to a library
function; the tables and views are rendered beside the reports (`harness.report_views`,
`iomodel.report`, `harness.bench.report`, `harness.replay.report`, `autotune.report`).

This package holds the `main` group and the helpers its commands share; the commands live in
`cli.tree_commands` (inspect, workloads), `cli.estimate` (estimate-io) and `cli.gpu_commands`
(bench, replay, autotune), each registering itself on `main` when imported (at the bottom here);
`cli.options` holds the options that pick a decoding run.
"""

from __future__ import annotations

import os
import sys

import click
from rich.console import Console
from rich.text import Text

import deft
from deft.tree import TreeError

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


# The command modules register their commands on `main`; they import the helpers above.
from cli import estimate, gpu_commands, tree_commands  # noqa: F401
