#!/usr/bin/env python3
"""Host time of one `TreeAttention.run`, and where it goes (GPU machine).

    python scripts/host_overhead.py [--workloads DIR] [--anchors a,b]

Per anchor (deft_flatten, tuned plan of the shipped table as `TreeAttention` picks it, fp16):
the mean host time per call of N back-to-back calls (no synchronisation inside; the GPU queue
absorbs them) of `run`, of the custom op `run` uses under torch.compile, of the partials
launch and of the merge launch alone, and of an empty Triton kernel (the launch floor); then
the eager time (`do_bench`, L2 flushed, what `deft-cli bench --timing eager` reports) and the
graph time of `run`. Prints a table; writes $OUT/host_overhead.json when $OUT is set.
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
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from harness.timing import CudaTimer  # noqa: E402
from deft.kernels.partials import partials  # noqa: E402
from deft.kernels.reduction import merge  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.tree import AttentionShape  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402

LLAMA = AttentionShape(32, 8, 128, "float16")
CALLS = 2000


@triton.jit
def _empty(x_ptr):
    pass


def host_us(fn, calls=CALLS) -> float:
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
    parser.add_argument("--anchors", default="reason_10x500_P1104,fewshot_b20_P4000_L200")
    args = parser.parse_args()
    timer = CudaTimer(warmup_ms=10, rep_ms=60)
    records = []
    x = torch.zeros(16, device="cuda")
    empty = host_us(lambda: _empty[(1,)](x))
    for name in args.anchors.split(","):
        tree = wl.anchor(name, args.workloads, LLAMA)
        s = tree.attention
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(tree.num_queries, s.q_heads, s.head_dim, generator=g, device="cuda").half()
        k = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device="cuda").half()
        k_cache, v_cache, table = paged_cache(tree, k, k.clone(), 16)
        attn = TreeAttention("deft_flatten", max_queries=tree.num_queries,
                             max_tokens=tree.num_tokens)
        plan = attn.plan(tree, table)
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
            run_host_us=host_us(lambda: attn.run(q, k_cache, v_cache, plan, out=out)),
            custom_op_host_us=host_us(lambda: torch.ops.deft.tree_attention(*op_args)),
            partials_host_us=host_us(lambda: partials(
                q, k_cache, v_cache, o_part, lse_part, views, flat=True,
                sm_scale=s.head_dim ** -0.5, config=config, num_programs=programs)),
            merge_host_us=host_us(lambda: merge(o_part, lse_part, views, out)),
            empty_kernel_host_us=empty,
            eager_us=timer.eager(lambda: attn.run(q, k_cache, v_cache, plan, out=out)).median_us,
            graph_us=timer.graph([lambda: attn.run(q, k_cache, v_cache, plan, out=out)])[0]
            .median_us,
        )
        records.append(rec)
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()},
              flush=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, "host_overhead.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                 triton=triton.__version__, records=records), indent=1))


if __name__ == "__main__":
    main()
