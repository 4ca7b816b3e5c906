"""deft.workloads: the real runs (on the files shipped in the package, and on small files written
here), the synthetic generators, the anchors, step events, the option parser and
`deft-cli workloads`."""

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import deft
from cli import main
from deft import workloads as w
from deft.tree_format import tree_to_dict

REAL = w.found_workload_files()


def real_file(relative):
    """The path of a workload file (they ship with the package: never missing)."""
    return REAL[relative]


def nodes_of(tree):
    """{id: (parent id, tokens, queries)} of a tree."""
    return {n["id"]: (n["parent"], n["tokens"], n["queries"]) for n in tree_to_dict(tree)["nodes"]}


def reference_reasoning_tree(record, iteration, prompt):
    """Slow, independent reading of the reasoning format: generating nodes plus their ancestors."""
    data = {n["id"]: n for n in record["data"].values()}
    parent = {c: n["id"] for n in data.values() for c in n["children"]}
    nodes = {}
    for node in data.values():
        if node["id"] in parent and node["start"] <= iteration <= node["end"]:
            v = node["id"]
            while v is not None and v not in nodes:
                n = data[v]
                tokens = prompt if v not in parent else min(iteration, n["end"]) - n["start"] + 1
                live = v in parent and n["start"] <= iteration <= n["end"]
                nodes[v] = (parent.get(v), tokens, int(live))
                v = parent.get(v)
    return nodes


# ---------------------------------------------------------------------------- small files
SMALL_TREE = {
    "incompleted": False,
    "prompt": "sort these",
    "data": {
        "0": {"id": 0, "value": 5, "start": -4, "end": 0, "children": [1, 2, 3]},
        "1": {"id": 1, "value": 3, "start": 1, "end": 3, "children": [4, 5]},
        "2": {"id": 2, "value": 2, "start": 1, "end": 2, "children": []},
        "3": {"id": 3, "value": 0, "start": 1, "end": 0, "children": []},
        "4": {"id": 4, "value": 2, "start": 4, "end": 5, "children": []},
        "5": {"id": 5, "value": 1, "start": 4, "end": 4, "children": []},
    },
}
INCOMPLETE = {"incompleted": True, "prompt": "", "data": {
    "0": {"id": 0, "value": 3, "start": -2, "end": 0, "children": [1]},
    "1": {"id": 1, "value": 1, "start": 1, "end": 1, "children": []},
}}


@pytest.fixture
def reasoning_file(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps([INCOMPLETE, SMALL_TREE, INCOMPLETE]))
    return path


def test_reasoning_small_file(reasoning_file):
    run = w.reasoning(reasoning_file, tree_index=1)
    assert len(run) == 5
    assert nodes_of(run.tree(0)) == {0: (None, 5, 0), 1: (0, 1, 1), 2: (0, 1, 1)}
    assert nodes_of(run.tree(2)) == {0: (None, 5, 0), 1: (0, 3, 1)}
    assert nodes_of(run.tree(3)) == {0: (None, 5, 0), 1: (0, 3, 0), 4: (1, 1, 1), 5: (1, 1, 1)}
    assert nodes_of(run.tree(-1)) == {0: (None, 5, 0), 1: (0, 3, 0), 4: (1, 2, 1)}
    events = run.events(3)
    assert events.added == (4, 5) and events.branched == (1,) and events.pruned == ()
    assert events.grown == {4: 1, 5: 1}
    assert run.events(2).pruned == (2,)
    assert run.events(0).added == (0, 1, 2) and run.events(0).grown == {0: 5, 1: 1, 2: 1}
    assert run.events(4) == w.StepEvents(added=(), pruned=(5,), branched=(), grown={4: 1})
    with pytest.raises(IndexError, match="out of range"):
        run.tree(5)


