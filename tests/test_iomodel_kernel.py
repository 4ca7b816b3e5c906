"""deft_flatten's kernel model (`iomodel.kernel_model`): the kernels' shapes it copies, its
work items' tile steps, the persistent grid (two programs per SM, or one in Hopper's small-grid
kernel), the HBM bound and the merge."""

import dataclasses

import numpy as np
import pytest

import iomodel
from deft.plan import build_plan
from deft.plan_aggregates import plan_aggregates
from deft.tree import AttentionShape, Tree
from iomodel import kernel_model
from iomodel.gpus import BUILTIN, load_gpu_spec
from iomodel.kernel_model import KERNEL_CONSTANTS
from iomodel.latency import (ROOFLINE_CONSTANTS, constants_for, constants_used, floor_traffic,
                             predict_latency)
from tests.test_iomodel import SPEC, star

# ---------------------------------------------------------------------------- the kernel model
# deft_flatten is timed from its kernel (iomodel.kernel_model); these are synthetic checks of
# each piece, with constants chosen so the quantities are whole numbers.
KERNEL = {"launch_us": 1.0, "memory_efficiency": 1.0, "query_tile_us": 2.0, "tile_us": 1.0,
          "small_grid_tile_us": 1.0, "contention": 0.0, "pair_speedup": 1.5,
          "merge_step_us": 1.0}


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
    _, consts, _, ctas_per_sm = deft_flatten_sm90.launch_spec(8, 4, 128, small_grid=True)
    assert kernel_model.SMALL_GRID_PROGRAMS_PER_SM == ctas_per_sm
    assert kernel_model.KV_TILE_HOPPER == consts["BLOCK_N"]  # the small-grid kernel's tile too
    assert kernel_model.MERGE_BLOCK_ROWS == (reduction.BLOCK_E, reduction.MAX_BLOCK_E)
    assert ([kernel_model.merge_block(r) for r in range(300)]
            == [reduction.merge_block(r) for r in range(300)])
    assert kernel_model.PER_QUERY_MAX_ROWS == reduction.PER_QUERY_MAX_ROWS


def test_which_kernel_and_its_query_tiles():
    h200, a100 = BUILTIN["h200"], BUILTIN["a100"]
    assert kernel_model.hopper(h200) and kernel_model.hopper(BUILTIN["h100"])
    assert not kernel_model.hopper(a100)
    assert not kernel_model.hopper(load_gpu_spec(SPEC))  # capability unknown: portable
    shapes = [AttentionShape(g, 1, 128, "float16") for g in (1, 4, 6, 8)]
    assert [kernel_model.queries_per_tile(s, h200) for s in shapes] == [64, 16, 8, 8]
    assert [kernel_model.queries_per_tile(s, a100) for s in shapes] == [64, 16, 10, 8]
    fp32 = [AttentionShape(g, 1, 128, "float32") for g in (1, 4, 6, 8)]  # the portable kernel
    assert [kernel_model.queries_per_tile(s, h200) for s in fp32] == [64, 16, 10, 8]
    assert kernel_model.kv_tile(shapes[0], h200) == kernel_model.KV_TILE_HOPPER
    assert kernel_model.kv_tile(fp32[0], h200) == kernel_model.KV_TILE_PORTABLE


def test_the_gluon_rule_is_the_kernels():
    """`kernel_model.gluon` on a Hopper card is `deft_flatten_sm90.takes` of the shape."""
    import torch

    from deft.kernels import deft_flatten_sm90

    h200 = BUILTIN["h200"]
    for dtype in ("float16", "bfloat16", "float32"):
        for head_dim in (32, 64, 96, 128, 256):
            for q_heads in (1, 8, 64, 65, 128):
                shape = AttentionShape(q_heads, 1, head_dim, dtype)
                assert kernel_model.gluon(shape, h200) == deft_flatten_sm90.takes(
                    getattr(torch, dtype), head_dim, q_heads), shape
                assert not kernel_model.gluon(shape, BUILTIN["a100"])


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


