"""PlanBuffers.fill's bookkeeping, the span rounding of its uploads, and the planner's arrays
written in turns (CPU)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deft import workloads as wl
from deft.fast_plan import NodePlanner
from deft.plan_buffers import FIELDS, PageTable, PlanBuffers
from deft.staged_upload import GRANULE, rounded_span
from deft.turn_buffers import TurnBuffers


@pytest.mark.parametrize("lo,hi,n", [(0, 1, 10**6), (5, 5000, 10**6), (GRANULE, 2 * GRANULE, 10**6),
                                     (3000, 10**6 - 7, 10**6), (999_999, 10**6, 10**6)])
def test_a_rounded_span_covers_the_span_inside_the_allocation(lo, hi, n):
    a, b = rounded_span(lo, hi, n)
    assert 0 <= a <= lo < hi <= b <= n
    assert a % GRANULE == 0 and (b % GRANULE == 0 or b == n)
    assert b - a < hi - lo + 2 * GRANULE


def test_spans_that_move_by_a_few_elements_share_their_rounding():
    assert rounded_span(4100, 9000, 10**6) == rounded_span(4097, 9003, 10**6)


def test_a_fill_that_fails_half_way_leaves_no_field_taken_for_written():
    """A fill that raises after writing some fields must not let the next fill skip a field
    as already held (the planner's read-only arrays are skipped when the buffers hold them)."""
    tree = wl.star(3, 100, 5)
    page_ptr = np.arange(tree.num_nodes + 1) * 128  # a node per 128 one-token pages
    page_ptr, pages = PageTable(page_ptr, np.arange(page_ptr[-1]), 1).host_node_pages(tree)
    arrays = NodePlanner("deft_flatten").arrays(tree, page_ptr, pages, 1, 64, None)
    buffers = PlanBuffers(8, 64, 512, True, "cpu")
    buffers.fill(arrays)
    broken = dict(arrays)
    broken["entry_row"] = [9] * len(arrays["entry_row"])  # written, then fails (no .flags)
    with pytest.raises(AttributeError):
        buffers.fill(broken)
    buffers.fill(arrays)
    for name in FIELDS:
        np.testing.assert_array_equal(buffers.read(name)[:len(arrays[name])], arrays[name],
                                      err_msg=name)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 40), st.floats(0, 1), st.integers(0, 10**6)),
                      min_size=1, max_size=12))
def test_turn_buffers_give_each_step_its_values_and_keep_the_last_one(steps):
    """A step of n values whose first `prefix` are the latest step's: `begin` hands out an
    array already holding them, and the finished array reads back the step's values while
    the next step is written (the one after replaces it)."""
    turns, latest = TurnBuffers(np.int64), np.zeros(0, dtype=np.int64)
    for n, share, seed in steps:
        prefix = int(share * min(n, len(latest)))
        values = np.random.default_rng(seed).integers(0, 99, n)
        values[:prefix] = latest[:prefix]
        array = turns.begin(n, prefix)
        np.testing.assert_array_equal(array[:prefix], latest[:prefix])
        array[prefix:] = values[prefix:]
        if len(latest):
            np.testing.assert_array_equal(turns.latest, latest)  # intact while written
        done = turns.finish(n, prefix)
        assert done is turns.latest and not done.flags.writeable
        np.testing.assert_array_equal(done, values)
        latest = values
