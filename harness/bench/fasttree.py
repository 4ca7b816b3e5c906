"""FastTree as a derived peer: its published times relative to FlashInfer's, scaled by this run.

FastTree (MLSys 2025) cannot be installed here, so it is never run. docs/anchors.md ("Outside
measurement, H200, 2026-12-01") gives its graph-timed µs beside FlashInfer's ``fi_mask`` from
the same outside run, at Llama-3-8B's shape and at the shard shapes. The bench turns each into
a ratio, FastTree µs / ``fi_mask`` µs of that run, and derives a row ``fasttree (derived)`` =
ratio x ``fi_mask``'s µs measured in this run. ``fi_mask`` is the base, as issue #15 states
(e.g. fewshot_b20: FastTree = 0.71 x fi_mask); FlashInfer's other methods do not take every
tree, and the base must be one method for every cell.

The ratios hold for fp16 graph timing at head dim 128 only; other runs get no derived row.
"""

from __future__ import annotations

BASE_METHOD = "fi_mask"
"""The FlashInfer method FastTree's published times are relative to."""

METHOD = "fasttree (derived)"
"""The derived row's method name."""

WRONG = "wrong"
"""A cell where FastTree's output failed the check in the outside run."""

PUBLISHED = {
    "32/8/128": {
        "fewshot_b20_P4000_L200": (36.7, 51.8),
        "fewshot_b50_P4000_L200": (65.2, 148.4),
        "reason_10x500_P1104": (18.7, 32.5),
        "long_P20000_q64_L100": (127.9, 261.5),
    },
    "4/1/128": {
        "fewshot_b20_P4000_L200": (14.4, 42.4),
        "fewshot_b50_P4000_L200": (17.4, 43.6),
        "reason_10x500_P1104": (10.6, 24.7),
        "long_P20000_q64_L100": WRONG,
    },
    "8/1/128": {
        "fewshot_b20_P4000_L200": (16.5, 42.2),
        "fewshot_b50_P4000_L200": (21.5, 51.0),
        "reason_10x500_P1104": (11.1, 40.5),
        "long_P20000_q64_L100": WRONG,
    },
    "16/2/128": {
        "fewshot_b20_P4000_L200": (20.8, 43.5),
        "fewshot_b50_P4000_L200": (35.9, 84.0),
        "reason_10x500_P1104": (13.7, 41.8),
        "long_P20000_q64_L100": WRONG,
    },
}
"""``{shape: {anchor: (FastTree graph µs, fi_mask graph µs) or WRONG}}`` of docs/anchors.md's
outside run (H200, fp16). FastTree takes only trees with one query per leaf: the ``spec_*``
anchors and the off-anchor suite have no entry."""


def published_ratio(workload: str, shape: str):
    """FastTree µs / ``fi_mask`` µs of the outside run for (workload, shape), `WRONG`, or None
    where there is no published number."""
    entry = PUBLISHED.get(shape, {}).get(workload)
    if entry is None or entry == WRONG:
        return entry
    fasttree_us, base_us = entry
    return fasttree_us / base_us


def applies(config: dict) -> bool:
    """Whether a run's configuration is the one the ratios were measured in (fp16, graph)."""
    return config["dtype"] == "float16" and config["timing"] == "graph"
