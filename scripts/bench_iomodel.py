"""Time the IO model: every strategy's traffic and latency on a 1000-node tree with 256 queries.

    python scripts/bench_iomodel.py [--nodes 1000] [--queries 256] [--repeat 3]

The tree is a random recursive tree (a 4000-token root, 1..64 tokens a node) with one query on
each of `queries` leaves chosen at random. Prints, per strategy, the best of `repeat` timings
of building the plan, predicting its traffic and its latency, and the total.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from deft.tree import Tree
from iomodel import predict_latency, resolve_gpu, traffic_of_plan
from deft.plan import build_plan
from deft.strategies import STRATEGIES


def bench_tree(nodes: int, queries: int, seed: int = 0) -> Tree:
    """A random recursive tree of `nodes` nodes with one query on `queries` of its leaves."""
    rng = np.random.default_rng(seed)
    parent = (rng.random(nodes) * np.arange(nodes)).astype(np.int64)
    tokens = rng.integers(1, 65, nodes)
    tokens[0] = 4000
    leaves = np.flatnonzero(np.bincount(parent[1:], minlength=nodes) == 0)
    if len(leaves) < queries:
        raise SystemExit(f"the tree has only {len(leaves)} leaves; ask for fewer queries")
    count = np.zeros(nodes, dtype=np.int64)
    count[rng.choice(leaves, queries, replace=False)] = 1
    parents = [None] + parent[1:].tolist()
    return Tree(range(nodes), parents, tokens.tolist(), count.tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tree = bench_tree(args.nodes, args.queries)
    gpu = resolve_gpu("h100")
    print(f"{tree!r}; best of {args.repeat}, milliseconds")
    header = ("plan", "traffic", "latency", "total")
    print(f"{'strategy':18s} " + " ".join(f"{h:>8s}" for h in header) + f" {'partitions':>11s}")
    grand = 0.0
    for strategy in STRATEGIES:
        best = None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            plan = build_plan(strategy, tree)
            t1 = time.perf_counter()
            traffic = traffic_of_plan(plan)
            t2 = time.perf_counter()
            predict_latency(plan, gpu, traffic)
            t3 = time.perf_counter()
            times = (t1 - t0, t2 - t1, t3 - t2)
            if best is None or sum(times) < sum(best):
                best = times
        grand += sum(best)
        plan_ms, traffic_ms, latency_ms = (1e3 * t for t in best)
        print(
            f"{strategy:18s} {plan_ms:8.1f} {traffic_ms:8.1f} {latency_ms:8.1f} "
            f"{plan_ms + traffic_ms + latency_ms:8.1f} {plan.num_partitions:11d}"
        )
    print(f"{'all strategies':18s} {'':8s} {'':8s} {'':8s} {1e3 * grand:8.1f}")


if __name__ == "__main__":
    main()
