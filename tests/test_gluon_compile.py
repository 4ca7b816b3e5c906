"""The Hopper Gluon kernel compiles for sm_90a on the CPU, without spills (no GPU needed).

`deft.kernels.deft_flatten_sm90` runs only on a Hopper GPU and the interpreter does not run
Gluon, so CI checks what it can here: every variant the launcher can pick compiles with this
triton (3.9 locally, 3.6 on the GPU machine through ``PYTHONPATH``), with triton's own ptxas,
with no local memory (spill stores/loads, stack) and no serialised wgmma (warning C7515). Its
numerics are checked on the GPU by ``scripts/gluon_check.py``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deft.kernels import deft_flatten_sm90 as sm90
from deft.kernels.deft_flatten_sm90_compile import compile_for_sm90, ptxas_report
from deft.kernels.gluon_compat import HAS_GLUON, WHY_NOT

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not HAS_GLUON, reason=WHY_NOT or "no Gluon")

VARIANTS = [
    # (dtype, kv_heads, group, head_dim): Llama-3-8B, its shard shapes, odd and edge groups
    ("fp16", 8, 4, 128),
    ("bf16", 8, 4, 128),
    ("fp16", 1, 4, 128),
    ("fp16", 1, 8, 128),
    ("fp16", 2, 8, 128),
    ("fp16", 4, 7, 128),
    ("fp16", 2, 64, 128),
    ("fp16", 8, 1, 64),
    ("bf16", 2, 3, 64),
]


CONFIGS = {
    # kernel configurations besides the default that scripts/gluon_check.py has timed
    "n32s4": (dict(BLOCK_N=32, NUM_STAGES=4), 128, 2),
    "1cta_s5": (dict(NUM_STAGES=5), 168, 1),
    # timed with the mask on every tile (session 3); with MASK_FREE as well, triton 3.6's
    # ptxas spills 16 bytes, and the pair was never timed: compiled as it was measured
    "lazy_rescale": (dict(LAZY=True, MASK_FREE=False), 128, 2),
}


MODULE_VARIANTS = {
    # the module-parameter variants scripts/gluon_check.py --variants checks and times:
    # (module attributes of deft_flatten_sm90, CTAs per SM that must fit)
    "split2": (dict(TWO_CONSUMERS=True), 1),
    "split2_ahead2": (dict(TWO_CONSUMERS=True, SLOT_AHEAD=2), 1),
    "masked": (dict(MASK_FREE=False), 2),
    "pipe_n32s4": (dict(PIPELINE=True, BLOCK_N=32, NUM_STAGES=4, SMALL_GRID_PIPELINE=False), 2),
    "no_pdl_partials": (dict(PDL_PARTIALS=False), 2),
    "no_prefetch_item": (dict(PREFETCH_ITEM=False), 2),
}


FRESH_PROCESS = "DEFT_COMPILE_ONLY"
"""Set in the fresh process that compiles without the interpreter (see below)."""

if os.environ.get("TRITON_INTERPRET") == "1":
    def test_gluon_kernels_compile_in_a_fresh_process():
        """The interpreter, which the other kernel tests of this process use, breaks Gluon code
        generation in triton 3.6: compile this file's variants in a process without it."""
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env[FRESH_PROCESS] = "1"
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
             "-k", "without_spills or tma_boxes", __file__],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert " passed" in result.stdout and " failed" not in result.stdout
