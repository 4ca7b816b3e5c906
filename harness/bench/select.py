"""Which workloads a bench runs: the ``--workloads`` syntax.

A ``--workloads`` value is ``all`` (the six anchors) or a comma-separated list of:

- an anchor name, e.g. ``fewshot_b20_P4000_L200`` (`deft.workloads.ANCHORS`);
- a tree.json path, e.g. ``trees/big.json`` (anything ending in ``.json`` or naming a file);
- a step of a run, ``KIND:key=value:...:step=N``, e.g. ``fewshot:width=20:step=199`` or
  ``speculative:path=64:step=10`` (kinds and options: `deft-cli workloads list`); ``step``
  counts from 0, negative from the end, and defaults to the last step (-1);
- a single synthetic tree, ``KIND:key=value:...``, e.g. ``star:leaves=50`` or
  ``random:seed=3:nodes=200``.

Values are integers, floats, ``none``, ``true``/``false``, or else text. Syntax is checked
when parsed (`parse_workloads` raises ValueError); building the tree (reading a file) happens
when the bench reaches the workload, so a missing file fails that workload only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deft.tree import Tree
from deft.workloads import parse_options

DEFAULT_STEP = -1


@dataclass(frozen=True)
class WorkloadSpec:
    """One parsed ``--workloads`` entry.

    Attributes
    ----------
    text : str
        The entry as given (the workload's name in the table and the JSON).
    kind : str
        ``"anchor"``, ``"file"``, a run kind (`deft.workloads.RUN_KINDS`) or a tree kind
        (`deft.workloads.TREE_KINDS`).
    options : dict
        Keyword arguments of the builder (the anchor name, the path, or the kind's options).
    step : int or None
        The step of a run; None for single trees.
    """

    text: str
    kind: str
    options: dict = field(default_factory=dict)
    step: int | None = None

    def tree(self) -> Tree:
        """Build the tree (reads files; raises what the builder raises)."""
        from deft import load_tree
        from deft import workloads as w

        if self.kind == "file":
            return load_tree(self.options["path"])
        if self.kind in w.RUN_KINDS:
            return w.RUN_KINDS[self.kind](**self.options).tree(self.step)
        return w.TREE_KINDS[self.kind](**self.options)


def parse_workloads(text: str) -> list[WorkloadSpec]:
    """Parse a ``--workloads`` value (module docstring). Raises ValueError on bad syntax."""
    from deft.workloads import ANCHORS

    if text.strip() == "all":
        return [parse_workload(name) for name in ANCHORS]
    specs = [parse_workload(item.strip()) for item in text.split(",") if item.strip()]
    if not specs:
        raise ValueError("no workload selected")
    return specs


def parse_workload(item: str) -> WorkloadSpec:
    """Parse one ``--workloads`` entry (module docstring). Raises ValueError on bad syntax."""
    from deft.workloads import ANCHORS, RUN_KINDS, TREE_KINDS

    if item in ANCHORS:
        return WorkloadSpec(item, "anchor", {"name": item})
    if item.endswith(".json") or Path(item).is_file():
        return WorkloadSpec(item, "file", {"path": item})
    kind, *pairs = item.split(":")
    kind = kind.replace("-", "_")
    builders = {**RUN_KINDS, **TREE_KINDS}
    if kind not in builders:
        raise ValueError(
            f"unknown workload {item!r}: not an anchor ({', '.join(ANCHORS)}), not a .json file, "
            f"and {kind!r} is not a workload kind ({', '.join(builders)})"
        )
    if kind not in RUN_KINDS:
        return WorkloadSpec(item, kind, parse_options(kind, pairs, where=item))
    options = parse_options(kind, pairs, where=item, extra=("step",))
    step = options.pop("step", DEFAULT_STEP)
    if not isinstance(step, int):
        raise ValueError(f"{item}: step must be an integer, got {step!r}")
    return WorkloadSpec(item, kind, options, step)

