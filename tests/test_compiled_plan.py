"""The compiled node planner (`deft.fast_plan`, `deft.compiled_plan`) step after step: random
decode runs that grow, branch and prune, and the anchors' runs, against the normative planner
field by field; its errors; and its compiled functions without a writable cache."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deft import workloads as wl
from deft.cache import PagedKVCache, TreeCache
from deft.fast_plan import FAST_STRATEGIES, NodePlanner
from deft.plan import build_plan, check_parameters
from deft.plan_buffers import FIELDS, plan_arrays
from deft.tree import Tree
from tests.trees import trees

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def decode_runs(draw, max_steps=8):
    """A run of trees: a random forest (queries on leaves and inner nodes), then steps that
    grow some nodes' tokens, branch new children (with queries) off any node, prune leaves
    and move queries; node ids stay with their nodes."""
    first = draw(trees(max_nodes=12, max_tokens=20, max_roots=3, max_queries_per_node=2))
    ids = first.node_ids.tolist()
    parent = {v: (None if p < 0 else ids[p]) for v, p in zip(ids, first.parent.tolist())}
    tokens = dict(zip(ids, first.tokens.tolist()))
    queries = dict(zip(ids, first.queries.tolist()))
    run, next_id = [first], max(ids) + 1
    for _ in range(draw(st.integers(1, max_steps))):
        nodes = sorted(tokens)
        kind = draw(st.sampled_from(["grow", "grow", "branch", "prune", "requery"]))
        if kind == "grow":
            for v in draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=4)):
                tokens[v] += draw(st.integers(0, 20))
        elif kind == "branch":
            for p in draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=3)):
                parent[next_id], tokens[next_id] = p, draw(st.integers(1, 9))
                queries[next_id] = draw(st.integers(0, 2))
                next_id += 1
        elif kind == "prune":
            leaves = sorted(set(nodes) - {p for p in parent.values() if p is not None})
            for v in draw(st.lists(st.sampled_from(leaves), max_size=len(leaves) - 1,
                                   unique=True)):
                del parent[v], tokens[v], queries[v]
        else:
            v = draw(st.sampled_from(nodes))
            queries[v] = draw(st.integers(0, min(2, tokens[v])))
        nodes = sorted(tokens)
        counts = [min(queries[v], tokens[v]) for v in nodes]
        if not any(counts):
            counts[-1] = 1
        run.append(Tree(nodes, [parent[v] for v in nodes], [tokens[v] for v in nodes], counts))
    return run


def shuffled_table(tree: Tree, page_size: int, seed: int):
    """(page_ptr, pages): each node on fresh pages, shuffled, some nodes given a spare page."""
    rng = np.random.default_rng(seed)
    counts = -(-tree.tokens // page_size) + rng.integers(0, 2, tree.num_nodes)
    page_ptr = np.concatenate([[0], np.cumsum(counts)])
    return page_ptr, rng.permutation(int(page_ptr[-1])) + seed


def check_step(planner, tree, page_ptr, pages, page_size, chunk, group, last) -> dict:
    """Plan one step; assert every field equals the reference encoding, and that what the step
    says it keeps of the last step's arrays (the same read-only array, or a shared prefix of
    one) holds. Returns the step's fields."""
    reference = plan_arrays(build_plan(planner.strategy, tree, chunk, group, page_size),
                            page_ptr, pages, flat=True)
    fast = planner.arrays(tree, page_ptr, pages, page_size, chunk, group)
    for name in FIELDS:
        np.testing.assert_array_equal(fast[name], reference[name], err_msg=name)
        if fast[name] is last.get(name):
            assert not fast[name].flags.writeable, name
    assert fast["max_slot"] == reference["max_slot"]
    np.testing.assert_array_equal(fast["slots"], reference["slots"][tree.flat_tokens])
    for name, (array, n) in fast["kept"].items():
        assert array is last[name] and not array.flags.writeable, name
        np.testing.assert_array_equal(array[:n], fast[name][:n], err_msg=name)
    return {name: fast[name] for name in FIELDS}


