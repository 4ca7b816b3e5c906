"""The Triton kernels (under the interpreter without a GPU) against the float64 oracle, the GPU
plan buffers against the reference planner, and the TreeAttention API's contracts.

Without CUDA the kernels run in Triton's interpreter (about 0.4 ms per program instance), so the
trees are tiny and the examples few; bf16 is left to scripts/gpu_check.py (the interpreter's
bf16 arithmetic is not trustworthy).
"""

import os
import subprocess
import sys

import numpy as np
import torch



import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import deft  # noqa: E402
from deft.strategies import KERNEL_STRATEGIES  # noqa: E402
from deft.tree_attention import TreeAttention  # noqa: E402
from deft.cache import PagedKVCache, TreeCache  # noqa: E402
from deft.kernels.partials import TileConfig  # noqa: E402
from deft.plan_buffers import CapacityError, paged_cache  # noqa: E402
from deft.tree import AttentionShape, Tree  # noqa: E402
from reference import build_plan, oracle_attention, rel_err  # noqa: E402
from tests.trees import trees  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float16: 2e-3, torch.float32: 2e-5}
TINY = dict(max_nodes=6, max_tokens=24, max_roots=2, max_queries_per_node=2)


def inputs(tree: Tree, dtype=torch.float16, seed=0):
    """Random q [queries, q_heads, d], k and v [tokens, kv_heads, d] for the tree's shape."""
    shape = tree.attention
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(tree.num_queries, shape.q_heads, shape.head_dim, generator=g)
    k = torch.randn(tree.num_tokens, shape.kv_heads, shape.head_dim, generator=g)
    v = torch.randn(tree.num_tokens, shape.kv_heads, shape.head_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def strategy_params(strategy, chunk, group):
    """The chunk and group sizes a strategy takes (others refused by build_plan)."""
    params = {}
    if strategy in ("flash_decoding", "radix", "tree_attention_s", "deft_node_chunk",
                    "deft_flatten"):
        params["chunk_size"] = chunk
    if strategy.startswith("deft_"):
        params["group_size"] = group
    return params


def run_poisoned(strategy, tree, q, k, v, page_size=1, seed=None, config=None, **params):
    """Plan and run over a (shuffled) paged cache with `out` full of NaN beforehand."""
    k_cache, v_cache, table = paged_cache(tree, k.to(DEVICE), v.to(DEVICE), page_size, seed)
    attn = TreeAttention(strategy, max_queries=tree.num_queries, max_tokens=tree.num_tokens,
                         max_entries=4096, config=config, device=DEVICE, **params)
    plan = attn.plan(tree, table)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    attn.run(q.to(DEVICE), k_cache, v_cache, plan, out=out)
    return out.cpu(), attn, plan


@settings(max_examples=12, deadline=None)
@given(
    tree=trees(**TINY, attention=AttentionShape(8, 2, 64, "float16")),
    strategy=st.sampled_from(KERNEL_STRATEGIES),
    page_size=st.sampled_from([1, 16]),
    chunk=st.sampled_from([8, 16, 128]),
    group=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 3),
)
def test_kernels_match_oracle(tree, strategy, page_size, chunk, group, seed):
    """Every kernel strategy on random trees and forests: shuffled pages, NaN-poisoned output."""
    q, k, v = inputs(tree, seed=seed)
    params = strategy_params(strategy, chunk, group)
    out, _, _ = run_poisoned(strategy, tree, q, k, v, page_size, seed, **params)
    assert torch.isfinite(out).all()
    assert rel_err(out, oracle_attention(tree, q, k, v)) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize(
    "q_heads, kv_heads, head_dim, dtype",
    [(4, 4, 128, torch.float16), (12, 2, 64, torch.float16), (8, 1, 256, torch.float16),
     (6, 2, 32, torch.float32)],
)
def test_head_shapes_and_dtypes(q_heads, kv_heads, head_dim, dtype):
    """GQA ratios 1, 6 (not a power of two) and 8, head dims 32 to 256, fp16 and fp32."""
    tree = Tree([0, 1, 2], [None, 0, 0], [21, 9, 4], [0, 2, 1],
                AttentionShape(q_heads, kv_heads, head_dim, "float16"))
    q, k, v = inputs(tree, dtype)
    ref = oracle_attention(tree, q, k, v, sm_scale=0.3)
    for strategy in ("deft_flatten", "flash_decoding"):
        k_cache, v_cache, table = paged_cache(tree, k.to(DEVICE), v.to(DEVICE), 16, seed=1)
        attn = TreeAttention(strategy, chunk_size=16, max_queries=3, max_tokens=34, device=DEVICE)
        out = attn.run(q.to(DEVICE), k_cache, v_cache, attn.plan(tree, table), sm_scale=0.3)
        assert rel_err(out.cpu(), ref) <= TOLERANCE[dtype], strategy


