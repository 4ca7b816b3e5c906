"""What `deft-cli bench` judges issue #15's target by: head shapes, the off-anchor suite, the
derived FastTree row and the verdicts (on the CPU; the numbers in the made-up results are
inputs of the functions, not measurements)."""

import json

import pytest
from click.testing import CliRunner

from cli import main
from harness import bench
from harness.bench import fasttree
from harness.bench.floor import FloorRates
from harness.bench.summary import finish
from harness.timing import WallTimer
from deft.tree import AttentionShape
from deft.workloads import ANCHORS, HELD_OUT, OFF_ANCHOR, TUNABLE, balanced, off_anchor
from deft.workloads import serving_batch

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

RATES = FloorRates(4245e9, 678e12, 1, 1.0, 1, 1.0, "float16")


# ---------------------------------------------------------------------------- --heads
def test_parse_heads():
    shapes = bench.parse_heads("32/8, 16/2,8/1,4/1,32/8/64,32/8")
    assert [bench.shape_label(s) for s in shapes] == [
        "32/8/128", "16/2/128", "8/1/128", "4/1/128", "32/8/64"]
    assert bench.parse_heads(None) is None and bench.parse_heads(" ") is None
    for bad, message in (("32", "q_heads/kv_heads"), ("32/x", "q_heads/kv_heads"),
                         ("6/4", "multiple"), ("32/8/128/1", "q_heads/kv_heads")):
        with pytest.raises(ValueError, match=message):
            bench.parse_heads(bad)


def test_cli_bad_heads_exits_2():
    result = CliRunner().invoke(main, ["bench", "--heads", "6/4"])
    assert result.exit_code == 2 and "bad --heads entry '6/4'" in result.output


def test_every_workload_at_every_shape_on_cpu():
    specs = bench.parse_workloads("star:leaves=2:root_tokens=12:leaf_tokens=3,balanced:levels=2")
    shapes = bench.parse_heads("4/2/16,2/1/8")
    result = bench.run_bench(specs, bench.parse_methods("sdpa"), shapes=shapes, device="cpu",
                             timer=WallTimer(repeats=1), rates=RATES, timing="eager")
    cells = [(w["name"], w["shape"]) for w in result["workloads"]]
    assert cells == [(s.text, shape) for shape in ("4/2/16", "2/1/8") for s in specs]
    assert result["config"]["shapes"] == ["4/2/16", "2/1/8"]
    for entry in result["workloads"]:
        q, kv, d = map(int, entry["shape"].split("/"))
        assert entry["tree"]["attention"]["q_heads"] == q
        assert entry["tree"]["attention"]["kv_heads"] == kv
        assert entry["tree"]["attention"]["head_dim"] == d
    rows = result["results"]
    assert [(r["workload"], r["shape"]) for r in rows] == cells
    assert all(r["status"] == "ok" and r["ratio_to_floor"] > 0 for r in rows)
    assert set(result["summary"]) == {"4/2/16", "2/1/8"}
    assert result["summary"]["2/1/8"]["sdpa"]["ok"] == 2


# ---------------------------------------------------------------------------- the suite
def test_suite_names_and_groups():
    assert set(HELD_OUT) | set(TUNABLE) == set(OFF_ANCHOR) and not set(HELD_OUT) & set(TUNABLE)
    assert HELD_OUT and TUNABLE and not set(OFF_ANCHOR) & set(ANCHORS)
    assert [s.text for s in bench.parse_workloads("heldout")] == list(HELD_OUT)
    assert [s.text for s in bench.parse_workloads("offanchor")] == list(OFF_ANCHOR)
    assert [s.text for s in bench.parse_workloads("all")] == list(ANCHORS)
    both = bench.parse_workloads("all,tunable,serving_r8_s4")
    assert [s.text for s in both] == [*ANCHORS, *TUNABLE]  # duplicates dropped
    with pytest.raises(ValueError, match="unknown off-anchor workload"):
        off_anchor("nope")


