"""PlanBuffers.fill's bookkeeping, the copies of its uploads, and the planner's arrays written
in turns (CPU)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deft import workloads as wl
from deft.cache import PagedKVCache, TreeCache
from deft.fast_plan import FAST_STRATEGIES, NodePlanner
from deft.field_writes import most_rows, upload_copies, write_fields
from deft.plan import build_plan
from deft.plan_buffers import FIELDS, PageTable, PlanBuffers, plan_arrays
from deft.tree_attention import TreeAttention
from deft.turn_buffers import TurnBuffers
from tests.buffer_checks import MirrorUpload, assert_buffers_hold
from tests.test_compiled_plan import decode_runs, shuffled_table


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
    assert_buffers_hold(buffers, arrays)


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


FIELD_TYPES = {"int64 everywhere": [np.int64] * len(FIELDS),  # plan_arrays' fields
               "the node planner's": [np.int32 if name in ("entry_query", "entry_row",
                                                           "subtree_end") else np.int64
                                      for name in FIELDS]}


def written_cells(offsets, sizes, starts) -> set:
    """The elements each field's written part ``[offset + start, offset + size)`` covers."""
    return {j for offset, size, start in zip(offsets, sizes, starts) if start >= 0
            for j in range(offset + start, offset + size)}


def assert_copies_upload(copies, offsets, sizes, starts, coalesce, n):
    """The copies cover every written element, lie inside the array, and take along at most
    ``coalesce`` elements not written: a span in each gap between written parts, a rectangle
    in all."""
    written, copied = written_cells(offsets, sizes, starts), set()
    for lo, width, height, pitch in copies:
        assert width > 0 and height > 0 and (height == 1 or pitch >= width)
        cells = [row + j for row in range(lo, lo + height * pitch, pitch) for j in range(width)]
        assert 0 <= min(cells) and max(cells) < n
        unwritten = sorted(set(cells) - written)
        if height == 1:
            gaps = np.split(unwritten, np.flatnonzero(np.diff(unwritten) != 1) + 1)
            assert all(len(gap) <= coalesce for gap in gaps)
        else:
            assert len(unwritten) <= coalesce
        copied.update(cells)
    assert written <= copied


@settings(max_examples=200, deadline=None)
@given(data=st.data(), types=st.sampled_from(sorted(FIELD_TYPES)),
       coalesce=st.sampled_from([0, 3, 40, 10**6]))
def test_write_fields_writes_each_field_past_its_start_and_returns_its_copies(
        data, types, coalesce):
    """Every field with a start >= 0 lands at its offset from its start on (int32, whatever
    its type), nothing else of the host array changes, and the copies upload what was
    written (fields of one capacity side by side, as the plan buffers lay out theirs, so
    that rectangles are tried)."""
    capacity = data.draw(st.lists(st.sampled_from([1, 4, 9, 30]), min_size=len(FIELDS),
                                  max_size=len(FIELDS)))
    offsets = np.concatenate([[0], np.cumsum(capacity)[:-1]]).astype(np.int64)
    fields, starts = [], []
    for cap, dtype in zip(capacity, FIELD_TYPES[types]):
        size = data.draw(st.integers(0, cap))
        fields.append(np.array(data.draw(st.lists(st.integers(-2**31, 2**31 - 1),
                                                  min_size=size, max_size=size)), dtype=dtype))
        starts.append(data.draw(st.integers(-1, size)))
    host = np.random.default_rng(len(fields[0])).integers(-99, 99, sum(capacity)).astype(np.int32)
    expected = host.copy()
    for values, offset, start in zip(fields, offsets, starts):
        if start >= 0:
            expected[offset + start:offset + len(values)] = values[start:]
    copies, too_long = write_fields(host, offsets, np.array(capacity, dtype=np.int64),
                                    tuple(starts), coalesce, *fields)
    assert too_long == -1
    np.testing.assert_array_equal(host, expected)
    assert_copies_upload(copies.tolist(), offsets, [len(f) for f in fields], starts, coalesce,
                         len(host))


