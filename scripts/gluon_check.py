#!/usr/bin/env python3
"""GPU check of the Hopper Gluon DeFT-Flatten kernel against the float64 oracle and the Triton
kernel, then a timing of both on the anchors, in one process.

    python scripts/gluon_check.py [--smoke] [--budget SECONDS] [--no-timing]
                                  [--variants [NAME,...]] [--shapes 32/8/128,...]
    python scripts/gluon_check.py --compile-only   # no GPU: every variant for sm_90a, ptxas

Correctness (deft_flatten through `deft.TreeAttention`, backend "gluon" and "triton" on the
same plan): random trees and forests at several GQA shapes and odd sizes, page sizes 1, 3, 8,
16, 64 (pages shuffled), fp16 and bf16, and the six anchors at 32/8/128. Before each run the
output and the partial-result workspace are poisoned with NaN; every partial row of the plan
must be written (finite) and the output must be finite; rel_err against the oracle <= 2e-3 fp16,
<= 1e-2 bf16; two runs bit-identical, the second replayed from the CUDA graph `run` captures of
itself (which must succeed); a third run with 3 padding rows of q and the lse must give the
same rows, a finite lse, and out = 0, lse = -inf on the padding rows; a CUDA graph of `run`
replays to the eager result (its DOT dump says whether the merge's programmatic dependency
survived capture). ``--variants``: every
VARIANTS entry (or those named) is checked the same way (poisoned, oracle, written,
deterministic, captured; Gluon only) on random trees, a forest, GQA groups 1/4/16, head_dim 64,
page sizes 1, 3, 16, fp16 and bf16, and the few-shot anchor with 64-token chunks, then timed
beside the default on every timing cell (its rel_err there counts too).
Timing: both backends on the six anchors at 32/8/128, 16/2/128, 8/1/128, 4/1/128 (or the
``--shapes`` named; page size 16, the tuned plan), a CUDA graph of 4 calls on 4 KV copies, per
call = median replay / 4.

Prints a table last; ``$OUT/gluon_check.json`` holds every record. ``--smoke`` runs one small
case only, for the default and (with ``--variants``) every variant: run it first under
``timeout`` (a pipeline bug hangs rather than fails). ``--compile-only`` needs no GPU. Exits 1
when a check fails (a timing cell's rel_err included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from deft.kernels import deft_flatten_sm90 as sm90  # noqa: E402
from deft.kernels import reduction  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.tree import AttentionShape, Tree  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from reference import build_plan, rel_err  # noqa: E402
from harness.timing import replay_seconds as replay_time  # noqa: E402
from reference.oracle import oracle_attention  # noqa: E402

DEVICE = "cuda"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = {"32/8/128": (32, 8, 128), "16/2/128": (16, 2, 128), "8/1/128": (8, 1, 128),
          "4/1/128": (4, 1, 128)}
RECORDS: list = []
START = time.time()
VARIANTS = {
    # kernel configurations checked and timed beside the default (module attributes of
    # deft_flatten_sm90 or of deft.kernels.reduction, see `variant`). Measured before (H200, one run each, vs the default): "n32s4"
    # dict(BLOCK_N=32, NUM_STAGES=4) slower on all 22 cells timed; "1cta_s5" dict(NUM_STAGES=5,
    # CTAS_PER_SM=1, MAX_REGS=168) faster on a few 16/2 and 8/1 cells, slower at 32/8 and on
    # long_P20000; "lazy_rescale" dict(LAZY_RESCALE=True) equal at 32/8 and 16/2, 5-15% slower
    # at 8/1 and 4/1.
    # two consumer warpgroups per CTA split each query tile's KV tiles, 1 CTA/SM, 4 stages
    # (with the mask-free path too). Measured 2026-12-01, H200, 32/8: without the mask-free
    # path 1.03-1.16x slower than the masked default; with it and SLOT_AHEAD=2 1.09-1.19x
    # slower than the mask-free default. Shard shapes untimed.
    "split2": dict(TWO_CONSUMERS=True),
    # split2 + the producer reads cache slots two tiles ahead (hides slot-load -> gather)
    "split2_ahead2": dict(TWO_CONSUMERS=True, SLOT_AHEAD=2),
    # the default kernel without its mask-free path (every tile masked: the kernel before
    # 2026-12-01; MASK_FREE measured 0.88-1.01x its time at 32/8)
    "masked": dict(MASK_FREE=False),
    # the merge launched after the partials kernel ends, not as its programmatic dependent
    "no_pdl": dict(PDL_MERGE=False),
    # the partials kernel releases the merge on entry (griddepcontrol.launch_dependents), not
    # as its CTAs exit
    "pdl_early": dict(EARLY_DEPENDENTS=True),
    # the consumer's tile loop software-pipelined (PIPELINE: tile j's Q K^T issued before tile
    # j-1's P V, K and V stages released apart) at two CTAs per SM, which at 64-token tiles
    # spills (160 consumer registers), so with 32-token tiles. Measured 2026-12-01, H200, all
    # 24 cells: 1.02-1.26x slower than the default. One CTA per SM with 4 or 5 stages of 64
    # tokens (240 consumer registers) was 0.85-1.02x the default where the work items fit one
    # CTA per SM and 1.14-1.28x elsewhere: the small-grid kernel (SMALL_GRID); with 8 stages of
    # 32 tokens, slower on 21 of 24.
    "pipe_n32s4": dict(PIPELINE=True, BLOCK_N=32, NUM_STAGES=4, SMALL_GRID_PIPELINE=False),
    # plans whose work items fit one CTA per SM run the default two-CTA kernel, not the
    # pipelined small-grid one
    "serial_small": dict(SMALL_GRID_PIPELINE=False),
    # the small-grid kernel (one CTA per SM, so the merge's waiting CTAs have room beside it)
    # releases the merge on entry, as "pdl_early" does for every plan. Measured 2026-12-01,
    # H200 (docs/performance.md, session 9): 0.3-0.8 us faster on reason_10x500 at 16/2, 8/1
    # and 4/1, 0.2-3.7 us slower on the other eight small grids, no item count between them
    "small_early": dict(SMALL_GRID=dict(sm90.SMALL_GRID, EARLY_DEPENDENTS=True)),
    # the partials kernel launched plainly, not as a programmatic dependent of the kernel
    # before it (the previous call's merge, in a graph of several calls)
    "no_pdl_partials": dict(PDL_PARTIALS=False),
    # the producer loads each item's plan data after the item count (the default before
    # session 10's PREFETCH_ITEM)
    "no_prefetch_item": dict(PREFETCH_ITEM=False),
    # the default kernel at twice the tuned group size
    "g2x": dict(group_times=2),
    # K/V tiles that lie whole on runs of consecutive cache slots copied by TMA boxes of one
    # page (page sizes that are multiples of 8), the rest gathered by cp.async (TMA_KV)
    "tma": dict(TMA_KV=True),
}
PLAN_KEYS = ("group_times",)
"""Variant keys that change the timed plan, not a module: ``group_times`` multiplies the tuned
plan's group size (a group of None, no cap, stays None)."""
VARIANT_MODULES = (sm90, reduction)
"""Where a variant's attributes live: each in the first of these modules that has it."""


