"""Masked tile steps (`iomodel.mask_tiles`): the count against a loop-by-loop emulation of the
Gluon kernel's branch on random plans, hand-built plans, the portable kernel, and aggregates."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deft.plan import build_plan
from deft.plan_aggregates import aggregates_of_plan, plan_aggregates
from deft.plan_buffers import plan_arrays
from deft.tree import AttentionShape, Tree
from iomodel import kernel_model, mask_tiles
from iomodel.gpus import BUILTIN
from iomodel.latency import predict_latency
from tests.trees import trees

BLOCK_N = 64


def kernel_masked_steps(plan, queries_per_tile: int, pipelined: bool) -> np.ndarray:
    """Masked steps per partition, by the kernel's loops over the plan buffers: the producer's
    query tiles (``entry0`` in steps of QUERIES_PER_TILE) and KV tiles (the serial consumer's
    ``range(0, num_tokens, BLOCK_N)``; the pipelined one's tile 0 then ``range(BLOCK_N,
    max(num_tokens, 1), BLOCK_N)``), and `mask_unless_whole`'s test on each (columns past the
    partition read subtree_end 0). [P]"""
    page_ptr = np.concatenate([[0], np.cumsum(plan.tree.tokens)])
    buffers = plan_arrays(plan, page_ptr, np.arange(page_ptr[-1]), flat=True)
    ends = buffers["subtree_end"]
    masked = np.zeros(plan.num_partitions, dtype=np.int64)
    for p in range(plan.num_partitions):
        token_start, num_tokens = buffers["part_start"][p], buffers["part_tokens"][p]
        entry_lo, entry_hi = buffers["part_entry"][p], buffers["part_entry"][p + 1]
        starts = ([0, *range(BLOCK_N, max(num_tokens, 1), BLOCK_N)] if pipelined
                  else list(range(0, num_tokens, BLOCK_N)))
        for entry0 in range(entry_lo, entry_hi, queries_per_tile):
            entries = buffers["entry_query"][entry0:min(entry0 + queries_per_tile, entry_hi)]
            query_flat = buffers["query_flat"][entries]
            for n0 in starts:
                col = n0 + np.arange(BLOCK_N)
                end = np.where(col < num_tokens,
                               ends[np.minimum(token_start + col, len(ends) - 1)], 0)
                masked[p] += bool((token_start + n0 + BLOCK_N - 1 > query_flat.min())
                                  | (query_flat.max() >= end.min()))
    return masked


@settings(max_examples=60, deadline=None)
@given(trees(max_nodes=12, max_tokens=150, max_queries_per_node=12),
       st.sampled_from([16, 32, 64, 100, 128, 200]), st.sampled_from([None, 1, 3, 8]),
       st.sampled_from([1, 8, 16, 64]))
def test_the_count_is_the_kernels_branch_on_random_plans(tree, chunk, group, per_tile):
    plan = build_plan("deft_flatten", tree, chunk, group, 16)
    got = mask_tiles.masked_steps(plan, per_tile, BLOCK_N)
    for pipelined in (False, True):  # the two-CTA kernel's consumer and the small-grid one's
        assert np.array_equal(got, kernel_masked_steps(plan, per_tile, pipelined))


GQA = AttentionShape(4, 1, 128, "float16")  # 16 queries a Gluon query tile


def flatten(tree, chunk, group=None):
    return build_plan("deft_flatten", tree, chunk, group, 16)


def counted(plan, gpu=BUILTIN["h200"]):
    return list(kernel_model.masked_item_steps(plan, gpu))


def test_tiles_every_query_sees_whole_are_mask_free():
    # a 640-token root under 16 one-token leaves, a query each
    star = Tree(range(17), [None] + [0] * 16, [640] + [1] * 16, [0] + [1] * 16, GQA)
    assert counted(flatten(star, 640)) == [0, 1]  # 10 whole tiles; the leaves' 16 tokens
    assert counted(flatten(star, 600)) == [1, 1]  # 9 whole tiles and a short one; 56 tokens
    assert counted(flatten(star, 640, group=8)) == [0, 0, 1, 1]
    # a tile crossing a node boundary on the query's path is mask-free (32 + 64 tokens)
    chain = Tree([0, 1], [None, 0], [32, 64], [0, 1], GQA)
    assert counted(flatten(chain, 1024)) == [1]  # tile 0 free, tile 1 short
    assert list(kernel_model.item_steps(flatten(chain, 1024), BUILTIN["h200"])) == [2]


def sibling_leaves(shape):
    """A 32-token root, two 64-token leaves with a query on each one's last token."""
    return Tree([0, 1, 2], [None, 0, 0], [32, 64, 64], [0, 1, 1], shape)


