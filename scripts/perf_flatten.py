#!/usr/bin/env python3
"""DeFT-Flatten kernel variants against the current kernel on the six anchors, same process.

    python scripts/perf_flatten.py [--workloads DIR] [--variants a,b,...] [--sizes] [--cpu]
                                   [--anchors a,b,...] [--no-timing]

Per anchor (docs/anchors.md, fp16, Llama-3-8B shape, page size 1): the plan and tile the shipped
H200 tuning log chose (`tuned`; ``--sizes`` also tries `extra_sizes`), then every variant of
``VARIANTS`` (a `TileConfig` derived from the tuned tile: kernel switches are config fields):
- correctness: output NaN-poisoned, run once, compared with the current kernel's output on the
  same inputs (rel diff <= 2e-3; the current kernel itself against a float64 oracle on the first
  KV copy);
- timing: one CUDA graph of 4 calls on 4 different KV copies (more than L2 holds), replayed
  under do_bench (`harness.timing.CudaTimer`); per call = median / 4. Timed twice: the whole
  `TreeAttention.run` (partials + merge) and the partials kernel alone.

The last lines of stdout are a table (us per call, and the speedup over "current");
``$OUT/perf_flatten.json`` (when $OUT is set) holds every record. ``--cpu`` runs a tiny tree
under the Triton interpreter (correctness only: a dry run of the script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module loads

from deft import workloads as wl  # noqa: E402
from deft.kernels.partials import TileConfig, partials  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.tree import AttentionShape, Tree  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from reference import build_plan, rel_err  # noqa: E402
from reference.oracle import oracle_attention  # noqa: E402

LLAMA = AttentionShape(32, 8, 128, "float16")
TOLERANCE = 2e-3
COPIES = 4
DEVICE = torch.device("cpu" if "--cpu" in sys.argv else "cuda")

TABLE = Path(__file__).resolve().parents[1] / "autotune/logs/nvidia-h200.json"
ANCHORS = ("fewshot_b20_P4000_L200", "fewshot_b50_P4000_L200", "reason_10x500_P1104",
           "spec_t64_P4000", "spec_t256_P4000", "long_P20000_q64_L100")


def tuned(anchor: str):
    """(chunk, group, TileConfig) the shipped H200 tuning log chose for an anchor, fp16."""
    buckets = json.loads(TABLE.read_text())["strategies"]["deft_flatten"]
    chosen = next(e["chosen"] for key, e in buckets.items()
                  if e["workload"] == anchor and key.endswith("-float16"))
    return chosen["chunk_size"], chosen["group_size"], TileConfig(**chosen["tile"])


def extra_sizes(chunk, group):
    """Other (chunk, group) sizes tried with --sizes: half the chunk (more work items, for more
    programs per SM), twice the group (fewer re-reads of shared blocks), and both."""
    return [(chunk // 2, group), (chunk, 2 * group), (chunk // 2, 2 * group)]


def _with(**changes):
    return lambda t: dataclasses.replace(t, **changes)


VARIANTS = {
    "current": _with(),
    "m128_w8": _with(block_m=128, num_warps=8),
    "n32_r168_p3": _with(block_n=32, num_stages=3, max_registers=168, programs_per_sm=3),
    "n32_s2_r128_p4": _with(block_n=32, num_stages=2, max_registers=128, programs_per_sm=4),
}
"""Kernel variants, each a change of the tuned tile."""


def inputs(tree: Tree, copies: int):
    """q and `copies` paged KV caches (page size 1, different random K/V each), fp16."""
    s = tree.attention
    g = torch.Generator(device=DEVICE).manual_seed(0)
    dtype = torch.float16
    q = torch.randn(tree.num_queries, s.q_heads, s.head_dim, generator=g, device=DEVICE).to(dtype)
    caches, kv0 = [], None
    for _ in range(copies):
        k = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device=DEVICE)
        v = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device=DEVICE)
        k, v = k.to(dtype), v.to(dtype)
        kv0 = kv0 or (k, v)
        caches.append(paged_cache(tree, k, v, 1))
    return q, caches, kv0


def label(t: TileConfig) -> str:
    return (f"m{t.block_m} n{t.block_n} w{t.num_warps} s{t.num_stages} p{t.programs_per_sm}"
            + (" pf" if t.prefetch else "") + (" lean" if t.lean else "")
            + (f" r{t.max_registers}" if t.max_registers else ""))


def run_anchor(name, tree, sizes, variants, timer, records):
    q, caches, (k0, v0) = inputs(tree, COPIES)
    ref = oracle_attention(tree, q, k0, v0)
    table = caches[0][2]
    head_dim, q_heads, kv_heads = q.shape[2], q.shape[1], LLAMA.kv_heads
    sm_scale = 1 / math.sqrt(head_dim)
    for chunk, group, tile in sizes:
        plan = build_plan("deft_flatten", tree, chunk, group, 1)
        attn = TreeAttention.for_plan(plan, config=tile, device=DEVICE)
        handle = attn.plan(tree, table, plan)
        base_out = None
        for vname in variants:
            cfg = VARIANTS[vname](tile).for_group(q_heads // kv_heads)
            rec = dict(anchor=name, chunk=chunk, group=group, variant=vname, tile=label(cfg),
                       partitions=plan.num_partitions, entries=len(plan.query_index),
                       programs=attn._num_programs(kv_heads, cfg))
            try:
                attn.config = cfg
                out = torch.full_like(q, float("nan"))
                attn.run(q, caches[0][0], caches[0][1], handle, out=out)
                finite = bool(torch.isfinite(out).all())
                if base_out is None:
                    base_out = out
                rec.update(finite=finite, rel_vs_current=float(f"{rel_err(out, base_out):.3g}"),
                           rel_vs_oracle=float(f"{rel_err(out, ref):.3g}"))
                rec["ok"] = finite and rec["rel_vs_current"] <= TOLERANCE \
                    and rec["rel_vs_oracle"] <= TOLERANCE
                if timer is not None and rec["ok"]:
                    outs = [torch.empty_like(q) for _ in range(COPIES)]
                    full = [lambda c=c, o=o: attn.run(q, c[0], c[1], handle, out=o)
                            for c, o in zip(caches, outs)]
                    rec["us"] = round(timer.graph(full)[0].median_us, 2)
                    o_part, lse_part = attn._partials_workspace(q_heads, head_dim)
                    progs = attn._num_programs(kv_heads, cfg)
                    part = [lambda c=c: partials(q, c[0], c[1], o_part, lse_part,
                                                 attn.buffers.views, flat=True,
                                                 sm_scale=sm_scale, config=cfg,
                                                 num_programs=progs) for c in caches]
                    rec["partials_us"] = round(timer.graph(part)[0].median_us, 2)
            except Exception as error:  # keep going; the record says what failed
                rec.update(ok=False, error=f"{type(error).__name__}: {error}"[:300],
                           trace=traceback.format_exc()[-1200:])
            records.append(rec)
            print({k: v for k, v in rec.items() if k != "trace"}, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--anchors", default=",".join(ANCHORS))
    parser.add_argument("--sizes", action="store_true", help="also extra_sizes()")
    parser.add_argument("--chunks", default="",
                        help="comma-separated chunk sizes to try too, at the tuned group")
    parser.add_argument("--cpu", action="store_true", help="tiny tree, interpreter, no timing")
    parser.add_argument("--no-timing", action="store_true",
                        help="correctness runs only (one launch per variant: for ncu)")
    args = parser.parse_args()
    variants = ["current"] + [v for v in args.variants.split(",") if v and v != "current"]

    records, info = [], {}
    start = time.time()
    if args.cpu:
        tree = Tree([0, 1, 2, 3], [None, 0, 0, 1], [40, 17, 5, 33], [0, 2, 1, 3], LLAMA)
        run_anchor("tiny", tree, [(16, 2, TileConfig(16, 16, 4, 2, 2))], variants, None,
                   records)
    else:
        import triton

        from harness.timing import CudaTimer

        props = torch.cuda.get_device_properties(DEVICE)
        info = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                    triton=triton.__version__)
        print(info, flush=True)
        timer = None if args.no_timing else CudaTimer(warmup_ms=10, rep_ms=60)
        for name in args.anchors.split(","):
            chunk, group, tile = tuned(name)
            sizes = [(chunk, group, tile)]
            if args.sizes:
                sizes += [(c, g, tile) for c, g in extra_sizes(chunk, group)]
            sizes += [(int(c), group, tile) for c in args.chunks.split(",")
                      if c and int(c) != chunk]
            tree = wl.anchor(name, args.workloads, LLAMA)
            run_anchor(name, tree, sizes, variants, timer, records)
            save(info, records, start)
    save(info, records, start)
    summarize(records, variants, info)


def save(info, records, start):
    out = os.environ.get("OUT")
    if out:
        Path(out, "perf_flatten.json").write_text(json.dumps(
            dict(info=info, records=records, elapsed_s=time.time() - start), indent=1))


def summarize(records, variants, info):
    print("\n==== failures ====")
    for r in records:
        if not r.get("ok"):
            print({k: v for k, v in r.items() if k != "trace"})
            if "trace" in r:
                print(r["trace"])
    print(f"\n==== deft_flatten graph us/call (partials only), x = current/variant; "
          f"{info.get('device', 'cpu')} ====")
    keys = list(dict.fromkeys((r["anchor"], r["chunk"], r["group"]) for r in records))
    print(f"{'anchor':24s} {'c/g':9s} " + " ".join(f"{v:>17s}" for v in variants))
    for key in keys:
        rows = {r["variant"]: r for r in records if (r["anchor"], r["chunk"], r["group"]) == key}
        base = rows.get("current", {}).get("us")
        cells = []
        for v in variants:
            r = rows.get(v, {})
            if "us" in r and base:
                cells.append(f"{r['us']:6.1f}({r['partials_us']:5.1f}){base / r['us']:4.2f}")
            else:
                cells.append(f"{'ok' if r.get('ok') else 'FAIL':>17s}")
        print(f"{key[0]:24s} {f'{key[1]}/{key[2]}':9s} " + " ".join(cells))


if __name__ == "__main__":
    main()