class variant:
    """Run the Gluon kernel with some module-level parameters changed (restored on exit)."""

    def __init__(self, name):
        self.name = name
        self.overrides = {k: v for k, v in VARIANTS.get(name, {}).items() if k not in PLAN_KEYS}

    def __enter__(self):
        self.saved = {}
        for k, v in self.overrides.items():
            module = next(m for m in VARIANT_MODULES if hasattr(m, k))
            self.saved[k] = (module, getattr(module, k))
            setattr(module, k, v)

    def __exit__(self, *exc):
        for k, (module, v) in self.saved.items():
            setattr(module, k, v)


def filling_chunk(tree, kv_heads, ctas) -> int:
    """The largest power-of-two chunk (2048..64) whose plan has >= ctas work items."""
    for chunk in (2048, 1024, 512, 256, 128, 64):
        if build_plan("deft_flatten", tree, chunk, None, 16).num_partitions * kv_heads >= ctas:
            return chunk
    return 64


def small_grid_chunk(tree, kv_heads, sms) -> int:
    """The smallest power-of-two chunk (64..2048) whose plan has <= sms work items (the
    small-grid kernel's), 2048 if none."""
    for chunk in (64, 128, 256, 512, 1024, 2048):
        if build_plan("deft_flatten", tree, chunk, None, 16).num_partitions * kv_heads <= sms:
            return chunk
    return 2048


