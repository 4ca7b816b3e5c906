"""`deft.attention`: tree attention of every strategy in the test layout (dense K and V by
node), the kernels' counterpart of `reference.attention`."""

from __future__ import annotations

from deft.kernels import KERNELS
from deft.plan import build_plan
from deft.plan_buffers import paged_cache
from deft.tree import Tree
from deft.kernels.tree_attention_op import check_runnable
from deft.tree_attention import TreeAttention


def attention(strategy, tree: Tree, q, k, v, *, chunk_size=None, group_size=None, page_size=1,
              sm_scale=None):
    """Tree attention of every strategy in the test layout (`reference.attention`'s signature).

    Kernel strategies copy K and V into a paged cache (each node on fresh pages), plan and run;
    flash_attention, tree_attention_m and vanilla_tree run their PyTorch reference (on the host,
    the result copied back to q's device).

    Parameters
    ----------
    strategy : str
        One of `reference.STRATEGIES`.
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
    if strategy not in KERNELS:  # the reference computes on the host: run it there
        import reference

        out, _ = reference.attention(strategy, tree, q.cpu(), k.cpu(), v.cpu(),
                                     chunk_size=chunk_size, group_size=group_size,
                                     page_size=page_size, sm_scale=sm_scale)
        return out.to(device=q.device, dtype=q.dtype)
    check_runnable(q.device, q.dtype)
    k_cache, v_cache, table = paged_cache(tree, k, v, page_size)
    plan = build_plan(strategy, tree, chunk_size, group_size, page_size)
    attn = TreeAttention.for_plan(plan, device=q.device)
    return attn.run(q, k_cache, v_cache, attn.plan(tree, table, plan), sm_scale=sm_scale)
