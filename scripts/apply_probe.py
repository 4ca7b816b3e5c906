#!/usr/bin/env python3
"""Where `deft.cache.TreeCache.apply`'s host time goes, over whole runs (issue #16).

    python scripts/apply_probe.py [cpu|cuda]   # about 10 s; medians in microseconds, also to
                                               # $OUT/apply_probe_<device>.json where $OUT is set

Per run (`RUNS`, six of scripts/plan_overhead.py's, their first 400 steps), apply alone step
after step (no planning between, so warmer caches than plan_overhead's ``apply`` column): the
whole call, its numpy/compiled step (``grow_step`` a
decode step, ``replace_step`` a speculative one; a count and a median) and the slots' upload
to the pool's device (``upload``).
"""
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import deft.cache as cache_module  # noqa: E402
from deft.cache import PagedKVCache, TreeCache, pages_for  # noqa: E402
from plan_overhead import runs, timed  # noqa: E402

RUNS = ("fewshot_b20", "keywordToT", "spec_t64", "spec_t256", "spec_t256_P63000",
        "fewshot_b256_P55296")
parts = {}


def timed_part(name, fn):
    """``fn``, its calls' host microseconds kept in ``parts[name]``."""
    def wrapper(*args, **kwargs):
        out, us = timed(lambda: fn(*args, **kwargs))
        parts.setdefault(name, []).append(us)
        return out
    return wrapper


def median(values) -> float:
    return round(statistics.median(values[1:] if len(values) > 1 else values), 1)


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    cache_module.grow_step = timed_part("grow_step", cache_module.grow_step)
    cache_module.replace_step = timed_part("replace_step", cache_module.replace_step)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    for name, run in runs(None).items():
        if name not in RUNS:
            continue
        trees = [run.tree(i) for i in range(min(len(run), 400))]
        big = max(trees, key=lambda t: t.num_tokens)
        cache = TreeCache(PagedKVCache(4 * pages_for(big, 16) + 64, 16, 1, 16, device=device))
        cache._slots_to_device = timed_part("upload", cache._slots_to_device)
        parts.clear()
        total = []
        for tree in trees:
            total.append(timed(lambda: cache.apply(tree))[1])
        if device == "cuda":
            torch.cuda.synchronize()
        row = {"steps": len(trees), "apply": median(total)}
        row.update({part: (len(v), median(v)) for part, v in parts.items()})
        result[name] = row
        print(name, row, flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"apply_probe_{device}.json").write_text(json.dumps(result,
                                                                                   indent=1))


if __name__ == "__main__":
    main()
