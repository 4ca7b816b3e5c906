"""DeFT inside Hugging Face transformers: every DeFT step against the same model decoding alone.

Tiny random Llama, Qwen2 and Mistral models (fp32, 2 layers, 4 query / 2 KV heads of 16; no
download). The reference is the model itself with eager attention and its default cache
(`DynamicCache`), decoding each branch alone; a token-tree verification is checked against one
eager forward with the equivalent 4-D tree mask. Without a GPU the kernels run under
TRITON_INTERPRET=1. The tensor-parallel test loads the model with transformers' own
``tp_plan="auto"`` on two gloo ranks (CPU) and checks both ranks against one process.
"""

import os
import socket

import torch


import pytest  # noqa: E402

transformers = pytest.importorskip("transformers")  # the test extra installs it (CI)

import deft  # noqa: E402
from deft.integrations.transformers import (  # noqa: E402
    TreeDecoder,
    UnsupportedModelError,
    check_model,
    generate,
    sample_tree,
    verify_token_tree,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 96
TOLERANCE = 1e-4  # max abs logit difference, relative to the largest logit


def tiny_model(kind="llama", seed=0, **overrides):
    """A 2-layer random model of a supported class, fp32, eager attention, in eval mode."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }[kind]
    options = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False)
    options.update(overrides)
    config = config_class(**options)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return model_class(config).to(DEVICE).eval()


def prompt(n=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (1, n), generator=g).to(DEVICE)


@torch.no_grad()
def eager_decode(model, ids, tokens=None, steps=None):
    """The model alone (eager, DynamicCache): feed ``tokens`` one by one (teacher forcing) or
    decode ``steps`` greedy tokens. Returns (tokens, logits before each token [n, vocab])."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keyword = check_model(model).cache_keyword  # "past_key_values" became "cache" in 5.2x
    out = model(input_ids=ids, use_cache=True, **{keyword: cache})
    logits, fed = [out.logits[0, -1]], []
    count = len(tokens) if tokens is not None else steps
    for i in range(count):
        token = tokens[i] if tokens is not None else int(logits[-1].argmax())
        fed.append(token)
        if i + 1 < count:
            out = model(input_ids=torch.tensor([[token]], device=ids.device), use_cache=True,
                        **{keyword: cache})
            logits.append(out.logits[0, -1])
    return fed, torch.stack(logits)


@torch.no_grad()
def eager_logits(model, sequence):
    """The model's logits after every token of one sequence, one eager forward. [n, vocab]"""
    return model(input_ids=torch.tensor([sequence], device=DEVICE)).logits[0]


def close(a, b):
    scale = b.abs().max().clamp_min(1.0)
    return float((a - b).abs().max() / scale) <= TOLERANCE


# ---------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_sample_tree_logits_match_each_branch_alone(kind):
    """Temperature/top-p sampling of 3 branches: every step's logits of every branch equal the
    model's decoding that branch alone; the run's tree holds the prompt once."""
    model = tiny_model(kind)
    ids = prompt()
    out = sample_tree(model, ids, width=3, max_new_tokens=5, temperature=0.9, top_p=0.9,
                      seed=3, return_logits=True, page_size=8)
    assert [len(s) for s in out.sequences] == [5, 5, 5]
    assert len(set(map(tuple, out.sequences))) > 1  # sampling, not three copies
    for b, sequence in enumerate(out.sequences):
        _, reference = eager_decode(model, ids, tokens=sequence)
        ours = torch.stack([step[b] for step in out.step_logits])
        assert close(ours, reference), (kind, b)
    tree = out.tree
    assert tree.num_nodes == 4 and tree.tokens.tolist() == [11, 5, 5, 5]
    assert tree.num_queries == 3 and tree.attention.kv_heads == 2
    if kind == "llama":
        again = sample_tree(model, ids, width=3, max_new_tokens=2, temperature=0.9, top_p=0.9,
                            seed=3, page_size=8)
        assert [s[:2] for s in out.sequences] == again.sequences  # seeded


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_greedy_branches_equal_eager_greedy(kind):
    """Three branches forced to different first tokens, then greedy: identical token ids to the
    model decoding each alone."""
    model = tiny_model(kind, seed=2)
    ids = prompt(9, seed=4)
    dec = TreeDecoder(model, max_tokens=64, max_queries=4, page_size=4)
    dec.prefill(ids)
    firsts = [3, 17, 40]
    children = dec.expand(0, [[t] for t in firsts])
    new = generate(dec, children, 4, temperature=0)
    for first, child in zip(firsts, children):
        tokens, _ = eager_decode(model, torch.cat([ids, torch.tensor([[first]], device=DEVICE)],
                                                  1), steps=4)
        assert new[child] == tokens, kind
        assert dec.sequence(child) == ids[0].tolist() + [first] + tokens
    if kind == "llama":  # and transformers' own greedy generate agrees
        greedy = sample_tree(model, ids, width=2, max_new_tokens=3, temperature=0)
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
        assert greedy.sequences == [reference[0, ids.shape[1]:].tolist()] * 2


# ---------------------------------------------------------------------------- token trees
def tree_mask_logits(model, ids, paths, tokens):
    """One eager forward over prompt + draft tokens with the 4-D tree mask and tree positions."""
    p = ids.shape[1]
    n = p + len(paths)
    visible = torch.zeros(n, n, dtype=torch.bool)
    visible[:p, :p] = torch.ones(p, p, dtype=torch.bool).tril()
    visible[p:, :p] = True
    index = {tuple(path): i for i, path in enumerate(paths)}
    for i, path in enumerate(paths):
        for depth in range(1, len(path) + 1):
            visible[p + i, p + index[tuple(path[:depth])]] = True
    mask = torch.zeros(1, 1, n, n).masked_fill(~visible, torch.finfo(torch.float32).min)
    positions = list(range(p)) + [p + len(path) - 1 for path in paths]
    with torch.no_grad():
        out = model(input_ids=torch.cat([ids, torch.tensor([tokens], device=DEVICE)], 1),
                    attention_mask=mask.to(DEVICE),
                    position_ids=torch.tensor([positions], device=DEVICE))
    return out.logits[0, p - 1], out.logits[0, p:]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_verify_token_tree_equals_tree_mask(kind):
    """A Medusa-style token tree: logits equal one eager forward with the 4-D tree mask, and
    the accepted path is the greedy one."""
    model = tiny_model(kind, seed=5)
    ids = prompt(10, seed=6)
    greedy, _ = eager_decode(model, ids, steps=3)
    other = [(t + 1) % VOCAB for t in greedy]
    paths = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]]
    # depth-1 candidates [greedy, other], depth 2 [other, greedy]: the accepted path is 0 -> 1
    candidates = [[greedy[0], other[0]], [other[1], greedy[1]], [greedy[2], other[2]]]
    tokens = [candidates[len(p) - 1][p[-1]] for p in paths]
    v = verify_token_tree(model, ids, paths, candidates, page_size=4)
    root, reference = tree_mask_logits(model, ids, paths, tokens)
    assert close(v.root_logits, root) and close(v.logits, reference), kind
    assert v.accepted_path == [0, 1] and v.accepted == [0, 3]
    assert v.tokens[:2] == greedy[:2]
    assert v.tokens[2] == int(reference[3].argmax())  # the bonus token after [0, 1]
    assert v.tree.num_nodes == 1 + len(paths) and v.tree.num_queries == len(paths)
    assert verify_token_tree(model, ids, paths, tokens).accepted == v.accepted  # flat drafts


