"""Gluon names that moved between triton 3.6 and 3.9, resolved once at import.

The Hopper Gluon kernel (`deft.kernels.deft_flatten_sm90`) must run on triton 3.6 (the GPU
machine) and compile with triton 3.9 (CI, CPU). Where the two differ:

==========================================  ==============================  ====================
what                                        triton 3.6                      triton 3.9
==========================================  ==============================  ====================
cp.async global -> shared (pointer gather)  async_copy.async_copy_global_   async_copy.async_load
                                            to_shared
TMA box global -> shared                    tma.async_copy_global_to_shared tma.async_load
expected bytes of an mbarrier phase         mbarrier.expect(bar, bytes=)    bytes_per_cta=
barrier of the executing warps              gl.thread_barrier               gl.barrier
==========================================  ==============================  ====================

The aliases below are the builtin functions themselves, so a ``@gluon.jit`` function calls
them like any Gluon builtin (``mbarrier.expect`` is called positionally, which both take).
``HAS_GLUON`` is False (and the aliases None) where this triton has no Hopper Gluon.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        async_copy,
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
except Exception as error:  # noqa: BLE001 - any import failure means: no Gluon here
    HAS_GLUON = False
    WHY_NOT = f"triton.experimental.gluon (Hopper) is not importable: {error!r}"
    gluon = gl = async_copy = fence_async_shared = mbarrier = tma = None
    warpgroup_mma = warpgroup_mma_wait = None
    async_load = tma_load = cta_barrier = None
else:
    HAS_GLUON = True
    WHY_NOT = ""
    async_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    """cp.async of a pointer tensor into a shared-memory descriptor of the same shape."""
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    """One TMA box (descriptor, coordinates, mbarrier, destination)."""
    cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    """bar.sync of the warps that run it (a partition's warps inside warp_specialize)."""

__all__ = [
    "HAS_GLUON", "WHY_NOT", "gluon", "gl", "async_copy", "fence_async_shared", "mbarrier", "tma",
    "warpgroup_mma", "warpgroup_mma_wait", "async_load", "tma_load", "cta_barrier",
]
