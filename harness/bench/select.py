"""Which workloads a bench runs, and at which head shapes: the ``--workloads`` and ``--heads``
syntax.

A ``--workloads`` value is a comma-separated list of:

- a group: ``all`` (the six anchors), ``offanchor`` (the off-anchor suite,
  `deft.workloads.OFF_ANCHOR`), ``heldout`` (its workloads never tuned on,
  `deft.workloads.HELD_OUT`) or ``tunable`` (the others);
- an anchor name, e.g. ``fewshot_b20_P4000_L200`` (`deft.workloads.ANCHORS`), or a name of the
  off-anchor suite, e.g. ``serving_r8_s4``;
- a tree.json path, e.g. ``trees/big.json`` (anything ending in ``.json`` or naming a file);
- a step of a run, ``KIND:key=value:...:step=N``, e.g. ``fewshot:width=20:step=199`` or
  ``speculative:path=64:step=10`` (kinds and options: `deft-cli workloads list`); ``step``
  counts from 0, negative from the end, and defaults to the last step (-1);
- a single synthetic tree, ``KIND:key=value:...``, e.g. ``star:leaves=50`` or
  ``random:seed=3:nodes=200``.

Values are integers, floats, ``none``, ``true``/``false``, or else text. Syntax is checked
when parsed (`parse_workloads` raises ValueError); building the tree (reading a file) happens
when the bench reaches the workload, so a missing file fails that workload only.

A ``--heads`` value is a comma-separated list of ``q_heads/kv_heads[/head_dim]`` (head dim 128
when left out), e.g. ``32/8,16/2,8/1,4/1`` or ``32/8/64``: every workload runs at every shape
(`parse_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deft.tree import AttentionShape, Tree, TreeError
from deft.workloads import parse_options
from harness.inputs import with_heads

DEFAULT_STEP = -1

DEFAULT_HEAD_DIM = 128
"""Head dim of a ``--heads`` entry that gives only ``q_heads/kv_heads``."""


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
    groups = workload_groups()
    names = []
    for item in (part.strip() for part in text.split(",")):
        names.extend(groups.get(item, (item,)) if item else ())
    if not names:
        raise ValueError("no workload selected")
    return [parse_workload(name) for name in dict.fromkeys(names)]


def workload_groups() -> dict:
    """The names ``--workloads`` accepts for several workloads at once: ``{group: names}``."""
    from deft.workloads import ANCHORS, HELD_OUT, OFF_ANCHOR, TUNABLE

    return {"all": ANCHORS, "offanchor": OFF_ANCHOR, "heldout": HELD_OUT, "tunable": TUNABLE}


def parse_workload(item: str) -> WorkloadSpec:
    """Parse one ``--workloads`` entry (module docstring). Raises ValueError on bad syntax."""
    from deft.workloads import ANCHORS, OFF_ANCHOR, RUN_KINDS, TREE_KINDS

    if item in ANCHORS:
        return WorkloadSpec(item, "anchor", {"name": item})
    if item in OFF_ANCHOR:
        return WorkloadSpec(item, "offanchor", {"name": item})
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



def parse_heads(text: str | None) -> list[AttentionShape] | None:
    """The shapes of a ``--heads`` value (module docstring); None for None or empty (each
    tree keeps its own shape). Raises ValueError on bad syntax or an impossible shape."""
    if text is None or not text.strip():
        return None
    shapes = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        parts = item.split("/")
        if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad --heads entry {item!r}: write q_heads/kv_heads[/head_dim], "
                             "e.g. 32/8 or 32/8/64")
        numbers = [int(p) for p in parts] + [DEFAULT_HEAD_DIM] * (3 - len(parts))
        try:
            shapes.append(AttentionShape(*numbers))
        except TreeError as error:
            raise ValueError(f"bad --heads entry {item!r}: {error}") from None
    return list(dict.fromkeys(shapes))


def shape_label(shape: AttentionShape) -> str:
    """``q_heads/kv_heads/head_dim``, e.g. ``32/8/128``: a shape's name in tables and JSON."""
    return f"{shape.q_heads}/{shape.kv_heads}/{shape.head_dim}"


def cells(specs: list[WorkloadSpec], shapes: list[AttentionShape] | None) -> list[dict]:
    """Every (shape, workload) cell a bench of `specs` at `shapes` runs, built without a GPU:
    ``{"shape", "workload", "tree"}`` or ``{"shape", "workload", "error"}``, shape by shape
    (``--dry-run``)."""
    found = []
    for shape in shapes or [None]:
        for spec in specs:
            try:
                tree = spec.tree()
                tree = tree if shape is None else with_heads(tree, shape)
                found.append({"shape": shape_label(tree.attention), "workload": spec.text,
                              "tree": tree})
            except (ValueError, OSError) as error:
                found.append({"shape": None if shape is None else shape_label(shape),
                              "workload": spec.text, "error": str(error)})
    return found