# (roots, nodes, KV tokens, queries) of every suite workload
SUITE_SIZES = {
    "serving_r8_s4": (8, 40, None, 32),
    "serving_r16_s2": (16, 48, None, 32),
    "tokentree_P12000_t96": (1, 97, 12096, 96),
    "tokentree_P12000_t96_rootq": (1, 97, 12096, 97),
    "balanced_l3_b4_n500": (1, 21, 10500, 16),
    "balanced_l4_b4_n500": (1, 85, 42500, 64),
    "star_b256_P4000_L100": (1, 257, 29600, 256),
}


@pytest.mark.parametrize("name", OFF_ANCHOR)
def test_suite_builds_valid_trees_of_the_stated_sizes(name):
    tree = off_anchor(name, attention=AttentionShape(4, 1, 128))
    assert tree.attention == AttentionShape(4, 1, 128)
    assert (bench.parse_workloads(name)[0].tree().tokens == tree.tokens).all()
    if name.startswith("tot_"):
        assert tree.num_queries >= 2 and len(tree.roots) == 1
        return
    roots, nodes, tokens, queries = SUITE_SIZES[name]
    assert (len(tree.roots), tree.num_nodes, tree.num_queries) == (roots, nodes, queries)
    if tokens is not None:
        assert tree.num_tokens == tokens


def test_serving_batch_is_a_forest_of_prompts_with_samples():
    tree = serving_batch(3, requests=8, samples=4, min_prompt=1000, max_prompt=2000,
                         min_sample=100, max_sample=300)
    roots = tree.roots
    assert len(roots) == 8 and (tree.queries[roots] == 0).all()
    assert ((tree.tokens[roots] >= 1000) & (tree.tokens[roots] <= 2000)).all()
    samples = tree.parent >= 0
    assert samples.sum() == 32 and (tree.queries[samples] == 1).all()
    assert ((tree.tokens[samples] >= 100) & (tree.tokens[samples] <= 300)).all()
    assert (tree.parent[tree.parent[samples]] == -1).all()  # every sample hangs off a prompt


def test_balanced_levels():
    tree = balanced(3, 4, 500)
    depth = {0: 1}
    for v in tree.preorder[1:]:
        depth[int(v)] = depth[int(tree.parent[v])] + 1
    leaves = [v for v in range(tree.num_nodes) if tree.queries[v]]
    assert {depth[v] for v in leaves} == {3} and len(leaves) == 16


# ---------------------------------------------------------------------------- made-up results
def row(workload, shape, method, kind, us, status="ok"):
    return {"workload": workload, "shape": shape, "method": method, "kind": kind,
            "status": status, "reason": None, "us": us, "timing": "graph", "rel_err": 1e-4,
            "plan_us": None, "variant": "", "params": {}}


def made_up(cells: dict, dtype="float16", floor_us=10.0) -> dict:
    """A result from ``{(workload, shape): {method: us}}``; ``deft_flatten`` is ours."""
    workloads, results = [], []
    for (name, shape), times in cells.items():
        workloads.append({"name": name, "shape": shape, "floor": {
            "floor_us": floor_us, "memory_us": floor_us, "compute_us": 1.0, "bound": "memory"}})
        for method, us in times.items():
            kind = "deft" if method.startswith("deft") else "peer"
            results.append(row(name, shape, method, kind, us, "ok" if us else "error"))
    result = {"config": {"dtype": dtype, "timing": "graph"}, "workloads": workloads,
              "results": results}
    finish(result)
    return result


