"""Pure-PyTorch reference implementations of every Table 1 strategy, and the oracle.

Each strategy is a module named as the strategy, with ``plan(tree, chunk_size=None,
group_size=None, page_size=1) -> Plan`` (its partitions) and ``attention(tree, q, k, v, plan,
sm_scale=None) -> (out, traffic)`` (every partition's partial result, reduced as its kernel
would, with the bytes it moves counted). `attention` below runs one by name; `oracle_attention`
is the dense float64 ground truth and `rel_err` the error measure (docs/design.md, "Numerics").
"""

from __future__ import annotations

import torch

from reference import (
    deft_flatten,
    deft_node,
    deft_node_chunk,
    flash_attention,
    flash_decoding,
    radix,
    tree_attention_m,
    tree_attention_s,
    vanilla_tree,
)
from reference.oracle import oracle_attention, rel_err
from deft.plan import Plan, build_plan
from deft.strategies import STRATEGIES

MODULES = {
    module.NAME: module
    for module in (
        flash_attention,
        flash_decoding,
        radix,
        tree_attention_s,
        tree_attention_m,
        vanilla_tree,
        deft_node,
        deft_node_chunk,
        deft_flatten,
    )
}
"""The strategy module of each name in STRATEGIES."""

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention(
    strategy: str,
    tree,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    chunk_size=None,
    group_size=None,
    page_size=1,
    sm_scale=None,
):
    """Tree attention by one Table 1 strategy, with the traffic its kernel would move.

    Parameters
    ----------
    strategy : str
        One of `STRATEGIES`.
    tree : deft.tree.Tree
    q : [queries, q_heads, head_dim]
        Queries in the test layout (by node id, then position).
    k, v : [tokens, kv_heads, head_dim]
        KV tokens in the test layout (by node id, then position); same dtype as q.
    chunk_size, group_size : int, optional
        None means the strategy's default; a parameter the strategy does not take raises
        ValueError (docs/design.md, "Partitions").
    page_size : int
        Tokens per page of the paged strategies (radix, deft_*).
    sm_scale : float, optional
        Default 1 / sqrt(head_dim).

    Returns
    -------
    out : [queries, q_heads, head_dim]
        float64 for float64 inputs, float32 for float16, bfloat16 and float32 inputs.
    traffic : dict
        Integer ``kv_bytes, q_bytes, mask_bytes, partial_bytes, score_bytes, output_bytes,
        index_bytes, partitions, max_partition_work`` and float ``mean_partition_work``,
        counted as the partitions touch the tensors, with the element size of
        ``tree.attention.dtype`` (docs/design.md, "Bytes").
    """
    if strategy not in MODULES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    _check_inputs(tree, q, k, v)
    module = MODULES[strategy]
    plan = module.plan(tree, chunk_size=chunk_size, group_size=group_size, page_size=page_size)
    return module.attention(tree, q, k, v, plan, sm_scale)


def output(strategy: str, tree, q, k, v, **options) -> torch.Tensor:
    """`attention`'s output computed on the host, returned on q's device in q's dtype: the
    stand-in for a kernel where a strategy has none (flash_attention, tree_attention_m,
    vanilla_tree), as the bench and the GPU checks use it. `options` as for `attention`."""
    out, _ = attention(strategy, tree, q.cpu(), k.cpu(), v.cpu(), **options)
    return out.to(device=q.device, dtype=q.dtype)


def _check_inputs(tree, q, k, v):
    """Raise ValueError naming the first input whose shape or dtype does not fit the tree."""
    shape = tree.attention
    expected = {
        "q": (tree.num_queries, shape.q_heads, shape.head_dim),
        "k": (tree.num_tokens, shape.kv_heads, shape.head_dim),
        "v": (tree.num_tokens, shape.kv_heads, shape.head_dim),
    }
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}; the tree needs {expected[name]} "
                "(queries or tokens, heads, head_dim)"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} has dtype {tensor.dtype}; expected one of {FLOAT_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


__all__ = [
    "MODULES",
    "STRATEGIES",
    "Plan",
    "attention",
    "build_plan",
    "oracle_attention",
    "output",
    "rel_err",
]