def test_reasoning_prompt_tokens_and_refusals(reasoning_file):
    assert w.reasoning(reasoning_file, 1, prompt_tokens=7).tree(0).tokens[0] == 7
    with pytest.raises(ValueError, match=r"tree 0 is incomplete.*first complete tree is index 1"):
        w.reasoning(reasoning_file, 0)
    with pytest.raises(ValueError, match="tree 2 is incomplete"):
        w.reasoning(reasoning_file, 2)
    with pytest.raises(ValueError, match="out of range"):
        w.reasoning(reasoning_file, 3)


def test_reasoning_default_is_the_first_complete_tree(tmp_path, reasoning_file):
    first = tree_to_dict(w.reasoning(reasoning_file, 1).tree(-1))
    for run in (w.reasoning(reasoning_file), w.reasoning(reasoning_file, w.FIRST_COMPLETE)):
        assert run.name == "reasoning_small_1_P5" and tree_to_dict(run.tree(-1)) == first
    assert w.reasoning(reasoning_file, -2).name == "reasoning_small_1_P5"
    with pytest.raises(ValueError, match=r"tree 2 is incomplete.*index 1 \(the default\)"):
        w.reasoning(reasoning_file, -1)
    with pytest.raises(ValueError, match="tree_index must be an integer or 'first_complete'"):
        w.reasoning(reasoning_file, "last")
    with pytest.raises(ValueError, match="tree_index must be an integer"):
        w.reasoning(reasoning_file, True)
    none_complete = tmp_path / "none.json"
    none_complete.write_text(json.dumps([INCOMPLETE]))
    with pytest.raises(ValueError, match="none.json: the file has no complete tree"):
        w.reasoning(none_complete)


@pytest.mark.parametrize(
    "node, field, value, message",
    [
        ("4", "start", 5, "start"),  # a child that does not start right after its parent
        ("2", "value", 3, "value"),  # value disagrees with start..end
        ("1", "children", [4, 5, 9], "not in the tree"),
    ],
)
def test_reasoning_bad_file(tmp_path, node, field, value, message):
    bad = json.loads(json.dumps(SMALL_TREE))
    bad["data"][node][field] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match=message):
        w.reasoning(path)


def test_reasoning_run_needs_a_generating_node_every_step():
    with pytest.raises(ValueError, match="exactly one root"):
        w.ReasoningRun([0, 1], [-1, -1], [0, 0], [0, 0], 4)
    with pytest.raises(ValueError, match="not right after its parent"):
        w.ReasoningRun([0, 1, 2], [-1, 0, 1], [0, 1, 5], [0, 2, 6], 4)


@pytest.fixture
def speculative_file(tmp_path):
    path = tmp_path / "APPS_tree_size6.json"
    record = {"prompt": "x", "Accept_length": [2, 1, 3], "Avg_accept_length": 2.0}
    path.write_text(json.dumps({
        "Tree_ID": 0,
        "Tree_Structure": [[0], [1], [0, 0], [0, 1], [1, 0]],
        "Token_Tree_size": 99,  # not used: the size comes from Tree_Structure
        "Records": [record, {**record, "Accept_length": [1, 1]}],
    }))
    return path


def test_speculative_small_file(speculative_file):
    run = w.speculative(speculative_file, prompt_tokens=10)
    assert len(run) == 3
    assert nodes_of(run.tree(0)) == {
        0: (None, 10, 1), 1: (0, 1, 1), 2: (0, 1, 1), 3: (1, 1, 1), 4: (1, 1, 1), 5: (2, 1, 1)
    }
    assert nodes_of(run.tree(1)) == {
        0: (None, 12, 1), 6: (0, 1, 1), 7: (0, 1, 1), 8: (6, 1, 1), 9: (6, 1, 1), 10: (7, 1, 1)
    }
    assert run.tree(2).tokens[0] == 13 and run.tree(2).num_queries == 6
    events = run.events(1)
    assert events.pruned == (1, 2, 3, 4, 5) and events.added == (6, 7, 8, 9, 10)
    assert events.grown[0] == 2 and events.branched == (0,)
    assert len(w.speculative(speculative_file, record=1)) == 2
    assert len(w.speculative(speculative_file, steps=2)) == 2
    with pytest.raises(ValueError, match="steps must be between 1 and 3"):
        w.speculative(speculative_file, steps=4)
    with pytest.raises(ValueError, match="record 2 is out of range"):
        w.speculative(speculative_file, record=2)


