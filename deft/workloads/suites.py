"""The off-anchor suite: single decode steps beside the six anchors, to judge how a choice
generalises.

Five families, each one attention call at the tree's shape: serving batches of independent
trees (a forest: several requests, each a prompt with a few samples), a token tree over a
12k-token prompt (with and without a query on the prompt), balanced multi-level trees,
Tree-of-Thoughts steps of the shipped reasoning traces, and a 256-leaf star.

`HELD_OUT` names the workloads that tuning must never see (`autotune` tunes on `TUNABLE` at
most), so that bench numbers on them say how the tuned choice carries over to trees it was not
fitted on. `off_anchor(name)` builds any of `OFF_ANCHOR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from deft.tree import Tree
from deft.workloads.runs import candidate_tree, check_positive, path_parents
from deft.workloads.synthetic import star, token_tree, token_tree_paths
from deft.workloads.traces import reasoning


def serving_batch(seed=0, requests=8, samples=4, min_prompt=1000, max_prompt=2000,
                  min_sample=100, max_sample=300, attention=None) -> Tree:
    """A forest of ``requests`` independent trees: each a prompt of ``min_prompt..max_prompt``
    tokens with ``samples`` children of ``min_sample..max_sample`` tokens (uniform, seeded),
    one query on the newest token of each child, none on the prompts.

    Request ``r``'s prompt is node ``r * (samples + 1)``, its samples the ids after it.
    """
    check_positive(requests=requests, samples=samples, min_prompt=min_prompt,
                   min_sample=min_sample)
    if max_prompt < min_prompt or max_sample < min_sample:
        raise ValueError("max_prompt and max_sample must be at least their minimums")
    rng = np.random.default_rng(seed)
    ids, parents, tokens, queries = [], [], [], []
    for r in range(requests):
        root = r * (samples + 1)
        ids.append(root)
        parents.append(None)
        tokens.append(int(rng.integers(min_prompt, max_prompt + 1)))
        queries.append(0)
        for s in range(samples):
            ids.append(root + 1 + s)
            parents.append(root)
            tokens.append(int(rng.integers(min_sample, max_sample + 1)))
            queries.append(1)
    return Tree(ids, parents, tokens, queries, attention)


def balanced(levels=3, branching=4, node_tokens=500, attention=None) -> Tree:
    """A balanced tree of ``levels`` levels (the root is level 1), every inner node with
    ``branching`` children, every node ``node_tokens`` tokens, one query per leaf.

    Ids are breadth-first: the root is 0, the children of node ``i`` are
    ``i * branching + 1 ..``.
    """
    check_positive(levels=levels, branching=branching, node_tokens=node_tokens)
    nodes = sum(branching**level for level in range(levels))
    leaves = branching ** (levels - 1)
    parents = [None] + [(i - 1) // branching for i in range(1, nodes)]
    queries = [0] * (nodes - leaves) + [1] * leaves
    return Tree(range(nodes), parents, [node_tokens] * nodes, queries, attention)


def prompt_token_tree(seed=0, size=97, depth=4, prompt_tokens=12000, attention=None) -> Tree:
    """`token_tree` with one more query, on the prompt's newest token (the verified token
    itself is scored too): ``size`` queries in all."""
    parents = path_parents(token_tree_paths(seed, size, depth), "prompt_token_tree")
    return candidate_tree(parents, prompt_tokens, 1, 1, attention)


def reasoning_step(name: str, step: int, attention=None) -> Tree:
    """The tree of step ``step`` of the shipped reasoning trace ``name`` (its first complete
    tree): `deft.workloads.reasoning` (name, attention=...).tree(step)."""
    return reasoning(name, attention=attention).tree(step)


@dataclass(frozen=True)
class SuiteWorkload:
    """One workload of the off-anchor suite.

    Attributes
    ----------
    name : str
    description : str
    build : callable
        ``build(attention) -> Tree``.
    held_out : bool
        Never used by tuning (`HELD_OUT`).
    """

    name: str
    description: str
    build: Callable[..., Tree]
    held_out: bool


def _tot(trace: str, step: int, held_out: bool) -> SuiteWorkload:
    return SuiteWorkload(
        f"tot_{trace.removesuffix('ToT')}_s{step}",
        f"{trace} (first complete tree), step {step}",
        lambda attention: reasoning_step(trace, step, attention), held_out)


SUITE = (
    SuiteWorkload("serving_r8_s4", "8 requests, prompts 1000-2000, 4 samples of 100-300",
                  lambda a: serving_batch(0, 8, 4, 1000, 2000, 100, 300, a), False),
    SuiteWorkload("serving_r16_s2", "16 requests, prompts 500-1500, 2 samples of 50-400",
                  lambda a: serving_batch(1, 16, 2, 500, 1500, 50, 400, a), True),
    SuiteWorkload("tokentree_P12000_t96", "12000-token prompt, 96 candidates (depth 4), "
                  "no query on the prompt", lambda a: token_tree(0, 97, 4, 12000, a), False),
    SuiteWorkload("tokentree_P12000_t96_rootq", "the same with a query on the prompt",
                  lambda a: prompt_token_tree(0, 97, 4, 12000, a), True),
    SuiteWorkload("balanced_l3_b4_n500", "3 levels, branching 4, 500 tokens a node (16 leaves)",
                  lambda a: balanced(3, 4, 500, a), False),
    SuiteWorkload("balanced_l4_b4_n500", "4 levels, branching 4, 500 tokens a node (64 leaves)",
                  lambda a: balanced(4, 4, 500, a), True),
    _tot("keywordToT", 141, False),
    _tot("keywordToT", 282, False),
    _tot("keywordToT", 423, False),
    _tot("set128ToT", 90, True),
    _tot("set128ToT", 272, True),
    _tot("sorting128ToT", 927, True),
    _tot("sorting128ToT", 1854, True),
    SuiteWorkload("star_b256_P4000_L100", "a 4000-token root, 256 leaves of 100",
                  lambda a: star(256, 4000, 100, a), False),
)
"""Every workload of the suite, in the bench's order."""

OFF_ANCHOR = tuple(w.name for w in SUITE)
"""The names of the suite (``--workloads offanchor``)."""

HELD_OUT = tuple(w.name for w in SUITE if w.held_out)
"""Names that tuning never uses (``--workloads heldout``)."""

TUNABLE = tuple(w.name for w in SUITE if not w.held_out)
"""Names that tuning may use (``--workloads tunable``)."""


def off_anchor(name, attention=None) -> Tree:
    """One workload of the off-anchor suite (`OFF_ANCHOR`) at ``attention`` (default
    Llama-3-8B's 32/8/128)."""
    by_name = {w.name: w for w in SUITE}
    if name not in by_name:
        raise ValueError(f"unknown off-anchor workload {name!r}; suite: {', '.join(OFF_ANCHOR)}")
    return by_name[name].build(attention)
