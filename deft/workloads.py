"""Decoding workloads: real tree-decoding runs replayed step by step, synthetic trees, anchors.

A *run* is a sequence of decode steps; ``run.tree(i)`` is the decoding tree of step ``i`` (the KV
cache held at that step and the queries it decodes) and ``run.events(i)`` what changed since step
``i - 1``: nodes added (a branch), nodes pruned, tokens grown. Node ids stay stable across steps,
so a paged cache can follow a run by id (`deft.cache.TreeCache.apply`).

Runs
- `fewshot`: a prompt branching into ``width`` samples decoded side by side.
- `reasoning`: a Tree-of-Thoughts run recorded from Graph-of-Thoughts (``reasoning/*.json``).
- `speculative`: Medusa token-tree verification over a growing sequence (``APPS_tree_size*.json``).
- `tot_run`, `token_tree_run`: seeded synthetic runs of the same two kinds.

Single trees: `random_tree` (trees and forests), `chain`, `star`, `tot`, `token_tree`, and the
six `ANCHORS` of the performance targets (`anchor`).

The real files are found by `find_workload_file` (``workload_dir``, else ``$DEFT_WORKLOADS``,
else ``.workloads/`` in the repository, else ``../shared/workloads`` beside the repository or the
working directory); `docs/workloads.md` describes each run and its options.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from deft.tree import Tree

REPO_ROOT = Path(__file__).resolve().parents[1]

ANCHORS = (
    "fewshot_b20_P4000_L200",
    "fewshot_b50_P4000_L200",
    "reason_10x500_P1104",
    "spec_t64_P4000",
    "spec_t256_P4000",
    "long_P20000_q64_L100",
)
"""The anchor workloads of the performance targets (one decode step each)."""


# ---------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class StepEvents:
    """What changed between two consecutive steps of a run.

    Attributes
    ----------
    added : tuple of int
        Ids of the nodes new at this step, parents before children.
    pruned : tuple of int
        Ids of the nodes of the previous step that are gone, ascending.
    branched : tuple of int
        Ids of nodes of the previous step that gained children, ascending.
    grown : dict of int to int
        New tokens per node id (an added node counts all its tokens); nodes that did not grow are
        left out.
    """

    added: tuple
    pruned: tuple
    branched: tuple
    grown: dict


def step_events(before: Tree | None, after: Tree) -> StepEvents:
    """The events that turn tree ``before`` (None: an empty cache) into tree ``after``, by node id."""
    before_ids = np.empty(0, np.int64) if before is None else before.node_ids
    before_tokens = np.empty(0, np.int64) if before is None else before.tokens
    kept = np.isin(after.node_ids, before_ids)
    grown = after.tokens.copy()
    grown[kept] -= before_tokens[np.searchsorted(before_ids, after.node_ids[kept])]
    new = np.flatnonzero(~kept)
    new = new[np.argsort(after.depth[new], kind="stable")]
    parents = after.parent[new]
    parents = parents[(parents >= 0) & kept[np.maximum(parents, 0)]]
    return StepEvents(
        added=tuple(after.node_ids[new].tolist()),
        pruned=tuple(before_ids[~np.isin(before_ids, after.node_ids)].tolist()),
        branched=tuple(np.unique(after.node_ids[parents]).tolist()),
        grown={int(i): int(n) for i, n in zip(after.node_ids, grown) if n},
    )


class Run:
    """A decoding run: ``len(run)`` steps; ``run.tree(i)`` the tree decoded at step ``i``.

    Subclasses set ``name`` (short, file-name safe) and ``description`` (one line), and implement
    ``_tree(i)`` for ``0 <= i < len(run)``.
    """

    name = "run"
    description = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def _tree(self, i: int) -> Tree:
        raise NotImplementedError

    def tree(self, i: int) -> Tree:
        """The tree of step ``i`` (negative ``i`` counts from the end, as for a list)."""
        return self._tree(self._step(i))

    def events(self, i: int) -> StepEvents:
        """What step ``i`` changes relative to step ``i - 1`` (step 0: everything is added)."""
        i = self._step(i)
        return step_events(self._tree(i - 1) if i else None, self._tree(i))

    def _step(self, i: int) -> int:
        steps = len(self)
        if not -steps <= i < steps:
            raise IndexError(f"{self.name}: step {i} is out of range (the run has {steps} steps)")
        return i % steps

    def __iter__(self):
        return (self._tree(i) for i in range(len(self)))

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}: {len(self)} steps>"


class FewshotRun(Run):
    """A prompt (node 0) branching into ``width`` samples (nodes 1..width).

    At step ``i`` each sample holds ``i + 1`` tokens and has one query on its newest token.
    """

    def __init__(self, prompt_tokens=4000, width=20, iterations=400, attention=None):
        _check_positive(prompt_tokens=prompt_tokens, width=width, iterations=iterations)
        self.prompt_tokens, self.width, self.iterations = prompt_tokens, width, iterations
        self.attention = attention
        self.name = f"fewshot_b{width}_P{prompt_tokens}_L{iterations}"
        self.description = (
            f"prompt of {prompt_tokens} tokens, {width} samples decoded for {iterations} steps"
        )

    def __len__(self):
        return self.iterations

    def _tree(self, i):
        return star(self.width, self.prompt_tokens, i + 1, self.attention)


class ReasoningRun(Run):
    """A Tree-of-Thoughts run: nodes generated over decode iterations, branching and pruned.

    Step ``i`` is iteration ``i + 1`` (iteration 1 decodes the first generated token). At
    iteration ``t`` a node is *generating* when ``start <= t <= end``; it then holds
    ``t - start + 1`` tokens and one query on its newest token. The tree of the step holds the
    generating nodes and all their ancestors (finished ancestors keep all their tokens); the root
    holds the prompt.

    Parameters
    ----------
    ids, parents : array of int, [nodes]
        Node ids and parent ids (-1 for the root; exactly one root).
    start, end : array of int, [nodes]
        First and last generating iteration of each node (inclusive; ignored for the root). A
        child starts right after its parent ends: ``start[child] == end[parent] + 1``. A leaf
        may be empty (``end == start - 1``, a branch that produced no token; two trees of
        ``docmergeToT.json`` have one): it never appears in a step's tree.
    prompt_tokens : int
        Tokens of the root.
    """

    def __init__(self, ids, parents, start, end, prompt_tokens, name="reasoning",
                 description="", attention=None):
        ids, parents = np.asarray(ids, np.int64), np.asarray(parents, np.int64)
        start, end = np.array(start, np.int64), np.array(end, np.int64)
        _check_positive(prompt_tokens=prompt_tokens)
        roots = np.flatnonzero(parents < 0)
        if len(roots) != 1:
            raise ValueError(f"{name}: a reasoning run needs exactly one root, got {len(roots)}")
        index = {int(node): k for k, node in enumerate(ids)}
        if len(index) != len(ids):
            raise ValueError(f"{name}: duplicate node ids")
        parent_index = np.array([index.get(int(p), -2) if p >= 0 else -1 for p in parents])
        # The root holds the prompt: as if generated over iterations 1 - prompt_tokens .. 0.
        start[roots[0]], end[roots[0]] = 1 - prompt_tokens, 0
        for k in np.flatnonzero(parent_index != -1):
            where = f"{name}: node {ids[k]}"
            p = parent_index[k]
            if p == -2:
                raise ValueError(f"{where}: parent {parents[k]} is not in the run")
            if end[k] < start[k] - 1 or (end[k] < start[k] and (parent_index == k).any()):
                raise ValueError(
                    f"{where}: generates iterations {start[k]}..{end[k]}; only a leaf may be "
                    "empty (end = start - 1)"
                )
            if start[k] != end[p] + 1:
                raise ValueError(
                    f"{where}: starts at iteration {start[k]}, not right after its parent "
                    f"{ids[p]} ends ({end[p]})"
                )
        # A node is in the tree from its start until the last iteration anything in its subtree
        # generates: children start right after their parent ends, so that span has no gap.
        last = end.copy()
        for k in np.argsort(-start, kind="stable"):  # children before parents
            if parent_index[k] >= 0:
                last[parent_index[k]] = max(last[parent_index[k]], last[k])
        generating = np.zeros(last[roots[0]] + 2, np.int64)
        np.add.at(generating, np.maximum(start, 0), 1)
        np.add.at(generating, end + 1, -1)
        idle = np.flatnonzero(np.cumsum(generating)[1:] == 0)
        if len(idle) and idle[0] + 1 <= last[roots[0]]:
            raise ValueError(f"{name}: no node generates at iteration {idle[0] + 1}")
        self.ids, self.start, self.end, self.last = ids, start, end, last
        self.parent_ids = parents
        self.prompt_tokens = prompt_tokens
        self.attention = attention
        self.name, self.description = name, description

    def __len__(self):
        return int(self.last.max())

    def _tree(self, i):
        t = i + 1
        present = (self.start <= t) & (t <= self.last)
        tokens = np.minimum(t, self.end[present]) - self.start[present] + 1
        queries = (t <= self.end[present]).astype(np.int64)
        parents = [None if p < 0 else p for p in self.parent_ids[present].tolist()]
        return Tree(self.ids[present].tolist(), parents, tokens.tolist(), queries.tolist(),
                    self.attention)


class SpeculativeRun(Run):
    """Token-tree speculative decoding: verify a tree of candidate tokens, accept some, repeat.

    At step ``i`` the root (node 0) holds the verified sequence, ``prompt_tokens`` plus the tokens
    accepted before step ``i``, with one query on its newest token; each candidate path ``k`` is a
    one-token node with one query, whose parent is the candidate ``path[:-1]`` (the root for a
    one-element path). The candidates of step ``i`` are new tokens, so they get new ids,
    ``1 + i * len(paths) + k``; step 0 uses ids ``1..len(paths)``.

    Parameters
    ----------
    paths : list of list of int, [T - 1]
        The token tree (``Tree_Structure`` of the Medusa files).
    accept_lengths : list of int, [steps]
        Tokens accepted by each step; the verified sequence grows by ``accept_lengths[i]`` after
        step ``i``.
    prompt_tokens : int
        Tokens of the verified sequence at step 0.
    """

    def __init__(self, paths, accept_lengths, prompt_tokens, name="speculative",
                 description="", attention=None):
        _check_positive(prompt_tokens=prompt_tokens)
        self.parent_index = _path_parents(paths, name)
        accept = np.asarray(accept_lengths, np.int64)
        if accept.ndim != 1 or not len(accept) or (accept < 1).any():
            raise ValueError(f"{name}: accept lengths must be a non-empty list of integers >= 1")
        self.root_tokens = prompt_tokens + np.concatenate([[0], np.cumsum(accept)[:-1]])
        self.prompt_tokens = prompt_tokens
        self.attention = attention
        self.name, self.description = name, description

    def __len__(self):
        return len(self.root_tokens)

    def _tree(self, i):
        first_id = 1 + i * len(self.parent_index)
        return _token_tree(self.parent_index, int(self.root_tokens[i]), 1, first_id, self.attention)


# ---------------------------------------------------------------------------- real files
def fewshot(prompt_tokens=4000, width=20, iterations=400, attention=None) -> FewshotRun:
    """Few-shot sampling: a prompt of ``prompt_tokens`` branching into ``width`` samples, each
    decoded for ``iterations`` steps (one query per sample per step)."""
    return FewshotRun(prompt_tokens, width, iterations, attention)


def reasoning(path, tree_index=0, prompt_tokens=None, workload_dir=None,
              attention=None) -> ReasoningRun:
    """A Tree-of-Thoughts run from a Graph-of-Thoughts template file.

    Parameters
    ----------
    path : str or Path
        A ``reasoning/*.json`` file, or its name (``sorting128ToT``) under the workload dir.
    tree_index : int
        Which tree of the file, counting every tree (incomplete ones included); an incomplete
        tree is refused with a ValueError.
    prompt_tokens : int, optional
        Root tokens (default: the root's ``value``, the recorded prompt length).

    Step ``i`` of the run is the file's iteration ``i + 1``; see `ReasoningRun`.
    """
    path = _workload_path(path, "reasoning", workload_dir)
    trees = _read_json(path)
    if not isinstance(trees, list) or not trees:
        raise ValueError(f"{path}: expected a JSON list of trees")
    if not -len(trees) <= tree_index < len(trees):
        raise ValueError(f"{path}: tree_index {tree_index} is out of range ({len(trees)} trees)")
    tree_index %= len(trees)
    record = trees[tree_index]
    where = f"{path.name} tree {tree_index}"
    if record.get("incompleted"):
        complete = [k for k, t in enumerate(trees) if not t.get("incompleted")]
        later = [k for k in complete if k > tree_index]
        hint = (
            f"the first complete tree is index {complete[0]}"
            + (f", the next after it index {later[0]}" if later and later[0] != complete[0] else "")
            if complete else "the file has no complete tree"
        )
        raise ValueError(f"{where} is incomplete ('incompleted': true) and is refused; {hint}")
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

    Looks under ``workload_dir`` when given, else under ``$DEFT_WORKLOADS``, ``.workloads/`` in
    the repository, then ``../shared/workloads`` beside the repository and beside the working
    directory. A directory may hold the files directly or under ``deft-dataset/``.
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


def _workload_dirs(workload_dir):
    if workload_dir is not None:
        return [Path(workload_dir)]
    dirs = [Path(os.environ["DEFT_WORKLOADS"])] if os.environ.get("DEFT_WORKLOADS") else []
    dirs += [REPO_ROOT / ".workloads", REPO_ROOT.parent / "shared" / "workloads",
             Path.cwd().parent / "shared" / "workloads"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def _read_json(path: Path):
    """The parsed file (shared between calls while the file is unchanged: do not modify it)."""
    return _parse_json(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _parse_json(path: str, mtime_ns: int):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno}: {error.msg}") from None


# ---------------------------------------------------------------------------- anchors
def anchor(name, workload_dir=None, attention=None) -> Tree:
    """One of the `ANCHORS`: the tree of one decode step of the performance targets.

    The ``spec_*`` anchors read ``APPS_tree_size{T}.json`` (`find_workload_file`); their queries
    sit on the token-tree nodes only, none on the root.
    """
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; anchors: {', '.join(ANCHORS)}")
    if name.startswith("spec_t"):
        size = int(name[len("spec_t"):].split("_")[0])
        path = find_workload_file(f"speculative/APPS_tree_size{size}.json", workload_dir)
        parent_index = _path_parents(_read_json(path)["Tree_Structure"], path.name)
        return _token_tree(parent_index, 4000, 0, 1, attention)
    leaves, root_tokens, leaf_tokens = {
        "fewshot_b20_P4000_L200": (20, 4000, 200),
        "fewshot_b50_P4000_L200": (50, 4000, 200),
        "reason_10x500_P1104": (10, 1104, 500),
        "long_P20000_q64_L100": (64, 20000, 100),
    }[name]
    return star(leaves, root_tokens, leaf_tokens, attention)


# ---------------------------------------------------------------------------- synthetic
def random_tree(seed, nodes=64, max_tokens=256, roots=1, max_queries=1, attention=None) -> Tree:
    """A random tree, or a forest of ``roots`` trees.

    Every node after the first ``roots`` picks its parent uniformly among the nodes before it
    (a random recursive tree, depth about log(nodes)); tokens are uniform in 1..max_tokens; each
    leaf gets 1..max_queries queries (at most its tokens), inner nodes none. Node ids are a
    random permutation of 0..nodes-1, so a parent's id is not always smaller than its child's.
    """
    _check_positive(nodes=nodes, max_tokens=max_tokens, roots=roots, max_queries=max_queries)
    if roots > nodes:
        raise ValueError(f"roots ({roots}) must be at most nodes ({nodes})")
    rng = np.random.default_rng(seed)
    parent = np.full(nodes, -1, np.int64)
    parent[roots:] = (rng.random(nodes - roots) * np.arange(roots, nodes)).astype(np.int64)
    tokens = rng.integers(1, max_tokens + 1, nodes)
    leaf = np.bincount(parent[roots:], minlength=nodes) == 0
    queries = np.where(leaf, rng.integers(1, np.minimum(max_queries, tokens) + 1), 0)
    ids = rng.permutation(nodes)
    parents = [None if p < 0 else int(ids[p]) for p in parent]
    return Tree(ids.tolist(), parents, tokens.tolist(), queries.tolist(), attention)


def chain(n=8, tokens=64, attention=None) -> Tree:
    """``n`` nodes in a line (ids 0..n-1, each the parent of the next) of ``tokens`` tokens each,
    one query on the last."""
    _check_positive(n=n, tokens=tokens)
    return Tree(range(n), [None, *range(n - 1)], [tokens] * n, attention=attention)


def star(leaves=20, root_tokens=4000, leaf_tokens=200, attention=None) -> Tree:
    """A root (id 0) of ``root_tokens`` with ``leaves`` children (ids 1..leaves) of
    ``leaf_tokens``, one query on the newest token of each child."""
    _check_positive(leaves=leaves, root_tokens=root_tokens, leaf_tokens=leaf_tokens)
    return Tree(
        range(leaves + 1), [None] + [0] * leaves, [root_tokens] + [leaf_tokens] * leaves,
        attention=attention,
    )


def tot(seed, depth=4, branching=10, prompt_tokens=1000, min_tokens=50, max_tokens=400, keep=1,
        attention=None) -> Tree:
    """A Tree-of-Thoughts search tree: every thought of every level, with all its tokens.

    The root (the prompt) has ``branching`` thoughts; at each of ``depth`` levels, ``keep`` of
    the new thoughts (chosen at random) each branch into ``branching`` more. Thoughts hold
    ``min_tokens..max_tokens`` tokens; one query per leaf. `tot_run` decodes the same tree.
    """
    run = tot_run(seed, depth, branching, prompt_tokens, min_tokens, max_tokens, keep, attention)
    parents = [None if p < 0 else p for p in run.parent_ids.tolist()]
    tokens = run.end - run.start + 1
    return Tree(run.ids.tolist(), parents, tokens.tolist(), attention=attention)


def tot_run(seed, depth=4, branching=10, prompt_tokens=1000, min_tokens=50, max_tokens=400,
            keep=1, attention=None) -> ReasoningRun:
    """The decoding run of `tot` with the same arguments, in the reasoning files' semantics:
    sibling thoughts decode side by side; a kept thought's children start right after it ends;
    a thought that is not kept is pruned when it ends."""
    _check_positive(depth=depth, branching=branching, prompt_tokens=prompt_tokens,
                    min_tokens=min_tokens, keep=keep)
    if max_tokens < min_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least min_tokens ({min_tokens})")
    rng = np.random.default_rng(seed)
    parents, start, end = [-1], [1 - prompt_tokens], [0]
    frontier = [0]
    for _ in range(depth):
        level = []
        for p in frontier:
            for length in rng.integers(min_tokens, max_tokens + 1, branching).tolist():
                level.append(len(parents))
                parents.append(p)
                start.append(end[p] + 1)
                end.append(end[p] + length)
        frontier = sorted(rng.choice(level, min(keep, len(level)), replace=False).tolist())
    return ReasoningRun(
        np.arange(len(parents)), parents, start, end, prompt_tokens,
        name=f"tot_s{seed}_d{depth}_b{branching}_k{keep}_P{prompt_tokens}",
        description=f"synthetic Tree-of-Thoughts: depth {depth}, branching {branching}, keep {keep}",
        attention=attention,
    )


def token_tree(seed, size=64, depth=4, prompt_tokens=4000, attention=None) -> Tree:
    """A random Medusa-like token tree of ``size`` nodes: the verified sequence (id 0,
    ``prompt_tokens``, no query) and ``size - 1`` one-token candidates (ids 1..size-1) at most
    ``depth`` below it, one query each (like the ``spec_*`` anchors)."""
    return _token_tree(_path_parents(token_tree_paths(seed, size, depth), "token_tree"),
                       prompt_tokens, 0, 1, attention)


def token_tree_run(seed, size=64, depth=4, prompt_tokens=4000, steps=100,
                   attention=None) -> SpeculativeRun:
    """Speculative decoding over the token tree of `token_tree` (same seed, size, depth) for
    ``steps`` steps, each accepting 1..depth+1 tokens at random."""
    _check_positive(steps=steps)
    paths = token_tree_paths(seed, size, depth)
    accept = np.random.default_rng(seed).integers(1, depth + 2, steps)
    return SpeculativeRun(
        paths, accept.tolist(), prompt_tokens,
        name=f"token_tree_s{seed}_t{size}_d{depth}_P{prompt_tokens}",
        description=f"synthetic token tree of {size} nodes, depth {depth}",
        attention=attention,
    )


def token_tree_paths(seed, size=64, depth=4) -> list:
    """``size - 1`` candidate paths in the ``Tree_Structure`` form, ordered by length then value.

    Each candidate is added under a node chosen uniformly among those less than ``depth`` deep;
    its last index is its rank among its siblings (Medusa's top-k rank)."""
    _check_positive(size=size, depth=depth)
    if size < 2:
        raise ValueError(f"size must be at least 2 (the root and one candidate), got {size}")
    rng = np.random.default_rng(seed)
    paths, children, open_nodes = [()], [0], [0]
    for _ in range(size - 1):
        p = open_nodes[rng.integers(len(open_nodes))]
        path = paths[p] + (children[p],)
        children[p] += 1
        paths.append(path)
        children.append(0)
        if len(path) < depth:
            open_nodes.append(len(paths) - 1)
    return [list(p) for p in sorted(paths[1:], key=lambda p: (len(p), p))]


# ---------------------------------------------------------------------------- registry
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
    "random": random_tree,
    "chain": chain,
    "star": star,
    "tot": tot,
    "token_tree": token_tree,
}
"""Single-tree builders by kind name."""


# ---------------------------------------------------------------------------- helpers
def _token_tree(parent_index, root_tokens, root_queries, first_id, attention) -> Tree:
    """The verified sequence (id 0) and one-token candidates (ids first_id + k), one query each.

    parent_index : array of int, [candidates]; -1 for a child of the root.
    """
    n = len(parent_index)
    ids = [0, *range(first_id, first_id + n)]
    parents = [None] + np.where(parent_index < 0, 0, parent_index + first_id).tolist()
    return Tree(ids, parents, [root_tokens] + [1] * n, [root_queries] + [1] * n, attention)


def _path_parents(paths, where) -> np.ndarray:
    """Index of each path's parent path in ``paths`` (-1 for the root). [len(paths)]"""
    if not isinstance(paths, list) or not paths:
        raise ValueError(f"{where}: the token tree must be a non-empty list of paths")
    index = {}
    for k, path in enumerate(paths):
        if (not isinstance(path, list) or not path
                or not all(isinstance(x, int) and x >= 0 for x in path)):
            raise ValueError(f"{where}: path #{k} must be a non-empty list of indices, got {path!r}")
        if tuple(path) in index:
            raise ValueError(f"{where}: path {path} appears twice")
        index[tuple(path)] = k
    parents = np.empty(len(paths), np.int64)
    for k, path in enumerate(paths):
        if len(path) > 1 and tuple(path[:-1]) not in index:
            raise ValueError(f"{where}: the parent {path[:-1]} of path {path} is missing")
        parents[k] = index[tuple(path[:-1])] if len(path) > 1 else -1
    return parents


def _check_positive(**values):
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
