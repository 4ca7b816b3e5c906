"""`deft-cli bench`: every strategy and every installed peer, side by side, against a measured floor.

One run measures the floor first (a large device copy and a large GEMM,
`deft.bench.floor`), then, for every workload x method: builds random inputs, checks the
method's output against the float64 oracle, and times it (`deft.bench.timing`: eager with
`triton.testing.do_bench`, or one CUDA graph over rotating KV copies). Methods are this
project's strategies through `deft.TreeAttention` and the peers of ANCHORS.md
(`deft.bench.peers`), in one registry (`deft.bench.methods`). `deft.bench.report` renders the
table, the JSON and the plot; `deft.bench.calibrate` fits the IO model's latency constants to
a bench JSON. docs/benchmarks.md describes the method and the exact command.

Everything that needs a GPU or a peer package imports it lazily: this package imports on a
CPU-only machine.
"""

from deft.bench.calibrate import calibrate
from deft.bench.inputs import DTYPES
from deft.bench.methods import DEFAULT_METHODS, METHODS, parse_methods
from deft.bench.report import plot_result, render, render_calibration, write_json
from deft.bench.runner import run_bench
from deft.bench.select import WorkloadSpec, parse_workloads

__all__ = [
    "DEFAULT_METHODS",
    "DTYPES",
    "METHODS",
    "WorkloadSpec",
    "calibrate",
    "parse_methods",
    "parse_workloads",
    "plot_result",
    "render",
    "render_calibration",
    "run_bench",
    "write_json",
]
