"""`TreeAttention.run`'s argument sets: checked once, then launched with little host time.

A decode step calls `run` once per layer with the same few tensors (the layer's caches, the
query and output buffers), so what `run` derives from its arguments (the checks, the tile
config, the persistent grid, the workspace) is kept per *argument set*: the key of every tensor
argument (address, shape, strides, dtype, device) and the scalars. Only the plan-dependent checks
(page size, largest slot, query count) run again on a later call.

On a GPU, an argument set that comes back (second call) is captured as a CUDA graph of the two
launches and replayed from then on: about 3 us of host time where the two Triton launches cost
40-80 us. An ``out`` (or lse) that `run` allocates is part of the key like any other tensor:
in a decode loop that drops each output before the next call, the allocator hands the same
address back and the graph serves it too. The graph stays right after a new `plan`:
the plan buffers are refilled in place at fixed addresses, both grids are sized by the
capacity and the rows of ``q`` alone, and the kernels read the plan's counts from device memory;
what else differs between plans (the merge kernel, a tuned tile config) is part of the key or
checked on every call. A graph holds no reference to the caller's tensors, only their
addresses: it is replayed only for tensors with the same address, shape, strides and dtype,
which then cover the same memory. At most `RunCache.size` argument sets are kept (least
recently used dropped first, with its graph).

Plain launches are used where capturing is impossible: on the CPU (the Triton interpreter),
inside someone else's stream capture, and when a capture fails. The custom op
``torch.ops.deft.tree_attention`` (what torch.compile calls) is this same path: it finds its
`TreeAttention` and runs the latest plan on `run`'s argument sets, so eager and compiled calls
with the same tensors share one set and one graph.

A call that hits its argument set costs: the key (four data pointers, shapes, strides and
dtypes), one tuple comparison with the key of the set hit last, else (a decode step's layers,
each on its own caches) one dict lookup and a stamp (`RunCache`), the plan-dependent checks
(`BoundRun.fits`: three integer comparisons), one capture-status query and the graph's replay
(torch's C++, which switches to the graph's device itself). The key is also the cheap check:
every part of it can change in place on the same tensor object (``set_``, ``resize_``,
``as_strided_``, ``transpose_``, assigning ``.data``), so the object's identity proves
nothing, and ``Tensor._version`` is no cheaper stand-in: assigning ``.data`` leaves it as it
is, and every write of the values bumps it (a decode loop writes ``q`` and the caches every
step).

The capture-status query (``torch._C._cuda_isCurrentStreamCapturing``, what
``torch.cuda.is_current_stream_capturing`` wraps in a Python frame) stays on every replay: it is
what keeps `run` safe inside someone else's capture, and a call inside a capture finds the same
argument set as the call just before the capture began, so no check made when the set was first
found can stand in for it.
"""

from __future__ import annotations

import gc
import itertools
import warnings

import torch


DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (16, 32, 64, 128, 256)
"""Head dims the kernels take (powers of two: tl.arange; at least 16: tl.dot)."""


def _fail(message):
    raise ValueError(f"TreeAttention.run: {message}")


def check_inputs(q, k_cache, v_cache, plan, out, device, max_queries, lse=None) -> None:
    """Raise ValueError, naming what is wrong, unless `run` can take these arguments:
    `check_tensors`, then `check_plan_fits`."""
    check_tensors(q, k_cache, v_cache, out, device, lse)
    check_plan_fits(q, k_cache, plan, max_queries)