def save(info=None):
    out = os.environ.get("OUT")
    if out:
        Path(out, "gluon_check.json").write_text(json.dumps(
            dict(info=info or {}, records=RECORDS, elapsed_s=time.time() - START), indent=1,
            default=str))


def random_inputs(tree: Tree, dtype, seed: int):
    s = tree.attention
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(tree.num_queries, s.q_heads, s.head_dim, generator=g, device=DEVICE)
    k = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device=DEVICE)
    v = torch.randn(tree.num_tokens, s.kv_heads, s.head_dim, generator=g, device=DEVICE)
    return q.to(dtype), k.to(dtype), v.to(dtype)


PAD_ROWS = 3
"""Rows past the plan's queries in `run_poisoned`'s padded call (out = 0, lse = -inf there)."""


def attention_for(plan, tree, backend) -> TreeAttention:
    return TreeAttention("deft_flatten", plan.chunk_size, plan.group_size,
                         max_queries=tree.num_queries + PAD_ROWS, max_tokens=tree.num_tokens,
                         max_entries=len(plan.query_index), device=DEVICE, backend=backend)


def run_poisoned(attn, handle, q, k_cache, v_cache):
    """Run twice into NaN-poisoned out and workspace, the second time from the CUDA graph `run`
    captures of itself on a second call, then once with PAD_ROWS more rows of q and the lse:
    (out, partials all written, identical, captured, padded call right: its real rows equal
    out and have a finite lse, its padding rows out = 0 and lse = -inf)."""
    outs, written = [], True
    rows_written = torch.as_tensor(attn.buffers.read("entry_row")[:handle.num_entries],
                                   device=q.device)  # the plan's partial rows (spaced per
    out = torch.empty_like(q)  # query or not, `deft.plan_entries.row_starts`)
    for _ in range(2):
        o_part, lse_part = attn._partials_workspace(q.shape[1], q.shape[2])
        o_part.fill_(float("nan"))
        lse_part.fill_(float("nan"))
        out.fill_(float("nan"))
        attn.run(q, k_cache, v_cache, handle, out=out)
        torch.cuda.synchronize()
        written &= bool(torch.isfinite(o_part[rows_written]).all()
                        and torch.isfinite(lse_part[rows_written]).all())
        outs.append(out.clone())
    rows = q.shape[0]
    q_pad = torch.cat([q, torch.randn(PAD_ROWS, *q.shape[1:], device=q.device).to(q.dtype)])
    out_pad = torch.full_like(q_pad, float("nan"))
    _, lse = attn.run(q_pad, k_cache, v_cache, handle, out=out_pad, return_lse=True)
    torch.cuda.synchronize()
    padded = bool(torch.equal(out_pad[:rows], outs[0]) and torch.isfinite(lse[:rows]).all()
                  and (out_pad[rows:] == 0).all() and torch.isneginf(lse[rows:]).all())
    return (outs[0], written, torch.equal(outs[0], outs[1]), attn._runs.graphs() == 1,
            padded)


