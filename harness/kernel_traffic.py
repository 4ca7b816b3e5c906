"""Bytes of a plan: the paper's strategy accounting, and what this project's kernels read.

`plan_traffic` is the IO model's accounting of a strategy (`iomodel.traffic`, the keys of
`deft.plan.BYTE_KEYS`): the paper's Table 1 view, where DeFT-Flatten and Tree-Attention-S read
a bit mask and the paged strategies a page table. This project's kernels
(`deft.kernels.partials`) read neither: every program, one (partition, KV head) pair, loads one
int32 cache slot per token instead of page-table entries, and the flattened-tree kernels
decide visibility by the Euler-interval test on one int32 per token (``subtree_end``) and one
per query (``query_flat``) instead of a mask. `kernel_traffic` counts those reads:

- ``kv_bytes``, ``q_bytes``, ``partial_bytes``, ``score_bytes``, ``output_bytes``: as the IO
  model's (the kernels move the same K, V, Q, partials and output);
- ``mask_bytes`` = ``index_bytes`` = 0;
- ``addressing_bytes`` = sum_p H_kv * 4 * (t(p) + [flat] (t(p) + q(p))): the slots, and for the
  flattened kernels the subtree ends and query positions, each program reads.
"""

from __future__ import annotations

from deft.plan import BYTE_KEYS, Plan
from deft.strategies import LISTS_SLOTS
from iomodel.traffic import output_bytes, partition_bytes

KERNEL_BYTE_KEYS = BYTE_KEYS + ("addressing_bytes",)
"""The keys of `kernel_traffic`."""

INDEX_BYTES = 4
"""Slots, subtree ends and query positions are int32."""


def plan_traffic(plan: Plan) -> dict:
    """The IO model's bytes of a `deft.plan.Plan` (docs/iomodel.md), by `BYTE_KEYS`.

    `iomodel.traffic_of_plan` without the load-balance statistics (which walk every visible
    pair and would dominate a replay's host time).
    """
    traffic = {key: int(value.sum()) for key, value in partition_bytes(plan).items()}
    traffic["output_bytes"] = output_bytes(plan.tree)
    return {key: traffic[key] for key in BYTE_KEYS}


def kernel_traffic(plan: Plan) -> dict:
    """The bytes this project's kernels read and write for `plan` (module docstring), by
    `KERNEL_BYTE_KEYS`."""
    traffic = plan_traffic(plan)
    traffic["mask_bytes"] = traffic["index_bytes"] = 0
    per_program = plan.tokens if plan.strategy in LISTS_SLOTS else 2 * plan.tokens + plan.queries
    traffic["addressing_bytes"] = int(per_program.sum()) * plan.tree.attention.kv_heads * INDEX_BYTES
    return traffic
