"""Compile the Hopper Gluon DeFT-Flatten kernel for sm_90a on the CPU, and read ptxas's report.

No GPU needed: triton compiles the kernel `deft.kernels.deft_flatten_sm90.launch_spec` picks
for an sm_90 target with its own ptxas, so tests check on the CPU that every variant compiles
without spills or serialised wgmma. The kernel's module parameters are read at call time.
"""

from __future__ import annotations

import os

from deft.kernels import deft_flatten_sm90 as sm90

_ARG_TYPES = dict(
    o_part_ptr="*fp32", lse_part_ptr="*fp32",
    counts_ptr="*i32", part_start_ptr="*i32", part_tokens_ptr="*i32", part_entry_ptr="*i32",
    entry_query_ptr="*i32", entry_row_ptr="*i32", query_flat_ptr="*i32", token_slot_ptr="*i32",
    subtree_end_ptr="*i32", stride_qn="i32", stride_qh="i32", stride_kt="i32", stride_kh="i32",
    stride_vt="i32", stride_vh="i32", qk_scale="fp32",
)


def compile_for_sm90(dtype: str = "fp16", kv_heads: int = 8, group: int = 4,
                     head_dim: int = 128, small_grid: bool = False, page_size: int = 16,
                     **overrides):
    """Compile the Gluon partials kernel for sm_90a without a GPU (triton's own ptxas).

    The kernel and its parameters are those `deft_flatten_sm90.launch_spec` picks from the
    module parameters (``TWO_CONSUMERS``: the two-consumer kernel) for a plan with a small grid
    or not, and caches of ``page_size`` (with ``TMA_KV``, its TMA boxes); ``overrides`` replace
    constexprs.

    Returns the `CompiledKernel` (``asm["ptx"]``, ``asm["cubin"]``); `ptxas_report` reads its
    register and spill counts.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    overrides.setdefault("TMA_ROWS", sm90.tma_rows(page_size))
    kernel, consts, max_regs, _ = sm90.launch_spec(kv_heads, group, head_dim, small_grid,
                                                   **overrides)
    desc = _descriptor_type(dtype, consts.get("TMA_ROWS", 0), head_dim)
    signature = dict(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", k_desc=desc,
                     v_desc=desc, **_ARG_TYPES)
    consts["num_warps"] = sm90.CONSUMER_WARPS
    names = kernel.arg_names
    signature = {n: signature.get(n, "constexpr") for n in names}
    # what the launcher specializes on at run time: 16-byte aligned tensors, strides % 16 == 0
    aligned = [n for n in names if n.endswith("_ptr") or n.startswith("stride_")]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = GluonASTSource(fn=kernel, signature=signature,
                            constexprs={(names.index(k),): v for k, v in consts.items()},
                            attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=sm90.CONSUMER_WARPS, maxnreg=max_regs))


def _descriptor_type(dtype: str, rows: int, head_dim: int) -> str:
    """The signature type of the kernel's K/V descriptor arguments: a TMA descriptor of boxes
    of ``rows`` x head_dim (`deft_flatten_sm90.kv_descriptors`), or a pointer where ``rows`` is
    0 (the kernel is handed the caches and does not read them)."""
    if not rows:
        return f"*{dtype}"
    from triton.experimental.gluon import language as gl

    element = dict(fp16=gl.float16, bf16=gl.bfloat16)[dtype]
    layout = gl.NVMMASharedLayout.get_default_for([sm90.BLOCK_N, head_dim], element)
    return f"tensordesc<{dtype}[{rows}, {head_dim}],{layout!r}>"


def ptxas_report(compiled) -> str:
    """``ptxas -v`` (sm_90a) of a compiled kernel's PTX: registers, spills, warnings (C7515)."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(90).path  # (arch) in triton 3.6 and 3.9 alike
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([path, "-v", "--gpu-name", "sm_90a", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    return done.stdout + done.stderr
