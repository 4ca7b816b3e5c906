"""The torch.compile records of `scripts/host_overhead.py`: compiled functions calling
`TreeAttention.run`, torch's floor under them (a no-op op of the custom op's schema, a compiled
function that calls nothing), the compiled calls' time over that floor, and the graphs a model's
attention layer compiles to over new plans."""

from __future__ import annotations

import time

import torch

from deft.bound_run import argument_key
from deft.kernels.tree_attention_op import OP_SIGNATURE
from harness.timing import synchronize
from host_timing import CALLS, host_us, stubbed_replay_us
from reference import rel_err

REPLANS = 3
"""New plans `replan_graphs` calls a compiled step with (under torch.compile's recompile limit,
8, past which a fullgraph compile raises)."""


_FLOOR = torch.library.Library("deft_host_overhead", "DEF")
_FLOOR.define("no_op" + OP_SIGNATURE)
_FLOOR.impl("no_op", lambda *args: None, "CompositeExplicitAutograd")
torch.library.register_fake("deft_host_overhead::no_op", lambda *args: None, lib=_FLOOR)


def floor_records(op_args, device) -> dict:
    """torch's share of the custom op's host time: a no-op op of the same schema called with
    the same arguments, eager and from a torch.compile'd function (dynamo's frame and guards,
    AOT autograd's and inductor's wrappers, the dispatcher), and a compiled function that calls
    nothing (dynamo's frame and guards alone: an empty graph reaches no backend). Nothing is
    launched, so `CALLS` calls each, with ``--cpu`` too."""
    q, k_cache, v_cache, out, *rest = op_args

    def no_op(q, k_cache, v_cache, out):
        torch.ops.deft_host_overhead.no_op(q, k_cache, v_cache, out, *rest)
        return out

    def nothing(q, k_cache, v_cache, out):
        return out

    def compiled_us(fn):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True)
        return host_us(lambda: compiled(q, k_cache, v_cache, out), CALLS, device)

    return {"no_op_host_us": host_us(lambda: torch.ops.deft_host_overhead.no_op(*op_args),
                                     CALLS, device),
            "compile_no_op_host_us": compiled_us(no_op),
            "compile_nothing_host_us": compiled_us(nothing)}


class AttentionLayer(torch.nn.Module):
    """A decoder layer's attention as a model holds it: the TreeAttention an attribute."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, q, k_cache, v_cache, plan, out):
        return self.attn.run(q, k_cache, v_cache, plan, out=out)


def replan_graphs(attn, tree, table, q, k_cache, v_cache) -> int:
    """Graphs torch.compile builds for an `AttentionLayer` called with `REPLANS` new plans of
    the same tree (1: nothing a new plan changes is guarded on; `REPLANS`: every decode step
    recompiles, as when dynamo guards on the plan's generation). Dynamo alone decides that, so
    the graphs are compiled by the ``eager`` backend (fast)."""
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(AttentionLayer(attn), backend="eager", fullgraph=True)
    out = torch.empty_like(q)
    for _ in range(REPLANS):
        compiled(q, k_cache, v_cache, attn.plan(tree, table), out)
    return torch._dynamo.utils.counters["stats"]["unique_graphs"] - before


def compiled_records(attn, plan, q, k_cache, v_cache, reference, calls, device) -> dict:
    """Host time, compile wall time and result of torch.compile'd functions calling `run`
    (fullgraph), the argument sets each added to `run`'s (``*_new_runs``: one for its new
    ``out``; the op runs on `run`'s sets), and the default mode's call with its argument set's
    replay stubbed (``compile_lookup_host_us``, `CALLS` calls with ``--cpu`` too)."""
    def into_out(q, k_cache, v_cache, out):
        return attn.run(q, k_cache, v_cache, plan, out=out)

    def new_out(q, k_cache, v_cache):
        return attn.run(q, k_cache, v_cache, plan)

    modes = [("compile", None, into_out)]
    if device.type == "cuda":
        modes += [("compile_ro", "reduce-overhead", into_out),
                  ("compile_ro_new_out", "reduce-overhead", new_out)]
    rec = {}
    for name, mode, fn in modes:
        torch._dynamo.reset()
        skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
        start = time.perf_counter()
        compiled = torch.compile(fn, mode=mode, fullgraph=True)
        out = torch.empty_like(q)
        args = (q, k_cache, v_cache, out) if fn is into_out else (q, k_cache, v_cache)
        runs_before = len(attn._runs)
        for _ in range(3):  # compile, warm up, record (reduce-overhead)
            result = compiled(*args)
        rec[f"{name}_compile_s"] = time.perf_counter() - start
        out.fill_(float("nan"))
        result = compiled(*args).clone()
        synchronize(device)
        rec[f"{name}_rel_err"] = rel_err(result.float().cpu(), reference)
        rec[f"{name}_host_us"] = host_us(lambda: compiled(*args), calls, device)
        rec[f"{name}_new_runs"] = len(attn._runs) - runs_before
        rec[f"{name}_cudagraph_skips"] = (
            torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skips)
        if name == "compile":
            bound = attn._runs.get(argument_key(q, k_cache, v_cache, out, None, None,
                                                plan.per_query_merge, plan.small_grid,
                                                plan.merge_block))
            rec["compile_lookup_host_us"] = stubbed_replay_us(
                [bound], lambda: compiled(*args), device)
    return rec


def over_floor(rec) -> dict:
    """The compiled calls' host time over torch's floor (`floor_records`): over a compiled
    function that calls nothing (``*_over_nothing_host_us``: what the op costs a compiled
    step, torch's per-graph wrappers included) and over one that calls the no-op op
    (``*_over_no_op_host_us``: the op's body alone)."""
    diff = {}
    for name in ("compile", "compile_lookup", "compile_ro", "compile_ro_new_out"):
        if f"{name}_host_us" in rec:
            for floor in ("nothing", "no_op"):
                diff[f"{name}_over_{floor}_host_us"] = (
                    rec[f"{name}_host_us"] - rec[f"compile_{floor}_host_us"])
    return diff
