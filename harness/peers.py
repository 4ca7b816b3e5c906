"""The one-shot peers of the bench: FlashInfer, SDPA, FlexAttention (SGLang: `harness.sglang`).

Each adapter calls the installed package (never a copy of its code) the way docs/benchmarks.md
describes, with everything a serving engine would do once per decode step — page tables,
masks, plans, the KV layout the peer takes — done in `prepare`, outside timing. The KV is the
bench's test layout; with page size 1 the test layout *is* a paged cache whose slot of a token
is its test-layout index, so the page-table peers read the bench's KV copies in place. These
peers do not step (`harness.methods.Method.steps`): the replay runs SGLang as its peer.

FlashInfer JIT-compiles its kernels with nvcc on first use (about 75 s for the decode,
prefill and cascade modules); the runner's first call, the correctness check, pays it, before
any timing.
"""

from __future__ import annotations

import numpy as np
import torch

from deft.plan import ranges
from harness.inputs import dense_mask, query_paths
from harness.methods import Method, Variant, need_cuda, need_module, time_plan
from harness.sglang import WHEELS_HINT, SGLangMethod

WORKSPACE_BYTES = 128 * 1024 * 1024
"""FlashInfer's float workspace (its documented recommendation), zeroed before first use."""

FLASHINFER_JIT = "FlashInfer JIT-compiles its kernels with nvcc on first use, about 75 s"

FLEX_BLOCK = 128
"""FlexAttention's block size; queries are padded to a multiple of it."""


# ---------------------------------------------------------------------------- FlashInfer
class FlashInferCascade(Method):
    name = "fi_cascade"
    description = ("FlashInfer MultiLevelCascadeAttentionWrapper, 2 levels (prefix, branches), "
                   "page size 1")
    first_call = FLASHINFER_JIT

    def unavailable(self, device, tree=None):
        return (need_cuda(device) or need_module("flashinfer", WHEELS_HINT)
                or (None if tree is None else two_level_reason(tree)))

    def prepare(self, inputs):
        import flashinfer

        tree = inputs.tree
        shape = tree.attention
        root = int(tree.roots[0])
        branches = np.flatnonzero(tree.queries > 0)  # every non-root node with a query
        device = inputs.device

        def int32(values):
            return torch.tensor(np.asarray(values), dtype=torch.int32, device=device)

        qo_indptr = [int32([0, tree.num_queries]), int32(_indptr(tree.queries[branches]))]
        kv_indptr = [int32([0, tree.tokens[root]]), int32(_indptr(tree.tokens[branches]))]
        kv_indices = [
            int32(ranges(tree.token_offset[[root]], tree.tokens[[root]])),
            int32(ranges(tree.token_offset[branches], tree.tokens[branches])),
        ]
        last_page_len = [int32([1]), int32(np.ones(len(branches)))]
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
        plan_us, _ = time_plan(lambda: wrapper.plan(
            qo_indptr, kv_indptr, kv_indices, last_page_len, shape.q_heads, shape.kv_heads,
            shape.head_dim, 1, causal=True, sm_scale=inputs.sm_scale, q_data_type=inputs.dtype,
            kv_data_type=inputs.dtype,
        ), device, repeats=3)
        caches = _pages_of_one(inputs)
        calls = [lambda cache=cache: wrapper.run(inputs.q, cache) for cache in caches]
        return [Variant(calls, plan_us=plan_us, params={"page_size": 1, "levels": 2})]


class FlashInferDecode(Method):
    name = "fi_decode"
    description = ("FlashInfer BatchDecodeWithPagedKVCacheWrapper (tensor cores), one request "
                   "per query, page size 1")
    first_call = FLASHINFER_JIT

    def unavailable(self, device, tree=None):
        return need_cuda(device) or need_module("flashinfer", WHEELS_HINT)

    def prepare(self, inputs):
        import flashinfer

        shape = inputs.tree.attention
        device = inputs.device
        indptr, indices = query_paths(inputs.tree)
        indptr = torch.tensor(indptr, dtype=torch.int32, device=device)
        indices = torch.tensor(indices, dtype=torch.int32, device=device)
        last_page_len = torch.ones(inputs.tree.num_queries, dtype=torch.int32, device=device)
        workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD",
                                                               use_tensor_cores=True)
        plan_us, _ = time_plan(lambda: wrapper.plan(
            indptr, indices, last_page_len, shape.q_heads, shape.kv_heads, shape.head_dim, 1,
            q_data_type=inputs.dtype, kv_data_type=inputs.dtype, sm_scale=inputs.sm_scale,
        ), device, repeats=3)
        outs = [torch.empty_like(inputs.q) for _ in range(inputs.copies)]
        calls = [
            lambda cache=cache, out=out: wrapper.run(inputs.q, cache, out=out)
            for cache, out in zip(_pages_of_one(inputs), outs)
        ]
        return [Variant(calls, plan_us=plan_us, poison=outs[:1], params={"page_size": 1})]


class FlashInferMask(Method):
    name = "fi_mask"
    description = "FlashInfer single_prefill_with_kv_cache, the tree as a custom mask (packed once)"
    first_call = FLASHINFER_JIT

    def unavailable(self, device, tree=None):
        return need_cuda(device) or need_module("flashinfer", WHEELS_HINT)

    def prepare(self, inputs):
        import flashinfer

        mask = torch.from_numpy(dense_mask(inputs.tree)).to(inputs.device)
        plan_us, packed = time_plan(
            lambda: flashinfer.packbits(mask.reshape(-1), bitorder="little"), inputs.device,
            repeats=3)
        calls = [
            lambda k=k, v=v: flashinfer.single_prefill_with_kv_cache(
                inputs.q, k, v, packed_custom_mask=packed, sm_scale=inputs.sm_scale)
            for k, v in zip(inputs.k, inputs.v)
        ]
        return [Variant(calls, plan_us=plan_us)]