@settings(max_examples=150, deadline=None)
@given(
    run=decode_runs(),
    strategy=st.sampled_from(FAST_STRATEGIES),
    page_size=st.sampled_from([1, 3, 16]),
    chunk=st.sampled_from([1, 5, 32, 128]),
    group=st.sampled_from([None, 1, 2, 5]),
    followed=st.booleans(),
    seed=st.integers(0, 5),
)
def test_compiled_planner_equals_the_reference_step_after_step(run, strategy, page_size, chunk,
                                                               group, followed, seed):
    """One planner over a random decode run (grown, branched, pruned, queries moved): every
    step's arrays equal `plan_arrays(build_plan(...))` field by field, the pages from a tree
    cache following the run or shuffled afresh each step, over forests and queries on inner
    nodes, any chunk, group and page size."""
    chunk = None if strategy == "deft_node" else chunk
    planner = NodePlanner(strategy, shapes=2)
    cache = TreeCache(PagedKVCache(8192, page_size, 1, 4))
    last = {}
    for step, tree in enumerate(run):
        if followed:
            cache.apply(tree)
            page_ptr, pages = cache.host_node_pages(tree)
        else:
            page_ptr, pages = shuffled_table(tree, page_size, seed + step)
        last = check_step(planner, tree, page_ptr, pages, page_size, chunk, group, last)


ANCHOR_RUNS = {
    "fewshot_b20": lambda: wl.fewshot(4000, 20, 400),
    "keywordToT": lambda: wl.reasoning("keywordToT", prompt_tokens=4000),
    "spec_t64": lambda: wl.speculative(64, 4000),
}


@pytest.mark.parametrize("name", sorted(ANCHOR_RUNS))
@pytest.mark.parametrize("strategy", FAST_STRATEGIES)
def test_the_anchors_runs_plan_the_reference_at_every_step(name, strategy):
    """The first steps of the anchors' runs (`scripts/plan_overhead.py`), their pages from a
    tree cache following the run, with the default sizes (deft_node: a group cap)."""
    run = ANCHOR_RUNS[name]()
    chunk, group, _ = check_parameters(strategy, None, None, 16)
    group = group or (4 if strategy == "deft_node" else None)
    planner = NodePlanner(strategy)
    cache = TreeCache(PagedKVCache(2048, 16, 1, 4))
    last = {}
    for step in range(6):
        tree = run.tree(step)
        cache.apply(tree)
        last = check_step(planner, tree, *cache.host_node_pages(tree), 16, chunk, group, last)


def test_errors_leave_the_planner_planning_exactly():
    """A short page table, one of the wrong length, one whose pages run past its pages and a
    slot beyond int32 raise ValueError; the next step still plans exactly."""
    tree = wl.star(2, 10, 3)
    planner = NodePlanner("deft_flatten")
    page_ptr, pages = np.array([0, 3, 4, 5]), np.arange(5)
    last = check_step(planner, tree, page_ptr, pages, 4, 4, None, {})
    with pytest.raises(ValueError, match="holds 10 tokens but the page table gives it 2 pages"):
        planner.arrays(tree, np.array([0, 2, 3, 4]), np.arange(4), 4, 4)
    with pytest.raises(ValueError, match="page_ptr must have nodes \\+ 1 = 4 entries, got 3"):
        planner.arrays(tree, np.array([0, 3, 4]), np.arange(4), 4, 4)
    with pytest.raises(ValueError, match="node index 2's pages run past the page table's 4"):
        planner.arrays(tree, np.array([0, 3, 4, 5]), np.arange(4), 4, 4)
    with pytest.raises(ValueError, match="beyond the int32 limit"):
        planner.arrays(tree, page_ptr, np.array([0, 1, 2, 3, 2**29]), 4, 4)
    grown = wl.star(2, 10, 4)
    check_step(planner, grown, np.array([0, 3, 4, 5]), np.arange(5) + 7, 4, 4, None, last)
    with pytest.raises(ValueError, match="NodePlanner plans"):
        NodePlanner("radix")


def test_without_a_writable_cache_the_planner_compiles_in_memory(tmp_path):
    """Where numba finds no writable cache directory (it raises then), `compiled` warns once
    and compiles without a cache: nothing breaks."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "__pycache__").write_text("")  # a file: no cache directory beside the module
    (blocked / "doubled.py").write_text(
        "from deft.compiled_plan import compiled\n\n\n@compiled\ndef twice(x):\n"
        "    return 2 * x\n\n\n@compiled\ndef thrice(x):\n    return 3 * x\n")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{blocked}",
               NUMBA_CACHE_DIR=str(blocked / "__pycache__" / "numba"),
               HOME=str(blocked / "__pycache__"), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import doubled; print(doubled.twice(21), "
         "doubled.thrice(2))"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "6"]
    assert done.stderr.count("not cached on disk") == 1