def test_the_entry_fields_changes_leave_as_one_strided_copy():
    """Five fields one pitch apart, each written past a kept prefix far from the next's
    start, make one rectangle where its unwritten cells are few enough (else one for the
    three partition fields and one for the two entry fields); a field of another pitch after
    them (not one pitch on) a copy of its own."""
    offsets = np.array([0, 4, 8] + [3012 + 3000 * r for r in range(5)] + [18512, 21512])
    starts = (0, 0, 0, 10, 10, 12, 300, 305, 50, -1)
    sizes = (2, 3, 2, 20, 20, 21, 320, 320, 60, 0)
    for coalesce, expected in [(2000, [[0, 10, 1, 10], [3022, 310, 5, 3000], [18562, 10, 1, 10]]),
                               (600, [[0, 10, 1, 10], [3022, 11, 3, 3000], [12312, 20, 2, 3000],
                                      [18562, 10, 1, 10]])]:
        copies = upload_copies(offsets, starts, sizes, coalesce, 22000).tolist()
        assert copies == expected
        assert_copies_upload(copies, offsets, sizes, starts, coalesce, 22000)


def test_write_fields_refuses_a_field_past_its_capacity_before_writing_any():
    capacity = np.full(len(FIELDS), 4, dtype=np.int64)
    offsets = np.arange(len(FIELDS), dtype=np.int64) * 4
    fields = [np.arange(4, dtype=np.int64) for _ in FIELDS]
    fields[6] = np.arange(5, dtype=np.int64)
    host = np.full(4 * len(FIELDS), -7, dtype=np.int32)
    copies, too_long = write_fields(host, offsets, capacity, (0,) * len(FIELDS), 0, *fields)
    assert too_long == 6 and len(copies) == 0
    assert (host == -7).all()


def test_fill_names_a_field_longer_than_its_buffer_and_writes_it_whole_next_time():
    tree = wl.star(3, 100, 5)
    page_ptr = np.arange(tree.num_nodes + 1) * 128
    page_ptr, pages = PageTable(page_ptr, np.arange(page_ptr[-1]), 1).host_node_pages(tree)
    arrays = NodePlanner("deft_flatten").arrays(tree, page_ptr, pages, 1, 64, None)
    buffers = PlanBuffers(8, 64, 512, True, "cpu")
    buffers.fill(arrays)
    broken = dict(arrays, counts=np.arange(3))
    with pytest.raises(ValueError, match="counts holds 3 values, more than its buffer's 2"):
        buffers.fill(broken)
    buffers.data.zero_()  # whatever the buffers held, the next fill writes every field
    buffers.fill(arrays)
    assert_buffers_hold(buffers, arrays)


@given(rows=st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), min_size=1,
                    max_size=20), spare=st.integers(0, 3))
def test_most_rows_is_the_largest_run_of_one_query(rows, spare):
    first, count = (np.array(x, dtype=np.int64) for x in zip(*rows))
    query_rows = np.stack([first, first + count], axis=1).ravel()
    queries = max(len(rows) - spare, 0)
    assert most_rows(query_rows, queries) == count[:queries].max(initial=0)


@settings(max_examples=60, deadline=None)
@given(run=decode_runs(), strategy=st.sampled_from(FAST_STRATEGIES),
       page_size=st.sampled_from([1, 3, 16]), chunk=st.sampled_from([1, 5, 32]),
       group=st.sampled_from([None, 2]), followed=st.booleans(),
       given_reference=st.lists(st.booleans(), min_size=8, max_size=8), seed=st.integers(0, 5))
def test_the_staged_path_uploads_every_change_of_every_step(run, strategy, page_size, chunk,
                                                            group, followed, given_reference,
                                                            seed):
    """`TreeAttention.plan` filling through a host mirror whose copies alone reach the
    buffers (poisoned beforehand): after every step of a random decode run the buffers hold
    the step's from-scratch encoding, so the copies a fill returns cover every value it wrote
    (kept prefixes skipped, the node planner's arrays and a reference plan's in turn)."""
    chunk = None if strategy == "deft_node" else chunk
    attn = TreeAttention.for_trees(strategy, run, chunk, group, device="cpu")
    attn.buffers.data.fill_(-77)
    mirror = MirrorUpload(attn.buffers.data)
    attn.buffers.stage_through(mirror)
    cache = TreeCache(PagedKVCache(8192, page_size, 1, 4))
    for step, tree in enumerate(run):
        if followed:
            cache.apply(tree)
            table = cache
        else:
            table = PageTable(*shuffled_table(tree, page_size, seed + step), page_size)
        page_ptr, pages = table.host_node_pages(tree)
        reference = build_plan(strategy, tree, chunk, group, page_size)
        expected = plan_arrays(reference, page_ptr, pages, True, attn.rows_per_query)
        attn.plan(tree, table, reference if given_reference[step % 8] else None)
        assert_buffers_hold(attn.buffers, expected, f"step {step}: ")
    assert mirror.uploads >= 1