def test_verification_loop_on_one_decoder():
    """Two verification rounds on one TreeDecoder: rejected drafts are pruned, the bonus token is
    fed, the second draft tree hangs under the accepted chain; logits equal eager."""
    model = tiny_model("llama", seed=10)
    ids = prompt(8, seed=11)
    dec = TreeDecoder(model, max_tokens=64, max_queries=8, page_size=4)
    dec.prefill(ids)
    greedy, _ = eager_decode(model, ids, steps=5)
    paths = [[0], [1], [0, 0]]
    first = verify_token_tree(model, None, paths, [greedy[0], (greedy[0] + 1) % VOCAB,
                                                   greedy[1]], decoder=dec)
    assert first.accepted == [0, 2] and first.tokens == greedy[:3]
    leaf, = dec.leaves()
    assert dec.sequence(leaf) == ids[0].tolist() + greedy[:2]
    dec.cache.tree_cache.check()
    dec.extend({leaf: [first.tokens[-1]]})  # the bonus token
    second = verify_token_tree(model, None, [[0], [0, 0]], [greedy[3], 1], decoder=dec)
    assert second.accepted == [0] and second.tokens[0] == greedy[3]
    sequence = ids[0].tolist() + greedy[:4]
    assert close(second.logits[0], eager_logits(model, sequence)[-1])
    assert dec.sequence(dec.leaves()[0]) == sequence


