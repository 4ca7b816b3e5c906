"""Decoding runs: a sequence of decode steps, one tree per step, and what changed between steps.

``run.tree(i)`` is the decoding tree of step ``i`` (the KV cache held at that step and the
queries it decodes) and ``run.events(i)`` what changed since step ``i - 1``: nodes added (a
branch), nodes pruned, tokens grown. Node ids stay stable across steps, so a paged cache can
follow a run by id (`deft.cache.TreeCache.apply`).

- `FewshotRun` (`fewshot`): a prompt branching into ``width`` samples decoded side by side.
- `ReasoningRun`: a Tree-of-Thoughts run (`deft.workloads.traces.reasoning` reads the recorded
  ones, `deft.workloads.synthetic.tot_run` makes seeded ones).
- `SpeculativeRun`: token-tree verification over a growing sequence
  (`deft.workloads.traces.speculative`, `deft.workloads.synthetic.token_tree_run`).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from deft.tree import AttentionShape, Tree

DEFAULT_ATTENTION = AttentionShape()
"""The attention shape of the steps' trees of a run given none (built once, shared)."""


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

    def _step_tree(self, node_ids, parent, tokens, queries) -> Tree:
        """`Tree.trusted` with the run's attention shape (``attention``, else the default)."""
        attention = self.attention if self.attention is not None else DEFAULT_ATTENTION
        return Tree.trusted(node_ids, parent, tokens, queries, attention)

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
        check_positive(prompt_tokens=prompt_tokens, width=width, iterations=iterations)
        self.prompt_tokens, self.width, self.iterations = prompt_tokens, width, iterations
        self.attention = attention
        self._ids = np.arange(width + 1)
        self._parent = np.concatenate([[-1], np.zeros(width, np.int64)])
        self._queries = np.concatenate([[0], np.ones(width, np.int64)])
        self.name = f"fewshot_b{width}_P{prompt_tokens}_L{iterations}"
        self.description = (
            f"prompt of {prompt_tokens} tokens, {width} samples decoded for {iterations} steps"
        )

    def __len__(self):
        return self.iterations

    def _tree(self, i):
        tokens = np.full(self.width + 1, i + 1, np.int64)
        tokens[0] = self.prompt_tokens
        return self._step_tree(self._ids, self._parent, tokens, self._queries)


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
        check_positive(prompt_tokens=prompt_tokens)
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
        by_id = np.argsort(ids)  # a step's tree holds its nodes by ascending id
        rank = np.empty_like(by_id)
        rank[by_id] = np.arange(len(ids))
        self._by_id = by_id
        self._parent_rank = np.where(parent_index[by_id] < 0, -1, rank[parent_index[by_id]])
        self.prompt_tokens = prompt_tokens
        self.attention = attention
        self.name, self.description = name, description
        self._steps = int(last.max())
        # The nodes present and the generating ones change only at these iterations: the
        # steps between two of them share one segment's arrays (`_segment`).
        self._changes = np.unique(np.concatenate([start, end + 1, last + 1])).tolist()
        self._last_segment = (None, None)

    def __len__(self):
        return self._steps

    def _tree(self, i):
        t = i + 1
        ids, parent, first, length, queries = self._segment(bisect_right(self._changes, t))
        tokens = np.minimum(t - first, length)  # first: the node's start less one
        return self._step_tree(ids, parent, tokens, queries)

    def _segment(self, k: int) -> tuple:
        """(ids, parent index, start - 1, most tokens, queries: int64 [nodes], read-only) of the
        tree at the iterations between change ``k - 1`` and change ``k``, kept for the next."""
        if self._last_segment[0] == k:
            return self._last_segment[1]
        t = self._changes[k - 1]
        nodes = self._by_id
        present = (self.start[nodes] <= t) & (t <= self.last[nodes])
        nodes = nodes[present]
        first, end = self.start[nodes] - 1, self.end[nodes]
        index = np.cumsum(present) - 1  # a present node's index in the step's tree
        parent = self._parent_rank[present]
        parent = np.where(parent < 0, -1, index[np.maximum(parent, 0)])
        arrays = (self.ids[nodes], parent, first, end - first, (t <= end).astype(np.int64))
        for array in arrays:
            array.flags.writeable = False
        self._last_segment = (k, arrays)
        return arrays


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
        check_positive(prompt_tokens=prompt_tokens)
        self.parent_index = path_parents(paths, name)
        accept = np.asarray(accept_lengths, np.int64)
        if accept.ndim != 1 or not len(accept) or (accept < 1).any():
            raise ValueError(f"{name}: accept lengths must be a non-empty list of integers >= 1")
        self.root_tokens = prompt_tokens + np.concatenate([[0], np.cumsum(accept)[:-1]])
        self._parent = candidate_parents(self.parent_index)
        self._queries = np.ones(len(self._parent), np.int64)
        self._queries.flags.writeable = False
        self.prompt_tokens = prompt_tokens
        self.attention = attention
        self.name, self.description = name, description

    def __len__(self):
        return len(self.root_tokens)

    def _tree(self, i):
        n = len(self.parent_index)
        ids = np.arange(1 + i * n - 1, 1 + (i + 1) * n)
        ids[0] = 0
        tokens = np.ones(n + 1, np.int64)
        tokens[0] = self.root_tokens[i]
        return self._step_tree(ids, self._parent, tokens, self._queries)


def fewshot(prompt_tokens=4000, width=20, iterations=400, attention=None) -> FewshotRun:
    """Few-shot sampling: a prompt of ``prompt_tokens`` branching into ``width`` samples, each
    decoded for ``iterations`` steps (one query per sample per step)."""
    return FewshotRun(prompt_tokens, width, iterations, attention)


# ---------------------------------------------------------------------------- shared helpers
def candidate_tree(parent_index, root_tokens, root_queries, first_id, attention) -> Tree:
    """The tree of one token-tree step: the verified sequence (id 0, ``root_tokens``,
    ``root_queries``) and one-token candidates (ids ``first_id + k``), one query each.

    parent_index : array of int, [candidates]; the parent candidate's index, -1 for the root.
    """
    n = len(parent_index)
    ids = [0, *range(first_id, first_id + n)]
    parents = [None] + np.where(parent_index < 0, 0, parent_index + first_id).tolist()
    return Tree(ids, parents, [root_tokens] + [1] * n, [root_queries] + [1] * n, attention)


def candidate_parents(parent_index) -> np.ndarray:
    """Parent node indices of `candidate_tree`'s tree (the root first, ids ascending).
    int64 [candidates + 1]"""
    return np.concatenate([[-1], np.where(parent_index < 0, 0, parent_index + 1)])


def path_parents(paths, where) -> np.ndarray:
    """Index of each path's parent path in ``paths`` (-1 for the root). [len(paths)]

    ``paths`` is a token tree in the ``Tree_Structure`` form (a list of index paths); ``where``
    names it in the errors.
    """
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


def check_positive(**values):
    """Raise ValueError naming the first value that is not a positive integer (bools are not)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")

