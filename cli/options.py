"""The options that pick a decoding run (estimate-io --workload, replay) and the run they build."""

from __future__ import annotations

import click

from cli import fail, option_name


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
