"""The IO model: traffic predicted exactly as the reference counts it, GPU specs, the latency
model and the floor, whole runs, and `deft-cli estimate-io` (deft_flatten's kernel model:
tests/test_iomodel_kernel.py)."""

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import iomodel
from cli import main
from deft.tree import AttentionShape, Tree
from deft.tree_format import tree_to_dict
from iomodel.gpus import BUILTIN, GpuSpecError, load_gpu_spec
from iomodel.latency import floor_traffic, predict_latency, strategy_sizes
from iomodel.traffic import TRAFFIC_KEYS
from deft.plan import build_plan
from deft.strategies import STRATEGIES
from tests.trees import trees

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.json"))

# ---------------------------------------------------------------------------- exact traffic
# The two-node tree of docs/iomodel.md: a root of 6 tokens and a child of 4 with queries on its
# last 2 tokens; 4 query heads, 2 KV heads, head dim 8, fp16; chunk 4, page 2.
TWO_NODES = Tree([0, 1], [None, 0], [6, 4], [0, 2], AttentionShape(4, 2, 8, "float16"))
# strategy: kv, q, mask, partial, score, output, index, partitions, max work, mean work
WORKED = {
    "flash_attention": (1216, 128, 0, 0, 0, 128, 0, 2, 10, 19 / 2),
    "flash_decoding": (1216, 384, 0, 1728, 0, 128, 0, 6, 4, 19 / 6),
    "radix": (1216, 384, 0, 1728, 0, 128, 80, 6, 4, 19 / 6),
    "tree_attention_s": (1280, 384, 160, 1728, 0, 128, 0, 6, 4, 19 / 6),
    "tree_attention_m": (640, 128, 20, 0, 640, 128, 0, 1, 19, 19.0),
    "vanilla_tree": (640, 128, 20, 0, 640, 128, 0, 1, 19, 19.0),
    "deft_node": (640, 256, 0, 1152, 0, 128, 40, 2, 12, 19 / 2),
    "deft_node_chunk": (640, 384, 0, 1728, 0, 128, 40, 3, 8, 19 / 3),
    "deft_flatten": (640, 384, 80, 1728, 0, 128, 40, 3, 8, 19 / 3),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_worked_example(strategy):
    chunk, group = strategy_sizes(strategy, 4, None)
    traffic = iomodel.predict_traffic(strategy, TWO_NODES, chunk, group, page_size=2)
    assert traffic == dict(zip(TRAFFIC_KEYS, WORKED[strategy]))


def test_worked_floor():
    assert floor_traffic(TWO_NODES) == {
        "kv_bytes": 640, "q_bytes": 128, "output_bytes": 128, "floor_bytes": 896
    }
    limit = iomodel.floor(TWO_NODES, BUILTIN["h100"], copy_bandwidth=1e9, matmul_rate=1e9)
    assert limit["floor_flops"] == 4 * 19 * 4 * 8
    assert limit["floor_us"] == pytest.approx(2.432) and limit["bound"] == "compute"


@st.composite
def cases(draw):
    """A random tree or forest with a small GQA shape, and sizes for every strategy."""
    kv_heads = draw(st.integers(1, 2))
    shape = AttentionShape(
        q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([2, 4])),
        dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )
    tree = draw(trees(max_nodes=12, max_tokens=20, attention=shape))
    chunk = draw(st.none() | st.integers(1, 24))
    group = draw(st.none() | st.integers(1, 5))
    page = draw(st.integers(1, 6))
    return tree, chunk, group, page


