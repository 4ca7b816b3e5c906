"""`deft-cli bench` on a CPU: registry, workload syntax, floor arithmetic, the loop, the report.

Timing numbers need the GPU run (scripts/bench_gpu.sh); here the loop runs with a wall-clock
timer on CPU-capable methods (sdpa, eager flex) and small trees, and GPU-only methods must
come out skipped with a reason. The Triton paths (this project's kernels, SGLang's kernel)
run under TRITON_INTERPRET=1 in a subprocess.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main
from harness import bench, peers
from harness.methods import Variant
from harness.bench.floor import FloorRates, measure_rates, workload_floor
from harness.inputs import Inputs, dense_mask, make_inputs, query_paths, with_dtype
from deft.plan import ranges
from harness.registry import GPU_STRATEGIES, GROUPS, METHODS, PYTORCH_STRATEGIES
from harness.bench.summary import finish
from harness.bench.select import parse_workload
from harness.timing import Timing, WallTimer
from deft.tree import AttentionShape, Tree
from deft.tree_format import tree_to_dict
from deft.workloads import ANCHORS, anchor, random_tree, star

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROOT = Path(__file__).parent.parent
SMALL = AttentionShape(q_heads=4, kv_heads=2, head_dim=16)
H200_RATES = FloorRates(4245e9, 678e12, 1, 1.0, 1, 1.0, "float16")  # an earlier H200 run, docs/iomodel.md
PEERS = ("fi_cascade", "fi_decode", "fi_mask", "sglang", "sdpa", "flex")


def small_tree_file(tmp_path) -> Path:
    """A three-level tree.json with a small head shape (fast on the CPU)."""
    tree = Tree([0, 1, 2, 3, 4], [None, 0, 0, 1, 1], [50, 9, 5, 3, 4], [0, 0, 2, 1, 2], SMALL)
    path = tmp_path / "small.json"
    path.write_text(json.dumps(tree_to_dict(tree)))
    return path


# ---------------------------------------------------------------------------- registry
def test_registry_names_every_strategy_and_peer():
    assert set(METHODS) == set(GPU_STRATEGIES) | set(PYTORCH_STRATEGIES) | set(PEERS)
    assert bench.DEFAULT_METHODS == GPU_STRATEGIES + PEERS
    assert not set(PYTORCH_STRATEGIES) & set(bench.DEFAULT_METHODS)
    for name, method in METHODS.items():
        assert method.name == name and method.description
        assert method.kind == ("peer" if name in PEERS else "deft")


def test_parse_methods_groups_order_and_errors():
    names = [m.name for m in bench.parse_methods("sdpa, peers,deft_flatten,vanilla_tree")]
    assert names == ["sdpa", *[p for p in GROUPS["peers"] if p != "sdpa"], "deft_flatten",
                     "vanilla_tree"]
    assert [m.name for m in bench.parse_methods("all")] == list(bench.DEFAULT_METHODS)
    with pytest.raises(ValueError, match="unknown method 'nope'.*deft_flatten.*groups"):
        bench.parse_methods("sdpa,nope")
    with pytest.raises(ValueError, match="no method"):
        bench.parse_methods(" , ")


# ---------------------------------------------------------------------------- workloads
def test_all_is_the_six_anchors():
    specs = bench.parse_workloads("all")
    assert [s.text for s in specs] == list(ANCHORS)
    assert {s.kind for s in specs} == {"anchor"}
    assert specs[0].tree().num_queries == 20


def test_tree_json_path(tmp_path):
    path = small_tree_file(tmp_path)
    (spec,) = bench.parse_workloads(str(path))
    assert spec.kind == "file"
    assert spec.tree().attention == SMALL


def test_run_steps_and_single_trees():
    spec = parse_workload("fewshot:width=3:prompt_tokens=10:iterations=5:step=2")
    assert (spec.kind, spec.step) == ("fewshot", 2)
    tree = spec.tree()
    assert tree.tokens.tolist() == [10, 3, 3, 3]
    assert parse_workload("fewshot:width=3:iterations=5").step == -1  # the last step
    assert parse_workload("fewshot:width=3:iterations=5").tree().tokens.tolist()[1] == 5
    assert parse_workload("star:leaves=4:root_tokens=7").tree().num_queries == 4
    assert parse_workload("token-tree:seed=1:size=9").tree().num_nodes == 9


@pytest.mark.parametrize("text, message", [
    ("nope", "not a workload kind"),
    ("fewshot:width", "bad option 'width'"),
    ("fewshot:colour=3", "bad option 'colour=3'"),
    ("fewshot:step=last", "step must be an integer"),
    ("star:leaves=3:step=2", "bad option 'step=2'"),
    ("reasoning:step=3", "missing option.*path"),
])
def test_bad_workload_syntax(text, message):
    with pytest.raises(ValueError, match=message):
        bench.parse_workloads(text)


def test_missing_file_fails_only_when_built():
    spec = parse_workload("missing/tree.json")
    with pytest.raises(ValueError, match="cannot read"):
        spec.tree()


# ---------------------------------------------------------------------------- the floor
# The floor column of an earlier H200 run (docs/iomodel.md): (bytes µs, flops µs) at 4245 GB/s and 678 TFLOP/s.
ANCHOR_FLOORS = {
    "fewshot_b20_P4000_L200": (7.8, 2.0),
    "fewshot_b50_P4000_L200": (13.7, 5.1),
    "reason_10x500_P1104": (5.9, 0.4),
    "spec_t64_P4000": (4.2, 6.1),
    "spec_t256_P4000": (5.1, 24.7),
    "long_P20000_q64_L100": (25.7, 31.1),
}


@pytest.mark.parametrize("name", ANCHORS)
def test_floor_matches_anchors_table(name):
    tree = anchor(name)
    floor = workload_floor(tree, H200_RATES.copy_bandwidth, H200_RATES.matmul_rate)
    memory, compute = ANCHOR_FLOORS[name]
    assert floor["memory_us"] == pytest.approx(memory, abs=0.051)
    assert floor["compute_us"] == pytest.approx(compute, abs=0.051)
    assert floor["floor_us"] == max(floor["memory_us"], floor["compute_us"])
    assert floor["bound"] == ("memory" if memory > compute else "compute")


class FixedTimer:
    """Every call takes `us` microseconds."""

    def __init__(self, us):
        self.us = us

    def eager(self, fn):
        fn()
        return Timing(self.us, self.us, self.us)


def test_measured_rates_arithmetic():
    rates = measure_rates(FixedTimer(100.0), "cpu", torch.float16, copy_bytes=1 << 20,
                          gemm_size=64)
    assert rates.copy_bytes == 1 << 20
    assert rates.copy_bandwidth == pytest.approx(2 * (1 << 20) / 100e-6)  # read + written
    assert rates.matmul_rate == pytest.approx(2 * 64**3 / 100e-6)
    assert rates.to_dict()["copy_bandwidth_gb_s"] == pytest.approx(rates.copy_bandwidth / 1e9)
    real = measure_rates(WallTimer(repeats=2), "cpu", torch.float16, copy_bytes=1 << 16,
                         gemm_size=32)
    assert real.copy_bandwidth > 0 and real.matmul_rate > 0


# ---------------------------------------------------------------------------- inputs
def test_paths_and_masks_agree():
    tree = random_tree(3, nodes=15, max_tokens=9, roots=2, max_queries=3)
    indptr, indices = query_paths(tree)
    mask = dense_mask(tree)
    for q in range(tree.num_queries):
        assert sorted(indices[indptr[q]:indptr[q + 1]]) == np.flatnonzero(mask[q]).tolist()
    assert ranges(np.array([5, 0]), np.array([2, 3])).tolist() == [5, 6, 0, 1, 2]


def test_flex_mask_mod_is_the_tree_mask():
    tree = random_tree(4, nodes=12, max_tokens=7, max_queries=2)
    padded = 16
    mask_mod = peers.tree_mask_mod(tree, padded, "cpu")
    q_idx = torch.arange(padded)[:, None]
    kv_idx = torch.arange(tree.num_tokens)[None, :]
    got = mask_mod(0, 0, q_idx, kv_idx).numpy()
    assert (got[: tree.num_queries] == dense_mask(tree)).all()
    assert (got[tree.num_queries:, 0]).all() and not got[tree.num_queries:, 1:].any()


def test_inputs_shapes_and_dtype():
    tree = star(3, 20, 4, attention=SMALL)
    inputs = make_inputs(tree, torch.bfloat16, copies=4, device="cpu", seed=1)
    assert inputs.tree.attention.dtype == "bfloat16" and inputs.copies == 4
    assert inputs.q.shape == (3, 4, 16) and inputs.k[3].shape == (32, 2, 16)
    assert not torch.equal(inputs.k[0], inputs.k[1])
    assert with_dtype(inputs.tree, torch.bfloat16) is inputs.tree


# ---------------------------------------------------------------------------- skip reasons
def test_gpu_methods_are_skipped_on_cpu():
    inputs = make_inputs(star(2, 8, 2, attention=SMALL), torch.float16, device="cpu")
    for name in ("fi_cascade", "fi_decode", "fi_mask", "sglang", *GPU_STRATEGIES):
        if name in GPU_STRATEGIES and os.environ.get("TRITON_INTERPRET") == "1":
            continue
        assert "CUDA" in METHODS[name].unavailable(inputs.device, inputs.tree)
    for name in ("sdpa", "flex", *PYTORCH_STRATEGIES):
        assert METHODS[name].unavailable(inputs.device, inputs.tree) is None


def test_missing_peers_are_skipped_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("flashinfer", "sglang") else real(name, *a))
    tree = star(2, 8, 2, attention=SMALL)
    inputs = Inputs(tree, torch.empty(0), [], [], 1.0, 16)
    monkeypatch.setattr(Inputs, "device", property(lambda self: torch.device("cuda")))
    for name in ("fi_cascade", "fi_decode", "fi_mask"):
        assert "flashinfer is not installed" in METHODS[name].unavailable(inputs.device, inputs.tree)
    assert "sglang is not installed" in METHODS["sglang"].unavailable(inputs.device, inputs.tree)


def test_cascade_needs_a_prefix_with_branches():
    assert peers.two_level_reason(star(3, 10, 2)) is None
    assert "levels deep" in peers.two_level_reason(Tree([0, 1, 2], [None, 0, 1], [4, 2, 2]))
    assert "forest" in peers.two_level_reason(random_tree(0, nodes=6, roots=2))
    assert "queries on its root" in peers.two_level_reason(Tree([0, 1], [None, 0], [4, 2], [1, 1]))


# ---------------------------------------------------------------------------- the loop and JSON
ROW_KEYS = {"workload", "method", "kind", "status", "reason", "us", "p10_us", "p90_us", "timing",
            "capture_error", "variant", "variants", "rel_err", "graph_rel_err", "plan_us",
            "params", "ratio_to_floor", "speedup_vs_best_peer", "seconds", "shape",
            "speedup_vs_best_peer_incl_fasttree"}


@pytest.fixture(scope="module")
def cpu_result(tmp_path_factory):
    path = small_tree_file(tmp_path_factory.mktemp("bench"))
    specs = bench.parse_workloads(f"{path},missing.json")
    methods = bench.parse_methods("sdpa,flex,fi_cascade,fi_decode,sglang,deft_flatten")
    lines = []
    result = bench.run_bench(specs, methods, device="cpu", timer=WallTimer(repeats=2),
                             rates=H200_RATES, log=lines.append)
    return result, lines


def test_run_bench_on_cpu(cpu_result):
    result, lines = cpu_result
    assert result["format"] == "deft-bench/2"
    assert {"env", "config", "floor_rates", "workloads", "results", "best_peer", "summary",
            "best_peer_incl_fasttree", "verdicts"} <= set(result)
    assert result["config"]["kv_copies"] == 4 and result["config"]["timing"] == "graph"
    good, missing = result["workloads"]
    assert "error" in missing and "floor" in good and good["tree"]["format"] == "deft-tree/1"
    rows = {r["method"]: r for r in result["results"]}
    assert len(result["results"]) == 6  # the failed workload has no rows
    for row in result["results"]:
        assert set(row) == ROW_KEYS
    for name in ("sdpa", "flex"):
        row = rows[name]
        assert row["status"] == "ok", row["reason"]
        assert row["rel_err"] < 2e-3 and row["us"] > 0 and row["ratio_to_floor"] > 0
        assert row["timing"] == "eager-fallback" and "CUDA" in row["capture_error"]
    assert rows["flex"]["plan_us"] > 0
    for name in ("fi_cascade", "fi_decode", "sglang"):
        assert rows[name]["status"] == "skipped" and rows[name]["reason"]
    best = min(rows["sdpa"]["us"], rows["flex"]["us"])
    assert good["shape"] == "4/2/16" and {r["shape"] for r in result["results"]} == {"4/2/16"}
    assert result["best_peer"][good["shape"]][good["name"]]["us"] == best
    assert any("sdpa" in line for line in lines)


def test_json_round_trip(cpu_result, tmp_path):
    result, _ = cpu_result
    path = tmp_path / "bench.json"
    bench.write_json({**result, "nan": float("nan"), "inf": float("inf")}, path)
    loaded = json.loads(path.read_text())  # strict JSON
    assert loaded["nan"] is None and loaded["inf"] is None
    assert loaded["results"] == json.loads(json.dumps(result["results"]))


def test_a_failing_method_does_not_stop_the_run():
    class Broken(peers.TorchSDPA):
        name = "broken"

        def prepare(self, inputs):
            raise RuntimeError("boom\nsecond line")

    class Wrong(peers.TorchSDPA):
        name = "wrong"

        def prepare(self, inputs):
            return [Variant([lambda: torch.zeros_like(inputs.q)])]

    specs = bench.parse_workloads("star:leaves=2:root_tokens=8:leaf_tokens=2")
    result = bench.run_bench(specs, [Broken(), Wrong(), METHODS["sdpa"]], device="cpu",
                             timer=WallTimer(repeats=1), rates=H200_RATES, timing="eager")
    broken, wrong, sdpa = result["results"]
    assert broken["status"] == "error" and broken["reason"] == "RuntimeError: boom"
    assert wrong["status"] == "wrong" and wrong["us"] is None and wrong["rel_err"] == 1.0
    assert sdpa["status"] == "ok" and sdpa["timing"] == "eager"
    assert result["config"]["kv_copies"] == 1


# ---------------------------------------------------------------------------- the report
def fake_result() -> dict:
    """A bench result with every kind of row, as the GPU run would produce."""
    def row(method, kind, status="ok", us=None, **extra):
        base = {"workload": "w", "shape": "32/8/128", "method": method, "kind": kind, "status": status, "reason": None,
                "us": us, "p10_us": us, "p90_us": us, "timing": "graph" if us else None,
                "capture_error": None, "variant": "", "variants": {}, "rel_err": 1e-4 if us else None,
                "graph_rel_err": None, "plan_us": None, "params": {}, "seconds": 1.0}
        return {**base, **extra}

    result = {
        "format": "deft-bench/1",
        "env": {"card": "NVIDIA H200", "sm_count": 132, "memory_gb": 139.8, "python": "3.12",
                "torch": "2.11", "cuda": "13.0", "triton": "3.6.0", "flashinfer": "0.5.3",
                "sglang": "0.5.10.post1", "deft_commit": "abc"},
        "config": {"dtype": "float16", "timing": "graph", "kv_copies": 4, "page_size": 16,
                   "seed": 0, "tolerance": 2e-3, "workloads": ["w", "bad"], "methods": []},
        "floor_rates": H200_RATES.to_dict(),
        "workloads": [{"name": "w", "shape": "32/8/128",
                       "floor": {"floor_us": 5.0, "memory_us": 5.0, "compute_us": 1.0,
                                 "bound": "memory"}},
                      {"name": "bad", "shape": "32/8/128", "error": "FileNotFoundError: nope"}],
        "results": [
            row("deft_flatten", "deft", us=10.0, plan_us=80.0),
            row("deft_node", "deft", "wrong", reason="rel_err 0.5 > tolerance 0.002"),
            row("fi_mask", "peer", us=15.0),
            row("sglang", "peer", us=20.0, variant="splits=8"),
            row("fi_cascade", "peer", "skipped", reason="needs a two-level tree"),
            row("sdpa", "peer", "error", reason="RuntimeError: boom"),
            row("flex", "peer", us=30.0, timing="eager-fallback", capture_error="no graphs"),
        ],
    }
    finish(result)
    return result


def test_finish_ratios_and_summary():
    result = fake_result()
    rows = {r["method"]: r for r in result["results"]}
    assert result["best_peer"] == {"32/8/128": {"w": {"method": "fi_mask", "us": 15.0}}}
    assert rows["deft_flatten"]["ratio_to_floor"] == 2.0
    assert rows["deft_flatten"]["speedup_vs_best_peer"] == 1.5
    assert rows["sglang"]["speedup_vs_best_peer"] == 0.75
    assert rows["deft_node"]["ratio_to_floor"] is None
    summary = result["summary"]["32/8/128"]["deft_flatten"]
    assert summary["faster_than_best_peer"] == 1 and summary["geomean_ratio_to_floor"] == 2.0


def test_report_renders_every_row():
    from rich.console import Console

    console = Console(record=True, width=240)
    console.print(bench.render(fake_result()))
    text = console.export_text()
    for expected in ("NVIDIA H200 (132 SMs", "flashinfer 0.5.3", "copy 4245 GB/s", "floor",
                     "memory bound", "deft_flatten", "1.50", "2.00", "splits=8",
                     "skipped: needs a two-level tree", "wrong: rel_err 0.5",
                     "error: RuntimeError: boom", "graph capture failed: no graphs",
                     "FileNotFoundError: nope", "summary"):
        assert expected in text, expected


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bench.plot_result(fake_result(), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- the CLI
def test_cli_without_gpu_exits_2(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(main, ["bench", "--workloads", "fewshot_b20_P4000_L200"])
    assert result.exit_code == 2
    assert "needs a CUDA GPU" in result.output


@pytest.mark.parametrize("args, message", [
    (["--methods", "nope"], "unknown method"),
    (["--workloads", "fewshot:colour=1"], "bad option"),
    (["--json", "/no/such/dir/out.json"], "directory does not exist"),
    (["--calibrate", "/no/such/file.json"], "No such file"),
])
def test_cli_bad_input_exits_2(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2
    assert message in result.output


# ---------------------------------------------------------------------------- calibration
def synthetic_bench(true_constants: dict) -> dict:
    """A bench result whose deft rows were 'measured' by the latency model itself."""
    from dataclasses import replace

    from iomodel import predict_latency
    from iomodel.gpus import builtin_gpu
    from deft.plan import build_plan

    gpu = replace(builtin_gpu("h100"), calibration=true_constants)
    trees = {"star": star(8, 3000, 100), "wide": star(40, 500, 50),
             "deep": Tree([0, 1, 2, 3], [None, 0, 1, 1], [2000, 300, 40, 40])}
    workloads, results = [], []
    for name, tree in trees.items():
        workloads.append({"name": name, "tree": tree_to_dict(tree)})
        for strategy in ("deft_flatten", "deft_node", "flash_decoding"):
            plan = build_plan(strategy, tree, page_size=16)
            results.append({"workload": name, "method": strategy, "kind": "deft", "status": "ok",
                            "us": predict_latency(plan, gpu)["predicted_us"],
                            "params": {"page_size": 16, "chunk_size": plan.chunk_size,
                                       "group_size": plan.group_size}})
    results.append({"workload": "star", "method": "sglang", "kind": "peer", "status": "ok",
                    "us": 50.0, "params": {}})
    return {"env": {"card": gpu.name}, "config": {"timing": "graph", "dtype": "float16",
                                                  "page_size": 16},
            "workloads": workloads, "results": results}


TRUE = {"launch_us": 4.0, "program_us": 0.5, "memory_efficiency": 0.6,
        "compute_efficiency": 0.5, "sm_bandwidth_fraction": 0.03}


def test_calibrate_recovers_the_model():
    from iomodel.gpus import gpu_from_dict

    fit = bench.calibrate(synthetic_bench(TRUE))
    assert fit["format"] == "deft-calibration/1" and fit["points"] == 9
    assert set(fit["per_strategy"]) == {"deft_flatten", "deft_node", "flash_decoding"}
    for errors in fit["per_strategy"].values():
        assert abs(errors["worst_err"]) < 0.02
        assert errors["median_abs_err"] <= errors["median_abs_err_before"] + 1e-9
    assert gpu_from_dict(fit["spec"]).calibration == fit["constants"]


def test_calibrate_refuses_what_it_cannot_fit():
    data = synthetic_bench(TRUE)
    with pytest.raises(ValueError, match="no built-in GPU spec"):
        bench.calibrate({**data, "env": {"card": "Mystery GPU"}})
    with pytest.raises(ValueError, match="no measured row"):
        bench.calibrate({**data, "results": data["results"][-1:]})


def test_cli_calibrate(tmp_path):
    source, target = tmp_path / "bench.json", tmp_path / "fit.json"
    source.write_text(json.dumps(synthetic_bench(TRUE)))
    result = CliRunner().invoke(main, ["bench", "--calibrate", str(source), "--json", str(target)])
    assert result.exit_code == 0, result.output
    assert "launch_us" in result.output and "deft_flatten" in result.output
    assert json.loads(target.read_text())["spec"]["format"] == "deft-gpu/1"


# ---------------------------------------------------------------------------- Triton on the CPU
INTERPRETED = """
import sys, torch
from tests.interpreter import use_interpreter_without_gpu
use_interpreter_without_gpu()
from harness.inputs import make_inputs
from harness.registry import METHODS
from harness.bench.runner import bench_method
from harness.timing import WallTimer
from deft.tree import AttentionShape, Tree
from reference import oracle_attention, rel_err
tree = Tree([0, 1, 2, 3, 4], [None, 0, 0, 1, 1], [40, 9, 5, 3, 4], [0, 0, 2, 1, 2],
            AttentionShape(8, 2, 32))
