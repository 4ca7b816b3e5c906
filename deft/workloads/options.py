"""Workload kinds by name, and the one parser of their ``KEY=VALUE`` options.

`deft-cli workloads export KIND key=value ...`, the bench's, replay's and autotune's
``--workloads KIND:key=value:...`` and the listing of `deft-cli workloads list` all read the kinds
and their options here: a kind's options are its builder's keyword arguments (``attention``
left out), with the builder's defaults.
"""

from __future__ import annotations

import inspect

from deft.workloads.anchors import anchor
from deft.workloads.runs import fewshot
from deft.workloads.synthetic import (
    chain, random_tree, star, token_tree, token_tree_run, tot, tot_run,
)
from deft.workloads.suites import balanced, off_anchor, serving_batch
from deft.workloads.traces import reasoning, speculative

RUN_KINDS = {
    "fewshot": fewshot,
    "reasoning": reasoning,
    "speculative": speculative,
    "tot_run": tot_run,
    "token_tree_run": token_tree_run,
}
"""Run builders by kind name (the CLI's ``workloads export KIND``)."""

TREE_KINDS = {
    "anchor": anchor,
    "offanchor": off_anchor,
    "random": random_tree,
    "chain": chain,
    "star": star,
    "tot": tot,
    "token_tree": token_tree,
    "serving_batch": serving_batch,
    "balanced": balanced,
}
"""Single-tree builders by kind name."""

REQUIRED = "required"
"""`kind_options`' mark of an option without a default."""


def kind_options(kind: str) -> dict:
    """The options of a workload kind: ``{name: default, or REQUIRED}`` in the builder's order."""
    builder = _builder(kind)
    return {
        name: REQUIRED if p.default is inspect.Parameter.empty else p.default
        for name, p in inspect.signature(builder).parameters.items()
        if name != "attention"
    }


def parse_option_value(text: str):
    """A KEY=VALUE option's value: an int, a float, none/null, true/false, or else the text."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(kind: str, pairs, where: str | None = None, extra=()) -> dict:
    """The builder options of a workload kind, from ``KEY=VALUE`` texts.

    Parameters
    ----------
    kind : str
        A key of `RUN_KINDS` or `TREE_KINDS`.
    pairs : iterable of str
        ``KEY=VALUE`` texts; a key may use dashes for underscores and leading dashes
        (``--prompt-tokens=10`` is ``prompt_tokens=10``); values as `parse_option_value` reads
        them.
    where : str, optional
        Names the workload in the errors (default: ``kind``).
    extra : tuple of str
        Keys accepted beside the kind's options (e.g. the bench's ``step``), returned with them.

    Returns
    -------
    dict
        ``{key: value}`` of the pairs given (defaults are left to the builder).

    Raises
    ------
    ValueError
        An unknown kind, a text without ``=``, a key the kind does not take, or a required
        option missing.
    """
    accepted = kind_options(kind)
    where = kind if where is None else where
    values = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not eq or (key not in accepted and key not in extra):
            raise ValueError(f"{where}: bad option {pair!r}; {kind} takes "
                             + ", ".join(f"{k}=..." for k in [*accepted, *extra]))
        values[key] = parse_option_value(value)
    missing = [k for k, default in accepted.items() if default == REQUIRED and k not in values]
    if missing:
        raise ValueError(f"{where}: missing option(s) " + ", ".join(f"{k}=..." for k in missing))
    return values


def _builder(kind: str):
    """The builder of a kind; ValueError naming the kinds when there is none."""
    builders = {**RUN_KINDS, **TREE_KINDS}
    if kind not in builders:
        raise ValueError(f"unknown workload kind {kind!r}; kinds: {', '.join(builders)}")
    return builders[kind]