@given(cases(), st.integers(0, 2**31 - 1))
def test_predicted_traffic_equals_reference_count(case, seed):
    from reference import attention

    tree, chunk, group, page = case
    shape = tree.attention
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(tree.num_queries, shape.q_heads, shape.head_dim, generator=generator,
                    dtype=torch.float64)
    k, v = torch.randn(2, tree.num_tokens, shape.kv_heads, shape.head_dim, generator=generator,
                       dtype=torch.float64)
    for strategy in STRATEGIES:
        sizes = strategy_sizes(strategy, chunk, group)
        predicted = iomodel.predict_traffic(strategy, tree, *sizes, page_size=page)
        _, counted = attention(strategy, tree, q, k, v, chunk_size=sizes[0],
                               group_size=sizes[1], page_size=page)
        assert predicted == {key: counted[key] for key in TRAFFIC_KEYS}, strategy
        assert all(type(predicted[key]) is int for key in TRAFFIC_KEYS[:-1])


def test_refused_size_raises():
    with pytest.raises(ValueError, match="chunk_size"):
        iomodel.predict_traffic("deft_node", TWO_NODES, chunk_size=4)


# ---------------------------------------------------------------------------- GPU specs
SPEC = {
    "format": "deft-gpu/1",
    "name": "Test GPU",
    "hbm_bandwidth_gb_s": 1000,
    "sm_count": 10,
    "smem_per_sm_kb": 100,
    "smem_per_block_kb": 99,
    "l2_mb": 8,
    "tensor_tflops": 100,
    "fp32_tflops": 10,
}


def test_builtin_specs_and_aliases():
    for alias, name, bandwidth, sms in (
        ("a100", "NVIDIA A100-SXM4-80GB", 2039, 108),
        ("h100", "NVIDIA H100 80GB HBM3", 3350, 132),
        ("h200", "NVIDIA H200", 4800, 132),
    ):
        spec = iomodel.resolve_gpu(alias)
        assert spec.name == name and spec.hbm_bandwidth_gb_s == bandwidth
        assert spec.sm_count == sms and spec.calibrated == (alias == "h200")  # fitted there
        assert iomodel.resolve_gpu(name) is spec and iomodel.resolve_gpu(alias.upper()) is spec
    assert iomodel.resolve_gpu(None).name == "NVIDIA H100 80GB HBM3"
    assert BUILTIN["h100"].matmul_rate("float16") == pytest.approx(989.4e12)
    assert BUILTIN["h100"].matmul_rate("float32") == pytest.approx(66.9e12)


def test_spec_file_round_trip(tmp_path):
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({**SPEC, "calibration": {"launch_us": 3}}))
    spec = iomodel.resolve_gpu(str(path))
    assert spec.sm_count == 10 and spec.calibrated and spec.calibration == {"launch_us": 3.0}
    assert load_gpu_spec(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format": "gpu"}, "field 'format' must be"),
        ({"sm_count": None}, "'sm_count' must be a number"),
        ({"sm_count": 1.5}, "'sm_count' must be an integer"),
        ({"l2_mb": -1}, "'l2_mb' must be positive"),
        ({"tensor_tflops": float("inf")}, "'tensor_tflops' must be positive and finite"),
        ({"name": ""}, "'name' must be a non-empty string"),
        ({"colour": "green"}, "unknown field(s): colour"),
        ({"smem_per_block_kb": 200}, "must not exceed"),
        ({"calibration": {"warp_speed": 9}}, "unknown constant(s) warp_speed"),
        ({"calibration": {"launch_us": 0}}, "'calibration.launch_us' must be positive"),
        ({"calibration": [1]}, "'calibration' must be an object"),
    ],
)
def test_bad_spec_fields(change, message):
    with pytest.raises(GpuSpecError) as error:
        load_gpu_spec({**SPEC, **change})
    assert message in str(error.value)


def test_missing_field_and_bad_files(tmp_path):
    spec = dict(SPEC)
    del spec["l2_mb"]
    with pytest.raises(GpuSpecError, match="'l2_mb' is missing"):
        load_gpu_spec(spec)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(GpuSpecError, match="malformed JSON at line 1"):
        iomodel.resolve_gpu(str(bad))
    with pytest.raises(GpuSpecError, match="cannot read"):
        iomodel.resolve_gpu(str(tmp_path / "missing.json"))
    with pytest.raises(GpuSpecError, match="unknown GPU 'v100'"):
        iomodel.resolve_gpu("v100")


