"""`deft.attention`: tree attention of a kernel strategy in the test layout (dense K and V by
node), the kernels' counterpart of `reference.attention`."""

from __future__ import annotations

from deft.kernels import KERNELS
from deft.plan import build_plan
from deft.plan_buffers import paged_cache
from deft.strategies import strategy as strategy_record
from deft.tree import Tree
from deft.kernels.tree_attention_op import check_runnable
from deft.tree_attention import TreeAttention


def attention(strategy, tree: Tree, q, k, v, *, chunk_size=None, group_size=None, page_size=1,
              sm_scale=None):
    """Tree attention of a kernel strategy in the test layout (`reference.attention`'s signature).

    K and V are copied into a paged cache (each node on fresh pages), then planned and run.
    flash_attention, tree_attention_m and vanilla_tree have no kernel: they are refused with a
    ValueError naming their PyTorch reference (`reference.output` gives its output on q's
    device; the core does not import the reference).

    Parameters
    ----------
    strategy : str
        One of `deft.strategies.KERNEL_STRATEGIES`.
    tree : Tree
    q : [queries, q_heads, head_dim]
        Queries by node index, then position.
    k, v : [tokens, kv_heads, head_dim]
        KV tokens by node index, then position.
    chunk_size, group_size : int, optional
        As for `deft.plan.build_plan`.
    page_size : int
    sm_scale : float, optional
        Default 1 / sqrt(head_dim).

    Returns
    -------
    out : [queries, q_heads, head_dim] in q's dtype
    """
    if strategy not in KERNELS:
        strategy_record(strategy)  # an unknown name: ValueError listing the strategies
        raise ValueError(f"{strategy} has no kernel: run its PyTorch reference with "
                         f"reference.attention (or reference.output for the output alone)")
    check_runnable(q.device, q.dtype)
    k_cache, v_cache, table = paged_cache(tree, k, v, page_size)
    plan = build_plan(strategy, tree, chunk_size, group_size, page_size)
    attn = TreeAttention.for_plan(plan, device=q.device)
    return attn.run(q, k_cache, v_cache, attn.plan(tree, table, plan), sm_scale=sm_scale)
