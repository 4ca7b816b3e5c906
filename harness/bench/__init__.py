"""`deft-cli bench`: every strategy and every installed peer, side by side, against a measured floor.

One run measures the floor first (a large device copy and a large GEMM,
`harness.bench.floor`), then, for every shape (``--heads``) x workload x method: builds random inputs, checks the
method's output against the float64 oracle, and times it (`harness.timing`: eager with
`triton.testing.do_bench`, or one CUDA graph over rotating KV copies). Methods are this
project's strategies through `deft.TreeAttention` and the peers (`harness.peers`,
`harness.sglang`), in the harness's one registry (`harness.registry`). `harness.bench.report`
renders the table, the JSON and the plot; `harness.bench.calibrate` fits the IO model's latency
constants to a bench JSON; `harness.bench.summary` adds ratios, the derived FastTree rows
(`harness.bench.fasttree`) and per-shape summaries, `harness.bench.verdicts` the verdict of each
target clause. docs/benchmarks.md describes the method and the exact command.

Everything that needs a GPU or a peer package imports it lazily: this package imports on a
CPU-only machine.
"""

from harness.bench.calibrate import calibrate
from harness.inputs import DTYPES
from harness.bench.report import plot_result, render, render_calibration, write_json
from harness.bench.runner import run_bench
from harness.bench.select import WorkloadSpec, cells, parse_heads, parse_workloads, shape_label
from harness.bench.summary import merge_results
from harness.bench.verdicts import verdicts
from harness.registry import DEFAULT_METHODS, METHODS, parse_methods

__all__ = [
    "DEFAULT_METHODS",
    "DTYPES",
    "METHODS",
    "WorkloadSpec",
    "calibrate",
    "cells",
    "merge_results",
    "parse_heads",
    "parse_methods",
    "parse_workloads",
    "plot_result",
    "render",
    "render_calibration",
    "run_bench",
    "shape_label",
    "verdicts",
    "write_json",
]