def test_detection_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert iomodel.detect_gpu() is None
    with pytest.raises(GpuSpecError, match="no CUDA GPU detected"):
        iomodel.resolve_gpu("auto")


def test_detection_of_unknown_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H200")
    assert iomodel.detect_gpu() is BUILTIN["h200"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Mystery Card")
    with pytest.raises(GpuSpecError, match="'Mystery Card', which has no built-in spec"):
        iomodel.detect_gpu()


def test_spec_compute_capability_is_optional():
    spec = load_gpu_spec({**SPEC, "compute_capability": 9.0})
    assert spec.compute_capability == 9.0 and load_gpu_spec(spec.to_dict()) == spec
    assert load_gpu_spec(SPEC).compute_capability == 0.0
    with pytest.raises(GpuSpecError, match="'compute_capability' must be positive"):
        load_gpu_spec({**SPEC, "compute_capability": -1})


# ---------------------------------------------------------------------------- latency, floor
def star(leaves=20, root=4000, leaf=200):
    return Tree(range(leaves + 1), [None] + [0] * leaves, [root] + [leaf] * leaves)


def test_floor_matches_anchors():
    """An earlier H200 run (docs/iomodel.md): fewshot_b20 measuring 4245 GB/s and 678 TFLOP/s: 7.8 (7.8 / 2.0)."""
    limit = iomodel.floor(star(), BUILTIN["h200"], copy_bandwidth=4245e9, matmul_rate=678e12)
    assert round(limit["memory_us"], 1) == 7.8 and round(limit["compute_us"], 1) == 2.0
    assert limit["floor_us"] == limit["memory_us"] and limit["bound"] == "memory"


def test_latency_model_shape():
    tree, gpu = star(), BUILTIN["h100"]
    for strategy in STRATEGIES:
        plan = build_plan(strategy, tree)
        latency = predict_latency(plan, gpu)
        assert latency["predicted_us"] == pytest.approx(
            latency["attention_us"] + latency["reduction_us"] + latency["launch_us"]
        )
        assert latency["predicted_us"] > iomodel.floor(tree, gpu)["floor_us"]
        assert latency["waves"] == math.ceil(latency["programs"] / gpu.sm_count)
        assert latency["bound"] in ("memory", "compute") and latency["calibrated"] is False
        assert (latency["reduction_us"] > 0) == plan.has_reduction
    # KV-guided strategies read the shared prefix once: far less than query-guided ones.
    rows = iomodel.estimate(tree, gpu)["strategies"]
    assert rows["deft_flatten"]["predicted_us"] < rows["radix"]["predicted_us"]
    assert rows["deft_node"]["balance"] == pytest.approx(20.0)


def test_calibration_overrides_constants():
    plan = build_plan("deft_flatten", star())
    base = predict_latency(plan, BUILTIN["h100"])
    spec = load_gpu_spec({**BUILTIN["h100"].to_dict(), "calibration": {"launch_us": 12.0}})
    calibrated = predict_latency(plan, spec)
    assert calibrated["calibrated"] is True
    assert calibrated["launch_us"] == pytest.approx(base["launch_us"] + 2 * 10.0)


# ---------------------------------------------------------------------------- whole runs
def test_run_totals_sum_the_steps():
    steps = [star(3, 50, n) for n in (1, 2, 70)]
    seen = []
    totals = iomodel.run_totals(steps, BUILTIN["a100"], chunk_size=16, group_size=2,
                                progress=seen.append)
    assert seen == [1, 2, 3] and totals["steps"] == 3
    for strategy in STRATEGIES:
        sizes = strategy_sizes(strategy, 16, 2)
        per_step = [iomodel.predict_traffic(strategy, tree, *sizes) for tree in steps]
        total = totals["strategies"][strategy]
        for key in ("kv_bytes", "q_bytes", "partial_bytes", "index_bytes", "partitions"):
            assert total[key] == sum(step[key] for step in per_step)
        assert total["max_partition_work"] == max(step["max_partition_work"] for step in per_step)
        assert total["kv_vs_radix"] == total["kv_bytes"] / totals["strategies"]["radix"]["kv_bytes"]
        assert (total["chunk_size"], total["group_size"]) == (
            build_plan(strategy, steps[0], *sizes).chunk_size, sizes[1]
        )
    assert totals["floor_bytes"] == sum(floor_traffic(tree)["floor_bytes"] for tree in steps)


# ---------------------------------------------------------------------------- the CLI
def invoke(*args):
    return CliRunner().invoke(main, ["estimate-io", *map(str, args)])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_cli_examples(path):
    result = invoke(path, "--gpu", "h100")
    assert result.exit_code == 0, result.output
    for strategy in STRATEGIES:
        assert strategy in result.output
    assert "floor" in result.output and "uncalibrated" in result.output
    assert "(calibrated)" in invoke(path, "--gpu", "h200").output  # constants fitted there


def test_cli_json_schema(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text(json.dumps(tree_to_dict(TWO_NODES)))
    result = invoke(path, "--json", "--chunk-size", 4, "--group-size", 1, "--page-size", 2,
                    "--strategies", "flash_attention,deft_flatten")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["format"] == "deft-estimate/1" and data["gpu"] == "NVIDIA H100 80GB HBM3"
    assert data["calibrated"] is False and data["floor_bytes"] == 896 and data["floor_us"] > 0
    assert list(data["strategies"]) == ["flash_attention", "deft_flatten"]
    keys = {*TRAFFIC_KEYS, "chunk_size", "group_size", "waves", "balance", "bound", "predicted_us"}
    for name, row in data["strategies"].items():
        assert set(row) == keys
    # sizes apply only where the strategy takes them
    assert data["strategies"]["flash_attention"]["chunk_size"] is None
    # group size 1: each block's two queries form two partitions, each reading the block
    assert data["strategies"]["deft_flatten"]["kv_bytes"] == 2 * WORKED["deft_flatten"][0]
    assert (data["strategies"]["deft_flatten"]["chunk_size"],
            data["strategies"]["deft_flatten"]["group_size"]) == (4, 1)


def test_cli_gpu_spec_file(tmp_path):
    spec = tmp_path / "gpu.json"
    spec.write_text(json.dumps(SPEC))
    result = invoke(EXAMPLES[0], "--gpu", spec, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gpu"] == "Test GPU"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "v100"], "unknown GPU 'v100'"),
        (["--strategies", "flash,radix"], "unknown strategy"),
        (["--width", 3], "--width applies only with --workload"),
        (["--workload", "fewshot"], "not both"),
    ],
)
def test_cli_bad_options_exit_2(args, message):
    result = invoke(EXAMPLES[0], *args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())


def test_cli_auto_without_gpu_exits_2(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke(EXAMPLES[0], "--gpu", "auto")
    assert result.exit_code == 2 and "no CUDA GPU detected" in result.stderr


def test_cli_bad_tree_exits_2(tmp_path):
    path = tmp_path / "tree.json"
    path.write_text('{"format": "deft-tree/1", "nodes": []}')
    result = invoke(path)
    assert result.exit_code == 2 and "nodes" in result.stderr
    assert invoke().exit_code == 2


def test_cli_workload(tmp_path):
    result = invoke("--workload", "fewshot", "--width", 3, "--iterations", 4,
                    "--prompt-tokens", 300, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["format"] == "deft-estimate-run/1" and data["steps"] == 4
    assert data["strategies"]["radix"]["kv_vs_radix"] == 1.0
    assert data["strategies"]["deft_flatten"]["kv_vs_radix"] < 1.0
    table = invoke("--workload", "fewshot", "--width", 3, "--iterations", 2)
    assert table.exit_code == 0 and "KV IO reduction" in table.output
    wrong = invoke("--workload", "fewshot", "--record", 1)
    assert wrong.exit_code == 2 and "--record does not apply" in wrong.stderr
