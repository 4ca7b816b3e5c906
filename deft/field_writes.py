"""A plan's changed fields written into the plan buffers' host array in one compiled call.

`deft.plan_buffers.PlanBuffers.fill` decides, field by field, from where a field's values are
to be written (its kept prefix skipped; a field the buffers already hold not at all), then
`write_fields` checks every field against its capacity, writes them all into the host array
(the pinned staging mirror of `deft.staged_upload` on a CUDA device, the buffers themselves on
the CPU) and returns the copies that upload what it wrote (`upload_copies`). numpy took a
slice assignment (0.4-1 us) per field and Python the spans' bookkeeping. `most_rows` reads
one field of a plan's arrays for `deft.TreeAttention.plan` (its merge's row block), where
numpy took three calls.
"""

from __future__ import annotations

import numpy as np

from deft.compiled_plan import compiled


@compiled
def write_fields(host, offsets, capacity, starts, coalesce, f0, f1, f2, f3, f4, f5, f6, f7,
                 f8, f9):
    """Write ``field[start:]`` at ``offset + start`` for every field whose start is >= 0.

    Parameters
    ----------
    host : int32 [n]
        The buffers' host array; field i lives at ``host[offsets[i]:offsets[i] +
        capacity[i]]``.
    offsets, capacity : int64 [10]
        Each field's offset and capacity.
    starts : tuple of 10 ints
        The first of each field's values to write (-1: none; the values before it are in
        ``host`` already).
    coalesce : int
        Unused elements between two written parts that a span takes along rather than end.
    f0, ..., f9 : int [values]
        The fields' values, in `deft.plan_buffers.FIELDS` order (cast to int32).

    Returns
    -------
    copies : int64 [copies, 4]
        What was written, as `upload_copies` gives it (none where nothing was).
    too_long : int
        The first field holding more values than its capacity, else -1; then nothing is
        written.
    """
    sizes = (len(f0), len(f1), len(f2), len(f3), len(f4), len(f5), len(f6), len(f7), len(f8),
             len(f9))
    for i in range(10):
        if sizes[i] > capacity[i]:
            return np.empty((0, 4), np.int64), i
    _write(host, offsets[0], starts[0], f0)
    _write(host, offsets[1], starts[1], f1)
    _write(host, offsets[2], starts[2], f2)
    _write(host, offsets[3], starts[3], f3)
    _write(host, offsets[4], starts[4], f4)
    _write(host, offsets[5], starts[5], f5)
    _write(host, offsets[6], starts[6], f6)
    _write(host, offsets[7], starts[7], f7)
    _write(host, offsets[8], starts[8], f8)
    _write(host, offsets[9], starts[9], f9)
    return upload_copies(offsets, starts, sizes, coalesce, len(host)), -1


@compiled
def upload_copies(offsets, starts, sizes, coalesce, n):
    """The copies that upload fields' written parts ``[offsets[i] + starts[i], offsets[i] +
    sizes[i])`` (none where ``starts[i] < 0`` or the part is empty), in field order, inside
    an array of ``n`` elements.

    A copy is a rectangle ``(lo, width, height, pitch)``: elements ``lo + r * pitch + j`` for
    ``r < height``, ``j < width``; a span where the height is 1 (then pitch = width). A written
    part joins the last copy where that takes along at most ``coalesce`` elements not written:
    a span across the gap before it, else, where the fields from the last copy's first to
    this one lie one pitch apart, a rectangle with a row per field and the columns of all
    their parts (no wider than the pitch).

    Returns
    -------
    int64 [copies, 4]
    """
    copies = np.empty((10, 4), np.int64)
    k = 0
    first, last, col_lo, col_hi, cells = -1, -1, 0, 0, 0  # the last copy as rows of fields
    span_lo, span_hi = 0, 0  # (with its written cells), or as a span where first < 0
    for i in range(10):
        lo, hi = starts[i], sizes[i]
        if lo < 0 or hi <= lo:
            continue
        a, b = offsets[i] + lo, offsets[i] + hi
        if k and (first < 0 or first == last) and a - span_hi <= coalesce:  # the gap along
            span_hi, first, cells = b, -1, 0
            copies[k - 1, 1] = copies[k - 1, 3] = span_hi - span_lo
            continue
        if k and first >= 0 and _one_pitch(offsets, first, i):
            new_lo, new_hi = min(col_lo, lo), max(col_hi, hi)
            pitch = offsets[first + 1] - offsets[first]
            if (i - first + 1) * (new_hi - new_lo) - (cells + hi - lo) <= coalesce \
                    and new_hi - new_lo <= pitch and offsets[i] + new_hi <= n:
                last, col_lo, col_hi, cells = i, new_lo, new_hi, cells + hi - lo
                copies[k - 1, 0] = offsets[first] + col_lo
                copies[k - 1, 1], copies[k - 1, 2] = col_hi - col_lo, i - first + 1
                copies[k - 1, 3] = pitch
                continue
        copies[k, 0], copies[k, 1], copies[k, 2], copies[k, 3] = a, b - a, 1, b - a
        k += 1
        first, last, col_lo, col_hi, cells = i, i, lo, hi, hi - lo
        span_lo, span_hi = a, b
    return copies[:k]


@compiled
def _one_pitch(offsets, first, i):
    """Whether fields ``first`` to ``i`` (> first) start one pitch apart."""
    pitch = offsets[first + 1] - offsets[first]
    for j in range(first + 1, i + 1):
        if offsets[j] - offsets[j - 1] != pitch:
            return False
    return True


@compiled
def _write(host, offset, start, values):
    """``host[offset + start + j] = values[start + j]`` for every value past ``start`` (none
    where ``start`` < 0); a loop over views from 0, which numba vectorises."""
    if start < 0:
        return
    into, source = host[offset + start:offset + len(values)], values[start:]
    for j in range(len(source)):
        into[j] = source[j]


@compiled
def most_rows(query_rows, queries):
    """The most partial-result rows of one query: ``max(query_rows[2n + 1] - query_rows[2n])``
    over the first ``queries`` (0 for none)."""
    most = 0
    for n in range(queries):
        most = max(most, query_rows[2 * n + 1] - query_rows[2 * n])
    return most
