#!/usr/bin/env python3
"""Host time of `TreeAttention.plan` and `TreeAttention.run`, and where it goes (GPU machine).

    python scripts/host_overhead.py [--workloads DIR] [--anchors a,b] [--calls N]

Per anchor (deft_flatten, fp16, Llama-3-8B heads): the mean host time per call of N
back-to-back calls (no synchronisation inside; the GPU queue absorbs them) of
- `plan` with fixed sizes (the node planner, `deft.fast_plan`) and tuned (`deft.plan.build_plan`
  through the tuned lookup), both over a `PageTable`;
- `run` with ``out`` given (from its second call a replayed CUDA graph, `deft.bound_run`), `run`
  with graphs off (``max_graphs=0``: checked once, plain launches), `run` with ``out=None`` (a
  new output each call: plain launches);
- the custom op `run` uses under torch.compile, the partials and the merge launch alone, and an
  empty Triton kernel (the launch floor);
then the eager time (`do_bench`, L2 flushed, what `deft-cli bench --timing eager` reports) of
`run` through the graph path and through plain launches, and the time of `run` inside a CUDA
graph of the caller's. Prints one line per anchor, a table last; writes $OUT/host_overhead.json
when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from harness.timing import CudaTimer  # noqa: E402
from deft.kernels.partials import partials  # noqa: E402
from deft.kernels.reduction import merge  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.strategies import DEFAULT_CHUNK_SIZE  # noqa: E402
from deft.tree import AttentionShape  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402

LLAMA = AttentionShape(32, 8, 128, "float16")
CALLS = 2000


@triton.jit
def _empty(x_ptr):
    pass


def host_us(fn, calls: int = CALLS) -> float:
    """Mean host time of `fn` over back-to-back calls, microseconds."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--anchors",
                        default="reason_10x500_P1104,fewshot_b20_P4000_L200,spec_t256_P4000")
    parser.add_argument("--calls", type=int, default=CALLS)
    args = parser.parse_args()
    timer = CudaTimer(warmup_ms=10, rep_ms=60)
    records = []
    x = torch.zeros(16, device="cuda")
    calls = args.calls
    empty = host_us(lambda: _empty[(1,)](x), calls)
    for name in args.anchors.split(","):
        try:
            tree = wl.anchor(name, args.workloads, LLAMA)
        except FileNotFoundError as missing:  # spec_* need the speculative files
            print(f"skipping {name}: {missing}", file=sys.stderr)
            continue
        s = tree.attention
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(tree.num_queries, s.q_heads, s.head_dim, generator=g, device="cuda").half()
        k = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device="cuda").half()
        k_cache, v_cache, table = paged_cache(tree, k, k.clone(), 16)
        capacity = dict(max_queries=tree.num_queries, max_tokens=tree.num_tokens)
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
        op_args = (q, k_cache, v_cache, attn.buffers.data, attn.buffers.layout(), o_part,
                   lse_part, out, None, True, s.head_dim ** -0.5, config.as_ints(), programs,
                   plan.per_query_merge)
        rec = dict(
            anchor=name, tuned_from=attn.tuned_from, config=str(config),
            plan_fixed_host_us=host_us(lambda: fixed.plan(tree, table), calls),
            plan_tuned_host_us=host_us(lambda: attn.plan(tree, table), calls),
        )
        plan = attn.plan(tree, table)
        rec.update(
            run_host_us=host_us(lambda: attn.run(q, k_cache, v_cache, plan, out=out), calls),
            run_plain_host_us=host_us(
                lambda: plain.run(q, k_cache, v_cache, plain_plan, out=out), calls),
            run_new_out_host_us=host_us(lambda: attn.run(q, k_cache, v_cache, plan), calls),
            graphs=attn._runs.graphs(),
            custom_op_host_us=host_us(lambda: torch.ops.deft.tree_attention(*op_args), calls),
            partials_host_us=host_us(lambda: partials(
                q, k_cache, v_cache, o_part, lse_part, views, flat=True,
                sm_scale=s.head_dim ** -0.5, config=config, num_programs=programs), calls),
            merge_host_us=host_us(lambda: merge(o_part, lse_part, views, out), calls),
            empty_kernel_host_us=empty,
            eager_us=timer.eager(lambda: attn.run(q, k_cache, v_cache, plan, out=out)).median_us,
            eager_plain_us=timer.eager(
                lambda: plain.run(q, k_cache, v_cache, plain_plan, out=out)).median_us,
            graph_us=timer.graph([lambda: attn.run(q, k_cache, v_cache, plan, out=out)])[0]
            .median_us,
        )
        records.append(rec)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()},
              flush=True)
    columns = [("plan_fixed_host_us", "plan fixed"), ("plan_tuned_host_us", "plan tuned"),
               ("run_host_us", "run"), ("run_plain_host_us", "run plain"),
               ("run_new_out_host_us", "run new out"), ("custom_op_host_us", "custom op"),
               ("eager_us", "eager"), ("eager_plain_us", "eager plain"), ("graph_us", "graph")]
    print(f"\nhost us per call, mean of {calls} (eager / graph: GPU us, median); "
          f"empty kernel {empty:.1f} us")
    print(f"{'anchor':<24}" + "".join(f"{label:>12}" for _, label in columns))
    for rec in records:
        print(f"{rec['anchor']:<24}" + "".join(f"{rec[key]:>12.1f}" for key, _ in columns))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "host_overhead.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                 triton=triton.__version__, calls=calls, records=records), indent=1))


if __name__ == "__main__":
    main()