def test_speculative_bad_paths():
    with pytest.raises(ValueError, match="parent"):
        w.SpeculativeRun([[0], [1, 0]], [1], 4)
    with pytest.raises(ValueError, match="twice"):
        w.SpeculativeRun([[0], [0]], [1], 4)
    with pytest.raises(ValueError, match="accept"):
        w.SpeculativeRun([[0]], [0], 4)


# ---------------------------------------------------------------------------- real files
@pytest.mark.parametrize("name", ["sorting128ToT", "docmergeToT", "keywordToT", "set128ToT"])
def test_real_reasoning_files_load(name):
    path = real_file(f"reasoning/{name}.json")
    trees = json.loads(path.read_text())
    complete = [k for k, t in enumerate(trees) if not t["incompleted"]]
    for k in range(len(trees)):
        if k in complete:
            run = w.reasoning(path, k)
            ends = [n["end"] for n in trees[k]["data"].values()]
            assert len(run) == max(ends)
        else:
            with pytest.raises(ValueError, match=f"index {complete[0]}"):
                w.reasoning(path, k)


@pytest.mark.parametrize(
    "name, first", [("sorting128ToT", 1), ("docmergeToT", 0), ("keywordToT", 0), ("set128ToT", 0)]
)
def test_real_reasoning_default_tree(name, first):
    trees = json.loads(real_file(f"reasoning/{name}.json").read_text())
    assert [k for k, t in enumerate(trees) if not t["incompleted"]][0] == first
    default = w.reasoning(name)
    assert default.name.startswith(f"reasoning_{name}_{first}_P")
    assert tree_to_dict(default.tree(-1)) == tree_to_dict(w.reasoning(name, first).tree(-1))


def test_traces_ship_in_the_package(monkeypatch):
    monkeypatch.delenv("DEFT_WORKLOADS", raising=False)
    found = w.found_workload_files()
    assert sorted(found) == sorted(
        [f"reasoning/{n}ToT.json" for n in ("sorting128", "docmerge", "keyword", "set128")]
        + [f"speculative/APPS_tree_size{t}.json" for t in (32, 64, 128, 256)]
    )
    dataset = w.PACKAGE_DATA / "deft-dataset"
    assert all(path.parent.parent == dataset for path in found.values())
    assert "MIT License" in (dataset / "LICENSE").read_text()
    assert "LICENSE" in (dataset / "README.md").read_text()


def test_real_reasoning_matches_reference_reading():
    path = real_file("reasoning/sorting128ToT.json")
    record = json.loads(path.read_text())[1]
    run = w.reasoning(path, 1)
    branch_points = [n["end"] for n in record["data"].values() if n["children"]]
    rng = np.random.default_rng(0)
    steps = {0, len(run) - 1, *rng.integers(0, len(run), 30).tolist()}
    steps |= {e - 1 for e in branch_points} | set(branch_points)
    for i in sorted(s for s in steps if 0 <= s < len(run)):
        assert nodes_of(run.tree(i)) == reference_reasoning_tree(record, i + 1, 1104), i


def test_real_reasoning_run_is_fast():
    path = real_file("reasoning/sorting128ToT.json")
    trees = json.loads(path.read_text())
    longest = max((k for k, t in enumerate(trees) if not t["incompleted"]),
                  key=lambda k: max(n["end"] for n in trees[k]["data"].values()))
    started = time.perf_counter()
    run = w.reasoning(path, longest)
    trees = list(run)
    assert len(trees) > 4000
    assert time.perf_counter() - started < 10


