"""Triton kernels of the GPU strategies, one module per strategy name.

Every strategy runs the same two kernels: `partials._partials_kernel` (the partial results of
its partitions, one program per (partition, kv_head) work item) and a merge of `reduction` (the
deterministic log-sum-exp merge per query: `_merge_kernel`, one program per (query, head), or
`_merge_query_kernel`, one per query, as `reduction.per_query_merge` picks per plan).
`launch.Launcher` relaunches both with little host time. A strategy module says how its
partitions address tokens (``FLAT``) and which tiles suit it (``config``). `radix` runs the
`flash_decoding` kernel through the real page table.
"""

from deft.kernels import (
    deft_flatten,
    deft_node,
    deft_node_chunk,
    flash_decoding,
    tree_attention_s,
)

KERNELS = {
    "flash_decoding": flash_decoding,
    "radix": flash_decoding,
    "tree_attention_s": tree_attention_s,
    "deft_node": deft_node,
    "deft_node_chunk": deft_node_chunk,
    "deft_flatten": deft_flatten,
}
"""The kernel module of every strategy that runs in Triton."""
