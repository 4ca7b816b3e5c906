"""Synthetic trees and runs, seeded: random trees and forests, chains, stars, Tree-of-Thoughts
search trees and Medusa-like token trees.

Single trees: `random_tree`, `chain`, `star`, `tot`, `token_tree`. Runs of the same kinds as the
recorded ones: `tot_run` (a `ReasoningRun`) and `token_tree_run` (a `SpeculativeRun`).
"""

from __future__ import annotations

import numpy as np

from deft.tree import Tree
from deft.workloads.runs import (
    FewshotRun, ReasoningRun, SpeculativeRun, candidate_tree, check_positive, path_parents,
)


def random_tree(seed, nodes=64, max_tokens=256, roots=1, max_queries=1, attention=None) -> Tree:
    """A random tree, or a forest of ``roots`` trees.

    Every node after the first ``roots`` picks its parent uniformly among the nodes before it
    (a random recursive tree, depth about log(nodes)); tokens are uniform in 1..max_tokens; each
    leaf gets 1..max_queries queries (at most its tokens), inner nodes none. Node ids are a
    random permutation of 0..nodes-1, so a parent's id is not always smaller than its child's.
    """
    check_positive(nodes=nodes, max_tokens=max_tokens, roots=roots, max_queries=max_queries)
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
    check_positive(n=n, tokens=tokens)
    return Tree(range(n), [None, *range(n - 1)], [tokens] * n, attention=attention)


def star(leaves=20, root_tokens=4000, leaf_tokens=200, attention=None) -> Tree:
    """A root (id 0) of ``root_tokens`` with ``leaves`` children (ids 1..leaves) of
    ``leaf_tokens``, one query on the newest token of each child.

    It is the last step of ``fewshot(root_tokens, leaves, leaf_tokens)``.
    """
    check_positive(leaves=leaves, root_tokens=root_tokens, leaf_tokens=leaf_tokens)
    return FewshotRun(root_tokens, leaves, leaf_tokens, attention).tree(-1)


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
    check_positive(depth=depth, branching=branching, prompt_tokens=prompt_tokens,
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
    return candidate_tree(path_parents(token_tree_paths(seed, size, depth), "token_tree"),
                       prompt_tokens, 0, 1, attention)


def token_tree_run(seed, size=64, depth=4, prompt_tokens=4000, steps=100,
                   attention=None) -> SpeculativeRun:
    """Speculative decoding over the token tree of `token_tree` (same seed, size, depth) for
    ``steps`` steps, each accepting 1..depth+1 tokens at random."""
    check_positive(steps=steps)
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
    check_positive(size=size, depth=depth)
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