def test_real_speculative_file():
    path = real_file("speculative/APPS_tree_size64.json")
    data = json.loads(path.read_text())
    run = w.speculative(64)
    accept = data["Records"][0]["Accept_length"]
    assert len(run) == len(accept) and run.name == "speculative_t64_P4000"
    first = run.tree(0)
    assert first.num_nodes == 64 and first.num_queries == 64 and first.queries[0] == 1
    assert first.depth.max() == max(len(p) for p in data["Tree_Structure"])
    assert run.tree(10).tokens[0] == 4000 + sum(accept[:10])
    assert w.speculative(path, steps=5, prompt_tokens=100).tree(-1).tokens[0] == 100 + sum(accept[:4])


# ---------------------------------------------------------------------------- anchors
ANCHOR_SIZES = {  # (unique KV tokens, queries), from docs/anchors.md
    "fewshot_b20_P4000_L200": (8000, 20),
    "fewshot_b50_P4000_L200": (14000, 50),
    "reason_10x500_P1104": (6104, 10),
    "spec_t64_P4000": (4063, 63),
    "spec_t256_P4000": (4255, 255),
    "long_P20000_q64_L100": (26400, 64),
}


@pytest.mark.parametrize("name", w.ANCHORS)
def test_anchors(name):
    tree = w.anchor(name)
    assert (tree.num_tokens, tree.num_queries) == ANCHOR_SIZES[name]
    assert tree.queries[0] == 0 and len(tree.roots) == 1


def test_anchor_is_a_run_step():
    assert tree_to_dict(w.fewshot(4000, 50, 200).tree(-1)) == tree_to_dict(w.anchor("fewshot_b50_P4000_L200"))


def test_anchor_lookup(tmp_path, monkeypatch, speculative_file):
    with pytest.raises(ValueError, match="unknown anchor"):
        w.anchor("fewshot")
    with pytest.raises(FileNotFoundError, match="DEFT_WORKLOADS"):
        w.anchor("spec_t64_P4000", workload_dir=tmp_path / "empty")
    folder = tmp_path / "mine" / "deft-dataset" / "speculative"
    folder.mkdir(parents=True)
    (folder / "APPS_tree_size64.json").write_text(speculative_file.read_text())
    assert w.anchor("spec_t64_P4000", workload_dir=tmp_path / "mine").num_queries == 5
    monkeypatch.setenv("DEFT_WORKLOADS", str(tmp_path / "mine"))
    assert w.anchor("spec_t64_P4000").num_queries == 5
    found = w.found_workload_files()
    assert found["speculative/APPS_tree_size64.json"] == (folder / "APPS_tree_size64.json").resolve()
    assert found["reasoning/docmergeToT.json"].is_relative_to(w.PACKAGE_DATA)  # then the package
    assert len(w.speculative(64, steps=2)) == 2  # by tree size, through the same lookup
    with pytest.raises(FileNotFoundError, match="no such file"):
        w.reasoning(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="reasoning/missing.json not found"):
        w.reasoning("missing")


# ---------------------------------------------------------------------------- synthetic
def test_fewshot_run():
    run = w.fewshot(100, 3, 5)
    assert len(run) == 5 and run.name == "fewshot_b3_P100_L5"
    assert nodes_of(run.tree(2)) == {0: (None, 100, 0), 1: (0, 3, 1), 2: (0, 3, 1), 3: (0, 3, 1)}
    assert run.events(4).grown == {1: 1, 2: 1, 3: 1}
    with pytest.raises(ValueError, match="width"):
        w.fewshot(width=0)


@given(st.integers(0, 2**32), st.integers(1, 60), st.integers(1, 50), st.integers(1, 4),
       st.integers(1, 5))
