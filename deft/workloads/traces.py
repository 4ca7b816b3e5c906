"""The recorded traces: Tree-of-Thoughts runs and Medusa token trees of the DeFT dataset.

`reasoning` reads a ``reasoning/*.json`` file (Tree-of-Thoughts runs recorded from
Graph-of-Thoughts tasks), `speculative` an ``speculative/APPS_tree_size{T}.json`` file (a Medusa
token tree and its accept lengths). The files ship with the package, under ``data/deft-dataset/``
(MIT licence and attribution there); `find_workload_file` looks under ``workload_dir`` when
given, else under ``$DEFT_WORKLOADS`` when set, then in the package data.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from deft.workloads.runs import ReasoningRun, SpeculativeRun

PACKAGE_DATA = Path(__file__).resolve().parent / "data"
"""The shipped copy of the DeFT dataset (``deft-dataset/{reasoning,speculative}/``)."""

FIRST_COMPLETE = "first_complete"
"""`reasoning`'s default ``tree_index``: the file's first complete tree."""


def reasoning(path, tree_index=FIRST_COMPLETE, prompt_tokens=None, workload_dir=None,
              attention=None) -> ReasoningRun:
    """A Tree-of-Thoughts run from a Graph-of-Thoughts template file.

    Parameters
    ----------
    path : str or Path
        A ``reasoning/*.json`` file, or its name (``sorting128ToT``) under the workload dir.
    tree_index : int or "first_complete"
        Which tree of the file, counting every tree (incomplete ones included; negative counts
        from the end). The default, ``"first_complete"``, is the file's first complete tree; an
        incomplete tree (``"incompleted": true``) given by its index is refused with a ValueError
        naming the first complete one.
    prompt_tokens : int, optional
        Root tokens (default: the root's ``value``, the recorded prompt length).

    Step ``i`` of the run is the file's iteration ``i + 1``; see `ReasoningRun`.
    """
    path = _workload_path(path, "reasoning", workload_dir)
    trees = _read_json(path)
    if not isinstance(trees, list) or not trees:
        raise ValueError(f"{path}: expected a JSON list of trees")
    tree_index = _complete_tree_index(trees, tree_index, path)
    record = trees[tree_index]
    where = f"{path.name} tree {tree_index}"
    nodes = list(record["data"].values())
    ids = [n["id"] for n in nodes]
    parent_of = {}
    for n in nodes:
        for child in n["children"]:
            if child in parent_of:
                raise ValueError(f"{where}: node {child} is listed as a child twice")
            parent_of[child] = n["id"]
    unknown = set(parent_of) - set(ids)
    if unknown:
        raise ValueError(f"{where}: children {sorted(unknown)} are not in the tree")
    for n in nodes:
        root = n["id"] not in parent_of
        expected = (1 - n["value"], 0) if root else (n["end"] - n["value"] + 1, n["end"])
        if (n["start"], n["end"]) != expected:
            raise ValueError(
                f"{where}: node {n['id']} has value {n['value']} but start..end "
                f"{n['start']}..{n['end']}"
            )
    roots = [n for n in nodes if n["id"] not in parent_of]
    if len(roots) != 1:
        raise ValueError(f"{where}: needs exactly one root, got {len(roots)}")
    prompt = roots[0]["value"] if prompt_tokens is None else prompt_tokens
    return ReasoningRun(
        ids,
        [parent_of.get(i, -1) for i in ids],
        [n["start"] for n in nodes],
        [n["end"] for n in nodes],
        prompt,
        name=f"reasoning_{path.stem}_{tree_index}_P{prompt}",
        description=f"{path.name} tree {tree_index}: Tree-of-Thoughts, prompt {prompt} tokens",
        attention=attention,
    )


def _complete_tree_index(trees, tree_index, path: Path) -> int:
    """The index in ``0..len(trees) - 1`` of the complete tree ``tree_index`` names (see
    `reasoning`); raises ValueError for an index out of range or an incomplete tree."""
    complete = [k for k, t in enumerate(trees) if not t.get("incompleted")]
    if isinstance(tree_index, str) and tree_index == FIRST_COMPLETE:
        if not complete:
            raise ValueError(f"{path.name}: the file has no complete tree")
        return complete[0]
    if isinstance(tree_index, bool) or not isinstance(tree_index, (int, np.integer)):
        raise ValueError(f"tree_index must be an integer or {FIRST_COMPLETE!r}, got {tree_index!r}")
    if not -len(trees) <= tree_index < len(trees):
        raise ValueError(f"{path}: tree_index {tree_index} is out of range ({len(trees)} trees)")
    index = int(tree_index) % len(trees)
    if trees[index].get("incompleted"):
        later = [k for k in complete if k > index]
        hint = (
            f"the first complete tree is index {complete[0]} (the default)"
            + (f", the next after it index {later[0]}" if later and later[0] != complete[0] else "")
            if complete else "the file has no complete tree"
        )
        raise ValueError(f"{path.name} tree {index} is incomplete ('incompleted': true) and is "
                         f"refused; {hint}")
    return index


def speculative(path, prompt_tokens=4000, record=0, steps=None, workload_dir=None,
                attention=None) -> SpeculativeRun:
    """Medusa token-tree decoding from an ``APPS_tree_size{T}.json`` file.

    Parameters
    ----------
    path : str, Path or int
        The file, or its tree size T (``64`` for ``speculative/APPS_tree_size64.json`` under the
        workload dir).
    prompt_tokens : int
        Verified tokens at step 0 (the files' prompts are text; no tokenizer is at hand).
    record : int
        Which of the file's ``Records`` gives the accept lengths.
    steps : int, optional
        Number of steps (default: every ``Accept_length`` entry of the record).

    The token tree has ``len(Tree_Structure) + 1`` nodes (``Token_Tree_size`` is not used);
    each step has one query per node, the root's on the newest verified token. See
    `SpeculativeRun`.
    """
    if str(path).isdigit():
        path = f"APPS_tree_size{path}.json"
    path = _workload_path(path, "speculative", workload_dir)
    data = _read_json(path)
    records = data["Records"]
    if not 0 <= record < len(records):
        raise ValueError(f"{path}: record {record} is out of range ({len(records)} records)")
    accept = records[record]["Accept_length"]
    if steps is not None:
        if not 1 <= steps <= len(accept):
            raise ValueError(f"{path}: steps must be between 1 and {len(accept)}, got {steps}")
        accept = accept[:steps]
    size = len(data["Tree_Structure"]) + 1
    return SpeculativeRun(
        data["Tree_Structure"],
        accept,
        prompt_tokens,
        name=f"speculative_t{size}_P{prompt_tokens}",
        description=f"{path.name} record {record}: token tree of {size}, prompt {prompt_tokens} tokens",
        attention=attention,
    )


def find_workload_file(relative, workload_dir=None) -> Path:
    """The path of a file of the real workloads, e.g. ``speculative/APPS_tree_size64.json``.

    Looks under ``workload_dir`` when given, else under ``$DEFT_WORKLOADS`` when set and then in
    the package data (`PACKAGE_DATA`). A directory may hold the files directly or under
    ``deft-dataset/``.
    """
    searched = []
    for root in _workload_dirs(workload_dir):
        for base in (root / "deft-dataset", root):
            searched.append(base)
            if (base / relative).is_file():
                return base / relative
    raise FileNotFoundError(
        f"workload file {relative} not found; looked in "
        + (", ".join(str(s) for s in searched) or "nothing")
        + " (pass workload_dir or set DEFT_WORKLOADS)"
    )


def found_workload_files(workload_dir=None) -> dict:
    """The real workload files found, ``{relative path: absolute Path}``, first directory wins."""
    found = {}
    for root in _workload_dirs(workload_dir):
        for base in (root / "deft-dataset", root):
            for kind in ("reasoning", "speculative"):
                for file in sorted((base / kind).glob("*.json")):
                    found.setdefault(f"{kind}/{file.name}", file)
    return found


def _workload_path(path, kind, workload_dir) -> Path:
    """A file given by its path, or by its bare name under ``kind/`` of the workload dir."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent != Path("."):
        raise FileNotFoundError(f"{path}: no such file")
    return find_workload_file(f"{kind}/{path.stem}.json", workload_dir)


def _workload_dirs(workload_dir) -> list:
    """The directories searched, in order: ``workload_dir`` alone when given, else
    ``$DEFT_WORKLOADS`` (when set) and the package data."""
    if workload_dir is not None:
        return [Path(workload_dir)]
    dirs = [Path(os.environ["DEFT_WORKLOADS"])] if os.environ.get("DEFT_WORKLOADS") else []
    return list(dict.fromkeys(d.resolve() for d in [*dirs, PACKAGE_DATA]))


def _read_json(path: Path):
    """The parsed file (shared between calls while the file is unchanged: do not modify it)."""
    return _parse_json(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _parse_json(path: str, mtime_ns: int):
    """The parsed file at ``path`` (``mtime_ns`` keys the cache); malformed JSON: ValueError."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno}: {error.msg}") from None

