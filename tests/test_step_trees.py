"""A run's step trees at serving speed: `Tree.trusted` trees equal the checking constructor's,
trees of one shape share their structure, and `TreeCache.apply` returns the new tokens' slots."""

import numpy as np
import pytest

from deft import workloads as wl
from deft.cache import PagedKVCache, TreeCache
from deft.tree import Tree, TreeError
from deft.workloads.runs import candidate_tree

FIELDS = ("node_ids", "parent", "tokens", "queries", "preorder", "tin", "tout", "depth",
          "ancestor_tokens", "flat_offset", "query_node")


def checked(tree: Tree) -> Tree:
    """The same tree through the checking constructor (ids, parent ids, counts as lists)."""
    ids = tree.node_ids.tolist()
    parents = [None if p < 0 else ids[p] for p in tree.parent.tolist()]
    return Tree(ids, parents, tree.tokens.tolist(), tree.queries.tolist(), tree.attention)


def reasoning_step(run, i) -> Tree:
    """Step i of a ReasoningRun as its docstring defines it, through the checking constructor."""
    t = i + 1
    present = (run.start <= t) & (t <= run.last)
    tokens = np.minimum(t, run.end[present]) - run.start[present] + 1
    queries = (t <= run.end[present]).astype(np.int64)
    parents = [None if p < 0 else p for p in run.parent_ids[present].tolist()]
    return Tree(run.ids[present].tolist(), parents, tokens.tolist(), queries.tolist())


def assert_same(tree: Tree, expected: Tree):
    for name in FIELDS:
        got = getattr(tree, name)
        assert got.dtype == np.int64, name
        np.testing.assert_array_equal(got, getattr(expected, name), err_msg=name)


def every_run():
    yield wl.fewshot(50, 4, 30)
    yield wl.speculative(64, 100, steps=40)
    yield wl.token_tree_run(2, size=20, depth=4, prompt_tokens=30, steps=20)
    for seed in range(3):
        yield wl.tot_run(seed, depth=3, branching=3, prompt_tokens=20, min_tokens=1,
                         max_tokens=6, keep=2)
    for name in ("keywordToT", "docmergeToT"):
        yield wl.reasoning(name, prompt_tokens=30)


@pytest.mark.parametrize("run", list(every_run()), ids=lambda run: run.name)
def test_step_trees_equal_the_checking_constructor(run):
    for i in range(len(run)):
        tree = run.tree(i)
        assert_same(tree, checked(tree))
        if isinstance(run, wl.ReasoningRun):
            assert_same(tree, reasoning_step(run, i))
        if isinstance(run, wl.SpeculativeRun):
            n = len(run.parent_index)
            assert_same(tree, candidate_tree(run.parent_index, int(run.root_tokens[i]), 1,
                                             1 + i * n, None))


def test_fewshot_steps_are_the_documented_trees():
    run = wl.fewshot(7, 3, 5)
    for i in range(len(run)):
        assert_same(run.tree(i), Tree(range(4), [None, 0, 0, 0], [7] + [i + 1] * 3))


def test_trees_of_one_shape_share_a_read_only_structure():
    first, later = wl.fewshot(9, 4, 10).tree(0), wl.fewshot(9, 4, 10).tree(7)
    assert first.preorder is later.preorder
    assert not first.depth.flags.writeable
    with pytest.raises(ValueError):
        first.preorder[0] = 1
    np.testing.assert_array_equal(later.ancestor_tokens, [0, 9, 9, 9, 9])


def test_a_known_shape_still_refuses_bad_trees():
    Tree([0, 1], [None, 0], [3, 2])  # the shape is now kept
    with pytest.raises(TreeError, match="closes a cycle"):
        Tree([0, 1], [1, 0], [3, 2])
    with pytest.raises(TreeError, match="at least 1"):
        Tree([0, 1], [None, 0], [3, 0])


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("run", list(every_run()), ids=lambda run: run.name)
def test_apply_returns_the_new_tokens_slots(run, page_size):
    """The slots `apply` returns are those of the tokens past what the cache held, in test
    layout, and the page table the planner reads is the cache's."""
    cache = TreeCache(PagedKVCache(40000 // page_size, page_size, 1, 4))
    held = {}
    for tree in run:
        new_slots = cache.apply(tree).numpy()
        before = np.array([held.get(i, 0) for i in tree.node_ids.tolist()])
        new = tree.token_position >= before[tree.token_node]
        np.testing.assert_array_equal(new_slots, cache.host_token_slots(tree)[new])
        page_ptr, pages = cache.host_node_pages(tree)
        np.testing.assert_array_equal(page_ptr, cache.node_pages(tree)[0].numpy())
        np.testing.assert_array_equal(pages, cache.node_pages(tree)[1].numpy())
        held = dict(zip(tree.node_ids.tolist(), tree.tokens.tolist()))
        cache.check()


def test_a_step_beyond_the_int32_limit_is_refused_as_by_the_checking_constructor():
    with pytest.raises(TreeError, match="node 0: field 'tokens' is 3000000000, beyond the int32"):
        wl.fewshot(3_000_000_000, 2, 3).tree(0)
    with pytest.raises(TreeError, match="the tree holds 2400000000 tokens, beyond the int32"):
        wl.fewshot(1_200_000_000, 1, 1_300_000_000).tree(1_199_999_999)
