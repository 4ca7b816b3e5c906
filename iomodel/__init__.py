"""The IO model: traffic, load balance and latency of every strategy, predicted from plans.

`predict_traffic` gives the exact bytes `reference.attention` counts (docs/design.md's rules),
`predict_latency` a roofline estimate on a GPU spec (`resolve_gpu`; for deft_flatten a model of
its kernels, `iomodel.kernel_model`), `floor` the physical limit of one call (docs/anchors.md),
and `run_totals` sums traffic over every decode step of a run.
"""

from iomodel.gpus import BUILTIN, GpuSpec, GpuSpecError, detect_gpu, load_gpu_spec, resolve_gpu
from iomodel.latency import Constants, estimate, floor, predict_latency
from iomodel.runs import run_totals
from iomodel.traffic import TRAFFIC_KEYS, predict_traffic, traffic_of_plan

__all__ = [
    "BUILTIN",
    "Constants",
    "GpuSpec",
    "GpuSpecError",
    "TRAFFIC_KEYS",
    "detect_gpu",
    "estimate",
    "floor",
    "load_gpu_spec",
    "predict_latency",
    "predict_traffic",
    "resolve_gpu",
    "run_totals",
    "traffic_of_plan",
]
