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
    "fused_merge": (dict(FUSED_MERGE=True), 2),
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
             "-k", "without_spills or stays_off", __file__],
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


    @pytest.mark.parametrize("dtype,kv_heads,group,head_dim", VARIANTS)
    def test_gluon_kernel_compiles_without_spills(dtype, kv_heads, group, head_dim):
        compiled = compile_for_sm90(dtype, kv_heads, group, head_dim)
        ptx = compiled.asm["ptx"]
        assert ".target sm_90a" in ptx
        assert "wgmma.mma_async" in ptx
        assert "cp.async.mbarrier.arrive.noinc" in ptx  # producer -> consumer through mbarriers
        assert "setmaxnreg" in ptx  # warp specialised with register reallocation
        _ptxas_ok(compiled)
        # both CTAs of an SM fit its shared memory (227 KB, 1 KB reserved per CTA)
        assert 2 * (compiled.metadata.shared + 1024) <= 233472, compiled.metadata.shared


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
            _ptxas_ok(compiled)
            assert ctas * (compiled.metadata.shared + 1024) <= 233472, compiled.metadata.shared
        kernel, consts, _, ctas_per_sm = sm90.launch_spec(8, 4, 128)
        assert ctas_per_sm == ctas
        assert consts["SLOT_AHEAD"] == sm90.SLOT_AHEAD and consts["MASK_FREE"] == sm90.MASK_FREE
        two = kernel is not sm90._partials_sm90_kernel
        assert two == sm90.TWO_CONSUMERS


    @pytest.mark.parametrize("dtype,kv_heads,group,head_dim",
                             [("fp16", 1, 8, 128), ("bf16", 1, 4, 128), ("fp16", 4, 7, 128),
                              ("fp16", 8, 1, 64)])
    def test_fused_merge_variant_compiles_without_spills(dtype, kv_heads, group, head_dim,
                                                         monkeypatch):
        """FUSED_MERGE: the arrival counters are bumped by a gpu-scope acq_rel atomic (the
        release of the tile's partial rows, the acquire of the other CTAs'), between barriers
        of the consumer's own 128 threads; the merge reads partial rows from L2 (ld.cg); no
        spills at the fused kernel's register split (FUSED_PRODUCER_REGS)."""
        monkeypatch.setattr(sm90, "FUSED_MERGE", True)
        for store_lse in (False, True):
            compiled = compile_for_sm90(dtype, kv_heads, group, head_dim, STORE_LSE=store_lse)
            ptx = compiled.asm["ptx"]
            assert "atom.global.gpu.acq_rel.add" in ptx
            assert "ld.global.cg" in ptx
            assert re.search(r"bar\.sync\s+0, 128;\s+[^\n]*\n(?:[^\n]*\n){0,8}?[^\n]*atom\.global",
                             ptx)  # the release barrier shortly before the atomic
            assert f"setmaxnreg.inc.sync.aligned.u32 \t{sm90.FUSED_PRODUCER_REGS};" in ptx
            _ptxas_ok(compiled)
            assert 2 * (compiled.metadata.shared + 1024) <= 233472, compiled.metadata.shared
        default = compile_for_sm90(dtype, kv_heads, group, head_dim, FUSED_MERGE=False)
        assert "atom." not in default.asm["ptx"]  # the unfused kernel has no counters


    def test_fused_merge_stays_off_past_its_group(monkeypatch):
        """Groups past FUSED_MAX_GROUP compile (and run) the unfused kernel under the flag."""
        monkeypatch.setattr(sm90, "FUSED_MERGE", True)
        _, consts, _, _ = sm90.launch_spec(2, 64, 128)
        assert not consts["FUSED_MERGE"] and consts["PRODUCER_REGS"] == sm90.PRODUCER_REGS
        _, consts, _, _ = sm90.launch_spec(1, 8, 128)
        assert consts["FUSED_MERGE"] and consts["PRODUCER_REGS"] == sm90.FUSED_PRODUCER_REGS


def test_fused_merge_host_logic(monkeypatch):
    """When the Gluon kernel merges itself: FUSED_MERGE, the one-consumer kernel, and an int32
    counter per (row, head) of out; TreeAttention keeps the counters (zeros) beside its
    workspace."""
    import torch

    from deft.kernels.deft_flatten_sm90_merge import arrival_counters, counters_fit
    from deft.tree_attention import TreeAttention

    out = torch.empty(6, 4, 32)
    counters = arrival_counters(6, 4, "cpu")
    assert counters.dtype == torch.int32 and counters.shape == (24,) and not counters.any()
    assert counters_fit(counters, 6, 4) and counters_fit(counters, 5, 4)
    assert not counters_fit(counters, 7, 4) and not counters_fit(None, 1, 1)
    assert not counters_fit(counters.float(), 6, 4)
    assert not sm90.fused_merge_applies((out, None, counters), 4, 4)  # FUSED_MERGE off
    monkeypatch.setattr(sm90, "FUSED_MERGE", True)
    assert sm90.fused_merge_applies((out, None, counters), 4, 4)
    assert not sm90.fused_merge_applies((out, None, counters), 4, sm90.FUSED_MAX_GROUP + 1)
    assert not sm90.fused_merge_applies((out, None, counters[:20]), 4, 4)
    assert not sm90.fused_merge_applies((out, None, None), 4, 4)
    assert not sm90.fused_merge_applies(None, 4, 4)
    monkeypatch.setattr(sm90, "TWO_CONSUMERS", True)
    assert not sm90.fused_merge_applies((out, None, counters), 4, 4)

    attn = TreeAttention("deft_flatten", max_queries=3, max_tokens=16, device="cpu")
    o_part, lse_part = attn._partials_workspace(4, 32)
    arrivals = attn.arrival_counters(o_part)
    assert arrivals.shape == (12,) and arrivals.dtype == torch.int32 and not arrivals.any()
    assert attn.arrival_counters(torch.empty_like(o_part)) is None
    assert attn._partials_workspace(4, 32)[0] is o_part and attn.arrival_counters(o_part) is arrivals


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