def test_query_tiles_loop():
    """A block seen by more queries than one tile holds (10 queries x 4 heads > 16 rows)."""
    tree = Tree(list(range(11)), [None] + [0] * 10, [30] + [2] * 10, [0] + [1] * 10,
                AttentionShape(8, 2, 32, "float16"))
    q, k, v = inputs(tree)
    ref = oracle_attention(tree, q, k, v)
    config = TileConfig(block_m=16, block_n=16)
    for strategy in ("deft_flatten", "deft_node"):
        params = {"chunk_size": 64} if strategy == "deft_flatten" else {}
        out, _, _ = run_poisoned(strategy, tree, q, k, v, config=config, **params)
        assert rel_err(out, ref) <= TOLERANCE[torch.float16], strategy


def test_single_node_single_query():
    tree = Tree([7], [None], [1], [1], AttentionShape(4, 2, 64, "float16"))
    q, k, v = inputs(tree)
    for strategy in KERNEL_STRATEGIES:
        out, _, _ = run_poisoned(strategy, tree, q, k, v)
        assert rel_err(out, oracle_attention(tree, q, k, v)) <= TOLERANCE[torch.float16]


@settings(max_examples=6, deadline=None)
@given(
    tree=trees(max_nodes=10, max_tokens=40, max_roots=3, max_queries_per_node=3),
    strategy=st.sampled_from(KERNEL_STRATEGIES),
    page_size=st.sampled_from([1, 4, 16]),
    chunk=st.sampled_from([1, 7, 32]),
    group=st.sampled_from([None, 1, 2]),
)
def test_plan_buffers_match_reference_planner(tree, strategy, page_size, chunk, group):
    """The partitions decoded from the device buffers are the reference planner's, exactly."""
    params = strategy_params(strategy, chunk, group)
    attn = TreeAttention(strategy, max_queries=tree.num_queries, max_tokens=tree.num_tokens,
                         max_entries=10_000, device=DEVICE, **params)
    _, _, table = paged_cache(tree, *inputs(tree)[1:], page_size, seed=3)
    plan = attn.plan(tree, table)
    reference = build_plan(strategy, tree, page_size=page_size, **params)
    assert plan.partition_sets() == reference.partition_sets()


def test_tree_cache_replan_padding_and_lse():
    """Plans over a `TreeCache`, re-plan into the same buffers, padded q rows, return_lse."""
    shape = AttentionShape(4, 2, 64, "float16")
    pool = PagedKVCache(64, 4, 2, 64, dtype=torch.float16, device=DEVICE)
    cache = TreeCache(pool)
    attn = TreeAttention("deft_flatten", chunk_size=16, max_queries=8, max_tokens=200,
                         device=DEVICE)
    out = torch.empty(8, 4, 64, dtype=torch.float16, device=DEVICE)
    lse = None
    for step, tree in enumerate([
        Tree([0, 1, 2], [None, 0, 0], [20, 3, 5], None, shape),
        Tree([0, 1, 2, 3], [None, 0, 0, 2], [20, 4, 5, 9], [0, 1, 0, 2], shape),
    ]):
        cache.apply(tree)
        _, k, v = inputs(tree, seed=step)
        pool.write(cache.token_slots(tree), k.to(DEVICE), v.to(DEVICE))  # rewrite every token
        q = torch.zeros(8, 4, 64, dtype=torch.float16)
        q[: tree.num_queries] = inputs(tree, seed=10 + step)[0]
        plan = attn.plan(tree, cache)
        out.fill_(float("nan"))
        _, lse = attn.run(q.to(DEVICE), pool.k, pool.v, plan, out=out, return_lse=True)
        n = tree.num_queries
        ref = oracle_attention(tree, q[:n], k, v)
        assert rel_err(out[:n].cpu(), ref) <= TOLERANCE[torch.float16]
        assert (out[n:] == 0).all() and torch.isneginf(lse[n:]).all()
    assert torch.isfinite(lse[:n]).all()
    with pytest.raises(ValueError, match="stale"):
        stale = attn.plan(tree, cache)
        attn.plan(tree, cache)
        attn.run(q.to(DEVICE), pool.k, pool.v, stale, out=out)


