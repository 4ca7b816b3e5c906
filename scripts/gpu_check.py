#!/usr/bin/env python3
"""GPU correctness of every strategy, and a first timing of the DeFT kernels, in one run.

    python scripts/gpu_check.py [--workloads DIR] [--budget SECONDS] [--memcheck-small]

Correctness (every output poisoned with NaN before each run; rel_err against a float64 dense
oracle on the GPU (`reference.oracle.oracle_attention` on the inputs' device); <= 2e-3 fp16,
<= 1.6e-2 bf16; two runs bit-identical):
- random trees and forests (up to ~20k tokens and ~250 queries), GQA ratios 1, 4, 7, 8 and head
  dims 64, 128, 256, page sizes 1 and 16 with shuffled pages, fp16 and bf16, every strategy
  (flash_attention, tree_attention_m and vanilla_tree as their PyTorch reference);
- the six anchor workloads (docs/anchors.md; spec_* read APPS_tree_size{64,256}.json, found by
  `deft.workloads.find_workload_file`, or under --workloads DIR);
- edge cases: one node, one query, a chain 10k nodes deep, a star of 1024 leaves, one-token
  nodes, a tree far larger than one wave, a forest of 64 trees;
- a CUDA graph captured over `run`, replayed after a re-plan onto another tree, against eager.
Timing (anchors, fp16): deft_flatten, deft_node_chunk, deft_node, flash_decoding, each a CUDA
graph of 4 calls on 4 KV copies (more than the L2 holds), median replay / 4; the floor from the
copy bandwidth and GEMM rate measured in the same run.

The last lines of stdout are a summary table; ``$OUT/gpu_check.json`` (when $OUT is set) holds
every record. ``--memcheck-small`` runs tiny cases only, for
``compute-sanitizer --tool memcheck python scripts/gpu_check.py --memcheck-small``; ``--cpu``
runs those tiny cases under the Triton interpreter (a dry run of this script without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module loads

from deft import workloads as wl  # noqa: E402
from deft.strategies import KERNEL_STRATEGIES  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from deft.kernels.partials import TileConfig  # noqa: E402
from deft.kernels.reduction import merge  # noqa: E402
from deft.plan_buffers import PageTable, paged_cache, token_slots  # noqa: E402
from deft.tree import AttentionShape, Tree  # noqa: E402
import reference  # noqa: E402
from reference import STRATEGIES, build_plan, rel_err  # noqa: E402
from harness.timing import replay_seconds as replay_time  # noqa: E402
from reference.oracle import oracle_attention  # noqa: E402

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LLAMA = AttentionShape(32, 8, 128, "float16")
TILES = {
    "64x32w4s5": TileConfig(64, 32, num_warps=4, num_stages=5, programs_per_sm=2),
    "64x32w4s7": TileConfig(64, 32, num_warps=4, num_stages=7, programs_per_sm=2),
    "64x32w8s9": TileConfig(64, 32, num_warps=8, num_stages=9, programs_per_sm=1),
    "128x32w8s9": TileConfig(128, 32, num_warps=8, num_stages=9, programs_per_sm=1),
    "128x64w8s5": TileConfig(128, 64, num_warps=8, num_stages=5, programs_per_sm=1),
}
"""Tile configs tried for deft_flatten (the others use their strategy's table)."""
TIMED = {
    "deft_flatten": [dict(chunk_size=128)] + [
        dict(chunk_size=c, group_size=g, tile=tile) for c in (256, 512, 1024, 2048)
        for g in (None, 32) for tile in TILES] + [
        dict(chunk_size=c, group_size=16, tile=tile) for c in (1024, 2048)
        for tile in ("64x32w4s5", "128x32w8s9")],
    "deft_node_chunk": [dict(chunk_size=c, group_size=g) for c in (256, 1024) for g in (None, 32)],
    "deft_node": [dict(group_size=g) for g in (None, 32)],
    "flash_decoding": [dict(chunk_size=c) for c in (128, 512, 2048)],
}
"""Strategies timed on the anchors, each over a few chunk and group sizes (best reported)."""
DEVICE = torch.device("cpu" if "--cpu" in sys.argv else "cuda")


class Report:
    """Every record of the run; written to $OUT/gpu_check.json after each section."""

    def __init__(self, budget: float):
        self.start = time.time()
        self.budget = budget
        self.records = []
        self.info = {}
        self.skipped = []

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def add(self, record: dict) -> None:
        self.records.append(record)
        status = "ok" if record.get("ok") else "FAIL"
        detail = {k: v for k, v in record.items() if k not in ("section", "ok")}
        print(f"[{time.time() - self.start:6.1f}s] {status:4s} {record['section']}: {detail}",
              flush=True)

    def save(self) -> None:
        out = os.environ.get("OUT")
        if not out:
            return
        data = dict(info=self.info, skipped=self.skipped, records=self.records,
                    elapsed_s=time.time() - self.start)
        Path(out, "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))


# ---------------------------------------------------------------------------- checking
def random_inputs(tree: Tree, dtype, seed: int):
    shape = tree.attention
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(tree.num_queries, shape.q_heads, shape.head_dim, generator=g, device=DEVICE)
    k = torch.randn(tree.num_tokens, shape.kv_heads, shape.head_dim, generator=g, device=DEVICE)
    v = torch.randn(tree.num_tokens, shape.kv_heads, shape.head_dim, generator=g, device=DEVICE)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def params_for(strategy: str, chunk=None, group=None) -> dict:
    params = {}
    if chunk is not None and strategy in ("flash_decoding", "radix", "tree_attention_s",
                                          "deft_node_chunk", "deft_flatten"):
        params["chunk_size"] = chunk
    if group is not None and strategy.startswith("deft_"):
        params["group_size"] = group
    return params


def run_kernel(strategy, tree, q, k, v, page_size, seed, params):
    """Plan once, run twice into NaN-poisoned outputs: (out, bit-identical?, partitions)."""
    k_cache, v_cache, table = paged_cache(tree, k, v, page_size, seed)
    plan = build_plan(strategy, tree, page_size=page_size, **params)
    attn = TreeAttention.for_plan(plan, device=DEVICE)
    handle = attn.plan(tree, table, plan)
    outs = []
    for _ in range(2):
        out = torch.full_like(q, float("nan"))
        attn.run(q, k_cache, v_cache, handle, out=out)
        outs.append(out)
    return outs[0], torch.equal(outs[0], outs[1]), plan.num_partitions


def check_tree(report, section, name, tree, dtypes=(torch.float16, torch.bfloat16),
               strategies=KERNEL_STRATEGIES, chunk=None, group=None, seed=0):
    """Every strategy on one tree: rel_err, all finite, deterministic."""
    for dtype in dtypes:
        if report.left() < 0:
            report.skipped.append(f"{section}/{name}/{dtype}")
            return
        q, k, v = random_inputs(tree, dtype, seed)
        ref = oracle_attention(tree, q, k, v)
        for i, strategy in enumerate(strategies):
            page_size = 16 if (i + seed) % 2 else 1
            params = params_for(strategy, chunk, group)
            record = dict(section=section, case=name, strategy=strategy,
                          dtype=str(dtype).split(".")[-1], page_size=page_size, **params,
                          tokens=tree.num_tokens, queries=tree.num_queries)
            try:
                if strategy in KERNEL_STRATEGIES:
                    out, same, parts = run_kernel(strategy, tree, q, k, v, page_size, seed + i,
                                                  params)
                    record.update(partitions=parts, deterministic=same)
                else:
                    out = reference.output(strategy, tree, q, k, v, page_size=page_size,
                                           **params)
                    same = True
                err = rel_err(out, ref)
                finite = bool(torch.isfinite(out).all())
                record.update(rel_err=float(f"{err:.3g}"), finite=finite,
                              ok=bool(finite and same and err <= TOLERANCE[dtype]))
            except Exception as error:  # keep checking the rest; the record says what failed
                record.update(ok=False, error=f"{type(error).__name__}: {error}"[:400],
                              trace=traceback.format_exc()[-1500:])
            report.add(record)
    report.save()


def check_graph_replan(report, dtype=torch.float16):
    """Capture run() in a CUDA graph on tree A, re-plan onto tree B, replay: equals eager on B."""
    record = dict(section="graph", case="capture A, re-plan B, replay", strategy="deft_flatten",
                  dtype=str(dtype).split(".")[-1])
    try:
        trees = [wl.random_tree(10, nodes=40, max_tokens=120, max_queries=2, attention=LLAMA),
                 wl.random_tree(11, nodes=60, max_tokens=90, roots=3, max_queries=3,
                                attention=LLAMA)]
        page_size = 16
        counts = [-(-t.tokens // page_size) for t in trees]
        first = [0, int(counts[0].sum())]  # B's pages follow A's in one pool
        pool_pages = first[1] + int(counts[1].sum())
        shape = (pool_pages, page_size, LLAMA.kv_heads, LLAMA.head_dim)
        k_pool = torch.zeros(shape, dtype=dtype, device=DEVICE)
        v_pool = torch.zeros(shape, dtype=dtype, device=DEVICE)
        tables, inputs = [], []
        for t, tree in enumerate(trees):
            page_ptr = np.concatenate([[0], np.cumsum(counts[t])])
            table = PageTable(page_ptr, first[t] + np.arange(page_ptr[-1]), page_size)
            q, k, v = random_inputs(tree, dtype, 20 + t)
            slots = torch.from_numpy(token_slots(tree, table.page_ptr, table.pages, page_size))
            k_pool.view(-1, *k.shape[1:])[slots.to(DEVICE)] = k
            v_pool.view(-1, *v.shape[1:])[slots.to(DEVICE)] = v
            tables.append(table)
            inputs.append((q, k, v))
        rows = 64
        attn = TreeAttention("deft_flatten", chunk_size=64, max_queries=rows, max_tokens=8192,
                             max_entries=4096, device=DEVICE)
        q_static = torch.zeros(rows, LLAMA.q_heads, LLAMA.head_dim, dtype=dtype, device=DEVICE)
        out_static = torch.empty_like(q_static)
        q_static[: trees[0].num_queries] = inputs[0][0]
        plan = attn.plan(trees[0], tables[0])
        attn.run(q_static, k_pool, v_pool, plan, out=out_static)  # warm-up: workspace, compile
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attn.run(q_static, k_pool, v_pool, plan, out=out_static)
        plan = attn.plan(trees[1], tables[1])
        q_static.zero_()
        q_static[: trees[1].num_queries] = inputs[1][0]
        out_static.fill_(float("nan"))
        graph.replay()
        eager = attn.run(q_static, k_pool, v_pool, plan)
        torch.cuda.synchronize()
        n = trees[1].num_queries
        err = rel_err(out_static[:n], oracle_attention(trees[1], *inputs[1]))
        record.update(
            rel_err=float(f"{err:.3g}"), equal_to_eager=torch.equal(out_static, eager),
            padding_zero=bool((out_static[n:] == 0).all()),
            ok=bool(torch.equal(out_static, eager) and (out_static[n:] == 0).all()
                    and err <= TOLERANCE[dtype]),
        )
    except Exception as error:
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[:400],
                      trace=traceback.format_exc()[-1500:])
    report.add(record)
    report.save()


# ---------------------------------------------------------------------------- timing
def measure_device(report) -> dict:
    """Copy bandwidth (bytes read + written per second) and fp16 GEMM rate, as in docs/anchors.md."""
    x = torch.empty(2**28, dtype=torch.float32, device=DEVICE)  # 1 GiB
    y = torch.empty_like(x)
    copy = replay_time(lambda: y.copy_(x), 10)
    a = torch.randn(8192, 8192, dtype=torch.float16, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=torch.float16, device=DEVICE)
    gemm = replay_time(lambda: a @ b, 10)
    info = dict(copy_bandwidth_GBs=2 * 2**30 / copy / 1e9, gemm_TFLOPs=2 * 8192**3 / gemm / 1e12)
    report.info.update(info)
    print(f"copy {info['copy_bandwidth_GBs']:.0f} GB/s, fp16 GEMM {info['gemm_TFLOPs']:.0f} "
          "TFLOP/s", flush=True)
    return info


def floor_us(tree: Tree, device_info: dict) -> dict:
    """The floor of docs/anchors.md: max(bytes / copy bandwidth, flops / GEMM rate), in us."""
    s = tree.attention
    e = s.element_bytes
    nbytes = (tree.num_tokens * s.kv_heads * s.head_dim * 2 * e
              + 2 * tree.num_queries * s.q_heads * s.head_dim * e)
    flops = 4 * int(tree.visible_tokens.sum()) * s.q_heads * s.head_dim
    bytes_us = nbytes / (device_info["copy_bandwidth_GBs"] * 1e9) * 1e6
    flops_us = flops / (device_info["gemm_TFLOPs"] * 1e12) * 1e6
    return dict(floor_us=max(bytes_us, flops_us), bytes_us=bytes_us, flops_us=flops_us)


def time_anchor(report, name, tree, device_info, strategy, copies=4):
    """Graph-mode time per call of one strategy's timed configs on one anchor (fp16)."""
    floor = floor_us(tree, device_info)
    q, _, _ = random_inputs(tree, torch.float16, 0)
    caches = []
    for c in range(copies):
        _, k, v = random_inputs(tree, torch.float16, 100 + c)
        caches.append(paged_cache(tree, k, v, 1))
    ref = oracle_attention(tree, q, k, v)  # of the last copy: what `out` holds after the replays
    table = caches[0][2]
    for params in TIMED[strategy]:
        if report.left() < 0:
            report.skipped.append(f"timing/{name}/{strategy}/{params}")
            continue
        params = {k: v for k, v in params.items() if v is not None}
        tile = params.pop("tile", None)
        record = dict(section="timing", case=name, strategy=strategy, **params, tile=tile,
                      **{k: round(v, 2) for k, v in floor.items()})
        try:
            plan = build_plan(strategy, tree, **params)
            attn = TreeAttention.for_plan(plan, config=TILES.get(tile), device=DEVICE)
            handle = attn.plan(tree, table, plan)
            out = torch.empty_like(q)

            def calls():
                for k_cache, v_cache, _ in caches:
                    attn.run(q, k_cache, v_cache, handle, out=out)

            per_call = replay_time(calls) / copies * 1e6
            o_part, lse_part = attn._partials_workspace(q.shape[1], q.shape[2])
            views = attn.buffers.views
            merge_us = replay_time(lambda: [merge(o_part, lse_part, views, out)
                                            for _ in range(copies)]) / copies * 1e6
            err = rel_err(out, ref)
            record.update(us=round(per_call, 2), merge_us=round(merge_us, 2),
                          x_floor=round(per_call / floor["floor_us"], 2),
                          partitions=plan.num_partitions, entries=len(plan.query_index),
                          rel_err=float(f"{err:.3g}"), ok=err <= TOLERANCE[torch.float16])
        except Exception as error:
            record.update(ok=False, error=f"{type(error).__name__}: {error}"[:400],
                          trace=traceback.format_exc()[-1500:])
        report.add(record)
    report.save()


# ---------------------------------------------------------------------------- the run
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=None, help="directory holding deft-dataset/")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds; sections past it are skipped (and listed)")
    parser.add_argument("--memcheck-small", action="store_true",
                        help="tiny cases only (for compute-sanitizer)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--cpu", action="store_true",
                        help="the --memcheck-small cases under the Triton interpreter")
    args = parser.parse_args()
    if not (args.cpu or torch.cuda.is_available()):
        sys.exit("gpu_check.py needs a CUDA device (or --cpu for a dry run)")
    import triton

    report = Report(args.budget)
    report.info.update(torch=torch.__version__, triton=triton.__version__)
    if not args.cpu:
        props = torch.cuda.get_device_properties(DEVICE)
        report.info.update(device=props.name, sms=props.multi_processor_count)
    print(report.info, flush=True)

    small = Tree([0, 1, 2, 3], [None, 0, 0, 1], [40, 17, 5, 33], [0, 2, 1, 3], LLAMA)
    if args.memcheck_small or args.cpu:
        check_tree(report, "small", "4 nodes", small, dtypes=(torch.float16,),
                   strategies=STRATEGIES if args.cpu else KERNEL_STRATEGIES, chunk=16, group=2)
        if not args.cpu:
            check_graph_replan(report)
        sys.exit(1 if summarize(report) else 0)

    device_info = measure_device(report)
    check_tree(report, "random", "4 nodes", small, chunk=16, group=2,
               strategies=STRATEGIES)
    check_tree(report, "random", "tree 30", wl.random_tree(1, 30, 64, max_queries=3,
                                                           attention=LLAMA),
               strategies=STRATEGIES, chunk=32)
    anchors = {}
    for name in wl.ANCHORS:
        try:
            anchors[name] = wl.anchor(name, args.workloads, LLAMA)
        except Exception as error:
            report.add(dict(section="anchors", case=name, ok=False, error=str(error)[:400]))
            continue
        check_tree(report, "anchors", name, anchors[name])
    check_graph_replan(report)
    edges = {
        "one node": Tree([0], [None], [1], [1], LLAMA),
        "one query": Tree([0, 1], [None, 0], [300, 50], None, LLAMA),
        "chain 10k nodes": wl.chain(10_000, 1, LLAMA),
        "star 1024 leaves": wl.star(1024, 1000, 20, LLAMA),
        "one-token nodes": wl.random_tree(4, 400, 1, max_queries=1, attention=LLAMA),
        "far larger than a wave": wl.star(64, 60_000, 100, LLAMA),
        "forest of 64": wl.random_tree(5, 640, 64, roots=64, max_queries=2, attention=LLAMA),
    }
    for name, tree in edges.items():
        dtypes = (torch.float16,) if tree.num_tokens > 20_000 else (torch.float16,
                                                                     torch.bfloat16)
        check_tree(report, "edges", name, tree, dtypes=dtypes)
    check_tree(report, "random", "forest 200", wl.random_tree(2, 200, 200, roots=5,
                                                              max_queries=2, attention=LLAMA),
               group=16)
    check_tree(report, "random", "20k tokens", wl.random_tree(3, 500, 80, max_queries=1,
                                                              attention=LLAMA))
    for shape in (AttentionShape(16, 2, 64), AttentionShape(8, 8, 256),
                  AttentionShape(28, 4, 128)):
        tree = wl.random_tree(6, 40, 150, max_queries=2, attention=shape)
        check_tree(report, "head shapes", f"{shape.q_heads}/{shape.kv_heads}/{shape.head_dim}",
                   tree, chunk=64)
    if not args.no_timing:
        for strategy in TIMED:  # every anchor gets each strategy before the budget runs out
            for name, tree in anchors.items():
                time_anchor(report, name, tree, device_info, strategy)
    sys.exit(1 if summarize(report) else 0)


def summarize(report) -> int:
    """Print the summary; the number of failed records."""
    report.save()
    correctness = [r for r in report.records if r["section"] != "timing" and "strategy" in r]
    failed = [r for r in report.records if not r.get("ok")]
    print("\n==== failures ====")
    for r in failed:
        print({k: v for k, v in r.items() if k != "trace"})
        if "trace" in r:
            print(r["trace"])
    print("\n==== worst rel_err per strategy and dtype (correctness) ====")
    worst = {}
    for r in correctness:
        if "rel_err" in r:
            key = (r["strategy"], r["dtype"])
            worst[key] = max(worst.get(key, 0.0), r["rel_err"])
    for (strategy, dtype), err in sorted(worst.items()):
        print(f"{strategy:18s} {dtype:9s} {err:.3g}")
    timing = [r for r in report.records if r["section"] == "timing" and r.get("ok")]
    if timing:
        print("\n==== timing: graph replay / call, fp16, us (x floor) ====")
        names = list(dict.fromkeys(r["case"] for r in timing))
        for name in names:
            rows = [r for r in timing if r["case"] == name]
            line = [f"{name:24s} floor {rows[0]['floor_us']:6.1f}"]
            for strategy in TIMED:
                best = min((r for r in rows if r["strategy"] == strategy), default=None,
                           key=lambda r: r["us"])
                if best:
                    line.append(f"{strategy} {best['us']:.1f} ({best['x_floor']:.1f}x, "
                                f"c={best.get('chunk_size')}, g={best.get('group_size')}, "
                                f"t={best.get('tile')}, merge {best['merge_us']:.1f})")
            print(" | ".join(line))
    print(f"\ndevice {report.info.get('device')}, copy "
          f"{report.info.get('copy_bandwidth_GBs', 0):.0f} GB/s, GEMM "
          f"{report.info.get('gemm_TFLOPs', 0):.0f} TFLOP/s; skipped {len(report.skipped)} "
          f"items; {len(report.records) - len(failed)}/{len(report.records)} records ok; "
          f"{time.time() - report.start:.0f} s")
    return len(failed)


if __name__ == "__main__":
    main()
