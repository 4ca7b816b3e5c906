"""The two kernels of one `TreeAttention.run` (partials, then merge), the custom op
``torch.ops.deft.tree_attention`` that wraps them for torch.compile, and the check that a device
can run them.

The op's implementation is what a compiled graph calls on every step, so it takes `run`'s
graph path (`deft.bound_run`): its argument sets are kept in `OP_RUNS` (plan-buffer views and
tile resolved once), captured as a CUDA graph on their second call on a GPU and replayed from
then on; plain launches on the CPU and inside someone else's capture (e.g. the CUDA graph that
``torch.compile(mode="reduce-overhead")`` records around it). Its fake implementation allocates
nothing and returns None: the op only writes its mutated arguments.

Importing this module registers the op; `deft.tree_attention` imports it.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

from deft.bound_run import OpRun, RunCache, check_plan_fits, op_argument_key
from deft.kernels import deft_flatten_sm90
from deft.kernels.partials import TileConfig, _partials_kernel, partials
from deft.kernels.reduction import merge
from deft.plan_buffers import views_of

INTERPRETED = not hasattr(_partials_kernel, "params")
"""Whether the kernels loaded under the Triton interpreter (TRITON_INTERPRET=1)."""

OP_RUNS = RunCache(64)
"""The custom op's argument sets and their graphs (least recently used dropped first)."""

OWNERS = weakref.WeakValueDictionary()
"""Handle -> `TreeAttention` (`register_owner`): what an op call traced by torch.compile names
instead of its plan, so that the op reads the plan when it runs, not when it is traced."""
_HANDLES = itertools.count(1)


def register_owner(attention) -> int:
    """A handle (> 0, never reused) under which the op finds `attention` at run time."""
    handle = next(_HANDLES)
    OWNERS[handle] = attention
    return handle


def check_runnable(device: torch.device, dtype: str | torch.dtype | None = None) -> None:
    """Refuse, saying what to do, a device or dtype the kernels cannot run (ValueError).

    Checked where a kernel would first run: `deft.attention`, and `TreeAttention.run` once per
    argument set (planning on the CPU needs no kernel)."""
    if device.type == "cpu" and not INTERPRETED:
        raise ValueError("the Triton kernels need a GPU: set TRITON_INTERPRET=1 before importing "
                         "deft to run them on the CPU")
    if device.type == "cpu" and dtype in ("bfloat16", torch.bfloat16):
        raise ValueError("bf16 kernels need a GPU; under the interpreter use float16 or float32")

def launch_tree_attention(q, k_cache, v_cache, buffers, o_part, lse_part, out, lse, flat,
                          sm_scale, config, num_programs, per_query_merge,
                          gluon=False, small_grid=False) -> None:
    """Partial results (the Hopper Gluon kernel where ``gluon``, its small-grid form where
    ``small_grid``: `deft.tree_plan.TreePlan.small_grid`), then the merge."""
    other_device = q.is_cuda and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if other_device else contextlib.nullcontext():
        if gluon:
            deft_flatten_sm90.partials(
                q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat, sm_scale=sm_scale,
                config=config, num_programs=num_programs, small_grid=small_grid)
        else:
            partials(q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat,
                     sm_scale=sm_scale, config=config, num_programs=num_programs)
        merge(o_part, lse_part, buffers, out, lse, per_query=per_query_merge,
              dependent_launch=gluon)


OP_SIGNATURE = (
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor plan_data, "
    "int[] plan_layout, Tensor(a!) o_part, Tensor(b!) lse_part, Tensor(c!) out, "
    "Tensor(d!)? lse, bool flat, float sm_scale, int[] tile, int num_programs, "
    "bool per_query_merge, bool gluon=False, bool small_grid=False, int owner=0) -> ()")
"""The op's schema after its name (``scripts/host_overhead.py`` times a no-op op of it)."""

_LIBRARY = torch.library.Library("deft", "DEF")
_LIBRARY.define("tree_attention" + OP_SIGNATURE)


def tree_attention_op(q, k_cache, v_cache, plan_data, plan_layout, o_part, lse_part, out, lse,
                      flat, sm_scale, tile, num_programs, per_query_merge, gluon=False,
                      small_grid=False, owner=0) -> None:
    """``torch.ops.deft.tree_attention``: the two kernels of one `TreeAttention.run`, as an
    opaque op for torch.compile; a replayed CUDA graph from an argument set's second call.

    Registered through `torch.library.Library` with one kernel for every backend, so a call
    crosses into Python once (``torch.library.custom_op`` adds Python autograd and
    in-place-or-view kernels: about 100 us a call on a 2-core CPU, against 5 us). Those 5 us are
    the dispatcher converting this schema's fifteen arguments, its two int lists about 2 us of
    them (a no-op op of the same schema costs the same: ``no_op_host_us`` in
    ``scripts/host_overhead.py``); the body then costs the key and one comparison.

    Parameters
    ----------
    q : [rows, q_heads, head_dim]
    k_cache, v_cache : [num_pages, page_size, kv_heads, head_dim]
    plan_data : int32 [n], plan_layout : list[int]
        The plan buffers' allocation and field offsets (`deft.plan_buffers.PlanBuffers`).
    o_part : fp32 [max_entries, q_heads, head_dim], lse_part : fp32 [max_entries, q_heads]
        The partial-result workspace (written).
    out : [rows, q_heads, head_dim] (written), lse : fp32 [rows, q_heads] or None (written)
    flat, sm_scale, tile, num_programs, per_query_merge, gluon, small_grid :
        As for `launch_tree_attention` (``tile``: `TileConfig.as_ints`).
    owner : int
        0, or the `register_owner` handle of the `TreeAttention` whose buffers these are: then
        its latest plan is checked against ``q`` and the caches (`check_plan_fits`) and gives
        ``per_query_merge`` and ``small_grid`` (what `TreeAttention.run` passes under
        torch.compile, so that a new plan changes nothing dynamo guards on).
    """
    if owner:
        attention = OWNERS.get(owner)
        if attention is None or attention.latest_plan is None:
            raise ValueError("torch.ops.deft.tree_attention: its TreeAttention is gone or has "
                             "not planned yet")
        plan = attention.latest_plan
        check_plan_fits(q, k_cache, plan, attention.max_queries)
        per_query_merge, small_grid = plan.per_query_merge, plan.small_grid
    key = op_argument_key(q, k_cache, v_cache, plan_data, plan_layout, o_part, lse_part, out,
                          lse, flat, sm_scale, tile, num_programs, per_query_merge, gluon,
                          small_grid)
    bound = OP_RUNS.get(key)
    if bound is None:
        bound = OpRun(views_of(plan_data, plan_layout), TileConfig.from_ints(tile))
        OP_RUNS.put(key, bound)
    if bound.replay is not None and not torch._C._cuda_isCurrentStreamCapturing():
        bound.replay()
        return
    OP_RUNS.launch(bound, lambda: launch_tree_attention(
        q, k_cache, v_cache, bound.views, o_part, lse_part, out, lse, flat, sm_scale,
        bound.config, num_programs, per_query_merge, gluon, small_grid), q.device)


_LIBRARY.impl("tree_attention", tree_attention_op, "CompositeExplicitAutograd")


@torch.library.register_fake("deft::tree_attention", lib=_LIBRARY)
def _(q, k_cache, v_cache, plan_data, plan_layout, o_part, lse_part, out, lse, flat, sm_scale,
      tile, num_programs, per_query_merge, gluon=False, small_grid=False, owner=0) -> None:
    return None
