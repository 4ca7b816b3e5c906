"""A pinned host mirror of one int32 device tensor, uploaded to it in rectangles.

`deft.plan_buffers.PlanBuffers.fill` writes a plan into the mirror, then uploads what it wrote
as a few non-blocking copies, each a rectangle ``(lo, width, height, pitch)`` of the buffers'
elements (a span where the height is one; fields of one pitch, the plan's entry fields, as one
strided copy), through the CUDA driver (`deft.driver_copies`): on an H200 host a copy through
``Tensor.copy_`` cost about 7 us of host time whatever its size up to 256 KiB (with slicing the
two tensors for it), a driver copy 2.3 (session 11's copy probe), and torch has no strided copy
from host memory. One event is recorded again and again on the current stream, looked up by its
id (``torch.cuda.current_stream`` costs 4-8 us).

`FreshUpload` does the same for `deft.cache.TreeCache.apply`'s new slots, which leave as fresh
tensors: ``torch.from_numpy(a).pin_memory().to(device, non_blocking=True)`` cost 30-65 us of
host time a step in whole runs on an H200 host (session 13), a fresh pinned block each time.
"""

from __future__ import annotations

import torch

from deft.driver_copies import HostToDevice


class StagedUpload:
    """Pinned staging for ``data`` (an int32 tensor on a CUDA device).

    Parameters
    ----------
    data : int32 [n] on a CUDA device (contiguous)

    Attributes
    ----------
    host : numpy int32 [n]
        The mirror, written by the caller between `wait` and `upload`. It holds what ``data``
        holds wherever either was ever written, so that a copy may take along elements it
        did not write.
    """

    def __init__(self, data: torch.Tensor):
        self.data = data
        self._staging = torch.zeros(len(data), dtype=data.dtype, pin_memory=True)
        self.host = self._staging.numpy()
        self._copies = HostToDevice(data.device.index)
        self._event = torch.cuda.Event()
        self._recorded = False
        self._stream = CurrentStream(data.device.index)

    def wait(self) -> None:
        """Block until the last upload has left the mirror (then it may be written)."""
        if self._recorded:
            self._event.synchronize()

    def upload(self, rects) -> None:
        """Copy each ``(lo, width, height, pitch)`` of ``rects`` (elements ``lo + r * pitch +
        j`` for ``r < height``, ``j < width``) from ``host`` to ``data`` (non-blocking, on the
        current stream of ``data``'s device)."""
        if not len(rects):
            return
        stream = self._stream()
        self._copies.copies(self.data.data_ptr(), self._staging.data_ptr(), rects,
                            stream.cuda_stream)
        self._event.record(stream)
        self._recorded = True


class CurrentStream:
    """The current stream of one CUDA device, looked up by its id (0.4 us) and made a
    `torch.cuda.Stream` only when it changes (``torch.cuda.current_stream`` costs 4-8 us)."""

    def __init__(self, device_index: int):
        self._device = device_index
        self._id, self._stream = None, None

    def __call__(self) -> torch.cuda.Stream:
        stream_id = torch._C._cuda_getCurrentStream(self._device)
        if stream_id != self._id:
            self._id, self._stream = stream_id, torch.cuda.current_stream(self._device)
        return self._stream


class FreshUpload:
    """Host int64 arrays as fresh int64 tensors on one CUDA device, copied without waiting
    for the stream from two pinned buffers written in turn: a buffer is written again once
    the copy out of it, two uploads before, has left it (its event), so the host waits only
    if it runs two uploads ahead of the GPU. A buffer grows to the next power of two an
    array needs.

    Parameters
    ----------
    device : torch.device or str, a CUDA device
    """

    def __init__(self, device):
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)  # not the current device at each call
        self._stream = CurrentStream(index)
        self._pinned = [torch.zeros(0, dtype=torch.int64)] * 2
        self._hosts = [pinned.numpy() for pinned in self._pinned]
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._recorded = [False, False]
        self._turn = 0

    def __call__(self, array) -> torch.Tensor:
        """``array`` (int64 [n], on the host) as a new tensor on the device (its copy queued
        on the device's current stream)."""
        n = len(array)
        out = torch.empty(n, dtype=torch.int64, device=self.device)
        if not n:
            return out
        turn = self._turn
        self._turn = 1 - turn
        if self._recorded[turn]:
            self._events[turn].synchronize()  # the copy out of this buffer has left it
        if n > len(self._hosts[turn]):
            self._pinned[turn] = torch.zeros(1 << (n - 1).bit_length(), dtype=torch.int64,
                                             pin_memory=True)
            self._hosts[turn] = self._pinned[turn].numpy()
        self._hosts[turn][:n] = array
        out.copy_(self._pinned[turn][:n], non_blocking=True)
        self._events[turn].record(self._stream())
        self._recorded[turn] = True
        return out
