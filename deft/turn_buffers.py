"""`TurnBuffers`: two growable host arrays that a planner's steps write in turns.

A decode step's large plan fields (the slot of every flattened position: 64k values on a
64k-token tree) mostly repeat the last step's: only a tail changes. Writing them into a fresh
array each step costs a copy of the unchanged prefix, and that memory is cold by then. Written
in turns, the array a step writes already holds the values of the step before the last, so only
what changed since then is copied; the last step's array stays intact meanwhile (its plan may
still be read).
"""

from __future__ import annotations

import numpy as np


class TurnBuffers:
    """Two growable arrays of one dtype, written in turns.

    Parameters
    ----------
    dtype : numpy dtype

    Attributes
    ----------
    latest : read-only array or None
        The values of the last finished step (a view of one of the two arrays, valid until the
        step after next starts).
    """

    def __init__(self, dtype):
        self._arrays = [np.empty(0, dtype), np.empty(0, dtype)]
        self._same = [0, 0]  # leading values of each array equal to `latest`'s
        self._turn = 0  # the array the next step writes
        self.latest = None

    def begin(self, n: int, prefix: int) -> np.ndarray:
        """The writable array [n] of a step whose first ``prefix`` values are ``latest``'s;
        they are already in it (copied where the array did not hold them yet)."""
        k = self._turn
        if len(self._arrays[k]) < n:
            self._arrays[k] = np.empty(max(n + n // 2, 2 * len(self._arrays[k])),
                                       dtype=self._arrays[k].dtype)
            self._same[k] = 0
        array = self._arrays[k]
        held = min(self._same[k], prefix)
        if held < prefix:
            array[held:prefix] = self.latest[held:prefix]
        self._same[k] = prefix  # whatever the step writes past it next
        return array[:n]

    def finish(self, n: int, prefix: int) -> np.ndarray:
        """End the step `begin` started (its ``n`` values written): they become ``latest``,
        returned read-only. ``prefix`` as given to `begin`."""
        k = self._turn
        view = self._arrays[k][:n]
        view.setflags(write=False)
        self._same[k], self._same[1 - k] = n, prefix
        self._turn = 1 - k
        self.latest = view
        return view