def test_derived_fasttree_row_arithmetic():
    ratio = fasttree.published_ratio("fewshot_b20_P4000_L200", "32/8/128")
    assert ratio == pytest.approx(36.7 / 51.8)
    assert fasttree.published_ratio("spec_t64_P4000", "32/8/128") is None
    assert fasttree.published_ratio("long_P20000_q64_L100", "4/1/128") == fasttree.WRONG
    result = made_up({
        ("fewshot_b20_P4000_L200", "32/8/128"): {"deft_flatten": 30.0, "fi_mask": 100.0,
                                                  "fi_decode": 80.0},
        ("long_P20000_q64_L100", "4/1/128"): {"deft_flatten": 30.0, "fi_mask": 50.0},
        ("reason_10x500_P1104", "4/1/128"): {"deft_flatten": 30.0, "fi_mask": None},
        ("spec_t64_P4000", "32/8/128"): {"deft_flatten": 30.0, "fi_mask": 50.0},
    })
    derived = {(r["workload"], r["shape"]): r for r in result["results"]
               if r["kind"] == "derived"}
    assert set(derived) == {("fewshot_b20_P4000_L200", "32/8/128"),
                            ("long_P20000_q64_L100", "4/1/128"),
                            ("reason_10x500_P1104", "4/1/128")}
    b20 = derived[("fewshot_b20_P4000_L200", "32/8/128")]
    assert b20["method"] == fasttree.METHOD and b20["us"] == pytest.approx(ratio * 100.0)
    assert b20["params"]["base_us"] == 100.0
    assert derived[("long_P20000_q64_L100", "4/1/128")]["status"] == "skipped"
    assert "fi_mask" in derived[("reason_10x500_P1104", "4/1/128")]["reason"]
    ours = next(r for r in result["results"]
                if r["method"] == "deft_flatten" and r["shape"] == "32/8/128"
                and r["workload"] == "fewshot_b20_P4000_L200")
    assert result["best_peer"]["32/8/128"]["fewshot_b20_P4000_L200"]["method"] == "fi_decode"
    assert ours["speedup_vs_best_peer"] == pytest.approx(80.0 / 30.0)
    assert ours["speedup_vs_best_peer_incl_fasttree"] == pytest.approx(ratio * 100.0 / 30.0)
    summary = result["summary"]["32/8/128"]["deft_flatten"]
    assert summary["compared_incl_fasttree"] == 2
    assert not [r for r in made_up({("fewshot_b20_P4000_L200", "32/8/128"): {
        "fi_mask": 10.0}}, dtype="bfloat16")["results"] if r["kind"] == "derived"]


def verdict(result, target_start):
    found = [v for v in result["verdicts"] if v["target"].startswith(target_start)]
    assert len(found) == 1, [v["target"] for v in result["verdicts"]]
    return found[0]


def test_verdicts_on_a_made_up_result():
    cells = {}
    for k, name in enumerate(ANCHORS):
        # ours 15 µs everywhere at 32/8 (1.5x the 10 µs floor), 25 µs on the last anchor
        cells[(name, "32/8/128")] = {"deft_flatten": 25.0 if k == 5 else 15.0, "fi_mask": 40.0,
                                     "fi_decode": 45.0}
        cells[(name, "4/1/128")] = {"deft_flatten": 20.0, "fi_mask": 40.0,
                                    "fi_decode": 18.0 if k == 0 else 40.0}
    result = made_up(cells)
    floor = verdict(result, "32/8/128 anchors: x floor")
    assert floor["status"] == "not met" and (floor["count"], floor["of"]) == (5, 6)
    assert floor["value"] == pytest.approx(2.5)
    assert "5/6" in floor["text"] and "worst 2.50" in floor["text"]
    plain = verdict(result, "32/8/128 anchors: geomean vs best peer >=")
    expected = (40.0 / 15.0) ** (5 / 6) * (40.0 / 25.0) ** (1 / 6)
    assert plain["value"] == pytest.approx(expected) and plain["status"] == "met"
    # FastTree's derived rows (0.25-0.71 x fi_mask) on four anchors pull the geomean down
    incl = verdict(result, "32/8/128 anchors: geomean vs best peer (FastTree incl.)")
    assert incl["value"] < plain["value"] and incl["status"] == "not met"
    shard = verdict(result, "4/1/128 anchors: faster than every peer")
    # fewshot_b20 loses to fi_decode (18 µs), b50 and reason to FastTree (e.g. 17.4/43.6 x 40)
    assert shard["status"] == "not met" and shard["count"] == 3
    assert verdict(result, "16/2/128 anchors: faster")["status"] == "not judged"
    assert verdict(result, "32/8/64 anchors")["status"] == "not judged"
    assert verdict(result, "32/8/128 serving")["status"] == "not judged"
    assert verdict(result, "bf16")["status"] == "not judged"
    assert {v["method"] for v in result["verdicts"]} == {"deft_flatten"}