@pytest.mark.parametrize("block", [2, 16, 64])
def test_merge_per_query_and_per_head_agree(block):
    """Both merge kernels give the same rows (padding rows zero, lse -inf) from one set of
    partials, the per-head one at several row blocks (2: several loop steps a query; 64: one
    step, most of the block masked); a plan picks per query where many queries have few
    partial rows each, and its per-head row block from its most rows of a query."""
    from deft.kernels.reduction import merge, merge_block, per_query_merge

    tree = Tree([0, 1, 2, 3, 4], [None, 0, 0, 1, 1], [40, 5, 9, 4, 6], [0, 2, 1, 1, 1],
                AttentionShape(12, 2, 32, "float16"))
    q, k, v = inputs(tree)
    k_cache, v_cache, table = paged_cache(tree, k.to(DEVICE), v.to(DEVICE), 4)
    attn = TreeAttention("deft_flatten", chunk_size=16, max_queries=8, max_tokens=64,
                         device=DEVICE)
    plan = attn.plan(tree, table)
    padded = torch.zeros(8, 12, 32, dtype=torch.float16, device=DEVICE)
    padded[: tree.num_queries] = q.to(DEVICE)
    attn.run(padded, k_cache, v_cache, plan)  # fills the partials
    o_part, lse_part = attn._partials_workspace(12, 32)
    results = []
    for per_query in (False, True):
        out = torch.full((8, 12, 32), float("nan"), dtype=torch.float16, device=DEVICE)
        lse = torch.full((8, 12), float("nan"), device=DEVICE)
        merge(o_part, lse_part, attn.buffers.views, out, lse, per_query=per_query, block=block)
        results.append((out.cpu(), lse.cpu()))
    n = tree.num_queries
    # The two kernels sum the same rows in different vector shapes (and the interpreter's
    # numpy may take a SIMD path): equal to rounding, far below what a wrong merge changes.
    torch.testing.assert_close(results[0][0][:n], results[1][0][:n], rtol=0, atol=2e-3)
    torch.testing.assert_close(results[0][1][:n], results[1][1][:n], rtol=1e-6, atol=1e-5)
    assert torch.isneginf(results[1][1][n:]).all() and (results[1][0][n:] == 0).all()
    assert rel_err(results[1][0][:n], oracle_attention(tree, q, k, v)) <= TOLERANCE[torch.float16]
    assert per_query_merge(255, 765, 132) and not per_query_merge(64, 1344, 132)
    assert not per_query_merge(63, 126, 132)  # too few programs to fill the SMs
    assert [merge_block(r) for r in (0, 1, 16, 17, 32, 33, 64, 65, 5000)] == [
        16, 16, 16, 32, 32, 64, 64, 64, 64]
    rows = np.diff(attn.buffers.read("query_rows")[: 2 * tree.num_queries].reshape(-1, 2))
    assert plan.merge_block == merge_block(rows.max())


def test_lse_and_merge_states():
    """return_lse is the log-sum-exp of the scores; merge_states composes two KV sets."""
    shape = AttentionShape(4, 1, 32, "float32")
    tree = Tree([0], [None], [10], [1], shape)
    q, k, v = inputs(tree, torch.float32)
    halves = []
    for lo, hi in ((0, 4), (4, 10)):
        part = Tree([0], [None], [hi - lo], [1], shape)
        k_cache, v_cache, table = paged_cache(part, k[lo:hi].to(DEVICE), v[lo:hi].to(DEVICE))
        attn = TreeAttention("deft_node", max_queries=1, max_tokens=10, device=DEVICE)
        # the last token of the first half is the query's own, so causality keeps all visible
        halves.append(attn.run(q.to(DEVICE), k_cache, v_cache, attn.plan(part, table),
                               return_lse=True))
    scores = torch.einsum("qhd,td->qht", q.double(), k[:, 0].double()) * 32**-0.5
    o, lse = deft.merge_states(halves[0][0], halves[0][1], halves[1][0], halves[1][1])
    assert torch.allclose(lse.cpu().double(), torch.logsumexp(scores, -1), atol=1e-5)
    assert rel_err(o.cpu(), oracle_attention(tree, q, k, v)) <= TOLERANCE[torch.float32]


