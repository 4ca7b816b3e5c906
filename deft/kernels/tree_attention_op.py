"""The two kernels of one `TreeAttention.run` (partials, then merge), the custom op
``torch.ops.deft.tree_attention`` that wraps `run` for torch.compile, and the check that a
device can run them.

The op's implementation is what a compiled graph calls on every step, so it is `run`'s graph
path itself (`deft.bound_run`): the owner's argument set for the call's tensors, captured as a
CUDA graph on its second call on a GPU and replayed from then on; plain launches on the CPU and
inside someone else's capture. It is tagged cudagraph-unsafe (`CUDAGRAPH_UNSAFE`), so
``torch.compile(mode="reduce-overhead")`` leaves it out of the CUDA graphs it records: its body
runs every call, with each plan's launch choices and checks. Its fake implementation allocates
nothing and returns None: the op's results are its mutated arguments (``out``, ``lse``), which
inductor writes in place, with no copy of ``out`` around the call (`tests/test_compiled_op.py`).

Importing this module registers the op; `deft.tree_attention` imports it.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref

import torch

from deft.kernels import deft_flatten_sm90
from deft.kernels.partials import _partials_kernel, partials
from deft.kernels.reduction import BLOCK_E, merge

INTERPRETED = not hasattr(_partials_kernel, "params")
"""Whether the kernels loaded under the Triton interpreter (TRITON_INTERPRET=1)."""

OWNERS = weakref.WeakValueDictionary()
"""Handle -> `TreeAttention` (`register_owner`): what an op call traced by torch.compile names
instead of its plan and buffers, so that the op reads the plan when it runs, not when it is
traced."""
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


def launch_partials(q, k_cache, v_cache, buffers, o_part, lse_part, flat, sm_scale, config,
                    num_programs, gluon=False, small_grid=False) -> None:
    """The partial results of one call: the Hopper Gluon kernel where ``gluon`` (its
    small-grid form where ``small_grid``: `deft.tree_plan.TreePlan.small_grid`), else the
    portable Triton kernel (on the current CUDA device)."""
    if gluon:
        deft_flatten_sm90.partials(
            q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat, sm_scale=sm_scale,
            config=config, num_programs=num_programs, small_grid=small_grid)
    else:
        partials(q, k_cache, v_cache, o_part, lse_part, buffers, flat=flat,
                 sm_scale=sm_scale, config=config, num_programs=num_programs)


def launch_tree_attention(q, k_cache, v_cache, buffers, o_part, lse_part, out, lse, flat,
                          sm_scale, config, num_programs, per_query_merge,
                          gluon=False, small_grid=False, merge_block=BLOCK_E) -> None:
    """`launch_partials`, then the merge (a programmatic dependent of the Gluon kernel; its
    per-head form ``merge_block`` rows a step: `deft.tree_plan.TreePlan.merge_block`), on
    ``q``'s device."""
    other_device = q.is_cuda and q.device.index != torch.cuda.current_device()
    with torch.cuda.device(q.device) if other_device else contextlib.nullcontext():
        launch_partials(q, k_cache, v_cache, buffers, o_part, lse_part, flat, sm_scale, config,
                        num_programs, gluon, small_grid)
        merge(o_part, lse_part, buffers, out, lse, per_query=per_query_merge,
              dependent_launch=gluon, block=merge_block)


OP_SIGNATURE = ("(Tensor q, Tensor k_cache, Tensor v_cache, Tensor(a!) out, Tensor(b!)? lse, "
                "float? sm_scale, int owner) -> ()")
"""The op's schema after its name (``scripts/host_overhead.py`` times a no-op op of it)."""

CUDAGRAPH_UNSAFE = tuple(tag for tag in (getattr(torch.Tag, "cudagraph_unsafe", None),)
                         if tag is not None)
"""The op's tags: inductor must not record its kernels into a CUDA graph of its own
(``mode="reduce-overhead"``), whose replays would keep the record-time plan's launch choices
(small grid, merge, tile, the workspace's addresses) and skip the plan checks; the op replays
its own graph per argument set instead. (torch >= 2.9; older ones have no such tag.)"""

_LIBRARY = torch.library.Library("deft", "DEF")
_LIBRARY.define("tree_attention" + OP_SIGNATURE, tags=CUDAGRAPH_UNSAFE)


def tree_attention_op(q, k_cache, v_cache, out, lse, sm_scale, owner) -> None:
    """``torch.ops.deft.tree_attention``: `TreeAttention.run` of the owner's latest plan, as an
    opaque op for torch.compile (what a compiled `run` calls).

    The op takes only the caller's tensors and the owner's handle: the plan buffers, the
    partial-result workspace, the tile and the launch flags are the owner's, so the traced graph
    has no input, guard or list argument for them, and the call is `run`'s own graph path
    (its argument set and CUDA graph, `deft.bound_run`) behind the dispatcher. The workspace is
    written without being declared: nothing outside the op reads it, and each call writes it
    before reading it.

    Registered through `torch.library.Library` with one kernel for every backend, so a call
    crosses into Python once (``torch.library.custom_op`` adds Python autograd and
    in-place-or-view kernels: about 100 us a call on a 2-core CPU). The dispatcher's cost is
    that of a no-op op of the same schema (``no_op_host_us`` in ``scripts/host_overhead.py``).

    Parameters
    ----------
    q : [rows, q_heads, head_dim]
    k_cache, v_cache : [num_pages, page_size, kv_heads, head_dim]
    out : [rows, q_heads, head_dim] (written)
    lse : fp32 [rows, q_heads] or None (written)
    sm_scale : float or None
        As for `TreeAttention.run`.
    owner : int
        The `register_owner` handle of the `TreeAttention` whose latest plan runs (checked
        against the tensors as `run` checks its plan).
    """
    attention = OWNERS.get(owner)
    if attention is None or attention.latest_plan is None:
        raise ValueError("torch.ops.deft.tree_attention: its TreeAttention is gone or has "
                         "not planned yet")
    attention._launch(q, k_cache, v_cache, attention.latest_plan, out, lse, sm_scale)


_LIBRARY.impl("tree_attention", tree_attention_op, "CompositeExplicitAutograd")


@torch.library.register_fake("deft::tree_attention", lib=_LIBRARY)
def _(q, k_cache, v_cache, out, lse, sm_scale, owner) -> None:
    return None
