"""Traffic of one attention call per strategy, predicted from a plan's per-partition aggregates.

The rules are docs/design.md's "Bytes" (normative, shared with `reference.attention`, which counts
the same keys while it computes). With e the element size of the tree's dtype, H_q, H_kv, d its
heads and head dim, and t(p), q(p), pages(p), work(p) the tokens, queries, pages and visible
(query, token) pairs of partition p:

- ``kv_bytes``      = sum_p t(p) * 2 * H_kv * d * e
- ``q_bytes``       = sum_p q(p) * H_q * d * e
- ``output_bytes``  = queries * H_q * d * e
- ``partial_bytes`` = 2 * sum_p q(p) * H_q * (d + 1) * 4   (strategies with a reduction)
- ``score_bytes``   = 4 * sum_p q(p) * t(p) * H_q * e      (tree_attention_m, vanilla_tree)
- ``mask_bytes``    = sum_p t(p) * ceil(q(p) / 64) * 8      (bit: tree_attention_s, deft_flatten)
                    = sum_p q(p) * t(p)                     (dense: tree_attention_m, vanilla_tree)
- ``index_bytes``   = sum_p pages(p) * H_kv * 4             (paged: radix and the DeFT strategies)
- ``partitions``, ``max_partition_work``, ``mean_partition_work``.

Only the plan's aggregates are read (vectorised numpy); no K, V or Q is touched. A plan is a
`deft.plan.Plan` or its `deft.plan_aggregates.PlanAggregates`, whose rows are classes of
``count`` equal partitions: every sum below is weighted by it.
"""

from __future__ import annotations

import numpy as np

from deft.tree import Tree
from deft.plan import BYTE_KEYS, Plan
from deft.plan_aggregates import PlanAggregates, plan_aggregates
from deft.strategies import MATERIALISED_SCORES, PAGED

TRAFFIC_KEYS = BYTE_KEYS + ("partitions", "max_partition_work", "mean_partition_work")
"""Every key `reference.attention` counts; all integers but ``mean_partition_work`` (float)."""

BIT_MASK_WORD = 64
"""Queries covered by one 8-byte word of a bit mask."""

PARTIAL_ELEMENT_BYTES = 4
"""Partial rows and log-sum-exp are fp32."""


def partition_bytes(plan: Plan | PlanAggregates) -> dict[str, np.ndarray]:
    """Bytes of every per-partition traffic key (all but ``output_bytes``), each int64 [P].

    Parameters
    ----------
    plan : deft.plan.Plan or deft.plan_aggregates.PlanAggregates
        The partitions (or partition classes: one row each) of one strategy over one tree.

    Returns
    -------
    dict
        ``kv_bytes``, ``q_bytes``, ``mask_bytes``, ``partial_bytes``, ``score_bytes`` and
        ``index_bytes`` of each partition (zeros where the strategy has none of that traffic).
    """
    shape = plan.tree.attention
    e, h_q, h_kv, d = shape.element_bytes, shape.q_heads, shape.kv_heads, shape.head_dim
    t, q = plan.tokens, plan.queries
    zero = np.zeros_like(t)
    if plan.mask == "bit":
        mask = t * -(-q // BIT_MASK_WORD) * 8
    elif plan.mask == "dense":
        mask = q * t
    else:
        mask = zero
    return {
        "kv_bytes": t * (2 * h_kv * d * e),
        "q_bytes": q * (h_q * d * e),
        "mask_bytes": mask,
        "partial_bytes": (
            q * (2 * h_q * (d + 1) * PARTIAL_ELEMENT_BYTES) if plan.has_reduction else zero
        ),
        "score_bytes": q * t * (4 * h_q * e) if plan.strategy in MATERIALISED_SCORES else zero,
        "index_bytes": plan.pages * (h_kv * 4) if plan.strategy in PAGED else zero,
    }


def output_bytes(tree: Tree) -> int:
    """Bytes of the attention output: every query's row of every query head, written once."""
    shape = tree.attention
    return tree.num_queries * shape.q_heads * shape.head_dim * shape.element_bytes


def traffic_of_plan(plan: Plan | PlanAggregates) -> dict:
    """Every traffic key of `plan` (docs/design.md's rules), as plain Python numbers.

    Returns
    -------
    dict
        The `TRAFFIC_KEYS`: byte counts, ``partitions`` and ``max_partition_work`` as int,
        ``mean_partition_work`` as float.
    """
    per_partition = partition_bytes(plan)
    count = plan.count
    traffic = {key: int(per_partition[key] @ count) for key in per_partition}
    traffic["output_bytes"] = output_bytes(plan.tree)
    work = plan.work
    traffic["partitions"] = plan.num_partitions
    traffic["max_partition_work"] = int(work.max())
    traffic["mean_partition_work"] = float(int(work @ count) / plan.num_partitions)
    return {key: traffic[key] for key in TRAFFIC_KEYS}


def predict_traffic(
    strategy: str, tree: Tree, chunk_size=None, group_size=None, page_size=1
) -> dict:
    """Traffic of one attention call of `strategy` over `tree` (see `traffic_of_plan`).

    Raises ValueError, like `deft.plan.build_plan`, for a size the strategy refuses, and for a
    tree too large to aggregate (`deft.plan_aggregates`).
    """
    return traffic_of_plan(plan_aggregates(strategy, tree, chunk_size, group_size, page_size))


def total_bytes(traffic: dict) -> int:
    """All HBM bytes of one call: the sum of the byte keys."""
    return sum(traffic[key] for key in BYTE_KEYS)