else:
    def _ptxas_ok(compiled) -> str:
        report = ptxas_report(compiled)
        assert "error" not in report.lower(), report
        assert "C7515" not in report, f"wgmma serialised:\n{report}"
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        assert spills and all(s == ("0", "0") for s in spills), f"register spills:\n{report}"
        stack = re.findall(r"(\d+) bytes stack frame", report)
        assert all(s == "0" for s in stack), f"local memory:\n{report}"
        return report


    def _assert_waits_before_loading(ptx):
        """A kernel launched as a programmatic dependent (`sm90.PDL_PARTIALS`) waits for the
        prior grid once per query tile, before the tile's first copy from Q or K/V (the first
        cp.async of the producer); without it, never."""
        waits = ptx.count("griddepcontrol.wait")
        if not sm90.PDL_PARTIALS:
            assert waits == 0
            return
        assert waits == 1, waits
        assert ptx.index("griddepcontrol.wait") < ptx.index("cp.async."), "loads before the wait"


    @pytest.mark.parametrize("dtype,kv_heads,group,head_dim", VARIANTS)
    def test_gluon_kernel_compiles_without_spills(dtype, kv_heads, group, head_dim):
        compiled = compile_for_sm90(dtype, kv_heads, group, head_dim)
        ptx = compiled.asm["ptx"]
        assert ".target sm_90a" in ptx
        assert "wgmma.mma_async" in ptx
        assert "cp.async.mbarrier.arrive.noinc" in ptx  # producer -> consumer through mbarriers
        assert "setmaxnreg" in ptx  # warp specialised with register reallocation
        _assert_waits_before_loading(ptx)
        _ptxas_ok(compiled)
        # both CTAs of an SM fit its shared memory (227 KB, 1 KB reserved per CTA)
        assert 2 * (compiled.metadata.shared + 1024) <= 233472, compiled.metadata.shared


    @pytest.mark.parametrize("dtype,kv_heads,group,head_dim", VARIANTS)
    def test_gluon_small_grid_kernel_compiles_without_spills(dtype, kv_heads, group, head_dim):
        """The kernel a plan with at most one work item per SM runs: the pipelined consumer,
        one CTA per SM."""
        kernel, consts, _, ctas = sm90.launch_spec(kv_heads, group, head_dim, small_grid=True)
        assert consts["PIPELINE"] and ctas == 1
        compiled = compile_for_sm90(dtype, kv_heads, group, head_dim, small_grid=True)
        assert "wgmma.mma_async" in compiled.asm["ptx"]
        _assert_waits_before_loading(compiled.asm["ptx"])
        _ptxas_ok(compiled)
        assert compiled.metadata.shared + 1024 <= 233472, compiled.metadata.shared


    @pytest.mark.parametrize("name", sorted(CONFIGS))
    def test_gluon_kernel_configs_compile_without_spills(name, monkeypatch):
        overrides, max_regs, ctas = CONFIGS[name]
        monkeypatch.setattr(sm90, "MAX_REGS", max_regs)
        for kv_heads, group in ((8, 4), (1, 8)):
            compiled = compile_for_sm90("fp16", kv_heads, group, 128, **overrides)
            _ptxas_ok(compiled)
            assert ctas * (compiled.metadata.shared + 1024) <= 233472, compiled.metadata.shared


    @pytest.mark.parametrize("name", sorted(MODULE_VARIANTS))
    def test_gluon_kernel_module_variants_compile_without_spills(name, monkeypatch):
        attributes, ctas = MODULE_VARIANTS[name]
        for key, value in attributes.items():
            monkeypatch.setattr(sm90, key, value)
        for dtype, kv_heads, group, head_dim in (("fp16", 8, 4, 128), ("bf16", 1, 8, 128),
                                                 ("fp16", 2, 64, 128), ("fp16", 8, 1, 64)):
            compiled = compile_for_sm90(dtype, kv_heads, group, head_dim)
            ptx = compiled.asm["ptx"]
            assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
            if not sm90.TWO_CONSUMERS:  # (launched plainly: no wait)
                _assert_waits_before_loading(ptx)
            _ptxas_ok(compiled)
            assert ctas * (compiled.metadata.shared + 1024) <= 233472, compiled.metadata.shared
        kernel, consts, _, ctas_per_sm = sm90.launch_spec(8, 4, 128)
        assert ctas_per_sm == ctas
        assert consts["SLOT_AHEAD"] == sm90.SLOT_AHEAD and consts["MASK_FREE"] == sm90.MASK_FREE
        assert (kernel is not sm90._partials_sm90_kernel) == sm90.TWO_CONSUMERS


    @pytest.mark.parametrize("page_size,small_grid,kv_heads,group,head_dim", [
        (16, False, 8, 4, 128), (64, False, 2, 8, 128), (8, True, 1, 8, 128), (16, False, 8, 1, 64),
        (3, False, 8, 4, 128)])
    def test_gluon_tma_variant_compiles_tma_boxes(page_size, small_grid, kv_heads, group,
                                                  head_dim, monkeypatch):
        """TMA_KV (an off variant, measured no faster: docs/performance.md, session 15): a KV
        tile is BLOCK_N / tma_rows boxes for K and as many for V, and each ready barrier
        counts the producer's threads plus the expect's arrival; a page size that is not a
        multiple of 8 compiles the gather-only kernel. Not checked for spills: triton 3.6's
        ptxas spills 8-20 bytes in the producer at 96 registers with both paths in it."""
        monkeypatch.setattr(sm90, "TMA_KV", True)
        rows = sm90.tma_rows(page_size)
        compiled = compile_for_sm90("fp16", kv_heads, group, head_dim, small_grid,
                                    page_size=page_size)
        ptx = compiled.asm["ptx"]
        assert ptx.count("cp.async.bulk.tensor.2d") == (2 * sm90.BLOCK_N // rows if rows else 0)
        ready = sm90.PRODUCER_WARPS * 32 + (1 if rows else 0)
        assert re.search(rf"mbarrier\.init\.shared(::cta)?\.b64 \[%r\d+\], {ready};", ptx)
        _assert_waits_before_loading(ptx)
        report = ptxas_report(compiled)
        assert "error" not in report.lower() and "C7515" not in report, report


def test_tma_rows_per_page_size(monkeypatch):
    """A TMA box is the largest power of two dividing the page size, up to a KV tile, and at
    least 8 rows; none with TMA_KV off."""
    monkeypatch.setattr(sm90, "TMA_KV", True)
    assert [sm90.tma_rows(p) for p in (1, 3, 4, 8, 16, 24, 64, 128)] == [0, 0, 0, 8, 16, 8, 64, 64]
    monkeypatch.setattr(sm90, "TMA_KV", False)
    assert sm90.tma_rows(16) == 0


def test_backend_resolution_without_a_gpu():
    """On the CPU everything runs the Triton kernel; forcing Gluon there says why not."""
    assert sm90.resolve_backend("deft_flatten", None, "cpu") == "triton"
    assert sm90.resolve_backend("deft_flatten", "triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="Gluon"):
        sm90.resolve_backend("deft_flatten", "gluon", "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        sm90.resolve_backend("deft_flatten", "cuda", "cpu")


def test_tree_attention_backend_argument(monkeypatch):
    """`TreeAttention(backend=)` and ``DEFT_BACKEND`` choose the partials kernel."""
    from deft.tree_attention import TreeAttention

    attn = TreeAttention("deft_flatten", max_queries=2, max_tokens=16, device="cpu")
    assert attn.backend == "triton"  # no Hopper GPU here
    monkeypatch.setenv("DEFT_BACKEND", "gluon")
    with pytest.raises(ValueError, match="Gluon"):
        TreeAttention("deft_flatten", max_queries=2, max_tokens=16, device="cpu")
    attn = TreeAttention("deft_flatten", max_queries=2, max_tokens=16, device="cpu",
                         backend="triton")
    assert attn.backend == "triton"