# ---------------------------------------------------------------------------- tree of thought
def test_expand_prune_frees_pages_and_keeps_logits():
    """Thoughts of several tokens in one step, a pruned thought's pages back in the pool, a new
    thought reusing them, logits right throughout."""
    model = tiny_model("llama", seed=7)
    ids = prompt(12, seed=8)
    dec = TreeDecoder(model, max_tokens=128, max_queries=16, page_size=4)
    dec.prefill(ids)
    free_after_prompt = dec.cache.allocator.num_free
    thoughts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    a, b, c = dec.expand(0, thoughts)
    for node, thought in zip((a, b, c), thoughts):
        reference = eager_logits(model, ids[0].tolist() + thought)
        assert close(dec.last_step_logits[node], reference[-len(thought):])
        assert close(dec.logits[node], reference[-1])
    deeper = dec.expand(a, [[20, 21], [22]])
    dec.prune(b)
    dec.prune(c)
    dec.cache.tree_cache.check()
    assert dec.cache.allocator.num_free == free_after_prompt - 1 - 2  # a, and a's two children
    d, = dec.expand(0, [[30, 31, 32]])
    assert dec.cache.allocator.num_free == free_after_prompt - 4
    dec.extend({deeper[0]: [23], d: [33, 34]})
    for node in (deeper[0], d):
        assert close(dec.logits[node], eager_logits(model, dec.sequence(node))[-1])
    dec.prune(a)  # a's subtree: both its children go with it
    assert sorted(dec.parent) == [0, d] and dec.leaves() == [d]
    dec.cache.tree_cache.check()
    assert dec.kv_bytes() == 2 * (3 + 2) * 4 * 2 * 2 * 16 * 4  # prompt 3 pages, d 2 pages


def test_tree_saves_for_deft_cli(tmp_path):
    out = sample_tree(tiny_model(), prompt(), width=2, max_new_tokens=2, seed=0)
    deft.save_tree(out.tree, tmp_path / "tree.json")
    loaded = deft.load_tree(tmp_path / "tree.json")
    assert loaded.tokens.tolist() == [11, 2, 2] and loaded.attention.dtype == "float32"
    assert out.kv_bytes == out.decoder.cache.pages_held * 2 * 2 * 16 * 16 * 2 * 4  # K+V, layers, page, head dim, kv heads, fp32


# ---------------------------------------------------------------------------- refusals
def test_refuses_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError) as error:
        sample_tree(gpt2, torch.tensor([[1, 2, 3]]), width=2, max_new_tokens=2)
    message = str(error.value)
    assert "GPT2LMHeadModel" in message and "'gpt2'" in message
    assert "rotary position embeddings" in message and "num_key_value_heads" in message
    assert "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM" in message


def test_refuses_paths_beyond_a_sliding_window():
    model = tiny_model("mistral", sliding_window=12)
    with pytest.raises(ValueError, match="sliding window of 12"):
        sample_tree(model, prompt(11), width=2, max_new_tokens=3)


def test_deft_attention_outside_a_driver():
    model = tiny_model()
    model.config._attn_implementation = "deft"
    with pytest.raises(RuntimeError, match="inside deft.integrations.transformers"):
        model(prompt())


# ---------------------------------------------------------------------------- tensor parallel
def _tp_worker(rank, world, port, path, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, distributed_config=DistributedConfig(tp_plan="auto"))
        out = sample_tree(model.eval(), prompt(), width=3, max_new_tokens=4, temperature=0.9,
                          seed=3, return_logits=True, page_size=8)
        keys, _ = out.decoder.cache.layer(0)
        assert out.decoder.tp_group is not None  # the ranks agree on the sampled tokens
        torch.save(dict(sequences=out.sequences, logits=out.step_logits, kv_bytes=out.kv_bytes,
                        kv_heads=keys.shape[2]), f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_two_gloo_ranks_equal_one_process(tmp_path):
    """transformers' tp_plan="auto" over 2 CPU ranks: each rank runs DeFT over its own KV head
    with the same plan; tokens and logits equal one process's, each rank holds half the KV."""
    pytest.importorskip("accelerate")  # transformers' tensor-parallel loading needs it
    import torch.multiprocessing as mp

    if DEVICE != "cpu":
        pytest.skip("the gloo test runs the CPU model")
    model = tiny_model("llama", seed=9)
    model.save_pretrained(tmp_path / "model")
    single = sample_tree(model, prompt(), width=3, max_new_tokens=4, temperature=0.9, seed=3,
                         return_logits=True, page_size=8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the ranks start with this process's imports (spawn would import them again)
    mp.start_processes(_tp_worker, nprocs=2, start_method="fork",
                       args=(2, port, str(tmp_path / "model"), str(tmp_path / "rank")))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank.{rank}")
        assert got["sequences"] == single.sequences
        assert got["kv_heads"] == 1 and got["kv_bytes"] * 2 == single.kv_bytes
        for step, reference in zip(got["logits"], single.step_logits):
            for b in reference:
                assert close(step[b], reference[b])