def check_tensors(q, k_cache, v_cache, out, device, lse=None) -> None:
    """What `check_inputs` checks without the plan (raise ValueError naming the problem);
    ``lse`` where one is passed (the custom op's caller's, or the one `run` allocates)."""
    for name, x, dims in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            _fail(f"{name} must be a {dims}-D tensor, got "
                  f"{getattr(x, 'shape', type(x).__name__)}")
        if x.device != device:
            _fail(f"{name} is on {x.device}, this TreeAttention on {device}")
        if x.stride(-1) != 1:
            _fail(f"{name} must have a contiguous last (head_dim) dimension")
    if q.dtype not in DTYPES:
        _fail(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            _fail(f"{name} is {x.dtype} but q is {q.dtype}")
        if x.stride(0) != x.shape[1] * x.stride(1):
            _fail(f"{name} must hold each page's tokens contiguously "
                  "(stride(0) == page_size * stride(1))")
    if k_cache.shape != v_cache.shape:
        _fail(f"k_cache {list(k_cache.shape)} and v_cache {list(v_cache.shape)} differ")
    _, q_heads, head_dim = q.shape
    kv_heads, cache_dim = k_cache.shape[2:]
    if cache_dim != head_dim:
        _fail(f"q has head_dim {head_dim}, the caches {cache_dim}")
    if head_dim not in HEAD_DIMS:
        _fail(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if q_heads % kv_heads:
        _fail(f"q_heads ({q_heads}) must be a multiple of the caches' kv_heads ({kv_heads})")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            _fail(f"out must be {q.dtype} {list(q.shape)} on {q.device}, got {out.dtype} "
                  f"{list(out.shape)} on {out.device}")
        if out.stride(-1) != 1:
            _fail("out must have a contiguous last (head_dim) dimension")
    if lse is not None and (not isinstance(lse, torch.Tensor) or lse.shape != q.shape[:2]
                            or lse.dtype != torch.float32 or lse.device != q.device):
        _fail(f"lse must be float32 {list(q.shape[:2])} on {q.device}, got "
              f"{getattr(lse, 'dtype', type(lse).__name__)} {list(getattr(lse, 'shape', []))}")


def check_plan_fits(q, k_cache, plan, max_queries) -> None:
    """The plan-dependent part of `check_inputs` (tensors already checked): the caches' page
    size and slots, and q's rows between the plan's queries and ``max_queries``."""
    rows = q.shape[0]
    num_pages, page_size = k_cache.shape[:2]
    if page_size != plan.page_size:
        _fail(f"the caches have pages of {page_size} tokens, the plan {plan.page_size}")
    if num_pages * page_size <= plan.max_slot:
        _fail(f"the plan reads slot {plan.max_slot} but the caches hold "
              f"{num_pages * page_size} slots")
    if not plan.num_queries <= rows <= max_queries:
        _fail(f"q has {rows} rows; it needs between the plan's {plan.num_queries} queries "
              f"and max_queries={max_queries}")


def argument_key(q, k_cache, v_cache, out, lse, sm_scale, per_query_merge, small_grid=False,
                 merge_block=16):
    """The key of one `run` call's arguments, or None when one of them is not a tensor.

    Every tensor's address, shape, strides and dtype (``lse`` may be None), and q's device
    (the others must be on it, checked when the set is bound; with unified addressing no two
    devices share an address), then the plan's launch choices.
    """
    try:
        return (q.data_ptr(), q.shape, q.stride(), q.dtype, q.get_device(),
                k_cache.data_ptr(), k_cache.shape, k_cache.stride(), k_cache.dtype,
                v_cache.data_ptr(), v_cache.shape, v_cache.stride(), v_cache.dtype,
                out.data_ptr(), out.shape, out.stride(), out.dtype,
                None if lse is None else (lse.data_ptr(), lse.shape, lse.stride(), lse.dtype),
                sm_scale, per_query_merge, small_grid, merge_block)
    except (AttributeError, TypeError):
        return None


class BoundRun:
    """One checked argument set of `TreeAttention.run`.

    Attributes
    ----------
    page_size, cache_slots, rows : int
        The caches' page size and slots, ``q``'s rows (the plan-dependent checks).
    config_source : tuple
        The TreeAttention's (config, tuned config) when bound: a plan that tunes another
        config rebinds.
    config, num_programs, sm_scale, o_part, lse_part :
        What the launches take.
    calls : int
        Calls so far (a graph is captured on the second).
    graph : torch.cuda.CUDAGraph or None
    replay : callable or None
        The graph's replay (`replay_of`), None without a graph.
    used : int
        When it was last found (`RunCache`'s stamp).
    """

    __slots__ = ("page_size", "cache_slots", "rows", "config_source", "config", "num_programs",
                 "sm_scale", "o_part", "lse_part", "calls", "graph", "replay", "used")

    def __init__(self, q, k_cache, config_source, config, num_programs, sm_scale, workspace):
        num_pages, self.page_size = k_cache.shape[:2]
        self.cache_slots = num_pages * self.page_size
        self.rows = q.shape[0]
        self.config_source, self.config, self.num_programs = config_source, config, num_programs
        self.sm_scale = sm_scale
        self.o_part, self.lse_part = workspace
        self.calls, self.graph, self.replay = 0, None, None

    def fits(self, plan, config_source) -> bool:
        """Whether the checks and the launch settings made at binding hold for `plan`."""
        if not (plan.page_size == self.page_size and plan.max_slot < self.cache_slots
                and plan.num_queries <= self.rows):
            return False
        if config_source == self.config_source:  # the same objects, or equal ones
            self.config_source = config_source
            return True
        return False


class RunCache:
    """Argument sets (`BoundRun`), the least recently used dropped first, and their graph pool.

    A hit costs one dict lookup (one hash and one comparison of the key) and a stamp of the
    entry's ``used`` from a counter: `put`, rare, finds the least recently used entry by the
    stamps, so no hit reorders anything (``OrderedDict.move_to_end`` would hash and compare the
    key a second time). The set hit last is also held with its key: a call with the same key
    (the same tensors again) finds it by one tuple comparison, without hashing. It always
    holds the newest stamp (`put` forgets it), so skipping the stamp keeps the order.

    Parameters
    ----------
    size : int
        Most argument sets kept (each with at most one graph); 0 keeps none.
    """

    def __init__(self, size: int):
        self.size = size
        self._bound = {}
        self._clock = itertools.count()
        self._pool = None
        self._last_key, self._last = None, None

    def get(self, key):
        """The argument set kept under `key` (None: none, or `key` is None)."""
        if key == self._last_key:
            return self._last
        bound = self._bound.get(key)
        if bound is not None:
            bound.used = next(self._clock)
            self._last_key, self._last = key, bound
        return bound

    def put(self, key, bound) -> None:
        """Keep `bound` under `key` (not when `key` is None or `size` is 0)."""
        if key is None or not self.size:
            return
        self._last_key, self._last = None, None
        bound.used = next(self._clock)
        self._bound[key] = bound
        while len(self._bound) > self.size:
            del self._bound[min(self._bound, key=lambda k: self._bound[k].used)]

    def clear(self) -> None:
        """Drop every argument set and graph (the workspace they launch on was replaced)."""
        self._last_key, self._last = None, None
        self._bound.clear()

    def __len__(self) -> int:
        return len(self._bound)

    def graphs(self) -> int:
        """Argument sets holding a captured graph."""
        return sum(b.graph is not None for b in self._bound.values())

    def launch(self, bound, launch, device: torch.device) -> None:
        """One call of a cached argument set that did not replay: on its second call on a GPU,
        outside anyone's capture, capture ``launch`` as its graph and replay it; else
        ``launch()``.

        An argument set not kept in the cache (no key, or ``size`` 0) is new on every call
        (``bound.calls`` stays 1), so it never captures.
        """
        bound.calls += 1
        if (bound.calls == 2 and device.type == "cuda"
                and not torch._C._cuda_isCurrentStreamCapturing()):
            with torch.cuda.device(device):
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                bound.graph = capture(launch, device, self._pool)
            if bound.graph is not None:
                bound.replay = replay_of(bound.graph)
                bound.replay()
                return
        launch()


def replay_of(graph: torch.cuda.CUDAGraph):
    """``graph.replay`` without torch's Python wrapper around it, bound once.

    The wrapper (``torch.cuda.CUDAGraph.replay``) adds only the input-liveness check of a graph
    captured with ``check_input_liveness=True``, which `capture` never asks for; the replay
    itself (device switch, cudaGraphLaunch) is torch's C++ either way.
    """
    return super(torch.cuda.CUDAGraph, graph).replay


def capture(launch, device: torch.device, pool) -> "torch.cuda.CUDAGraph | None":
    """A CUDA graph of ``launch()`` captured on a side stream, or None (with a warning) if
    capturing fails.

    The capture only records: nothing runs until the graph is replayed. Errors are confined to
    this thread's capture (``thread_local``), so other threads' CUDA work is not disturbed.
    Python's cyclic garbage collector is held off meanwhile: a collection inside the capture
    may free unreachable CUDA graphs of other objects (a dropped `TreeAttention` and its plan
    form a cycle), and releasing their memory is not allowed while a stream captures; the
    capture then fails, and torch leaves its default CUDA generator marked as capturing, so a
    later ``torch.randn`` on that device raises.
    """
    current = torch.cuda.current_stream(device)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                launch()
            finally:
                graph.capture_end()
    except RuntimeError as error:
        warnings.warn(f"deft: a CUDA graph of TreeAttention.run could not be captured "
                      f"({error}); this argument set launches its kernels without one",
                      RuntimeWarning, stacklevel=2)
        return None
    finally:
        if collecting:
            gc.enable()
    current.wait_stream(stream)
    return graph