def test_tiles_crossing_into_a_sibling_are_masked():
    siblings = sibling_leaves(GQA)
    assert counted(flatten(siblings, 1024)) == [3]  # one query tile sees no tile whole
    # one query a partition: the first leaf's sees tile 0 whole, the second's none
    assert counted(flatten(siblings, 1024, group=1)) == [2, 3]
    # a query tile per query (64 query heads per KV head: one query fills the tile's rows)
    wide = sibling_leaves(AttentionShape(64, 1, 128, "float16"))
    assert counted(flatten(wide, 1024)) == [5]


def test_the_portable_kernel_masks_every_step():
    for gpu, shape in ((BUILTIN["a100"], GQA), (BUILTIN["h200"], AttentionShape(4, 1, 128, "float32"))):
        plan = flatten(sibling_leaves(shape), 1024)
        assert counted(plan, gpu) == list(kernel_model.item_steps(plan, gpu))


@settings(max_examples=40, deadline=None)
@given(trees(max_nodes=12, max_tokens=150, max_queries_per_node=12, attention=GQA),
       st.sampled_from([16, 64, 100, 256]), st.sampled_from([None, 2, 8]))
def test_aggregates_predict_what_their_plan_does(tree, chunk, group):
    gpu = dataclasses.replace(BUILTIN["h200"], calibration={"masked_tile_us": 0.5})
    plan = flatten(tree, chunk, group)
    want = predict_latency(plan, gpu)
    got = predict_latency(plan_aggregates("deft_flatten", tree, chunk, group, 16), gpu)
    assert got["predicted_us"] == pytest.approx(want["predicted_us"], rel=1e-12)
    # past the plan limit the aggregates' bound: no fewer masked steps than the count
    exact = mask_tiles.masked_steps(plan, 16, BLOCK_N)
    bound = mask_tiles.masked_steps_bound(aggregates_of_plan(plan), 16, BLOCK_N)
    steps = kernel_model.item_steps(plan, gpu)
    assert np.all(exact <= bound) and np.all(bound <= steps)
    whole = plan.work == plan.queries * plan.tokens
    assert np.array_equal(exact[whole], bound[whole])


def test_past_the_plan_limit_aggregates_take_the_bound(monkeypatch):
    # a 640-token root and two 64-token leaves, a query on each one's last token
    star = Tree([0, 1, 2], [None, 0, 0], [640, 64, 64], [0, 1, 1], GQA)
    aggregates = plan_aggregates("deft_flatten", star, 1024, None, 16)
    assert counted(flatten(star, 1024)) == [2]  # the root's 10 tiles free, each leaf's masked
    assert isinstance(mask_tiles.partitions_of(aggregates), type(flatten(star, 1024)))
    gpu = dataclasses.replace(BUILTIN["h200"], calibration={"masked_tile_us": 0.5})
    exact = predict_latency(aggregates, gpu)["predicted_us"]
    monkeypatch.setattr(mask_tiles, "PLAN_LIMIT", 1)  # the plan has 2 entries
    assert mask_tiles.partitions_of(aggregates) is None
    assert kernel_model.counted_form(aggregates, gpu) is aggregates
    assert counted(aggregates) == [12]  # not every query sees every token: all 12 steps
    bounded = predict_latency(aggregates, gpu)["predicted_us"]
    assert bounded == pytest.approx(exact + 10 * 0.5)  # 10 more masked steps at 0.5 µs
