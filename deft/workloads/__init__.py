"""Decoding workloads: real tree-decoding runs replayed step by step, synthetic trees, anchors.

A *run* is a sequence of decode steps; ``run.tree(i)`` is the decoding tree of step ``i`` and
``run.events(i)`` what changed since step ``i - 1`` (`deft.workloads.runs`).

- `deft.workloads.runs`: `fewshot` (a prompt branching into samples decoded side by side), the
  run classes and the step events.
- `deft.workloads.traces`: the recorded runs, `reasoning` (Tree-of-Thoughts runs of
  Graph-of-Thoughts tasks, ``reasoning/*.json``) and `speculative` (Medusa token-tree
  verification, ``speculative/APPS_tree_size{T}.json``), read from the copy of the DeFT dataset
  shipped in ``deft/workloads/data/`` (or ``workload_dir``, or ``$DEFT_WORKLOADS``).
- `deft.workloads.synthetic`: seeded trees and runs, `random_tree` (trees and forests), `chain`,
  `star`, `tot`, `tot_run`, `token_tree`, `token_tree_run`.
- `deft.workloads.anchors`: the six `ANCHORS` of the performance targets (`anchor`).
- `deft.workloads.suites`: the off-anchor suite (`OFF_ANCHOR`, `off_anchor`), its `HELD_OUT`
  names (never tuned on) and `TUNABLE` ones, and its builders `serving_batch` (a forest of
  requests) and `balanced`.
- `deft.workloads.options`: the kinds by name (`RUN_KINDS`, `TREE_KINDS`) and the one parser of
  their ``KEY=VALUE`` options.

`docs/workloads.md` describes each run and its options.
"""

from deft.workloads.anchors import ANCHORS, anchor
from deft.workloads.options import (
    REQUIRED, RUN_KINDS, TREE_KINDS, kind_options, parse_option_value, parse_options,
)
from deft.workloads.runs import (
    FewshotRun, ReasoningRun, Run, SpeculativeRun, StepEvents, fewshot, step_events,
)
from deft.workloads.suites import (
    HELD_OUT, OFF_ANCHOR, TUNABLE, balanced, off_anchor, serving_batch,
)
from deft.workloads.synthetic import (
    chain, random_tree, star, token_tree, token_tree_paths, token_tree_run, tot, tot_run,
)
from deft.workloads.traces import (
    FIRST_COMPLETE, PACKAGE_DATA, find_workload_file, found_workload_files, reasoning, speculative,
)

__all__ = [
    "ANCHORS", "FIRST_COMPLETE", "HELD_OUT", "OFF_ANCHOR", "PACKAGE_DATA", "REQUIRED",
    "RUN_KINDS", "TREE_KINDS", "TUNABLE",
    "FewshotRun", "ReasoningRun", "Run", "SpeculativeRun", "StepEvents",
    "anchor", "balanced", "chain", "fewshot", "find_workload_file", "found_workload_files",
    "kind_options", "off_anchor", "parse_option_value", "parse_options", "random_tree",
    "reasoning", "serving_batch", "speculative", "star", "step_events", "token_tree",
    "token_tree_paths", "token_tree_run", "tot", "tot_run",
]
