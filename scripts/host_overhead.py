#!/usr/bin/env python3
"""Host time of `TreeAttention.plan` and `TreeAttention.run`, and where it goes (GPU machine).

    python scripts/host_overhead.py [--workloads DIR] [--anchors a,b] [--heads 32/8,4/1]
                                    [--calls N] [--no-compile | --compile-anchors a,b]
    python scripts/host_overhead.py --cpu    # small dry run under the Triton interpreter

Per anchor and head shape (deft_flatten, fp16, head dim 128; default the Llama-3-8B heads 32/8,
records of other shapes named ``anchor@q/kv``): the mean host time per call of N
back-to-back calls (no synchronisation inside; the GPU queue absorbs them) of
- `plan` with fixed sizes (the node planner, `deft.fast_plan`) and tuned (`deft.plan.build_plan`
  through the tuned lookup), both over a `PageTable`; the same tree planned again and again,
  so since session 7 the tuned column times the choice reused (`deft.kernels.tuned.reuse_key`),
  not the lookup and its wave count (`scripts/plan_overhead.py` times whole runs);
- `run` with ``out`` given (from its second call a replayed CUDA graph, `deft.bound_run`), the
  same with a synchronisation every `BATCH` calls left out of the time (so a full launch queue
  cannot stall the host), the same over `LAYERS` cache pairs in turn (a decode step's layers:
  each call finds another argument set, through the dict rather than the last-hit
  comparison), `run` with graphs off (``max_graphs=0``: checked once, plain launches), `run`
  with ``out=None`` (a new output each call);
- the parts of `run`'s graph path: `run` (on one and on `LAYERS` cache pairs) and the custom
  op with the replay stubbed out (``*lookup_host_us``: their own Python, key and lookup;
  `CALLS` calls with ``--cpu`` too), the argument key, the
  capture-status query, the replay, and the top functions of a cProfile of `run` and of the
  custom op (``*_profile``);
- the custom op ``torch.ops.deft.tree_attention`` called directly with what a compiled `run`
  passes it (`run`'s graph path behind the dispatcher), and torch.compile'd functions calling
  `run` (fullgraph; default mode, ``mode="reduce-overhead"`` with ``out`` given and with
  ``out=None``), each checked against eager `run` (NaN-poisoned ``out``, rel_err), with their
  compile wall time (``*_compile_s``);
- torch's floor under them (`floor_records`): a no-op op of the same schema, eager and
  compiled, and a compiled function that calls nothing; the compiled calls' time over each
  floor (`over_floor`: ``compile_over_nothing_host_us`` is what the op adds to a compiled
  step); and the graphs torch.compile builds for a model's attention layer called with
  `REPLANS` new plans (``compile_replan_graphs``);
- the partials and the merge launch alone, and an empty Triton kernel (the launch floor);
then the eager time (`do_bench`, L2 flushed, what `deft-cli bench --timing eager` reports) of
`run` through the graph path and through plain launches, and the time of `run` inside a CUDA
graph of the caller's. Prints one line per anchor, a table last; writes $OUT/host_overhead.json
when $OUT is set (rewritten after every anchor); exits 1 when a compiled result differs from
eager `run`.

``--cpu`` runs the same host-side paths (no eager/graph GPU timing, no reduce-overhead) on one
small tree under the Triton interpreter, a few calls each: a check that the script works end to
end, not a measurement; only what launches nothing (``*lookup_host_us``, the key, the floors
and ``compile_lookup_over_*``) gets `CALLS` calls there, a host-only microbenchmark.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

if "--cpu" in sys.argv:  # before any kernel module loads
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from deft.bound_run import argument_key  # noqa: E402
from deft.kernels.partials import partials  # noqa: E402
from deft.kernels.reduction import merge  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.strategies import DEFAULT_CHUNK_SIZE  # noqa: E402
from deft.tree import AttentionShape, Tree  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from reference import rel_err  # noqa: E402

from compile_overhead import (  # noqa: E402  (scripts/: this script's folder)
    compiled_records, floor_records, over_floor, replan_graphs)
from host_timing import CALLS, host_us, profile_us, stubbed_replay_us  # noqa: E402

LLAMA = AttentionShape(32, 8, 128, "float16")
BATCH = 50
"""Calls between synchronisations in the batched host times."""
LAYERS = 4
"""Cache pairs `run_layers_host_us` calls `run` over in turn."""
TOLERANCE = 1e-3
"""Largest rel_err of a compiled result against eager `run` (the same kernels)."""
CPU_TREE = Tree([0, 1, 2], [None, 0, 0], [40, 8, 8], None, AttentionShape(4, 2, 32, "float16"))


@triton.jit
def _empty(x_ptr):
    pass


def measure(name, tree, device, calls, compile_runs) -> dict:
    """Every host time of one anchor (`--cpu`: one small tree)."""
    s = tree.attention
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(tree.num_queries, s.q_heads, s.head_dim, generator=g, device=device).half()
    k = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device=device).half()
    k_cache, v_cache, table = paged_cache(tree, k, k.clone(), 16)
    capacity = dict(max_queries=tree.num_queries, max_tokens=tree.num_tokens, device=device)
    attn = TreeAttention("deft_flatten", **capacity)  # tuned, as users get it
    fixed = TreeAttention("deft_flatten", DEFAULT_CHUNK_SIZE, **capacity)
    plain = TreeAttention("deft_flatten", **capacity, max_graphs=0)
    plan = attn.plan(tree, table)
    plain_plan = plain.plan(tree, table)
    out = torch.empty_like(q)
    attn.run(q, k_cache, v_cache, plan, out=out)
    o_part, lse_part = attn._partials_workspace(s.q_heads, s.head_dim)
    config, programs = attn._launch_config(s.head_dim, s.q_heads, s.kv_heads)
    views = attn.buffers.views
    op_args = (q, k_cache, v_cache, out, None, None, attn._handle)  # what a compiled run calls
    rec = dict(
        anchor=name, tuned_from=attn.tuned_from, config=str(config),
        plan_fixed_host_us=host_us(lambda: fixed.plan(tree, table), calls, device),
        plan_tuned_host_us=host_us(lambda: attn.plan(tree, table), calls, device),
    )
    plan = attn.plan(tree, table)
    run = lambda: attn.run(q, k_cache, v_cache, plan, out=out)  # noqa: E731
    layers = [(k_cache, v_cache)] + [(k_cache.clone(), v_cache.clone())
                                     for _ in range(LAYERS - 1)]
    turn = itertools.cycle(layers)
    rec.update(
        run_host_us=host_us(run, calls, device),
        run_batched_host_us=host_us(run, calls, device, BATCH),
        run_layers_host_us=host_us(
            lambda: attn.run(q, *next(turn), plan, out=out), calls * LAYERS, device, BATCH),
        run_plain_host_us=host_us(
            lambda: plain.run(q, k_cache, v_cache, plain_plan, out=out), calls, device),
        run_new_out_host_us=host_us(lambda: attn.run(q, k_cache, v_cache, plan), calls, device),
        graphs=attn._runs.graphs(),
        run_profile=profile_us(run, calls, device),
        key_host_us=host_us(lambda: argument_key(q, k_cache, v_cache, out, None, None,
                                                 plan.per_query_merge, plan.small_grid,
                                                 plan.merge_block),
                            CALLS, device),
    )
    entries = [attn._runs.get(argument_key(q, *caches, out, None, None, plan.per_query_merge,
                                           plan.small_grid, plan.merge_block))
               for caches in layers]
    bound = entries[0]
    rec.update(
        run_lookup_host_us=stubbed_replay_us([bound], run, device),
        run_layers_lookup_host_us=stubbed_replay_us(
            entries, lambda: attn.run(q, *next(turn), plan, out=out), device),
    )
    if device.type == "cuda":
        rec["capture_check_host_us"] = host_us(torch._C._cuda_isCurrentStreamCapturing,
                                               calls, device)
        if bound.replay is not None:  # None where the capture failed
            rec["replay_host_us"] = host_us(bound.replay, calls, device, BATCH)
    reference = run().float().cpu()
    out.fill_(float("nan"))
    torch.ops.deft.tree_attention(*op_args)
    rec["custom_op_rel_err"] = rel_err(out.float().cpu(), reference)
    rec.update(
        custom_op_host_us=host_us(lambda: torch.ops.deft.tree_attention(*op_args), calls,
                                  device),
        custom_op_batched_host_us=host_us(lambda: torch.ops.deft.tree_attention(*op_args),
                                          calls, device, BATCH),
        custom_op_lookup_host_us=stubbed_replay_us(
            [bound], lambda: torch.ops.deft.tree_attention(*op_args), device),
        custom_op_profile=profile_us(lambda: torch.ops.deft.tree_attention(*op_args), calls,
                                     device),
    )
    if compile_runs:
        rec.update(compiled_records(attn, plan, q, k_cache, v_cache, reference, calls, device))
        rec.update(floor_records(op_args, device))
        rec.update(over_floor(rec))
    rec.update(
        partials_host_us=host_us(lambda: partials(
            q, k_cache, v_cache, o_part, lse_part, views, flat=True,
            sm_scale=s.head_dim ** -0.5, config=config, num_programs=programs), calls, device),
        merge_host_us=host_us(lambda: merge(o_part, lse_part, views, out), calls, device),
    )
    if device.type == "cuda":
        from harness.timing import CudaTimer

        timer = CudaTimer(warmup_ms=10, rep_ms=60)
        rec.update(
            eager_us=timer.eager(run).median_us,
            eager_plain_us=timer.eager(
                lambda: plain.run(q, k_cache, v_cache, plain_plan, out=out)).median_us,
            graph_us=timer.graph([run])[0].median_us,
        )
    if compile_runs:  # last: it re-plans, so `plan` above goes stale
        rec["compile_replan_graphs"] = replan_graphs(attn, tree, table, q, k_cache, v_cache)
    return rec


COLUMNS = [("plan_fixed_host_us", "plan fixed"), ("plan_tuned_host_us", "plan tuned"),
           ("run_host_us", "run"), ("run_batched_host_us", "run batched"),
           ("run_layers_host_us", "run layers"), ("run_lookup_host_us", "run lookup"),
           ("run_layers_lookup_host_us", "lyr lookup"),
           ("run_plain_host_us", "run plain"), ("run_new_out_host_us", "run new out"),
           ("key_host_us", "key"), ("replay_host_us", "replay"),
           ("custom_op_host_us", "custom op"), ("custom_op_lookup_host_us", "op lookup"),
           ("no_op_host_us", "no-op op"), ("compile_host_us", "compiled"),
           ("compile_no_op_host_us", "comp. no-op"), ("compile_nothing_host_us", "comp. none"),
           ("compile_over_nothing_host_us", "comp.-none"),
           ("compile_lookup_over_nothing_host_us", "c.lkp-none"),
           ("compile_ro_host_us", "compiled ro"), ("compile_ro_new_out_host_us", "ro new out"),
           ("eager_us", "eager"), ("eager_plain_us", "eager plain"), ("graph_us", "graph")]


def print_table(records, calls, empty) -> None:
    columns = [(key, label) for key, label in COLUMNS if any(key in r for r in records)]
    print(f"\nhost us per call, mean of {calls} (eager / graph: GPU us, median); "
          f"empty kernel {empty:.1f} us")
    print(f"{'anchor':<24}" + "".join(f"{label:>12}" for _, label in columns))
    for rec in records:
        print(f"{rec['anchor']:<24}" + "".join(
            f"{rec[key]:>12.1f}" if key in rec else f"{'-':>12}" for key, _ in columns))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--anchors",
                        default="reason_10x500_P1104,fewshot_b20_P4000_L200,spec_t256_P4000")
    parser.add_argument("--heads", default="32/8",
                        help="q_heads/kv_heads per measured shape, comma-separated (e.g. "
                             "32/8,4/1: Llama-3-8B and its 8-way shard)")
    parser.add_argument("--calls", type=int, default=None,
                        help=f"calls per mean (default {CALLS}; 5 with --cpu)")
    parser.add_argument("--cpu", action="store_true",
                        help="one small tree under the Triton interpreter (a dry run)")
    parser.add_argument("--compile-anchors", default=None,
                        help="the anchors whose torch.compile records are taken (default: "
                             "every anchor; each costs several inductor compiles)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile records")
    args = parser.parse_args()
    device = torch.device("cpu" if args.cpu else "cuda")
    calls = args.calls or (5 if args.cpu else CALLS)
    x = torch.zeros(16, device=device)
    empty = host_us(lambda: _empty[(1,)](x), calls, device)
    cases = [("cpu_small", CPU_TREE)] if args.cpu else []
    for heads in [] if args.cpu else args.heads.split(","):
        q_heads, kv_heads = (int(n) for n in heads.split("/"))
        shape = AttentionShape(q_heads, kv_heads, LLAMA.head_dim, LLAMA.dtype)
        for name in args.anchors.split(","):
            try:
                tree = wl.anchor(name, args.workloads, shape)
            except FileNotFoundError as missing:  # spec_* need the speculative files
                print(f"skipping {name}: {missing}", file=sys.stderr)
                continue
            cases.append((name if shape == LLAMA else f"{name}@{heads}", tree))
    records, failed = [], []
    for name, tree in cases:
        compiled = not args.no_compile and (args.compile_anchors is None or name.split("@")[0]
                                            in args.compile_anchors.split(","))
        rec = measure(name, tree, device, calls, compiled)
        rec["empty_kernel_host_us"] = empty
        records.append(rec)
        failed += [f"{name} {key}={value}" for key, value in rec.items()
                   if key.endswith("rel_err") and not value <= TOLERANCE]
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()},
              flush=True)
        if os.environ.get("OUT"):  # after every anchor: a run cut short keeps what it measured
            Path(os.environ["OUT"], "host_overhead.json").write_text(json.dumps(dict(
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=triton.__version__, calls=calls, batch=BATCH,
                records=records, failed=failed), indent=1))
    print_table(records, calls, empty)
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
