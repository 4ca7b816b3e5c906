"""The anchor workloads of the performance targets: six single decode steps.

Four are stars (a shared prompt and its samples); the two ``spec_*`` anchors are a verified
sequence of 4000 tokens under the shipped Medusa token tree of 64 or 256 nodes.
"""

from __future__ import annotations

from deft.tree import Tree
from deft.workloads.runs import candidate_tree
from deft.workloads.synthetic import star
from deft.workloads.traces import find_workload_file, speculative

ANCHORS = (
    "fewshot_b20_P4000_L200",
    "fewshot_b50_P4000_L200",
    "reason_10x500_P1104",
    "spec_t64_P4000",
    "spec_t256_P4000",
    "long_P20000_q64_L100",
)
"""The anchor workloads of the performance targets (one decode step each)."""

STARS = {
    "fewshot_b20_P4000_L200": (20, 4000, 200),
    "fewshot_b50_P4000_L200": (50, 4000, 200),
    "reason_10x500_P1104": (10, 1104, 500),
    "long_P20000_q64_L100": (64, 20000, 100),
}
"""The star anchors: ``(leaves, root_tokens, leaf_tokens)`` of `star`."""


def anchor(name, workload_dir=None, attention=None) -> Tree:
    """One of the `ANCHORS`: the tree of one decode step of the performance targets.

    The ``spec_*`` anchors read ``APPS_tree_size{T}.json`` (`find_workload_file`); their queries
    sit on the token-tree nodes only, none on the root.
    """
    if name not in ANCHORS:
        raise ValueError(f"unknown anchor {name!r}; anchors: {', '.join(ANCHORS)}")
    if name in STARS:
        return star(*STARS[name], attention)
    size = int(name[len("spec_t"):].split("_")[0])
    run = speculative(find_workload_file(f"speculative/APPS_tree_size{size}.json", workload_dir))
    return candidate_tree(run.parent_index, 4000, 0, 1, attention)
