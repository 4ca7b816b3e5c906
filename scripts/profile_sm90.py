#!/usr/bin/env python3
"""Launch DeFT-Flatten (the default backend: Gluon on sm_90) a few times per anchor and shape,
for Nsight Compute (GPU machine).

    ncu -k regex:_partials_sm90 ... python scripts/profile_sm90.py [--anchors a,b] [--shapes 32/8,4/1]

Per (anchor, shape): the tuned plan over a page-size-16 cache of random fp16 K/V, two runs
(``--runs``); every launch of the partials and merge kernels is one ncu record, in the order the
script prints the cases, each case's runs inside an NVTX range named "ANCHOR SHAPE" (``ncu
--nvtx`` shows it on every record). No timing and no check here (`scripts/gluon_check.py` does those).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deft import workloads as wl  # noqa: E402
from deft.plan_buffers import paged_cache  # noqa: E402
from deft.tree import AttentionShape  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from harness.inputs import make_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anchors", default=",".join(wl.ANCHORS))
    parser.add_argument("--shapes", default="32/8")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        q_heads, kv_heads = (int(x) for x in shape.split("/"))
        attention = AttentionShape(q_heads, kv_heads, args.head_dim, "float16")
        for name in args.anchors.split(","):
            inputs = make_inputs(wl.anchor(name, attention=attention), torch.float16)
            tree, q = inputs.tree, inputs.q
            k_cache, v_cache, table = paged_cache(tree, inputs.k[0], inputs.v[0], 16, 0)
            attn = TreeAttention("deft_flatten", max_queries=tree.num_queries,
                                 max_tokens=tree.num_tokens, device="cuda")
            plan = attn.plan(tree, table)
            out = torch.empty_like(q)
            torch.cuda.nvtx.range_push(f"{name} {shape}")
            for _ in range(args.runs):
                attn.run(q, k_cache, v_cache, plan, out=out)
            torch.cuda.synchronize()
            torch.cuda.nvtx.range_pop()
            print(f"{name} {shape}/{args.head_dim}: chunk {plan.reference.chunk_size} group "
                  f"{plan.reference.group_size} partitions {plan.num_partitions} small_grid "
                  f"{plan.small_grid}", flush=True)


if __name__ == "__main__":
    main()
