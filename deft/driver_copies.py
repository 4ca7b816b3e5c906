"""Host-to-device copies through the CUDA driver (``libcuda``, by ctypes), 1-D and 2-D.

`deft.staged_upload.StagedUpload` copies a plan's changes out of pinned staging with these.
torch has no strided copy from host memory, and a copy's host time is mostly the call, whatever
its size: the plan buffers' fields before the slots lie one pitch apart, so their changes leave
as one ``cuMemcpy2DAsync`` where they took up to six copies (fewshot_b50: 6 -> 2 copies a step,
the 64k-token runs 7 -> 4). On one H200 host (session 17, `scripts/plan_overhead.py`, main and
this upload alternated twice) the fill's upload took 4-78 us less a step, the step's tree and
plan 0.50-0.97x the time.
"""

from __future__ import annotations

import ctypes

_HOST, _DEVICE = 1, 2  # CUmemorytype


class _Copy2D(ctypes.Structure):
    """The driver's ``CUDA_MEMCPY2D``."""

    _fields_ = [("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t),
                ("srcMemoryType", ctypes.c_int), ("srcHost", ctypes.c_void_p),
                ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
                ("srcPitch", ctypes.c_size_t),
                ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t),
                ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p),
                ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
                ("dstPitch", ctypes.c_size_t),
                ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t)]


_driver = None


def _load():
    global _driver
    if _driver is None:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_void_p]
        lib.cuMemcpy2DAsync_v2.argtypes = [ctypes.POINTER(_Copy2D), ctypes.c_void_p]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int]
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        lib.cuCtxPushCurrent_v2.argtypes = [ctypes.c_void_p]
        lib.cuCtxPopCurrent_v2.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        _driver = lib
    return _driver


def _check(result: int, call: str) -> None:
    if result:
        name = ctypes.c_char_p()
        _driver.cuGetErrorName(result, ctypes.byref(name))
        raise RuntimeError(f"{call} failed: {(name.value or b'?').decode()} ({result})")


class HostToDevice:
    """Non-blocking copies from pinned host memory to one CUDA device, queued on a stream.

    Parameters
    ----------
    device_index : int
        The device (as torch numbers it) whose memory the copies write; its primary context is
        made current around the copies where another is (a fresh thread has none).
    """

    def __init__(self, device_index: int):
        driver = _load()
        device, self._context = ctypes.c_int(), ctypes.c_void_p()
        _check(driver.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
        _check(driver.cuDevicePrimaryCtxRetain(ctypes.byref(self._context), device.value),
                "cuDevicePrimaryCtxRetain")
        self._current = ctypes.c_void_p()
        self._copy = _Copy2D(srcMemoryType=_HOST, dstMemoryType=_DEVICE)
        self._copy_ref = ctypes.byref(self._copy)

    def copies(self, dst: int, src: int, rects, stream: int) -> None:
        """Copy each ``(lo, width, height, pitch)`` of ``rects`` (in 4-byte elements) from
        ``src`` to ``dst`` (addresses): rows ``lo + r * pitch`` of ``width`` elements, for
        ``r < height``, on ``stream`` (a CUDA stream handle)."""
        driver, copy = _driver, self._copy
        _check(driver.cuCtxGetCurrent(ctypes.byref(self._current)), "cuCtxGetCurrent")
        pushed = self._current.value != self._context.value
        if pushed:
            _check(driver.cuCtxPushCurrent_v2(self._context), "cuCtxPushCurrent")
        try:
            for lo, width, height, pitch in rects:
                if height == 1:
                    _check(driver.cuMemcpyHtoDAsync_v2(dst + 4 * lo, src + 4 * lo, 4 * width,
                                                       stream), "cuMemcpyHtoDAsync")
                    continue
                copy.srcHost, copy.dstDevice = src + 4 * lo, dst + 4 * lo
                copy.srcPitch = copy.dstPitch = 4 * pitch
                copy.WidthInBytes, copy.Height = 4 * width, height
                _check(driver.cuMemcpy2DAsync_v2(self._copy_ref, stream), "cuMemcpy2DAsync")
        finally:
            if pushed:
                _check(driver.cuCtxPopCurrent_v2(ctypes.byref(self._current)), "cuCtxPopCurrent")