def test_each_query_tile_of_an_item_pays_the_fixed_cost():
    shape = AttentionShape(32, 8, 128, "float16")  # 16 queries a tile
    gpu = kernel_gpu()
    c = constants_for(gpu)
    for queries, tiles in ((16, 1), (17, 2)):
        tree = Tree(range(queries + 1), [None] + [0] * queries, [640] + [1] * queries,
                    [0] + [1] * queries, shape)
        plan = build_plan("deft_flatten", tree, 1024, None, 16)  # one partition, 8 items
        assert list(kernel_model.query_tiles(plan, gpu)) == [tiles]
        steps = tiles * -(-(640 + queries) // 64)
        chain, _ = kernel_model.partials_seconds(plan, gpu, c, 0.0, 0.0)
        assert chain * 1e6 == pytest.approx(tiles * c.query_tile_us + steps * c.tile_us)


def test_items_are_dealt_longest_first_one_per_program_in_turn():
    gpu = kernel_gpu()
    programs = kernel_model.PROGRAMS_PER_SM * gpu.sm_count
    tree = Tree(range(302), [None, 0] + [1] * 300, [64, 64] + [64] * 300)  # 300 leaves
    plan = build_plan("deft_flatten", tree, 64, None, 16)  # the two shared chunks: 300 queries
    tiles = kernel_model.query_tiles(plan, gpu)  # 2.0 µs each, 1.0 a step
    cost = np.repeat(2.0 * tiles + kernel_model.item_steps(plan, gpu),
                     plan.tree.attention.kv_heads)
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
    alone, bound = kernel_model.partials_seconds(one, gpu, c, 0.0, 0.0)
    assert bound == "compute" and alone * 1e6 == pytest.approx(2.0 + 101 * 1.0)
    # items = 2 x SMs equal ones (roots of one KV tile and one query each): SM s runs programs
    # s and s + SMs together, 1.5x one's rate
    roots = 2 * gpu.sm_count
    forest = Tree(range(roots), [None] * roots, [64] * roots, [1] * roots,
                  AttentionShape(4, 1, 128, "float16"))
    many = build_plan("deft_flatten", forest, 64, None, 16)
    assert list(kernel_model.item_steps(many, gpu)) == [1] * roots
    pair, _ = kernel_model.partials_seconds(many, gpu, c, 0.0, 0.0)
    assert pair * 1e6 == pytest.approx(2 * 3.0 / 1.5)
    loaded = kernel_model.partials_seconds(many, gpu, dataclasses.replace(c, contention=0.5),
                                           0.0, 0.0)[0]
    assert loaded * 1e6 == pytest.approx(2 * (2.0 + 1.5) / 1.5)  # every SM busy: 1.5x steps
    assert kernel_model.partials_seconds(many, gpu, c, 1e9, 0.0)[1] == "memory"


def test_a_plan_of_at_most_one_item_per_sm_runs_the_small_grid_kernel_on_hopper():
    # forests of roots of one KV tile and one query each (one KV head): one item per root
    def forest(roots):
        tree = Tree(range(roots), [None] * roots, [64] * roots, [1] * roots,
                    AttentionShape(4, 1, 128, "float16"))
        return build_plan("deft_flatten", tree, 64, None, 16)

    gpu = kernel_gpu(small_grid_tile_us=0.5)
    c = constants_for(gpu)
    fits, over = forest(gpu.sm_count), forest(gpu.sm_count + 1)
    assert kernel_model.small_grid(fits, gpu) and not kernel_model.small_grid(over, gpu)
    assert kernel_model.programs_per_sm(fits, gpu) == kernel_model.SMALL_GRID_PROGRAMS_PER_SM
    assert kernel_model.programs_per_sm(over, gpu) == kernel_model.PROGRAMS_PER_SM
    # one program per SM, one item each, at the small-grid step
    loads = kernel_model.program_loads(fits, gpu, c)
    assert len(loads) == gpu.sm_count and np.allclose(loads * 1e6, c.query_tile_us + 0.5)
    small, _ = kernel_model.partials_seconds(fits, gpu, c, 0.0, 0.0)
    assert small * 1e6 == pytest.approx(c.query_tile_us + c.small_grid_tile_us)
    # one item more: two programs per SM at tile_us, SM 0 hosting two items
    assert len(kernel_model.program_loads(over, gpu, c)) == 2 * gpu.sm_count
    shared, _ = kernel_model.partials_seconds(over, gpu, c, 0.0, 0.0)
    assert shared * 1e6 == pytest.approx(2 * (c.query_tile_us + c.tile_us) / c.pair_speedup)
    assert small < shared
    # the aggregates agree, and a card without the Gluon kernel never takes the small grid
    aggregated = plan_aggregates("deft_flatten", fits.tree, 64, None, 16)
    assert kernel_model.small_grid(aggregated, gpu)
    a100 = dataclasses.replace(kernel_gpu("a100", small_grid_tile_us=0.5),
                               sm_count=gpu.sm_count)
    assert not kernel_model.small_grid(fits, a100)
    assert len(kernel_model.program_loads(fits, a100, constants_for(a100))) == 2 * a100.sm_count


def test_small_grid_tile_us_times_only_small_grid_plans():
    few = build_plan("deft_flatten", star(4, 6400, 64), 8192, None, 16)  # a few items
    many = build_plan("deft_flatten", star(400, 640, 64), 64, None, 16)  # more than the SMs
    gpu, cheaper = kernel_gpu(), kernel_gpu(small_grid_tile_us=0.5)
    assert kernel_model.small_grid(few, gpu) and not kernel_model.small_grid(many, gpu)
    assert predict_latency(few, cheaper)["predicted_us"] < predict_latency(few, gpu)[
        "predicted_us"]
    assert predict_latency(many, cheaper)["predicted_us"] == pytest.approx(
        predict_latency(many, gpu)["predicted_us"])


def test_merge_chain_over_a_querys_partial_rows():
    gpu = kernel_gpu()
    chain = Tree([0, 1], [None, 0], [3200, 64], [0, 1])  # one query: 3264 / 32 = 102 rows
    plan = build_plan("deft_flatten", chain, 32, None, 16)
    assert kernel_model.merge_steps(plan, gpu) == -(-102 // 64)  # the per-head merge, 64 a step
    assert kernel_model.merge_steps(plan_aggregates("deft_flatten", chain, 32, None, 16),
                                    gpu) == -(-102 // 64)
    short = build_plan("deft_flatten", chain, 128, None, 16)  # 26 rows: one step of 32
    assert kernel_model.merge_steps(short, gpu) == 1
    wide = star(200, 64, 64)  # 200 queries, 2 rows each: the per-query merge, row by row
    assert kernel_model.merge_steps(build_plan("deft_flatten", wide, 64, 8, 16), gpu) == 2
    assert kernel_model.merge_steps(build_plan("deft_flatten", wide, 64, None, 16), gpu) == 2
    latency = predict_latency(plan, gpu)
    assert latency["reduction_us"] == pytest.approx(2 * 1.0, rel=1e-3)  # chain over bytes


def test_merge_at_the_fixed_block_a_sweep_was_timed_with():
    chain = Tree([0, 1], [None, 0], [3200, 64], [0, 1])  # one query, 102 partial rows
    plan = build_plan("deft_flatten", chain, 32, None, 16)
    gpu = kernel_gpu()
    assert kernel_model.merge_steps(plan, gpu, 16) == -(-102 // 16)
    assert kernel_model.merge_steps(plan, gpu, 0) == kernel_model.merge_steps(plan, gpu)
    fixed = predict_latency(plan, kernel_gpu(merge_block_rows=16))["reduction_us"]
    assert fixed == pytest.approx(7 * 1.0, rel=1e-3)  # 7 steps of 16 rows at 1 us
    assert predict_latency(plan, gpu)["reduction_us"] == pytest.approx(2 * 1.0, rel=1e-3)


def test_refit_predicts_the_merge_block_its_sweeps_timed():
    from harness.bench.calibrate import merge_block_of, timed_as

    old, new = {"merge_block": 16}, {"merge_block": "plan"}
    assert merge_block_of([old, old]) == 16 and merge_block_of([new, {}]) == 0
    with pytest.raises(ValueError, match="different merge blocks"):
        merge_block_of([old, new])
    gpu = kernel_gpu()
    assert constants_for(timed_as(gpu, [old])).merge_block_rows == 16
    assert timed_as(gpu, [new]) is gpu


def test_chain_and_bytes_overlap_as_the_softness_says():
    assert kernel_model.overlapped(3.0, 4.0, 0.0) == 4.0  # softness 0: the larger
    assert kernel_model.overlapped(3.0, 4.0, 0.5) == pytest.approx(5.0)  # the 2-norm
    assert kernel_model.overlapped(0.0, 4.0, 0.5) == pytest.approx(4.0)
    assert kernel_model.overlapped(3.0, 4.0, 1.0) == pytest.approx(7.0)  # the sum
    # both kernels: the partials' chain and bytes, the merge's chain and bytes
    chain = Tree([0, 1], [None, 0], [3200, 64], [0, 1])
    plan = build_plan("deft_flatten", chain, 32, None, 16)
    hard, soft = predict_latency(plan, kernel_gpu()), predict_latency(
        plan, kernel_gpu(overlap_softness=1.0))
    moved = iomodel.traffic_of_plan(plan)["partial_bytes"] / 2 + iomodel.traffic_of_plan(
        plan)["output_bytes"]
    assert soft["reduction_us"] == pytest.approx(
        hard["reduction_us"] + moved / kernel_gpu().bandwidth * 1e6)
    assert soft["attention_us"] > hard["attention_us"] and soft["bound"] == hard["bound"]


def test_the_kv_bytes_take_their_own_softness():
    """The partials' softness is the byte-weighted mean of ``kv_overlap_softness`` over the KV
    bytes and ``overlap_softness`` over the rest; a negative KV softness is the plain one."""
    plan = build_plan("deft_flatten", Tree([0, 1], [None, 0], [3200, 64], [0, 1]), 32, None, 16)
    gpu = kernel_gpu()
    c = constants_for(gpu)
    chain = kernel_model.partials_seconds(plan, gpu, c, 0.0, 0.0)[0]  # no bytes: the chain
    hbm = chain * gpu.bandwidth * c.memory_efficiency  # bytes as long as the chain: the balance

    def seconds(kv_bytes, **constants):
        gpu = kernel_gpu(**constants)
        return kernel_model.partials_seconds(plan, gpu, constants_for(gpu), hbm, kv_bytes)[0]

    assert seconds(0.0, overlap_softness=0.5) == pytest.approx(2 ** 0.5 * chain)  # the 2-norm

    assert seconds(hbm, overlap_softness=0.2, kv_overlap_softness=0.8) == pytest.approx(
        seconds(0.0, overlap_softness=0.8))
    assert seconds(hbm / 2, overlap_softness=0.2, kv_overlap_softness=0.8) == pytest.approx(
        seconds(0.0, overlap_softness=0.5))
    assert seconds(hbm, overlap_softness=0.5) == seconds(0.0, overlap_softness=0.5)
    assert seconds(hbm, overlap_softness=0.5, kv_overlap_softness=0.0) < seconds(
        hbm, overlap_softness=0.5)


def test_predict_latency_weights_the_softness_by_the_trees_kv_bytes():
    """On a tree whose bytes are mostly KV the prediction follows ``kv_overlap_softness``, not
    ``overlap_softness`` (the KV bytes reach `partials_seconds`)."""
    plan = build_plan("deft_flatten", star(20, 4000, 200), 512, 16, 16)
    gpu = kernel_gpu(tile_us=0.05, small_grid_tile_us=0.05, query_tile_us=0.5)

    def attention(**constants):
        return predict_latency(plan, dataclasses.replace(
            gpu, calibration={**gpu.calibration, **constants}))["attention_us"]

    low, high = attention(overlap_softness=0.2), attention(overlap_softness=0.8)
    mixed = attention(overlap_softness=0.2, kv_overlap_softness=0.8)
    assert low < mixed < high and high - mixed < mixed - low
    assert attention(overlap_softness=0.2, kv_overlap_softness=-1.0) == low


def test_a_per_query_merge_step_has_its_own_cost():
    """``merge_query_step_us`` prices the per-query merge's steps (one row each) and leaves the
    per-head merge's (a block of rows) to ``merge_step_us``."""
    many = star(200, 1000, 16)  # 200 queries >= the SMs, few rows each: the per-query merge
    few = star(20, 4000, 200)
    gpu = BUILTIN["h200"]
    for tree, per_query in ((many, True), (few, False)):
        plan = build_plan("deft_flatten", tree, 512, None, 16)
        assert kernel_model.per_query(plan, gpu) == per_query
        base = predict_latency(plan, kernel_gpu(merge_step_us=3.0))["reduction_us"]
        own = predict_latency(plan, kernel_gpu(merge_step_us=3.0, merge_query_step_us=0.5))
        if per_query:
            assert own["reduction_us"] == pytest.approx(predict_latency(
                plan, kernel_gpu(merge_step_us=0.5))["reduction_us"])
            assert own["reduction_us"] < base
        else:
            assert own["reduction_us"] == base


def test_flatten_reads_each_seen_token_from_hbm_once():
    shape = AttentionShape(32, 8, 128, "float16")
    tree = Tree(range(65), [None] + [0] * 64, [4000] + [64] * 64, [0] + [1] * 64, shape)
    gpu = kernel_gpu(query_tile_us=1e-3, tile_us=1e-3,  # no chain: the kernel is memory bound
                     small_grid_tile_us=1e-3)
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


def test_portable_kernel_steps_cost_the_same_per_token():
    tree = Tree([0, 1], [None, 0], [6336, 64], [0, 1], AttentionShape(4, 1, 128, "float16"))
    plan = build_plan("deft_flatten", tree, 8192, None, 16)  # one item of 6400 tokens
    times = {}
    for base in ("h200", "a100"):
        gpu = dataclasses.replace(kernel_gpu(base), sm_count=132)
        times[base] = kernel_model.partials_seconds(plan, gpu, constants_for(gpu), 0.0, 0.0)[0]
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


def test_a_masked_step_costs_masked_tile_us_more_on_both_kernels():
    # a 32-token root and two 64-token leaves, a query on each one's last token, 4/1
    siblings = Tree([0, 1, 2], [None, 0, 0], [32, 64, 64], [0, 1, 1],
                    AttentionShape(4, 1, 128, "float16"))
    one = build_plan("deft_flatten", siblings, 1024, 1, 16)  # a query each: 2 and 3 masked
    assert list(kernel_model.masked_item_steps(one, kernel_gpu())) == [2, 3]
    for tile_us in ("small_grid_tile_us", "tile_us"):  # small grid, then one item per program
        gpu = kernel_gpu(masked_tile_us=0.25, **{tile_us: 1.0})
        if tile_us == "tile_us":
            gpu = dataclasses.replace(gpu, sm_count=1)  # two items > one SM: two CTAs
        assert kernel_model.small_grid(one, gpu) == (tile_us == "small_grid_tile_us")
        loads = kernel_model.program_loads(one, gpu, constants_for(gpu)) * 1e6
        busy = sorted(loads[loads > 0])  # one item a program: 1 query tile, 3 steps each
        assert busy == pytest.approx([2.0 + 3 * 1.0 + 2 * 0.25, 2.0 + 3 * 1.0 + 3 * 0.25])
    free = kernel_gpu(masked_tile_us=0.25)
    chain = Tree([0, 1], [None, 0], [6336, 64], [0, 1], AttentionShape(4, 1, 128, "float16"))
    whole = build_plan("deft_flatten", chain, 8192, None, 16)  # 100 tiles, all seen whole
    assert list(kernel_model.masked_item_steps(whole, free)) == [0]
    assert predict_latency(whole, free)["predicted_us"] == pytest.approx(
        predict_latency(whole, kernel_gpu())["predicted_us"])
    a100 = dataclasses.replace(kernel_gpu("a100", masked_tile_us=0.25), sm_count=132)
    assert list(kernel_model.masked_item_steps(whole, a100)) == [200]  # every portable step
    extra = (kernel_model.partials_seconds(whole, a100, constants_for(a100), 0.0, 0.0)[0]
             - kernel_model.partials_seconds(whole, free, constants_for(free), 0.0, 0.0)[0])
    assert extra * 1e6 == pytest.approx(200 * 0.25 / 2)  # half a Gluon step's extra each