def test_deterministic_and_compiles():
    """Two runs are bit-identical; the custom op traces under torch.compile."""
    tree = Tree([0, 1, 2], [None, 0, 1], [40, 8, 3], [0, 2, 1], AttentionShape(4, 2, 64))
    q, k, v = (x.to(DEVICE) for x in inputs(tree))
    k_cache, v_cache, table = paged_cache(tree, k, v, 16)
    attn = TreeAttention("deft_node_chunk", chunk_size=16, max_queries=3, max_tokens=51,
                         max_entries=64, device=DEVICE)
    plan = attn.plan(tree, table)
    first = attn.run(q, k_cache, v_cache, plan)
    assert torch.equal(first, attn.run(q, k_cache, v_cache, plan))
    compiled = torch.compile(lambda q, kc, vc: attn.run(q, kc, vc, plan), backend="aot_eager",
                             fullgraph=True)
    assert torch.equal(first, compiled(q, k_cache, v_cache))


def test_compiled_run_takes_each_new_plan_without_recompiling():
    """Under torch.compile run reads nothing of the plan while tracing (dynamo would guard on
    it): one graph serves every plan, each call runs the latest plan as eager run does, and the
    plan checks run when the op runs."""
    shape = AttentionShape(4, 2, 64)
    big = Tree([0, 1, 2], [None, 0, 0], [40, 8, 5], [0, 2, 1], shape)
    small = Tree([0, 1, 2], [None, 0, 0], [40, 7, 5], [0, 2, 1], shape)  # one token less
    q, k, v = (x.to(DEVICE) for x in inputs(big))
    k_cache, v_cache, table = paged_cache(big, k, v, 16)
    attn = TreeAttention("deft_flatten", max_queries=3, max_tokens=53, device=DEVICE)
    eager = [attn.run(q, k_cache, v_cache, attn.plan(t, table)).clone() for t in (big, small)]
    assert not torch.equal(eager[0], eager[1])
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = torch.compile(lambda q, kc, vc, plan: attn.run(q, kc, vc, plan),
                             backend="eager", fullgraph=True)
    for step, tree in enumerate((big, small, big, small)):
        assert torch.equal(compiled(q, k_cache, v_cache, attn.plan(tree, table)), eager[step % 2])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
    plan = attn.plan(big, table)
    with pytest.raises(ValueError, match="slot"):  # the caches are too small for the plan
        compiled(q, k_cache[:1], v_cache[:1], plan)


def test_input_checks():
    tree = Tree([0, 1], [None, 0], [12, 3], None, AttentionShape(4, 2, 64))
    q, k, v = inputs(tree)
    k_cache, v_cache, table = paged_cache(tree, k, v, 4)
    attn = TreeAttention("deft_flatten", max_queries=2, max_tokens=15, device="cpu")
    plan = attn.plan(tree, table)
    cases = [
        (dict(q=q.float()), "float16"),
        (dict(q=q[:, :3]), "multiple"),
        (dict(q=q.transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
        (dict(k_cache=k_cache[:, :2].contiguous(), v_cache=v_cache[:, :2].contiguous()),
         "pages of"),
        (dict(k_cache=k_cache[:, :2]), "contiguously"),
        (dict(v_cache=v_cache[:, :, :1].contiguous()), "differ"),
        (dict(k_cache=k_cache[:1], v_cache=v_cache[:1]), "slot"),
        (dict(out=torch.empty(2, 4, 64, dtype=torch.float16)), "out must be"),
        (dict(q=torch.zeros(3, 4, 64, dtype=torch.float16)), "max_queries"),
    ]
    for change, message in cases:
        args = dict(q=q, k_cache=k_cache, v_cache=v_cache, out=None) | change
        with pytest.raises(ValueError, match=message):
            attn.run(args["q"], args["k_cache"], args["v_cache"], plan, out=args["out"])
    with pytest.raises(CapacityError, match="max_entries"):
        small = TreeAttention("deft_flatten", chunk_size=1, max_queries=2, max_tokens=15,
                              max_entries=3, device="cpu")
        small.plan(tree, table)
    with pytest.raises(ValueError, match="max_tokens"):
        TreeAttention("deft_flatten", max_queries=1, max_tokens=4, device="cpu").plan(tree, table)
    with pytest.raises(ValueError, match="no kernel"):
        TreeAttention("vanilla_tree", max_queries=1, max_tokens=4)
    with pytest.raises(ValueError, match="chunk_size"):
        TreeAttention("deft_node", chunk_size=8, max_queries=1, max_tokens=4)


def test_plans_compare_and_hash_by_identity():
    """Plan and TreePlan hold arrays: value equality would raise, so they compare as objects."""
    tree = Tree([0, 1], [None, 0], [12, 3], None, AttentionShape(4, 2, 64))
    _, k, v = inputs(tree)
    _, _, table = paged_cache(tree, k, v, 4)
    attn = TreeAttention("deft_flatten", max_queries=2, max_tokens=15, device="cpu")
    first, second = attn.plan(tree, table), attn.plan(tree, table)
    for a, b in ((first, second), (first.reference, second.reference)):
        assert a == a and a != b and len({a, b, a}) == 2 and hash(a) == hash(a)


def test_attention_wrapper_every_strategy():
    """deft.attention runs the six kernel strategies; the three without a kernel are refused
    (the core does not import the reference) and `reference.output` computes them."""
    import reference

    tree = Tree([0, 1, 2], [None, 0, 0], [9, 4, 6], None, AttentionShape(4, 2, 32))
    q, k, v = inputs(tree)
    ref = oracle_attention(tree, q, k, v)
    on_device = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    for strategy in reference.STRATEGIES:
        if strategy in KERNEL_STRATEGIES:
            out = deft.attention(strategy, tree, *on_device, page_size=4)
        else:
            with pytest.raises(ValueError, match="has no kernel: run its PyTorch reference"):
                deft.attention(strategy, tree, *on_device, page_size=4)
            out = reference.output(strategy, tree, *on_device, page_size=4)
        assert out.dtype == q.dtype and out.shape == q.shape and out.device == on_device[0].device
        assert rel_err(out.cpu(), ref) <= TOLERANCE[torch.float16], strategy
    with pytest.raises(ValueError, match="unknown strategy"):
        deft.attention("flash", tree, *on_device)


SM90_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget

from deft.kernels.partials import _partials_kernel
from deft.kernels.reduction import _merge_kernel, _merge_query_kernel


def compile_for_sm90(fn, pointers, ints, floats, constexprs, num_warps, **options):
    signature = {**pointers, **dict.fromkeys(ints, "i32"), **dict.fromkeys(floats, "fp32"),
                 **dict.fromkeys(constexprs, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers) + len(ints))}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                       attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=2, **options))
    assert kernel.asm["cubin"]
    return kernel


