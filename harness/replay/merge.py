"""Step ranges of one run, replayed in separate calls (``--step-range A:B``), merged into one
record: a full-run result when the ranges cover the run exactly."""

from __future__ import annotations

import copy

from harness.replay.result import summarise

SAME = ("format", "config")
"""Keys of a result that every part of one run must share."""


def merge(parts: list) -> dict:
    """One result of a run's step-range parts (in any order), summarised again.

    Per-step times are concatenated in step order, traffic summed, the worst rel_err kept; a
    method that failed in any part is failed in the whole. Raises ValueError for parts of
    different runs or settings, sampled parts, and ranges that leave a gap or overlap.
    """
    if not parts:
        raise ValueError("nothing to merge")
    for part in parts:
        if part["workload"]["step_range"] is None:
            raise ValueError(f"{part['workload']['name']}: a sampled replay (--max-steps) "
                             "cannot be merged into a full run")
    parts = sorted(parts, key=lambda p: p["workload"]["step_range"][0])
    first = parts[0]
    name = first["workload"]["name"]
    for part in parts[1:]:
        if part["workload"]["name"] != name or part["workload"]["steps"] != \
                first["workload"]["steps"]:
            raise ValueError(f"cannot merge {part['workload']['name']} into {name}")
        for key in SAME:
            if part[key] != first[key]:
                raise ValueError(f"{name}: the parts differ in {key}")
        if [e["method"] for e in part["methods"]] != [e["method"] for e in first["methods"]]:
            raise ValueError(f"{name}: the parts ran different methods")
    for before, after in zip(parts, parts[1:]):
        end, start = before["workload"]["step_range"][1], after["workload"]["step_range"][0]
        if start > end:
            raise ValueError(f"{name}: steps {end}:{start} are in no part (a gap)")
        if start < end:
            raise ValueError(f"{name}: steps {start}:{end} are in two parts (an overlap)")
    merged = copy.deepcopy(first)
    w = merged["workload"]
    for part in parts[1:]:
        w["step_indices"] += part["workload"]["step_indices"]
        for into, entry in zip(merged["methods"], part["methods"]):
            _merge_entry(into, entry)
        if merged["upper_bound"] is not None:
            _merge_upper(merged["upper_bound"], part["upper_bound"])
    w["step_range"] = [first["workload"]["step_range"][0], parts[-1]["workload"]["step_range"][1]]
    w["replayed"] = len(w["step_indices"])
    w["complete"] = w["replayed"] == w["steps"]
    w["parts"] = [p["workload"]["step_range"] for p in parts]
    merged["cache"] = parts[-1]["cache"]
    return summarise(merged)


def _merge_entry(into: dict, entry: dict) -> None:
    for key, values in entry["per_step_ms"].items():
        into["per_step_ms"][key] += values
    for key in ("traffic", "kernel_traffic"):
        if into[key] is not None and entry[key] is not None:
            into[key] = {k: into[key][k] + entry[key][k] for k in into[key]}
        elif entry[key] is not None:
            into[key] = dict(entry[key])
    errors = [e for e in (into["rel_err"], entry["rel_err"]) if e is not None]
    into["rel_err"] = max(errors) if errors else None
    if into["status"] == "ok" and entry["status"] != "ok":
        into["status"], into["reason"] = entry["status"], entry["reason"]
    into["capture_error"] = into["capture_error"] or entry["capture_error"]
    into["e2e_timing"] = into["e2e_timing"] or entry["e2e_timing"]


def _merge_upper(into: dict, upper: dict) -> None:
    into["per_step_ms"] += upper["per_step_ms"]
    if into["status"] == "ok" and upper["status"] != "ok":
        into["status"], into["reason"] = upper["status"], upper["reason"]


def combine(results: list) -> list:
    """Saved results with each run's step-range parts merged (`merge`), in first-seen order."""
    by_run, order = {}, []
    for result in results:
        key = result["workload"]["name"]
        if result["workload"]["step_range"] is None or result["workload"]["complete"]:
            key = (key, len(order))  # sampled or whole: stands alone
        if key not in by_run:
            by_run[key] = []
            order.append(key)
        by_run[key].append(result)
    return [merge(by_run[key]) if isinstance(key, str) else by_run[key][0] for key in order]
