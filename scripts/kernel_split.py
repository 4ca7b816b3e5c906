#!/usr/bin/env python3
"""Where DeFT-Flatten's graph time goes: each anchor's call timed whole and in parts (GPU).

    OUT=/some/dir python3 scripts/kernel_split.py [--anchors a,b] [--shapes 32/8,4/1]

Per (anchor, shape), CUDA-graph timing over 4 KV copies (page size 16, the tuned plan, as
`scripts/gluon_check.py` times), µs per call, of:

- ``run``: the whole call (`TreeAttention.run`: partials kernel, then the merge as its
  programmatic dependent on sm_90);
- ``partials``: the partials kernel alone;
- ``merge``: the merge alone (plain launches, so each waits for the one before), and
  ``merge_pdl``: the same launched as programmatic dependents of the kernel before;
- ``two_empty``: two empty Triton kernels, the graph's floor for any two-launch call.

So ``partials + merge - run`` is what the programmatic launch overlaps, and ``run -
partials`` what the merge adds to a call. ``--merge-blocks`` times every cell again with the
per-head merge's row block forced to each value (the plan's own is
`deft.kernels.reduction.merge_block`). Each record's ``rel_err`` is the
last copy's output (last written by the merge alone) against the float64 oracle; the full
numerical checks are `gluon_check.py`'s. ``$OUT/kernel_split.json`` holds every record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

if "--cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module loads

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from deft.kernels import reduction  # noqa: E402
from deft.kernels.tree_attention_op import launch_partials  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.tree import AttentionShape  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from harness.inputs import make_inputs  # noqa: E402
from harness.timing import CudaTimer  # noqa: E402
from reference.oracle import oracle_attention, rel_err  # noqa: E402

COPIES = 4


@triton.jit
def _empty_kernel(x_ptr):
    if tl.program_id(0) < 0:  # never: a launch that does nothing
        tl.store(x_ptr, 0)


def parts(attn, plan, q, k_cache, v_cache, out):
    """(partials, merge, merge_pdl) launches of one call, as `TreeAttention.run` makes them."""
    _, q_heads, head_dim = q.shape
    config, programs = attn._launch_config(head_dim, q_heads, k_cache.shape[2])
    o_part, lse_part = attn._partials_workspace(q_heads, head_dim)
    views, scale = attn.buffers.views, 1.0 / math.sqrt(head_dim)

    def partials():
        launch_partials(q, k_cache, v_cache, views, o_part, lse_part, attn.flat, scale, config,
                        programs, attn.backend == "gluon", plan.small_grid)

    def merged(pdl):
        return lambda: reduction.merge(o_part, lse_part, views, out, None,
                                       per_query=plan.per_query_merge, dependent_launch=pdl,
                                       block=plan.merge_block)

    return partials, merged(False), merged(True)


def time_cell(name: str, shape: str, timer, device: str = "cuda") -> dict:
    """One anchor at one head shape (`timer`: a `CudaTimer`, or `dry_run` on the CPU)."""
    q_heads, kv_heads = (int(x) for x in shape.split("/"))
    tree = wl.anchor(name, attention=AttentionShape(q_heads, kv_heads, 128, "float16"))
    inputs = make_inputs(tree, torch.float16, copies=COPIES, device=device)
    tree, q = inputs.tree, inputs.q
    cells = []
    for c in range(COPIES):
        k_cache, v_cache, table = paged_cache(tree, inputs.k[c], inputs.v[c], 16, c)
        attn = TreeAttention("deft_flatten", max_queries=tree.num_queries,
                             max_tokens=tree.num_tokens, device=device)
        plan = attn.plan(tree, table)
        out = torch.empty_like(q)
        attn.run(q, k_cache, v_cache, plan, out=out)
        cells.append((attn, plan, k_cache, v_cache, out))
    record = dict(anchor=name, shape=shape, merge_block=cells[0][1].merge_block,
                  chunk=cells[0][1].reference.chunk_size,
                  group=cells[0][1].reference.group_size, partitions=cells[0][1].num_partitions,
                  small_grid=cells[0][1].small_grid, per_query_merge=cells[0][1].per_query_merge)
    launches = [parts(a, p, q, kc, vc, o) for a, p, kc, vc, o in cells]
    flag = torch.zeros(1, dtype=torch.int32, device=device)
    variants = {
        "run": [lambda c=c: c[0].run(q, c[2], c[3], c[1], out=c[4]) for c in cells],
        "partials": [p[0] for p in launches],
        "merge": [p[1] for p in launches],
        "merge_pdl": [p[2] for p in launches],
        "two_empty": [lambda: (_empty_kernel[(1,)](flag), _empty_kernel[(1,)](flag))] * COPIES,
    }
    for key, calls in variants.items():
        try:
            record[f"{key}_us"] = round(timer(calls), 2)
        except Exception as error:  # noqa: BLE001 - a record of what failed
            record[f"{key}_error"] = f"{type(error).__name__}: {error}"[:300]
    # the last copy's output, last written by the merge alone, against the float64 oracle
    expected = oracle_attention(tree, q, inputs.k[-1], inputs.v[-1])
    record["rel_err"] = float(f"{rel_err(cells[-1][4], expected):.3g}")
    return record


def graph_us(calls) -> float:
    """Median µs per call of a CUDA graph of `calls`, replayed (`harness.timing.CudaTimer`)."""
    return CudaTimer().graph(calls)[0].median_us


def dry_run(calls) -> float:
    """Run `calls` once (the CPU check of this script's code paths; no time is measured)."""
    for call in calls:
        call()
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", default=",".join(wl.ANCHORS))
    parser.add_argument("--shapes", default="32/8,8/1,4/1")
    parser.add_argument("--merge-blocks", default="",
                        help="also time every cell with the per-head merge's row block forced "
                             "to each of these (comma-separated; the rule's rows come first)")
    parser.add_argument("--cpu", action="store_true",
                        help="run each variant once on the CPU (TRITON_INTERPRET=1), no timing")
    args = parser.parse_args()
    records, device = [], "cpu" if args.cpu else "cuda"
    out = Path(os.environ.get("OUT", "."), "kernel_split.json")
    rule = (reduction.BLOCK_E, reduction.MAX_BLOCK_E)
    for block in [None] + [int(b) for b in args.merge_blocks.split(",") if b]:
        # None: the rule (`reduction.merge_block`); else least = largest block = `block`, read
        # by each plan (each cell plans and captures its graphs anew)
        reduction.BLOCK_E, reduction.MAX_BLOCK_E = rule if block is None else (block, block)
        for shape in args.shapes.split(","):
            for name in args.anchors.split(","):
                record = time_cell(name, shape, dry_run if args.cpu else graph_us, device)
                record["forced_block"] = block
                records.append(record)
            print(json.dumps(record), flush=True)
            out.write_text(json.dumps(dict(device=torch.cuda.get_device_name() if device == "cuda"
                                           else "cpu",
                                           records=records), indent=1))
    keys = ("run", "partials", "merge", "merge_pdl", "two_empty")
    print(f"{'anchor':24} {'shape':6} {'items':>6} {'block':>5} "
          + " ".join(f"{k:>10}" for k in keys) + "    rel_err")
    for r in records:
        items = r["partitions"] * int(r["shape"].split("/")[1])
        print(f"{r['anchor']:24} {r['shape']:6} {items:6d} {r['merge_block']:5d} "
              + " ".join(f"{r.get(k + '_us', float('nan')):10.2f}" for k in keys)
              + f"  {r['rel_err']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