def check_grid_wait(kernel, dependent):
    # a dependent merge (programmatic dependent launch) waits for the partials kernel first
    # and carries the launch option; an ordinary one has no wait
    assert ("griddepcontrol.wait" in kernel.asm["ptx"]) == dependent
    assert kernel.metadata.launch_pdl == dependent


plan_pointers = ["counts_ptr", "part_start_ptr", "part_tokens_ptr", "part_entry_ptr",
                 "entry_query_ptr", "entry_row_ptr", "query_flat_ptr", "token_slot_ptr",
                 "subtree_end_ptr"]
for dtype, flat, head_dim in (("fp16", True, 128), ("bf16", False, 64)):
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}",
                "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32",
                **dict.fromkeys(plan_pointers, "*i32")}
    compile_for_sm90(
        _partials_kernel, pointers,
        ["stride_qn", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh"],
        ["qk_scale"],
        dict(KV_HEADS=8, GROUP=4, HEAD_DIM=head_dim, BLOCK_M=64, BLOCK_N=64, FLAT=flat,
             DOT_PRECISION="tf32", PREFETCH=flat, LEAN=flat, NARROW=flat, SAME_KV_STRIDE=flat),
        num_warps=4,
    )
for dependent in (True, False):
    check_grid_wait(compile_for_sm90(
        _merge_kernel,
        {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
         "counts_ptr": "*i32", "query_rows_ptr": "*i32"},
        ["stride_on", "stride_oh", "stride_ln", "stride_lh"], [],
        dict(Q_HEADS=32, HEAD_DIM=128, BLOCK_E=16, STORE_LSE=True, WAIT_FOR_PRIOR_GRID=dependent),
        num_warps=2, launch_pdl=dependent,
    ), dependent)
    check_grid_wait(compile_for_sm90(
        _merge_query_kernel,
        {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32", "out_ptr": "*fp16", "lse_ptr": "*fp32",
         "counts_ptr": "*i32", "query_rows_ptr": "*i32"},
        ["stride_on", "stride_oh", "stride_ln", "stride_lh"], [],
        dict(Q_HEADS=12, HEADS=16, HEAD_DIM=128, STORE_LSE=True, WAIT_FOR_PRIOR_GRID=dependent),
        num_warps=4, launch_pdl=dependent,
    ), dependent)
"""


def test_gpu_compilation():
    """The kernels compile for sm_90 (PTX and cubin, no GPU needed): catches what the
    interpreter lets through (non-constexpr globals, dot shapes, loop-carried types), and the
    merge's programmatic-dependent-launch wait, which the interpreter cannot run. Runs in a
    fresh process without TRITON_INTERPRET (the interpreter's patches break code generation)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
