"""Plan aggregates: equal to the built plan's on random trees, exact on trees no plan fits.

`deft.plan_aggregates` gives a plan's per-partition aggregates as classes of equal partitions;
the IO model reads them. The built plan (`deft.plan.build_plan`) is the oracle wherever it fits.
"""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import iomodel
from deft.plan import build_plan
from deft.plan_aggregates import ENTRY_LIMIT, QUERY_LIMIT, aggregates_of_plan, plan_aggregates
from deft.strategies import DEFAULT_CHUNK_SIZE, STRATEGIES
from deft.tree import AttentionShape, Tree
from iomodel.gpus import BUILTIN
from iomodel.latency import _snake_counts, predict_latency, strategy_sizes
from iomodel.traffic import traffic_of_plan
from tests.trees import trees


def partitions(aggregates) -> Counter:
    """The multiset of (tokens, queries, pages, work) over partitions."""
    rows = zip(aggregates.tokens.tolist(), aggregates.queries.tolist(),
               aggregates.pages.tolist(), aggregates.work.tolist(), aggregates.count.tolist())
    counter = Counter()
    for t, q, p, w, n in rows:
        counter[(t, q, p, w)] += n
    return counter


@st.composite
def cases(draw):
    """A random forest, sizes that cut nodes into several chunks and pages, a GQA shape."""
    kv_heads = draw(st.integers(1, 2))
    shape = AttentionShape(q_heads=kv_heads * draw(st.sampled_from([1, 4])), kv_heads=kv_heads,
                           head_dim=draw(st.sampled_from([2, 64])),
                           dtype=draw(st.sampled_from(["float16", "float32"])))
    tree = draw(trees(max_nodes=16, max_tokens=60, max_queries_per_node=6, attention=shape))
    chunk = draw(st.none() | st.integers(1, 24))
    group = draw(st.none() | st.integers(1, 4))
    page = draw(st.sampled_from([1, 2, 3, 4]))
    return tree, chunk, group, page


@given(cases())
def test_aggregates_equal_the_built_plan(case):
    tree, chunk, group, page = case
    for strategy in STRATEGIES:
        sizes = strategy_sizes(strategy, chunk, group)
        plan = build_plan(strategy, tree, *sizes, page)
        aggregates = plan_aggregates(strategy, tree, *sizes, page)
        assert partitions(aggregates) == partitions(aggregates_of_plan(plan)), strategy
        assert aggregates.num_partitions == plan.num_partitions


@given(cases())
def test_traffic_and_latency_from_aggregates_equal_the_plan(case):
    tree, chunk, group, page = case
    gpu = BUILTIN["h100"]
    for strategy in STRATEGIES:
        sizes = strategy_sizes(strategy, chunk, group)
        plan = build_plan(strategy, tree, *sizes, page)
        aggregates = plan_aggregates(strategy, tree, *sizes, page)
        assert traffic_of_plan(aggregates) == traffic_of_plan(plan), strategy
        want, got = predict_latency(plan, gpu), predict_latency(aggregates, gpu)
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float)
                                else value), (strategy, key)


def snake_by_grid(runs, values, sms):
    """The snake deal spelled out: programs in waves of `sms`, odd waves reversed. [sms]"""
    programs = np.repeat(np.arange(len(runs)), runs)
    waves = -(-len(programs) // sms)
    grid = np.append(programs, np.full(waves * sms - len(programs), len(runs)))
    grid = grid.reshape(waves, sms)
    grid[1::2] = grid[1::2, ::-1]
    return np.append(values, 0.0)[grid].sum(axis=0)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=30), st.integers(1, 9), st.data())
def test_snake_deal_in_closed_form_equals_the_grid(runs, sms, data):
    runs = np.array(runs)
    values = np.array(data.draw(st.lists(st.floats(0, 1e3), min_size=len(runs),
                                         max_size=len(runs))))
    dealt = _snake_counts(runs, sms)
    want = snake_by_grid(runs, values, sms)
    assert np.allclose(dealt(values), want, rtol=1e-12, atol=1e-9)
    assert dealt(values, sms - 1) == pytest.approx(want[-1], rel=1e-12, abs=1e-9)


def test_million_token_prefix_with_a_million_queries():
    """One node whose every token holds a query: far past what a plan can list, exact here."""
    n, chunk = 1_000_000, DEFAULT_CHUNK_SIZE
    tree = Tree([0], [None], [n], [n])
    lengths = np.arange(1, n + 1)
    paths = plan_aggregates("flash_decoding", tree)
    assert paths.num_partitions == int((-(-lengths // chunk)).sum())
    assert int(paths.tokens @ paths.count) == n * (n + 1) // 2
    per_tree = plan_aggregates("tree_attention_s", tree)
    assert per_tree.num_partitions == n * -(-n // chunk)
    assert int(per_tree.work @ per_tree.count) == n * (n + 1) // 2
    assert int(per_tree.tokens @ per_tree.count) == n * n
    chunks = plan_aggregates("deft_flatten", tree)
    starts = np.arange(0, n, chunk)
    assert chunks.num_partitions == len(starts)
    assert np.array_equal(np.sort(chunks.queries), np.sort(n - starts))
    estimate = iomodel.estimate(tree, BUILTIN["h100"])
    assert estimate["strategies"]["flash_decoding"]["partitions"] == paths.num_partitions


def test_sizes_no_aggregate_serves_are_refused_with_size_and_limit():
    many = Tree([0], [None], [QUERY_LIMIT + 1], [QUERY_LIMIT + 1])
    with pytest.raises(ValueError, match=f"needs {QUERY_LIMIT + 1} queries, beyond the "
                                         f"{QUERY_LIMIT}"):
        iomodel.predict_traffic("flash_attention", many)
    chunks = plan_aggregates("deft_node_chunk", many, chunk_size=8)  # per chunk: no limit hit
    assert chunks.num_partitions == -(-(QUERY_LIMIT + 1) // 8)
    # a chain with a query on every node: (query node, ancestor) pairs grow as nodes squared
    n = 4097
    chain = Tree(list(range(n)), [None, *range(n - 1)], [1] * n, [1] * n)
    pairs = n * (n - 1) // 2
    for strategy, group in (("tree_attention_s", None), ("deft_node", 2)):
        with pytest.raises(ValueError, match=f"needs {pairs} .query node, ancestor. pairs, "
                                             f"beyond the {ENTRY_LIMIT}"):
            plan_aggregates(strategy, chain, group_size=group)


@given(trees(max_nodes=10, max_tokens=300, max_queries_per_node=40), st.integers(1, 64),
       st.integers(1, 9))
def test_groups_of_long_chunks_equal_the_built_plan(tree, chunk, group):
    """Groups crossing the ramp of a node's own queries, on chunks longer than the groups."""
    for strategy in ("deft_node", "deft_node_chunk", "deft_flatten"):
        size = None if strategy == "deft_node" else chunk
        plan = build_plan(strategy, tree, size, group)
        aggregates = plan_aggregates(strategy, tree, size, group)
        assert partitions(aggregates) == partitions(aggregates_of_plan(plan)), strategy