inputs = make_inputs(tree, torch.float16, copies=2, device="cpu", page_size=4)
reference = oracle_attention(inputs.tree, inputs.q, inputs.k[0], inputs.v[0])
for name in sys.argv[1:]:
    method = METHODS[name]
    if name == "sglang":
        variant = method.prepare(inputs)[0]
        error = rel_err(variant.calls[1](), oracle_attention(inputs.tree, inputs.q, inputs.k[1], inputs.v[1]))
        print(name, "ok" if error < 2e-3 else f"wrong {error}")
        continue
    row = bench_method(method, inputs, lambda out: rel_err(out, reference), WallTimer(1),
                       "eager", 2e-3, lambda line: None)
    print(name, row["status"], row["reason"])
"""


def run_interpreted(*methods, env=None):
    result = subprocess.run(
        [sys.executable, "-c", INTERPRETED, *methods], cwd=ROOT, capture_output=True, text=True,
        timeout=600, env={**os.environ, "TRITON_INTERPRET": "1", **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("\n")


def test_deft_strategy_through_the_bench_under_the_interpreter():
    lines = run_interpreted("deft_flatten", "radix")
    assert "deft_flatten ok None" in lines and "radix ok None" in lines


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed")
def test_sglang_kernel_loads_from_the_wheel_and_is_right():
    assert "sglang ok" in run_interpreted("sglang")