def test_random_tree(seed, nodes, max_tokens, roots, max_queries):
    roots = min(roots, nodes)
    tree = w.random_tree(seed, nodes, max_tokens, roots, max_queries)
    assert tree.num_nodes == nodes and len(tree.roots) == roots
    assert tree.tokens.max() <= max_tokens and tree.queries.max() <= max_queries
    assert ((tree.queries > 0) == (tree.child_count == 0)).all()
    assert tree_to_dict(w.random_tree(seed, nodes, max_tokens, roots, max_queries)) == tree_to_dict(tree)


@given(st.integers(0, 2**32), st.integers(2, 80), st.integers(1, 5))
def test_token_tree(seed, size, depth):
    tree = w.token_tree(seed, size, depth, prompt_tokens=50)
    assert tree.num_nodes == size and tree.num_queries == size - 1
    assert tree.depth.max() <= depth and (tree.tokens[1:] == 1).all()
    run = w.token_tree_run(seed, size, depth, prompt_tokens=50, steps=3)
    assert run.tree(0).num_queries == size
    assert nodes_of(run.tree(0))[0] == (None, 50, 1)


@given(st.integers(0, 2**32), st.integers(1, 4), st.integers(1, 5), st.integers(1, 3))
def test_tot_run_decodes_the_tot_tree(seed, depth, branching, keep):
    args = (seed, depth, branching, 20, 1, 12, keep)
    full = nodes_of(w.tot(*args))
    level, count = branching, 1 + branching
    for _ in range(depth - 1):
        level = min(keep, level) * branching
        count += level
    assert len(full) == count
    run = w.tot_run(*args)
    seen = set()
    for i in range(len(run)):
        tree = run.tree(i)
        for node, (parent, tokens, queries) in nodes_of(tree).items():
            assert parent == full[node][0] and tokens <= full[node][1]
            assert queries == (node != 0 and tokens < full[node][1] or i + 1 == run.end[node])
        seen |= set(tree.node_ids.tolist())
    assert seen == set(full)


def test_chain_and_star():
    assert nodes_of(w.chain(3, 5)) == {0: (None, 5, 0), 1: (0, 5, 0), 2: (1, 5, 1)}
    assert w.star(4, 10, 2).num_tokens == 18


@given(st.integers(0, 2**32))
def test_events_rebuild_the_next_tree(seed):
    run = w.tot_run(seed, depth=3, branching=3, prompt_tokens=5, min_tokens=1, max_tokens=6, keep=2)
    previous = {}
    for i in range(len(run)):
        tree, events = run.tree(i), run.events(i)
        current = nodes_of(tree)
        tokens = {n: previous[n][1] for n in previous if n not in events.pruned}
        for node, grown in events.grown.items():
            tokens[node] = tokens.get(node, 0) + grown
        assert tokens == {n: t for n, (_, t, _) in current.items()}
        assert set(events.added) == set(current) - set(previous)
        parents = {current[n][0] for n in events.added} - set(events.added) - {None}
        assert parents == set(events.branched)
        previous = current


# ---------------------------------------------------------------------------- options
def test_kind_options():
    assert w.kind_options("fewshot") == {"prompt_tokens": 4000, "width": 20, "iterations": 400}
    assert w.kind_options("reasoning")["path"] == w.REQUIRED
    assert w.kind_options("reasoning")["tree_index"] == w.FIRST_COMPLETE
    assert set(w.kind_options("random")) == {"seed", "nodes", "max_tokens", "roots", "max_queries"}
    with pytest.raises(ValueError, match="unknown workload kind 'nope'; kinds: fewshot, "):
        w.kind_options("nope")


