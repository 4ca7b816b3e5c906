"""The reference strategies against the oracle, their traffic against the byte rules, and the
plan properties they rely on (docs/design.md, "Normative plan and accounting")."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference
from deft.tree import AttentionShape, Tree
from reference import tiles
from reference.oracle import visible_by_parents
from deft.strategies import BIT_MASK, DENSE_MASK, PAGED, USES_CHUNK_SIZE, USES_GROUP_SIZE
from tests.trees import trees

HEADS = [  # (q_heads, kv_heads, head_dim): GQA ratios 1, 4, 8; head dims 64, 128
    (1, 1, 64),
    (2, 2, 128),
    (4, 1, 64),
    (4, 1, 128),
    (8, 1, 64),
    (8, 1, 128),
    (16, 2, 64),
]
FEW_HEADS = [(1, 1, 64), (4, 1, 64), (8, 1, 128)]


def shapes(heads):
    """Attention shapes with the given (q_heads, kv_heads, head_dim), any dtype (e = 2 or 4)."""
    dtypes = st.sampled_from(["float16", "bfloat16", "float32"])
    return st.builds(lambda h, dtype: AttentionShape(*h, dtype), st.sampled_from(heads), dtypes)


def forests(scale: int = 1):
    """Random forests (`tests.trees`): up to 200 nodes of a few tokens (one query each, few
    heads), up to 30 nodes of up to 60 tokens, or up to 6 nodes of up to 300 tokens; several
    queries on leaves and inner nodes. `scale` multiplies the token counts."""
    return st.one_of(
        shapes(FEW_HEADS).flatmap(
            lambda a: trees(max_nodes=200, max_tokens=6 * scale, max_queries_per_node=1, attention=a)
        ),
        shapes(HEADS).flatmap(lambda a: trees(max_nodes=30, max_tokens=60 * scale, attention=a)),
        shapes(HEADS).flatmap(lambda a: trees(max_nodes=6, max_tokens=300 * scale, attention=a)),
    )


def inputs(tree: Tree, dtype=torch.float64, seed=0):
    """Random q [queries, q_heads, d], k, v [tokens, kv_heads, d] in `dtype`."""
    generator = torch.Generator().manual_seed(seed)
    shape = tree.attention

    def draw(rows, heads):
        return torch.randn(rows, heads, shape.head_dim, generator=generator, dtype=torch.float64).to(dtype)

    return (
        draw(tree.num_queries, shape.q_heads),
        draw(tree.num_tokens, shape.kv_heads),
        draw(tree.num_tokens, shape.kv_heads),
    )


@st.composite
def parameters(draw, strategy):
    """chunk_size, group_size, page_size that `strategy` accepts (None: its default)."""
    chunk = draw(st.one_of(st.none(), st.integers(8, 300))) if strategy in USES_CHUNK_SIZE else None
    group = draw(st.one_of(st.none(), st.integers(1, 70))) if strategy in USES_GROUP_SIZE else None
    return dict(chunk_size=chunk, group_size=group, page_size=draw(st.integers(1, 17)))


def predicted_traffic(plan) -> dict:
    """docs/design.md's byte rules applied to the plan's per-partition aggregates (the IO model's view)."""
    shape = plan.tree.attention
    e, h_q, h_kv, d = shape.element_bytes, shape.q_heads, shape.kv_heads, shape.head_dim
    t, q = plan.tokens, plan.queries
    mask = 0
    if plan.strategy in BIT_MASK:
        mask = int((t * -(-q // 64) * 8).sum())
    if plan.strategy in DENSE_MASK:
        mask = int((q * t).sum())
    return {
        "kv_bytes": int((t * 2 * h_kv * d * e).sum()),
        "q_bytes": int((q * h_q * d * e).sum()),
        "mask_bytes": mask,
        "partial_bytes": int(2 * (q * h_q * (d + 1) * 4).sum()) if plan.has_reduction else 0,
        "score_bytes": int(4 * (q * t * h_q * e).sum()) if plan.strategy in DENSE_MASK else 0,
        "output_bytes": plan.tree.num_queries * h_q * d * e,
        "index_bytes": int((plan.pages * h_kv * 4).sum()) if plan.strategy in PAGED else 0,
        "partitions": plan.num_partitions,
        "max_partition_work": int(plan.work.max()),
        "mean_partition_work": float(plan.work.mean()),
    }


def check_strategy(strategy, tree, q, k, v, tolerance, ref=None, **params):
    """Run one strategy; check dtype, error against the oracle (`ref` if given) and traffic
    against the byte rules."""
    out, traffic = reference.attention(strategy, tree, q, k, v, **params)
    assert out.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert out.shape == q.shape
    assert torch.isfinite(out).all()
    ref = reference.oracle_attention(tree, q, k, v) if ref is None else ref
    error = reference.rel_err(out, ref)
    assert error <= tolerance, f"{strategy} {params}: rel_err {error:.3g}"
    expected = predicted_traffic(reference.build_plan(strategy, tree, **params))
    assert traffic.keys() == expected.keys()
    for key, value in expected.items():
        assert traffic[key] == pytest.approx(value, rel=1e-12), f"{strategy} {params}: {key}"
        assert type(traffic[key]) is type(value), key
    return out, traffic


# ---------------------------------------------------------------------------- against the oracle
@settings(max_examples=50)
@given(data=st.data(), tree=forests())
def test_every_strategy_matches_oracle_in_float64(data, tree):
    q, k, v = inputs(tree)
    ref = reference.oracle_attention(tree, q, k, v)
    for strategy in reference.STRATEGIES:
        check_strategy(strategy, tree, q, k, v, 1e-9, ref, **data.draw(parameters(strategy)))


@settings(max_examples=30)
@given(data=st.data(), tree=forests(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_every_strategy_matches_oracle_in_half_precision(data, tree, dtype):
    q, k, v = inputs(tree, dtype)
    ref = reference.oracle_attention(tree, q, k, v)
    for strategy in reference.STRATEGIES:
        check_strategy(strategy, tree, q, k, v, 2e-3, ref, **data.draw(parameters(strategy)))


@settings(max_examples=30)
@given(data=st.data(), tree=forests())
def test_small_batches_give_the_same_result(data, tree):
    """A tiny batch budget splits every bucket into many batches (and the reduction too)."""
    q, k, v = inputs(tree)
    strategy = data.draw(st.sampled_from(reference.STRATEGIES))
    params = data.draw(parameters(strategy))
    expected, expected_traffic = reference.attention(strategy, tree, q, k, v, **params)
    with mock.patch.object(tiles, "TILE_ELEMENTS", 1):
        out, traffic = reference.attention(strategy, tree, q, k, v, **params)
    assert reference.rel_err(out, expected) <= 1e-12
    assert traffic == expected_traffic


@settings(max_examples=5)
@given(tree=trees(max_nodes=200, max_tokens=300, max_queries_per_node=1, attention=AttentionShape(1, 1, 64)))
def test_big_trees_with_one_head(tree):
    q, k, v = inputs(tree)
    ref = reference.oracle_attention(tree, q, k, v)
    for strategy in ("flash_decoding", "tree_attention_m", "deft_node", "deft_flatten"):
        check_strategy(strategy, tree, q, k, v, 1e-9, ref)


@pytest.mark.parametrize("strategy", reference.STRATEGIES)
def test_sm_scale_is_passed_through(strategy):
    tree = Tree([0, 1, 2], [None, 0, 0], [20, 5, 7], attention=AttentionShape(4, 1, 64))
    q, k, v = inputs(tree)
    out, _ = reference.attention(strategy, tree, q, k, v, sm_scale=0.3)
    assert reference.rel_err(out, reference.oracle_attention(tree, q, k, v, sm_scale=0.3)) <= 1e-12


@pytest.mark.parametrize("strategy", reference.STRATEGIES)
def test_module_api(strategy):
    """Each strategy module plans its own partitions and runs them like the entry point."""
    module = reference.MODULES[strategy]
    tree = Tree([0, 1, 2, 3], [None, 0, 0, 1], [9, 5, 7, 3], attention=AttentionShape(8, 2, 64))
    q, k, v = inputs(tree, torch.float32)
    plan = module.plan(tree)
    assert plan.partition_sets() == reference.build_plan(strategy, tree).partition_sets()
    out, traffic = module.attention(tree, q, k, v, plan, None)
    expected, expected_traffic = reference.attention(strategy, tree, q, k, v)
    assert torch.equal(out, expected)
    assert traffic == expected_traffic


# ---------------------------------------------------------------------------- targeted trees
SHAPE = AttentionShape(8, 1, 64, "float16")


def star(leaves: int, root_tokens: int = 300) -> Tree:
    ids = list(range(leaves + 1))
    return Tree(ids, [None] + [0] * leaves, [root_tokens] + [1 + i % 3 for i in range(leaves)], attention=SHAPE)


def chain(nodes: int) -> Tree:
    tokens = [1 + (i * 7) % 5 for i in range(nodes)]
    queries = [1 if i % 10 == 0 else 0 for i in range(nodes)]
    queries[-1] = 2
    return Tree(list(range(nodes)), [None] + list(range(nodes - 1)), tokens, queries, SHAPE)


@pytest.mark.parametrize(
    "tree",
    [
        Tree([5], [None], [40], [6], SHAPE),  # one node, several queries on its tail
        Tree([5], [None], [1], [1], SHAPE),  # one token
        chain(120),
        star(256),
        Tree([3, 9, 1, 4], [None, None, 3, 9], [50, 60, 10, 20], attention=SHAPE),  # a forest
    ],
    ids=["one-node", "one-token", "chain", "star-256", "forest"],
)
@pytest.mark.parametrize("strategy", reference.STRATEGIES)
def test_targeted_trees(tree, strategy):
    q, k, v = inputs(tree)
    chunk = 16 if strategy in USES_CHUNK_SIZE else None
    check_strategy(strategy, tree, q, k, v, 1e-9, chunk_size=chunk)


@pytest.mark.parametrize("chunk", [4, 128])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_lengths_at_chunk_boundaries(chunk, delta):
    """Node and path lengths at c-1, c, c+1: chunk counts and results."""
    length = chunk + delta
    tree = Tree([0, 1, 2], [None, 0, 1], [length, length, 1], [1, 1, 1], SHAPE)
    q, k, v = inputs(tree)
    for strategy in sorted(USES_CHUNK_SIZE):
        check_strategy(strategy, tree, q, k, v, 1e-9, chunk_size=chunk)
    paths = np.array([length, 2 * length, 2 * length + 1])
    flash = reference.build_plan("flash_decoding", tree, chunk_size=chunk)
    assert flash.num_partitions == int((-(-paths // chunk)).sum())
    node_chunk = reference.build_plan("deft_node_chunk", tree, chunk_size=chunk, group_size=1)
    per_node_chunks = np.array([-(-length // chunk), -(-length // chunk), 1])
    assert node_chunk.num_partitions == int((per_node_chunks * [3, 2, 1]).sum())
    flatten = reference.build_plan("deft_flatten", tree, chunk_size=chunk)
    assert flatten.num_partitions == -(-(2 * length + 1) // chunk)


@pytest.mark.parametrize("group", [1, 8, 64])
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_query_counts_at_group_boundaries(group, delta):
    count = max(1, group + delta)
    tree = Tree([0, 1], [None, 0], [200, count + 3], [0, count], SHAPE)
    q, k, v = inputs(tree)
    for strategy in USES_GROUP_SIZE:
        check_strategy(strategy, tree, q, k, v, 1e-9, group_size=group)
    plan = reference.build_plan("deft_node", tree, group_size=group)
    assert list(plan.queries) == ([group] * (count // group) + [count % group] * (count % group > 0)) * 2


def test_fully_masked_partitions_give_no_nan():
    """Tree Attention-S gives a query chunks of its sibling's branch; DeFT-Flatten groups
    queries with block tokens they do not see. Both merge -inf partials without NaN."""
    tree = Tree([0, 1, 2], [None, 0, 0], [8, 40, 40], attention=SHAPE)
    q, k, v = inputs(tree)
    plan = reference.build_plan("tree_attention_s", tree, chunk_size=8)
    assert (plan.work == 0).any()
    check_strategy("tree_attention_s", tree, q, k, v, 1e-9, chunk_size=8)
    plan = reference.build_plan("deft_flatten", tree, chunk_size=16)
    assert (plan.work < plan.queries * plan.tokens).any()
    check_strategy("deft_flatten", tree, q, k, v, 1e-9, chunk_size=16)


# ---------------------------------------------------------------------------- plan properties
@given(data=st.data(), tree=forests(scale=4))
def test_every_visible_pair_is_in_exactly_one_partition(data, tree):
    visible = visible_by_parents(tree, np.arange(tree.num_queries))
    for strategy in reference.STRATEGIES:
        plan = reference.build_plan(strategy, tree, **data.draw(parameters(strategy)))
        pairs, work = [], []
        for p in range(plan.num_partitions):
            queries, tokens = plan.partition_queries(p), plan.partition_tokens(p)
            seen = visible[np.ix_(queries, tokens)]
            rows, cols = np.nonzero(seen)
            pairs.append(queries[rows] * tree.num_tokens + tokens[cols])
            work.append(seen.sum())
        pairs = np.concatenate(pairs)
        assert len(np.unique(pairs)) == len(pairs) == visible.sum(), strategy
        assert list(plan.work) == work, strategy


@given(data=st.data(), tree=forests(scale=4))
def test_chunks_never_exceed_the_chunk_size(data, tree):
    for strategy in sorted(USES_CHUNK_SIZE):
        params = data.draw(parameters(strategy))
        plan = reference.build_plan(strategy, tree, **params)
        assert plan.tokens.max() <= plan.chunk_size
        if params["group_size"] is not None:
            assert plan.queries.max() <= params["group_size"]


def with_leaf_queries(tree: Tree) -> Tree:
    """The same tree with at least one query on every leaf, so every token is seen."""
    queries = np.where(tree.child_count == 0, np.maximum(tree.queries, 1), tree.queries)
    parents = [None if p < 0 else int(tree.node_ids[p]) for p in tree.parent]
    return Tree(tree.node_ids.tolist(), parents, tree.tokens.tolist(), queries.tolist(), tree.attention)


@given(data=st.data(), tree=forests().map(with_leaf_queries))
def test_kv_guided_loads_no_more_kv_than_query_guided(data, tree):
    """Uncapped groups: the DeFT strategies read each token once, Flash-Decoding once per
    query that sees it; equal exactly when no token is seen by two queries."""
    q, k, v = inputs(tree)
    sharing = visible_by_parents(tree, np.arange(tree.num_queries)).sum(axis=0)
    assert sharing.min() >= 1
    _, flash = reference.attention("flash_decoding", tree, q, k, v, chunk_size=data.draw(st.integers(8, 300)))
    for strategy in ("deft_node", "deft_node_chunk", "deft_flatten"):
        chunk = data.draw(st.integers(8, 300)) if strategy in USES_CHUNK_SIZE else None
        _, deft = reference.attention(strategy, tree, q, k, v, chunk_size=chunk)
        assert deft["kv_bytes"] <= flash["kv_bytes"]
        assert (deft["kv_bytes"] == flash["kv_bytes"]) == bool(sharing.max() <= 1), strategy


def test_flatten_can_load_tokens_nobody_sees():
    """Why the property above needs every token seen: a block also carries the tokens of a
    branch without queries, which a query-guided kernel never reads."""
    tree = Tree([0, 1, 2], [None, 0, 0], [1, 1, 100], [0, 1, 0], SHAPE)
    q, k, v = inputs(tree)
    _, flash = reference.attention("flash_decoding", tree, q, k, v)
    _, flatten = reference.attention("deft_flatten", tree, q, k, v)
    assert flatten["kv_bytes"] > flash["kv_bytes"]


# ---------------------------------------------------------------------------- refusals
TREE = Tree([0, 1], [None, 0], [10, 3], attention=SHAPE)


@pytest.mark.parametrize(
    "strategy, params",
    [(s, {"chunk_size": 64}) for s in reference.STRATEGIES if s not in USES_CHUNK_SIZE]
    + [(s, {"group_size": 4}) for s in reference.STRATEGIES if s not in USES_GROUP_SIZE]
    + [
        ("flash_decoding", {"chunk_size": 0}),
        ("deft_flatten", {"chunk_size": -3}),
        ("deft_flatten", {"chunk_size": 2.5}),
        ("deft_node", {"group_size": 0}),
        ("deft_node", {"group_size": True}),
        ("radix", {"page_size": 0}),
        ("no_such_strategy", {}),
    ],
)
def test_refused_parameters(strategy, params):
    q, k, v = inputs(TREE)
    with pytest.raises(ValueError):
        reference.attention(strategy, TREE, q, k, v, **params)


@pytest.mark.parametrize(
    "change",
    [
        lambda q, k, v: (q[:-1], k, v),  # a query short
        lambda q, k, v: (q, k[:, :, :32], v),  # head dim
        lambda q, k, v: (q, k, v.repeat(1, 2, 1)),  # kv heads
        lambda q, k, v: (q, k.half(), v),  # mixed dtypes
        lambda q, k, v: (q.int(), k.int(), v.int()),  # not floats
    ],
)
def test_refused_inputs(change):
    q, k, v = change(*inputs(TREE))
    with pytest.raises(ValueError):
        reference.attention("deft_flatten", TREE, q, k, v)
