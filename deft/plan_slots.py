"""The cache slot of every flattened position of a tree, laid out a page at a time.

`deft.fast_plan.NodePlanner` puts a tree's nodes in preorder; the ``token_slot`` plan buffer
then lists the cache slot (page * page_size + offset) of every flattened position. A page
holds a run of consecutive slots for consecutive positions of its node, so the slots are laid
out page run by page run, from the first run that differs from the last plan's: a decode step
that grows the last nodes of the preorder lays out only their pages. The slots are written in
turns (`deft.turn_buffers`), so the prefix is mostly in place already.
"""

from __future__ import annotations

import numpy as np

from deft.turn_buffers import TurnBuffers


class SlotLayout:
    """The slots of one planner's plans, with what the last plan's page table fixed kept."""

    def __init__(self):
        self._last_runs = None  # (page size, the last plan's page runs and slots)
        self._slot_turns = TurnBuffers(np.int64)  # the slots, written in turns
        self._last_page_runs = None  # (page table, its page runs: `_page_runs`)
        self._last_page_layout = None  # (shape, page_ptr, what they fix: `_page_layout`)
        self._iota = np.arange(0)

    def lay_out(self, shape, ordered, total, page_ptr, pages, page_size):
        """(cache slot of every flattened position, int64 [tokens] read-only; the largest;
        ``{"token_slot": (the last plan's slots, n)}`` where their first n slots are these)

        ``shape`` is the tree's `deft.fast_plan` shape (its preorder), ``ordered`` (int64
        [nodes]) the tokens of each preorder node, ``total`` their sum, ``page_ptr`` (int64
        [nodes + 1]) and ``pages`` (int64 [pages]) the page table in node-index order.

        A page holds a run of consecutive slots for consecutive positions of its node: the
        pages are put in preorder and each page's run (``page_size`` slots, fewer for a node's
        last page, none past its tokens) is laid out with one repeat. The runs the last plan
        shared with this one, up to the first that differs, keep the last plan's slots (a step
        that grows the last nodes of the preorder lays out only their pages; the slots are
        written in turns, `deft.turn_buffers`, so the prefix is mostly in place already). The
        largest slot lies on the largest page where that page is used and held once.
        """
        counts, first_slot, run_page, run_base, top = self._page_runs(shape, page_ptr, pages,
                                                                      page_size)
        # a page's run: its node's tokens past the node's pages before it, at most page_size
        run = (ordered + first_slot).repeat(counts) - run_base
        np.minimum(np.maximum(run, 0, out=run), page_size, out=run)
        run_end = np.add.accumulate(run)
        if not len(run) or run_end[-1] < total:  # the runs hold fewer tokens than the nodes
            short = (counts * page_size < ordered).nonzero()[0]
            node = shape.order[short[0]]
            raise ValueError(f"node index {node} holds {ordered[short[0]]} tokens but "
                             f"the page table gives it {counts[short[0]]} pages of {page_size}")
        run_start = run_end - run  # the flattened position of each page's first slot
        same, first, last_slots = 0, 0, None  # runs shared with the last plan
        if self._last_runs is not None and self._last_runs[0] == page_size:
            last_page, last_run, last_slots = self._last_runs[1:]
            n = min(len(run), len(last_run))
            differ = run[:n] != last_run[:n]
            if run_page is not last_page:  # else the same pages as the last plan's
                differ |= run_page[:n] != last_page[:n]
            differ = differ.nonzero()[0]
            same = int(differ[0]) if len(differ) else n
        first = int(run_start[same]) if same < len(run) else total
        if same and same == len(run) and first == len(last_slots):  # the last plan's slots exactly
            slots = last_slots
        else:  # in turns: the step before the last left most of the prefix in place
            slots = self._slot_turns.begin(total, first)
            np.add((run_page[same:] - run_start[same:]).repeat(run[same:]),
                   self._positions(total)[first:], out=slots[first:])
            slots = self._slot_turns.finish(total, first)
        kept = {"token_slot": (last_slots, first)} if same else {}
        self._last_runs = (page_size, run_page, run, slots)
        if top >= 0 and run[top] > 0:  # the largest slot lies on the largest page
            return slots, int(run_page[top] + run[top]) - 1, kept
        return slots, int((run_page + run)[run > 0].max()) - 1, kept

    def _positions(self, total: int) -> np.ndarray:
        """0, 1, ..., total - 1 (int64, read-only), kept: numpy's arange of many elements costs
        several times a copy."""
        if len(self._iota) < total:
            self._iota = np.arange(max(total, 2 * len(self._iota)))
            self._iota.flags.writeable = False
        return self._iota[:total]

    def _page_runs(self, shape, page_ptr, pages, page_size) -> tuple:
        """(pages of each preorder node, int64 [nodes]; page_size times its first page's rank
        in preorder, int64 [nodes]; page * page_size of every page in preorder, int64 [pages];
        page_size times 0, 1, ..., pages - 1; the rank of the largest page where no other
        rank holds it, else -1), kept for a read-only page table passed again with the same
        shape (the tree cache's, at a decode step that took no new page). Where only its pages
        are new (a speculative step's renamed candidates, on as many pages as before), what
        the shape and the read-only ``page_ptr`` fix is kept (`_page_layout`)."""
        key, last = (shape, page_ptr, pages, page_size), self._last_page_runs
        if last is not None and shape is last[0][0] and page_ptr is last[0][1] \
                and pages is last[0][2] and page_size == last[0][3] \
                and not page_ptr.flags.writeable and not pages.flags.writeable:
            return last[1]
        counts, page_first, where, positions = self._page_layout(shape, page_ptr)
        run_page = pages[where] * page_size  # the pages in preorder
        run_page.flags.writeable = False
        top = int(run_page.argmax()) if len(run_page) else -1
        if top >= 0 and np.count_nonzero(run_page == run_page[top]) > 1:
            top = -1
        self._last_page_runs = (key, (counts, page_first * page_size, run_page,
                                      positions * page_size, top))
        return self._last_page_runs[1]

    def _page_layout(self, shape, page_ptr) -> tuple:
        """(pages of each preorder node; each one's first page's rank in preorder; where the
        pages in preorder are in the page table, a slice or int64 [pages]; 0, 1, ...,
        pages - 1), kept for a read-only ``page_ptr`` passed again with the same shape."""
        last = self._last_page_layout
        if last is not None and shape is last[0] and page_ptr is last[1] \
                and not page_ptr.flags.writeable:
            return last[2]
        counts = page_ptr[1:] - page_ptr[:-1]
        first_page, end_page = int(page_ptr[0]), int(page_ptr[-1])
        positions = self._positions(end_page - first_page)
        if shape.in_order:  # the nodes' pages one after the other already
            page_first, where = page_ptr[:-1] - first_page, slice(first_page, end_page)
        else:
            counts = counts[shape.order]
            page_first = counts.cumsum() - counts
            where = positions + (page_ptr[:-1][shape.order] - page_first).repeat(counts)
        self._last_page_layout = (shape, page_ptr, (counts, page_first, where, positions))
        return self._last_page_layout[2]
