"""PlanBuffers.fill's bookkeeping and the span rounding of its uploads (CPU)."""

import numpy as np
import pytest

from deft import workloads as wl
from deft.fast_plan import NodePlanner
from deft.plan_buffers import FIELDS, PageTable, PlanBuffers
from deft.staged_upload import GRANULE, rounded_span


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