def test_verdicts_on_the_suite_and_failures():
    cells = {(name, "32/8/128"): {"deft_flatten": 10.0, "fi_mask": 20.0} for name in OFF_ANCHOR}
    cells[("balanced_l4_b4_n500", "32/8/128")]["deft_flatten"] = None  # ours failed there
    result = made_up(cells)
    assert verdict(result, "32/8/128 serving")["status"] == "met"
    assert verdict(result, "32/8/128 tot")["count"] == 7
    failed = verdict(result, "32/8/128 balanced")
    assert failed["status"] == "not met" and "1 without a number" in failed["text"]
    held = verdict(result, "32/8/128 held-out")
    assert (held["count"], held["of"]) == (len(HELD_OUT) - 1, len(HELD_OUT))


def test_report_shows_shapes_and_verdicts():
    from rich.console import Console

    result = made_up({("fewshot_b20_P4000_L200", "32/8/128"): {"deft_flatten": 30.0,
                                                                "fi_mask": 100.0},
                      ("fewshot_b20_P4000_L200", "4/1/128"): {"deft_flatten": 9.0,
                                                               "fi_mask": 12.0}})
    result.update(env={"card": "NVIDIA H200", "python": "3.12"},
                  config={**result["config"], "kv_copies": 4, "page_size": 16,
                          "tolerance": 2e-3}, floor_rates=None)
    console = Console(record=True, width=260)
    console.print(bench.render(result))
    text = console.export_text()
    for expected in ("heads 32/8/128: per-call time", "heads 4/1/128: summary",
                     "fasttree (derived)", "0.708 x fi_mask", "verdicts (deft_flatten",
                     "x floor <= 2: not judged"):
        assert expected in text, expected


def test_merge_results_and_cli_verdicts(tmp_path):
    from harness.bench import merge_results

    header = {"env": {"card": "NVIDIA H200", "python": "3.12"}, "floor_rates": None}
    config = {"kv_copies": 4, "page_size": 16, "tolerance": 2e-3}
    parts = []
    for shape, ours in (("32/8/128", 20.0), ("4/1/128", 10.0)):
        part = made_up({(name, shape): {"deft_flatten": ours, "fi_mask": 50.0}
                        for name in ANCHORS})
        part.update(header, config={**part["config"], **config})
        parts.append(part)
    merged = merge_results(parts)
    assert merged["config"]["merged_from"] == 2
    assert len([r for r in merged["results"] if r["kind"] == "derived"]) == len(
        [r for part in parts for r in part["results"] if r["kind"] == "derived"])
    assert verdict(merged, "32/8/128 anchors: x floor")["value"] == pytest.approx(2.0)
    assert verdict(merged, "4/1/128 anchors: geomean")["status"] != "not judged"
    with pytest.raises(ValueError, match="more than one result"):
        merge_results([parts[0], parts[0]])
    bf16 = {**parts[1], "config": {**parts[1]["config"], "dtype": "bfloat16"}}
    with pytest.raises(ValueError, match="cannot merge"):
        merge_results([parts[0], bf16])

    paths = []
    for k, part in enumerate(parts):
        paths.append(tmp_path / f"part{k}.json")
        bench.write_json(part, paths[-1])
    target = tmp_path / "verdicts.json"
    result = CliRunner().invoke(main, ["bench", "--verdicts", ",".join(map(str, paths)),
                                       "--json", str(target)])
    assert result.exit_code == 0, result.output
    assert "x floor <= 2 on 6/6" in result.output and "heads 4/1/128" in result.output
    assert json.loads(target.read_text())["config"]["merged_from"] == 2


def test_cli_dry_run_lists_every_cell():
    result = CliRunner().invoke(main, ["bench", "--dry-run", "--workloads", "heldout",
                                       "--heads", "32/8,4/1", "--methods", "fi_mask,sdpa"])
    assert result.exit_code == 0, result.output
    assert f"{2 * len(HELD_OUT)} cells x 2 methods" in result.output
    assert "4/1/128  balanced_l4_b4_n500: 85 nodes, 42500 tokens, 64 queries" in result.output