def check_case(section, name, tree, page_sizes, dtypes, chunk=None, seed=0, kernel="default",
               backends=("gluon", "triton")):
    for dtype in dtypes:
        q, k, v = random_inputs(tree, dtype, seed)
        ref = oracle_attention(tree, q, k, v)
        for page_size in page_sizes:
            record = dict(section=section, case=name, kernel=kernel,
                          dtype=str(dtype).split(".")[-1],
                          page_size=page_size, tokens=tree.num_tokens, queries=tree.num_queries,
                          shape="/".join(map(str, (tree.attention.q_heads, tree.attention.kv_heads,
                                                   tree.attention.head_dim))))
            try:
                k_cache, v_cache, table = paged_cache(tree, k, v, page_size, seed + page_size)
                plan = build_plan("deft_flatten", tree, chunk, None, page_size)
                outs = {}
                for backend in backends:
                    attn = attention_for(plan, tree, backend)
                    handle = attn.plan(tree, table, plan)
                    with variant(kernel):
                        out, written, same, captured, padded = run_poisoned(
                            attn, handle, q, k_cache, v_cache)
                    outs[backend] = out
                    record[f"{backend}_small_grid"] = handle.small_grid
                    record[f"{backend}_graph_captured"] = captured
                    record[f"{backend}_rel_err"] = float(f"{rel_err(out, ref):.3g}")
                    record[f"{backend}_written"] = written
                    record[f"{backend}_deterministic"] = same
                    record[f"{backend}_padded"] = padded
                    record[f"{backend}_finite"] = bool(torch.isfinite(out).all())
                if "triton" in outs:
                    between = rel_err(outs["gluon"], outs["triton"].double())
                    record["gluon_vs_triton"] = float(f"{between:.3g}")
                record["partitions"] = plan.num_partitions
                record["ok"] = bool(record["gluon_rel_err"] <= TOLERANCE[dtype]
                                    and record["gluon_written"] and record["gluon_finite"]
                                    and record["gluon_deterministic"]
                                    and record["gluon_graph_captured"]
                                    and record["gluon_padded"])
            except Exception as error:  # keep going; the record says what failed
                record.update(ok=False, error=f"{type(error).__name__}: {error}"[:400],
                              trace=traceback.format_exc()[-1500:])
            RECORDS.append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
            if "trace" in record and section == "smoke":
                print(record["trace"], flush=True)
    save()


def check_graph():
    """A CUDA graph of gluon run() on tree A, re-plan onto tree B, replay == eager on B."""
    record = dict(section="graph", case="capture A, re-plan B, replay")
    try:
        shape = AttentionShape(32, 8, 128, "float16")
        trees = [wl.random_tree(s, nodes=40, max_tokens=120, max_queries=2, attention=shape)
                 for s in (10, 11)]
        max_q = max(t.num_queries for t in trees)
        max_t = max(t.num_tokens for t in trees)
        attn = TreeAttention("deft_flatten", 64, None, max_queries=max_q, max_tokens=max_t,
                             device=DEVICE, backend="gluon")
        data = []
        for i, t in enumerate(trees):
            q, k, v = random_inputs(t, torch.float16, 20 + i)
            qp = torch.zeros(max_q, 32, 128, dtype=torch.float16, device=DEVICE)
            qp[: t.num_queries] = q
            kc, vc, table = paged_cache(t, k, v, 16, 3)
            data.append((qp, kc, vc, table, oracle_attention(t, q, k, v)))
        # one set of static buffers sized for both trees
        pages = max(d[1].shape[0] for d in data)
        kbuf = torch.zeros(pages, 16, 8, 128, dtype=torch.float16, device=DEVICE)
        vbuf = torch.zeros_like(kbuf)
        qbuf = torch.zeros(max_q, 32, 128, dtype=torch.float16, device=DEVICE)
        out = torch.empty_like(qbuf)

        def load(i):
            qbuf.copy_(data[i][0])
            kbuf.zero_(); vbuf.zero_()
            kbuf[: data[i][1].shape[0]] = data[i][1]
            vbuf[: data[i][2].shape[0]] = data[i][2]

        load(0)
        handle = attn.plan(trees[0], data[0][3])
        attn.run(qbuf, kbuf, vbuf, handle, out=out)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        graph.enable_debug_mode()  # keeps the graph for its DOT dump
        with torch.cuda.graph(graph):
            attn.run(qbuf, kbuf, vbuf, handle, out=out)
        record["programmatic_edges"] = programmatic_lines(graph)
        load(1)
        handle = attn.plan(trees[1], data[1][3])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        replayed = out[: trees[1].num_queries].clone()
        eager = attn.run(qbuf, kbuf, vbuf, handle)[: trees[1].num_queries]
        record.update(equal_eager=bool(torch.equal(replayed, eager)),
                      rel_err=float(f"{rel_err(replayed, data[1][4]):.3g}"))
        record["ok"] = record["equal_eager"] and record["rel_err"] <= 2e-3
    except Exception as error:
        record.update(ok=False, error=f"{type(error).__name__}: {error}"[:400],
                      trace=traceback.format_exc()[-1500:])
    RECORDS.append(record)
    print(json.dumps({k: v for k, v in record.items() if k != "trace"}), flush=True)
    save()