@pytest.mark.parametrize("text, value", [
    ("3", 3), ("-2", -2), ("0.5", 0.5), ("1e3", 1000.0), ("none", None), ("Null", None),
    ("true", True), ("FALSE", False), ("sorting128ToT", "sorting128ToT"), ("", ""),
])
def test_parse_option_value(text, value):
    parsed = w.parse_option_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_options():
    assert w.parse_options("fewshot", ["width=3", "--prompt-tokens=10", " iterations =none"]) == {
        "width": 3, "prompt_tokens": 10, "iterations": None}
    assert w.parse_options("fewshot", []) == {}
    assert w.parse_options("reasoning", ["path=x", "step=-1"], extra=("step",)) == {"path": "x", "step": -1}
    with pytest.raises(ValueError, match=r"^fewshot: bad option 'widht=3'; fewshot takes "
                                         r"prompt_tokens=\.\.\., width=\.\.\., iterations=\.\.\.$"):
        w.parse_options("fewshot", ["widht=3"])
    with pytest.raises(ValueError, match=r"^fewshot:width: bad option 'width'; .* iterations=\.\.\., "
                                         r"step=\.\.\.$"):
        w.parse_options("fewshot", ["width"], where="fewshot:width", extra=("step",))
    with pytest.raises(ValueError, match="bad option 'step=2'"):
        w.parse_options("star", ["step=2"])
    with pytest.raises(ValueError, match=r"^reasoning: missing option\(s\) path=\.\.\.$"):
        w.parse_options("reasoning", ["tree_index=1"])
    with pytest.raises(ValueError, match="unknown workload kind"):
        w.parse_options("nope", [])


# ---------------------------------------------------------------------------- CLI
def test_cli_list():
    result = CliRunner().invoke(main, ["workloads", "list", "--json"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert listing["anchors"] == list(w.ANCHORS)
    assert listing["kinds"]["fewshot"]["options"] == {"prompt_tokens": 4000, "width": 20, "iterations": 400}
    assert listing["kinds"]["reasoning"]["options"]["path"] == "required"
    assert listing["kinds"]["reasoning"]["options"]["tree_index"] == "first_complete"
    assert CliRunner().invoke(main, ["workloads", "list"]).exit_code == 0


def test_cli_reasoning_default_is_one_rule(reasoning_file):
    """export and estimate-io take the same tree when tree_index is not given; an incomplete
    index is refused by both, naming the first complete tree."""
    expected = w.reasoning(reasoning_file)
    result = CliRunner().invoke(main, ["workloads", "export", "reasoning", f"path={reasoning_file}"])
    assert result.exit_code == 0, result.output
    assert deft.tree_from_dict(json.loads(result.output)).num_nodes == expected.tree(0).num_nodes
    args = ["estimate-io", "--workload", "reasoning", "--path", str(reasoning_file), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["workload"] == expected.name
    for args in (["workloads", "export", "reasoning", f"path={reasoning_file}", "tree_index=0"],
                 ["estimate-io", "--workload", "reasoning", "--path", str(reasoning_file),
                  "--tree-index", "0"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "first complete tree is index 1" in result.output


def test_cli_export(tmp_path, reasoning_file):
    out = tmp_path / "tree.json"
    args = ["workloads", "export", "fewshot", "width=3", "prompt-tokens=10", "--step", "4", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert tree_to_dict(deft.load_tree(out)) == tree_to_dict(w.fewshot(10, 3).tree(4))
    args = ["workloads", "export", "reasoning", f"path={reasoning_file}", "tree_index=1", "--step", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert deft.tree_from_dict(json.loads(result.output)).num_nodes == 4
    result = CliRunner().invoke(main, ["workloads", "export", "random", "seed=3", "nodes=7", "-o", str(out)])
    assert result.exit_code == 0 and deft.load_tree(out).num_nodes == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["nope"], "unknown workload kind"),
        (["fewshot", "widht=3"], "bad option"),
        (["fewshot", "width"], "bad option"),
        (["fewshot", "width=0"], "width must be a positive integer"),
        (["fewshot", "--step", "400"], "out of range"),
        (["reasoning"], "missing option"),
        (["anchor", "name=nope"], "unknown anchor"),
        (["chain", "--step", "1"], "single tree"),
    ],
)
def test_cli_export_errors(args, message):
    result = CliRunner().invoke(main, ["workloads", "export", *args])
    assert result.exit_code == 2
    assert message in result.output
