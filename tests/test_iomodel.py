"""The IO model: traffic predicted exactly as the reference counts it, GPU specs, the latency
model (the roofline and deft_flatten's kernel model) and the floor, whole runs, and
`deft-cli estimate-io`."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import iomodel
from cli import main
from deft.tree import AttentionShape, Tree
from deft.tree_format import tree_to_dict
from iomodel import kernel_model
from iomodel.gpus import BUILTIN, GpuSpecError, load_gpu_spec
from iomodel.kernel_model import KERNEL_CONSTANTS
from iomodel.latency import (ROOFLINE_CONSTANTS, constants_for, constants_used, floor_traffic,
                             predict_latency, strategy_sizes)
from iomodel.traffic import TRAFFIC_KEYS
from deft.plan import build_plan
from deft.plan_aggregates import plan_aggregates
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


# ---------------------------------------------------------------------------- the kernel model
# deft_flatten is timed from its kernel (iomodel.kernel_model); these are synthetic checks of
# each piece, with constants chosen so the quantities are whole numbers.
KERNEL = {"launch_us": 1.0, "memory_efficiency": 1.0, "item_us": 2.0, "tile_us": 1.0,
          "contention": 0.0, "pair_speedup": 1.5, "merge_step_us": 1.0}


def kernel_gpu(base="h200", **constants):
    return dataclasses.replace(BUILTIN[base], calibration={**KERNEL, **constants})


def test_kernel_shapes_match_the_kernels():
    from deft.kernels import deft_flatten_sm90, fill, reduction
    from deft.kernels.partials import TileConfig

    assert kernel_model.QUERY_TILE_ROWS == fill.TILE_ROWS == deft_flatten_sm90.BLOCK_M
    assert kernel_model.QUERY_TILE_ROWS == TileConfig().block_m
    assert kernel_model.KV_TILE_HOPPER == deft_flatten_sm90.BLOCK_N
    assert kernel_model.KV_TILE_PORTABLE == TileConfig().block_n
    assert kernel_model.PROGRAMS_PER_SM == fill.PROGRAMS_PER_SM == deft_flatten_sm90.CTAS_PER_SM
    assert kernel_model.MERGE_BLOCK_ROWS == reduction.BLOCK_E
    assert kernel_model.PER_QUERY_MAX_ROWS == reduction.PER_QUERY_MAX_ROWS


def test_which_kernel_and_its_query_tiles():
    h200, a100 = BUILTIN["h200"], BUILTIN["a100"]
    assert kernel_model.hopper(h200) and kernel_model.hopper(BUILTIN["h100"])
    assert not kernel_model.hopper(a100)
    assert not kernel_model.hopper(load_gpu_spec(SPEC))  # capability unknown: portable
    assert [kernel_model.queries_per_tile(g, h200) for g in (1, 4, 6, 8)] == [64, 16, 8, 8]
    assert [kernel_model.queries_per_tile(g, a100) for g in (1, 4, 6, 8)] == [64, 16, 10, 8]


def test_a_tile_step_costs_the_same_however_full_its_query_tile():
    shape = AttentionShape(32, 8, 128, "float16")  # 4 query heads per KV head: 16 queries a tile
    gpu = BUILTIN["h200"]

    def steps(queries, group=None):
        tree = Tree(range(queries + 1), [None] + [0] * queries, [640] + [1] * queries,
                    [0] + [1] * queries, shape)
        plan = build_plan("deft_flatten", tree, 1024, group, 16)
        return kernel_model.item_steps(plan, gpu)

    assert steps(8)[0] == steps(16)[0] == 11  # ceil(648 / 64) KV tiles x one query tile
    assert steps(17)[0] == 2 * 11  # a second query tile streams the KV again
    assert list(steps(32, group=16)) == [11, 11]  # two groups: two items side by side


def test_items_are_dealt_longest_first_one_per_program_in_turn():
    gpu = kernel_gpu()
    programs = kernel_model.PROGRAMS_PER_SM * gpu.sm_count
    tree = Tree(range(302), [None, 0] + [1] * 300, [64, 64] + [64] * 300)  # 300 leaves
    plan = build_plan("deft_flatten", tree, 64, None, 16)  # the two shared chunks: 300 queries
    cost = 2.0 + np.repeat(kernel_model.item_steps(plan, gpu), plan.tree.attention.kv_heads)
    assert cost.max() > cost.min() and len(cost) > programs
    loads = kernel_model.program_loads(plan, gpu, constants_for(gpu)) * 1e6
    dealt = np.sort(cost)[::-1]  # item i of that order to program i % programs
    assert np.allclose(loads, np.bincount(np.arange(len(cost)) % programs, dealt, programs))
    aggregated = plan_aggregates("deft_flatten", tree, 64, None, 16)
    assert np.array_equal(kernel_model.program_loads(aggregated, gpu, constants_for(gpu)),
                          kernel_model.program_loads(plan, gpu, constants_for(gpu)))
    aggregated = plan_aggregates("deft_flatten", plan.tree, 64, None, 16)
    assert np.allclose(np.sort(kernel_model.program_loads(aggregated, gpu,
                                                          constants_for(gpu))) * 1e6,
                       np.sort(loads))


def test_two_programs_share_an_sm_and_busy_sms_slow_each_step():
    gpu = kernel_gpu(pair_speedup=1.5)
    c = constants_for(gpu)
    one = build_plan("deft_flatten", star(1, 6400, 64), 8192, None, 16)  # one item
    alone, bound = kernel_model.partials_seconds(one, gpu, c, 0.0)
    assert bound == "compute" and alone * 1e6 == pytest.approx(2.0 + 101 * 1.0)
    # items = 2 x SMs equal ones (roots of one KV tile and one query each): SM s runs programs
    # s and s + SMs together, 1.5x one's rate
    roots = 2 * gpu.sm_count
    forest = Tree(range(roots), [None] * roots, [64] * roots, [1] * roots,
                  AttentionShape(4, 1, 128, "float16"))
    many = build_plan("deft_flatten", forest, 64, None, 16)
    assert list(kernel_model.item_steps(many, gpu)) == [1] * roots
    pair, _ = kernel_model.partials_seconds(many, gpu, c, 0.0)
    assert pair * 1e6 == pytest.approx(2 * 3.0 / 1.5)
    loaded = kernel_model.partials_seconds(many, gpu, dataclasses.replace(c, contention=0.5),
                                           0.0)[0]
    assert loaded * 1e6 == pytest.approx(2 * (2.0 + 1.5) / 1.5)  # every SM busy: 1.5x steps
    assert kernel_model.partials_seconds(many, gpu, c, 1e9)[1] == "memory"


def test_merge_chain_over_a_querys_partial_rows():
    gpu = kernel_gpu()
    chain = Tree([0, 1], [None, 0], [3200, 64], [0, 1])  # one query: 3264 / 32 = 102 rows
    plan = build_plan("deft_flatten", chain, 32, None, 16)
    assert kernel_model.merge_steps(plan, gpu) == -(-102 // 16)  # the per-head merge
    assert kernel_model.merge_steps(plan_aggregates("deft_flatten", chain, 32, None, 16),
                                    gpu) == -(-102 // 16)
    wide = star(200, 64, 64)  # 200 queries, 2 rows each: the per-query merge, row by row
    assert kernel_model.merge_steps(build_plan("deft_flatten", wide, 64, 8, 16), gpu) == 2
    assert kernel_model.merge_steps(build_plan("deft_flatten", wide, 64, None, 16), gpu) == 2
    latency = predict_latency(plan, gpu)
    assert latency["reduction_us"] == pytest.approx(7 * 1.0, rel=1e-3)  # chain over bytes


def test_flatten_reads_each_seen_token_from_hbm_once():
    shape = AttentionShape(32, 8, 128, "float16")
    tree = Tree(range(65), [None] + [0] * 64, [4000] + [64] * 64, [0] + [1] * 64, shape)
    gpu = kernel_gpu(item_us=1e-3, tile_us=1e-3)  # no chain: the kernel is memory bound
    for group in (None, 8):
        plan = build_plan("deft_flatten", tree, 512, group, 16)
        traffic = iomodel.traffic_of_plan(plan)
        latency = predict_latency(plan, gpu, traffic)
        hbm = (traffic["q_bytes"] + traffic["mask_bytes"] + traffic["index_bytes"]
               + traffic["partial_bytes"] / 2 + floor_traffic(tree)["kv_bytes"])
        assert latency["bound"] == "memory"
        assert latency["attention_us"] == pytest.approx(hbm / gpu.bandwidth * 1e6)
    assert traffic["kv_bytes"] > 4 * floor_traffic(tree)["kv_bytes"]  # 8 groups re-read it


def test_kernel_model_reads_only_its_constants():
    plan = build_plan("deft_flatten", star())
    gpu = kernel_gpu()
    base = predict_latency(plan, gpu)["predicted_us"]
    for name in ROOFLINE_CONSTANTS:
        if name not in KERNEL_CONSTANTS:
            changed = kernel_gpu(**{name: 0.5})
            assert predict_latency(plan, changed)["predicted_us"] == pytest.approx(base)
    assert set(constants_used("deft_flatten")) == set(KERNEL_CONSTANTS)
    assert set(constants_used("deft_node")) == set(ROOFLINE_CONSTANTS)


def test_spec_compute_capability_is_optional():
    spec = load_gpu_spec({**SPEC, "compute_capability": 9.0})
    assert spec.compute_capability == 9.0 and load_gpu_spec(spec.to_dict()) == spec
    assert load_gpu_spec(SPEC).compute_capability == 0.0
    with pytest.raises(GpuSpecError, match="'compute_capability' must be positive"):
        load_gpu_spec({**SPEC, "compute_capability": -1})


def test_portable_kernel_steps_cost_the_same_per_token():
    tree = Tree([0, 1], [None, 0], [6336, 64], [0, 1], AttentionShape(4, 1, 128, "float16"))
    plan = build_plan("deft_flatten", tree, 8192, None, 16)  # one item of 6400 tokens
    times = {}
    for base in ("h200", "a100"):
        gpu = dataclasses.replace(kernel_gpu(base), sm_count=132)
        times[base] = kernel_model.partials_seconds(plan, gpu, constants_for(gpu), 0.0)[0]
    assert kernel_model.item_steps(plan, BUILTIN["a100"])[0] == 200  # 32-token tiles
    assert times["a100"] == pytest.approx(times["h200"])  # 200 half steps = 100 whole ones


def test_deal_in_turn_in_closed_form_equals_dealing_item_by_item():
    rng = np.random.default_rng(0)
    for programs in (1, 3, 264):
        runs = rng.integers(1, 700, 40)
        values = rng.random(40)
        items = np.repeat(values, runs)
        want = np.bincount(np.arange(len(items)) % programs, items, programs)
        assert np.allclose(kernel_model._dealt_in_turn(runs, values, programs), want)