def programmatic_lines(graph) -> list:
    """The lines of a captured graph's DOT dump that mention a programmatic dependency (the
    merge's PDL edge; none where capture turned it into a plain edge)."""
    path = Path(os.environ.get("OUT") or "/tmp", "gluon_check_graph.dot")
    try:
        graph.debug_dump(str(path))
        text = path.read_text()
    except Exception as error:  # the dump is evidence, not a check
        return [f"no DOT dump: {type(error).__name__}: {error}"[:200]]
    return [line.strip()[:200] for line in text.splitlines()
            if "programmatic" in line.lower()][:8]


def group_times_sizes(tree, table, times: int) -> tuple:
    """(chunk, group) of the tuned plan of `tree` with its group size times `times` (a group of
    None, no cap, stays None): a variant's ``group_times``."""
    tuned = TreeAttention("deft_flatten", max_queries=tree.num_queries,
                          max_tokens=tree.num_tokens, device=DEVICE).plan(tree, table)
    return tuned.chunk_size, tuned.group_size and tuned.group_size * times


def time_anchor(name, shape_name, page_size=16, copies=4, timing_variants=(),
                fill_chunks=False):
    qh, kvh, d = SHAPES[shape_name]
    tree = wl.anchor(name, attention=AttentionShape(qh, kvh, d, "float16"))
    q, _, _ = random_inputs(tree, torch.float16, 0)
    caches = []
    for c in range(copies):
        _, k, v = random_inputs(tree, torch.float16, 100 + c)
        caches.append(paged_cache(tree, k, v, page_size, c))
    ref = oracle_attention(tree, q, k, v)  # the last copy's: what `out` holds after the replays
    record = dict(section="timing", case=name, shape=shape_name, page_size=page_size)
    runs = [("gluon", "gluon", "default", None), ("triton", "triton", "default", None)]
    for v in timing_variants:
        times = VARIANTS[v].get("group_times")
        sizes = group_times_sizes(tree, caches[0][2], times) if times else None
        runs.append((f"gluon_{v}", "gluon", v, sizes))
    if fill_chunks:  # the chunk whose work items fill two CTAs per SM; the most items of one
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        runs += [("gluon_fill", "gluon", "default", (filling_chunk(tree, kvh, 2 * sms), None)),
                 ("gluon_small", "gluon", "default", (small_grid_chunk(tree, kvh, sms), None))]
    for key, backend, kernel, sizes in runs:
        try:
            # sizes None: the tuned plan (autotune table: chunk and group per tree), the same
            # for both backends; one TreeAttention per KV copy (the copies' page orders differ)
            outs = [torch.empty_like(q) for _ in caches]
            plans = []
            for i, (kc, vc, table) in enumerate(caches):
                a = TreeAttention("deft_flatten", *(sizes or (None, None)),
                                  max_queries=tree.num_queries, max_tokens=tree.num_tokens,
                                  device=DEVICE, backend=backend)
                plans.append((a, a.plan(tree, table), kc, vc, outs[i]))

            def calls():
                for a, h, kc, vc, o in plans:
                    a.run(q, kc, vc, h, out=o)

            with variant(kernel):
                per_call = replay_time(calls) / copies * 1e6
            err = rel_err(outs[-1], ref)
            record[f"{key}_us"] = round(per_call, 2)
            record[f"{key}_rel_err"] = float(f"{err:.3g}")
            record[f"{key}_chunk"] = plans[0][1].reference.chunk_size
            record[f"{key}_group"] = plans[0][1].reference.group_size
            record[f"{key}_partitions"] = plans[0][1].num_partitions
        except Exception as error:
            record[f"{key}_error"] = f"{type(error).__name__}: {error}"[:300]
            record[f"{key}_trace"] = traceback.format_exc()[-1200:]
    if "gluon_us" in record and "triton_us" in record:
        record["speedup"] = round(record["triton_us"] / record["gluon_us"], 3)
    record["ok"] = all(v <= 2e-3 for k, v in record.items() if k.endswith("_rel_err"))
    RECORDS.append(record)
    print(json.dumps({k: v for k, v in record.items() if not k.endswith("trace")}), flush=True)
    save()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--budget", type=float, default=200.0)
    parser.add_argument("--variants", nargs="?", const=",".join(VARIANTS), default="",
                        help="also check and time the VARIANTS (or those named, comma-separated)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"the timing shapes, comma-separated (of {', '.join(SHAPES)})")
    parser.add_argument("--fill", action="store_true",
                        help="also time the Gluon kernel with the chunk whose work items fill "
                             "two CTAs per SM, and with the smallest that fits one CTA per SM")
    parser.add_argument("--compile-only", action="store_true",
                        help="no GPU: compile the default and every variant for sm_90a")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    shapes = args.shapes.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown variants or shapes: {unknown}")
    if args.compile_only:
        return compile_only()
    ok, why = sm90.gluon_supported()
    info = dict(device=torch.cuda.get_device_name(), triton=__import__("triton").__version__,
                torch=torch.__version__, gluon_supported=ok, why_not=why,
                pdl_merge=reduction.PDL_MERGE)
    print(json.dumps(info), flush=True)
    if not ok:
        save(info)
        return 1
    llama = AttentionShape(32, 8, 128, "float16")
    if args.smoke:
        tree = wl.random_tree(1, nodes=12, max_tokens=90, max_queries=2, attention=llama)
        check_case("smoke", "random12", tree, (16, 1), (torch.float16,))
        for v in variants:
            check_case("smoke", "random12", tree, (16, 1), (torch.float16,), kernel=v,
                       backends=("gluon",))
        save(info)
        return 0 if all(r.get("ok") for r in RECORDS) else 1
    f16, b16 = torch.float16, torch.bfloat16
    cases = [
        ("random40_q2", wl.random_tree(2, nodes=40, max_tokens=150, max_queries=2,
                                       attention=llama), (1, 3, 8, 16, 64), (f16, b16), None),
        ("forest3_odd", wl.random_tree(3, nodes=37, max_tokens=77, roots=3, max_queries=3,
                                       attention=AttentionShape(28, 4, 128, "float16")),
         (1, 16), (f16, b16), None),
        ("random_g1_d64", wl.random_tree(4, nodes=30, max_tokens=200, max_queries=2,
                                         attention=AttentionShape(8, 8, 64, "float16")),
         (8, 64), (f16, b16), 96),
        ("random_4_1", wl.random_tree(5, nodes=50, max_tokens=300, max_queries=3,
                                      attention=AttentionShape(4, 1, 128, "float16")),
         (1, 16), (f16, b16), None),
        ("random_group16", wl.random_tree(6, nodes=60, max_tokens=100, max_queries=4,
                                          attention=AttentionShape(32, 2, 128, "float16")),
         (16,), (f16,), 32),
        ("star_1024", wl.star(1024, 300, 3, attention=llama), (16,), (f16,), None),
    ]
    for name, tree, pages, dtypes, chunk in cases:
        if time.time() - START > args.budget * 0.45:
            RECORDS.append(dict(section="random", case=name, skipped="budget"))
            continue
        check_case("random", name, tree, pages, dtypes, chunk)
    check_graph()
    for name in wl.ANCHORS:
        if time.time() - START > args.budget * 0.6:
            RECORDS.append(dict(section="anchor", case=name, skipped="budget"))
            continue
        try:
            tree = wl.anchor(name, attention=llama)
        except Exception as error:
            RECORDS.append(dict(section="anchor", case=name, ok=False, error=str(error)[:200]))
            continue
        check_case("anchor", name, tree, (16,), (f16, b16))
    if variants:  # after the default's checks, so the variants' time cannot skip them
        fewshot = wl.anchor("fewshot_b20_P4000_L200", attention=llama)
        trees = {name: (tree, chunk) for name, tree, _, _, chunk in cases}
        variant_cases = [  # (case, page sizes, dtypes)
            ("random40_q2", (1, 3, 8, 16, 64), (f16, b16)), ("forest3_odd", (3,), (f16,)),
            ("random_g1_d64", (8, 16, 64), (b16,)), ("random_4_1", (1, 16), (f16,)),
            ("random_group16", (16,), (f16,)), ("star_1024", (16, 64), (f16, b16))]
        checked = set()  # kernels: a variant of the plan alone runs one checked already
        for v in variants:
            kernel = tuple(sorted(variant(v).overrides.items(), key=str))
            if not kernel or kernel in checked:
                continue
            checked.add(kernel)
            for name, pages, dtypes in variant_cases:
                tree, chunk = trees[name]
                check_case("random", name, tree, pages, dtypes, chunk, kernel=v,
                           backends=("gluon",))
            check_case("random", "fewshot_b20", fewshot, (16,), (f16,), chunk=64, kernel=v,
                       backends=("gluon",))
    if not args.no_timing:
        for shape in shapes:
            for name in wl.ANCHORS:
                if time.time() - START > args.budget:
                    RECORDS.append(dict(section="timing", case=name, shape=shape,
                                        skipped="budget"))
                    continue
                try:
                    time_anchor(name, shape, timing_variants=variants,
                                fill_chunks=args.fill)
                except Exception as error:
                    RECORDS.append(dict(section="timing", case=name, shape=shape, ok=False,
                                        error=str(error)[:300]))
    save(info)
    summarize(info)
    return 1 if any(r.get("ok") is False for r in RECORDS) else 0


def compile_only():
    """Compile the default kernel and every variant of it (those changing the merge compile as
    the default) for sm_90a with this triton (no GPU) and read ptxas's report: registers, shared memory, spills, C7515. Exit 1 on any of those."""
    import re

    from deft.kernels.deft_flatten_sm90_compile import compile_for_sm90, ptxas_report

    failed = False
    kernel_variants = [v for v, attrs in VARIANTS.items() if any(hasattr(sm90, k) for k in attrs)]
    for name in ("default", *kernel_variants):
        for dtype, kv_heads, group, head_dim in (("fp16", 8, 4, 128), ("bf16", 1, 8, 128),
                                                 ("fp16", 2, 64, 128), ("fp16", 8, 1, 64)):
            record = dict(section="compile", kernel=name, dtype=dtype,
                          shape=f"{kv_heads * group}/{kv_heads}/{head_dim}")
            try:
                with variant(name):
                    compiled = compile_for_sm90(dtype, kv_heads, group, head_dim)
                report = ptxas_report(compiled)
                record.update(
                    registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                    shared=compiled.metadata.shared, c7515="C7515" in report,
                    local=sorted({int(n) for n in re.findall(r"(\d+) bytes (?:stack frame|spill)",
                                                             report)}) != [0])
                record["ok"] = not (record["c7515"] or record["local"])
            except Exception as error:
                record.update(ok=False, error=f"{type(error).__name__}: {error}"[:400])
            failed |= not record["ok"]
            RECORDS.append(record)
            print(json.dumps(record), flush=True)
    save(dict(triton=__import__("triton").__version__))
    return 1 if failed else 0


def summarize(info):
    print(f"\n== {info['device']}, triton {info['triton']}")
    checks = [r for r in RECORDS if r.get("section") in ("random", "anchor", "graph")]
    bad = [r for r in checks if not r.get("ok")]
    print(f"correctness: {len(checks) - len(bad)}/{len(checks)} ok")
    for r in bad:
        print("  FAIL", {k: v for k, v in r.items() if k != "trace"})
    worst = {}
    for r in checks:
        if "gluon_rel_err" in r:
            key = (r.get("kernel", "default"), r["dtype"], r["page_size"])
            worst[key] = max(worst.get(key, 0), r["gluon_rel_err"])
    print("max gluon rel_err by (kernel, dtype, page size):",
          ", ".join(f"{k}/{d}/p{p}: {e:.2e}" for (k, d, p), e in sorted(worst.items())))
    keys = []
    for r in RECORDS:
        if r.get("section") == "timing":
            keys += [k[:-3] for k in r if k.endswith("_us") and k[:-3] not in keys]
    print("timing, graph mode, us per call (4 KV copies), page size 16:")
    widths = [max(13, len(k) + 1) for k in keys]
    print(f"{'anchor':24} {'shape':9}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))
          + f"{'speedup':>8}")
    for r in RECORDS:
        if r.get("section") == "timing" and "gluon_us" in r:
            print(f"{r['case']:24} {r['shape']:9}"
                  + "".join(f"{r.get(k + '_us', float('nan')):{w}.2f}"
                            for k, w in zip(keys, widths))
                  + f"{r.get('speedup', float('nan')):8.3f}")


if __name__ == "__main__":
    sys.exit(main())