def two_level_reason(tree) -> str | None:
    """Why `tree` is not a prefix with branches (what the 2-level cascade runs), or None."""
    if len(tree.roots) != 1:
        return f"needs a single tree (a prefix and its branches); this is a forest of {len(tree.roots)}"
    if tree.queries[tree.roots[0]]:
        return "needs a prefix without queries; this tree has queries on its root"
    if tree.depth.max() > 1:
        return (f"needs a two-level tree (a prefix and its branches); this tree is "
                f"{int(tree.depth.max()) + 1} levels deep")
    return None


def _indptr(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)])


def _pages_of_one(inputs) -> list[tuple]:
    """Each KV copy as a (k, v) paged cache of page size 1: [tokens, 1, kv_heads, head_dim] views."""
    return [(k.unsqueeze(1), v.unsqueeze(1)) for k, v in zip(inputs.k, inputs.v)]


# ---------------------------------------------------------------------------- PyTorch
class TorchSDPA(Method):
    name = "sdpa"
    description = ("torch scaled_dot_product_attention, dense boolean tree mask, enable_gqa "
                   "(KV as [1, heads, tokens, head_dim])")
    first_call = "no compilation"

    def unavailable(self, device, tree=None):
        return None

    def prepare(self, inputs):
        import torch.nn.functional as F

        mask = torch.from_numpy(dense_mask(inputs.tree)).to(inputs.device)[None, None]
        q = inputs.q.transpose(0, 1).unsqueeze(0).contiguous()
        kv = [(_heads_first(k), _heads_first(v)) for k, v in zip(inputs.k, inputs.v)]

        def call(k, v):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=inputs.sm_scale,
                                                 enable_gqa=True)
            return out[0].transpose(0, 1)

        return [Variant([lambda k=k, v=v: call(k, v) for k, v in kv])]


class FlexAttention(Method):
    name = "flex"
    description = ("torch.compile(flex_attention), block mask from the tree (Euler-tour "
                   f"mask_mod), queries padded to {FLEX_BLOCK}")
    first_call = "torch.compile builds the kernel (on CUDA)"

    def unavailable(self, device, tree=None):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as error:
            return f"torch {torch.__version__} has no FlexAttention ({error})"
        return None

    def prepare(self, inputs):
        from torch.nn.attention.flex_attention import create_block_mask

        tree = inputs.tree
        padded = -(-tree.num_queries // FLEX_BLOCK) * FLEX_BLOCK
        mask_mod = tree_mask_mod(tree, padded, inputs.device)
        plan_us, block_mask = time_plan(
            lambda: create_block_mask(mask_mod, None, None, padded, tree.num_tokens,
                                      device=inputs.device),
            inputs.device, repeats=3)
        shape = tree.attention
        q = torch.zeros((1, shape.q_heads, padded, shape.head_dim), dtype=inputs.dtype,
                        device=inputs.device)
        q[0, :, : tree.num_queries] = inputs.q.transpose(0, 1)
        kv = [(_heads_first(k), _heads_first(v)) for k, v in zip(inputs.k, inputs.v)]
        flex = _flex_function(inputs.device)

        def call(k, v):
            out = flex(q, k, v, block_mask=block_mask, scale=inputs.sm_scale, enable_gqa=True)
            return out[0, :, : tree.num_queries].transpose(0, 1)

        return [Variant([lambda k=k, v=v: call(k, v) for k, v in kv], plan_us=plan_us,
                        params={"padded_queries": padded,
                                "compiled": inputs.device.type == "cuda"})]


def tree_mask_mod(tree, padded_queries: int, device):
    """FlexAttention mask_mod of the tree, by Euler-tour intervals (`Tree.visible`).

    Padded query rows (index >= queries) see token 0 only, so no row is empty.
    """

    def tensor(values, pad=None):
        values = np.asarray(values, dtype=np.int64)
        if pad is not None:
            values = np.concatenate([values, np.full(padded_queries - len(values), pad)])
        return torch.tensor(values, dtype=torch.int32, device=device)

    token_node = tree.token_node
    token_tin = tensor(tree.tin[token_node])
    token_tout = tensor(tree.tout[token_node])
    token_node_t = tensor(token_node)
    token_position = tensor(tree.token_position)
    query_tin = tensor(tree.tin[tree.query_node], pad=-1)
    query_node = tensor(tree.query_node, pad=-1)
    query_position = tensor(tree.query_position, pad=0)

    def mask_mod(b, h, q_idx, kv_idx):
        at = query_tin[q_idx]
        inside = (token_tin[kv_idx] <= at) & (at <= token_tout[kv_idx])
        causal = (token_node_t[kv_idx] != query_node[q_idx]) | (
            token_position[kv_idx] <= query_position[q_idx])
        return (inside & causal) | ((at < 0) & (kv_idx == 0))

    return mask_mod


_COMPILED_FLEX = None


def _flex_function(device: torch.device):
    """torch.compile(flex_attention) on CUDA (compiled once per process); eager flex elsewhere."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        # Every workload is a new shape and a new mask_mod, so a recompile: past dynamo's
        # limit (8 by default) it would silently fall back to the unfused eager flex.
        import torch._dynamo

        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 256))
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, head_dim] -> contiguous [1, heads, tokens, head_dim]."""
    return x.transpose(0, 1).unsqueeze(0).contiguous()


PEERS = (FlashInferCascade, FlashInferDecode, FlashInferMask, SGLangMethod, TorchSDPA, FlexAttention)
"""Every peer adapter, in the table's order."""
