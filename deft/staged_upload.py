"""A pinned host mirror of one int32 device tensor, uploaded to it span by span.

`deft.plan_buffers.PlanBuffers.fill` writes a plan into the mirror, then uploads the spans it
wrote with non-blocking copies. On an H200 host a copy costs about 7 us of host time whatever its
size up to 256 KiB, slicing the two tensors for it another 6, and recording a fresh event on
the current stream 13 (`scripts/fill_probe.py`), so that the copies, not the values, were most
of ``fill``: the spans' views are kept (bounds rounded out to `GRANULE` elements, so a decode
step's spans, which move by a few tokens, find the views of the last step's), and one event is
recorded again and again on the current stream, looked up by its id.
"""

from __future__ import annotations

import torch

GRANULE = 1024
"""Span bounds are rounded out to multiples of this many elements (4 KiB), so that spans that
move by a few elements share their views (the extra elements hold what the device holds)."""

MAX_VIEWS = 256
"""Span views kept (all dropped when full: a new plan size settles again in a step or two)."""


def rounded_span(lo: int, hi: int, n: int) -> tuple:
    """``[lo, hi)`` rounded out to multiples of `GRANULE`, within ``[0, n)``."""
    return lo - lo % GRANULE, min(-(-hi // GRANULE) * GRANULE, n)


class StagedUpload:
    """Pinned staging for ``data`` (an int32 tensor on a CUDA device).

    Parameters
    ----------
    data : int32 [n] on a CUDA device (contiguous)

    Attributes
    ----------
    host : numpy int32 [n]
        The mirror, written by the caller between `wait` and `upload`. Wherever it was
        uploaded, it holds what ``data`` holds; elsewhere the caller must not rely on it.
    """

    def __init__(self, data: torch.Tensor):
        self.data = data
        self._staging = torch.zeros(len(data), dtype=data.dtype, pin_memory=True)
        self.host = self._staging.numpy()
        self._views = {}
        self._event = torch.cuda.Event()
        self._recorded = False
        self._device = data.device.index
        self._stream_id, self._stream = None, None

    def wait(self) -> None:
        """Block until the last upload has left the mirror (then it may be written)."""
        if self._recorded:
            self._event.synchronize()

    def upload(self, spans) -> None:
        """Copy ``host[lo:hi]`` to ``data[lo:hi]`` for each ``(lo, hi)`` of ``spans``
        (non-blocking, on the current stream of ``data``'s device)."""
        if not spans:
            return
        for lo, hi in spans:
            lo, hi = rounded_span(lo, hi, len(self.host))
            views = self._views.get((lo, hi))
            if views is None:
                if len(self._views) >= MAX_VIEWS:
                    self._views.clear()
                views = self._views[(lo, hi)] = (self.data[lo:hi], self._staging[lo:hi])
            views[0].copy_(views[1], non_blocking=True)
        stream_id = torch._C._cuda_getCurrentStream(self._device)
        if stream_id != self._stream_id:
            self._stream_id, self._stream = stream_id, torch.cuda.current_stream(self._device)
        self._event.record(self._stream)
        self._recorded = True
