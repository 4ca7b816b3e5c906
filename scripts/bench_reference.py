"""Time every reference strategy on the six anchor workloads (docs/anchors.md).

Llama-3-8B attention (32 query heads, 8 KV heads, head dim 128), fp16 inputs computed in fp32,
default chunk and group sizes. Prints seconds per call (the plan is built inside the call, as
`reference.attention` does) with the error against the float64 oracle, then the peak resident
memory of the process. CPU time is printed too: on a shared machine wall time is noisy.

    python scripts/bench_reference.py [--workload NAME ...] [--strategy NAME ...]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

import reference
from deft.workloads import ANCHORS, anchor


def random_inputs(tree, seed: int = 0):
    """fp16 q [queries, q_heads, head_dim] and k, v [tokens, kv_heads, head_dim]."""
    generator = torch.Generator().manual_seed(seed)
    shape = tree.attention

    def draw(rows, heads):
        return torch.randn(rows, heads, shape.head_dim, generator=generator).to(torch.float16)

    q = draw(tree.num_queries, shape.q_heads)
    return q, draw(tree.num_tokens, shape.kv_heads), draw(tree.num_tokens, shape.kv_heads)


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", nargs="+", default=list(ANCHORS), choices=ANCHORS)
    parser.add_argument("--strategy", nargs="+", default=list(reference.STRATEGIES), choices=reference.STRATEGIES)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("wall seconds per call / CPU seconds (rel_err against the float64 oracle)")
    print(f"{'workload':<24}{'strategy':<18}{'wall s':>8}{'cpu s':>8}{'rel_err':>10}")
    total = 0.0
    for name in args.workload:
        tree = anchor(name)
        q, k, v = random_inputs(tree)
        ref, wall, cpu = timed(reference.oracle_attention, tree, q, k, v)
        print(f"{name:<24}{'(oracle, float64)':<18}{wall:8.2f}{cpu:8.2f}")
        for strategy in args.strategy:
            (out, _), wall, cpu = timed(reference.attention, strategy, tree, q, k, v)
            total += wall
            print(f"{'':<24}{strategy:<18}{wall:8.2f}{cpu:8.2f}{reference.rel_err(out, ref):10.1e}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"strategies: {total:.1f} s in all; peak resident memory {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
