"""DeFT inside transformers on a GPU: equality on a short run, then sample_tree's tokens/s and KV
bytes against transformers decoding the W samples as a batch (the prompt copied W times, SDPA).

    python3 scripts/transformers_gpu.py                 # Llama-3-8B shape, random fp16 weights
    python3 scripts/transformers_gpu.py --layers 8      # fewer layers (memory or time)
    python3 scripts/transformers_gpu.py --smoke         # a tiny model on the CPU (the script)

The model is a `LlamaForCausalLM` built from a Llama-3-8B-shaped `LlamaConfig` with random
weights (no download). Checks: (1) a short sampled tree (width 4, 8 tokens): every DeFT step's
logits against one SDPA forward of each branch (teacher-forced), and greedy branches against
transformers' greedy generate; (2) for each width: `sample_tree` (DeFT, the prompt prefilled
once) against `model.generate` over W copies of the prompt (SDPA, DynamicCache), the same
sampling settings, timed end to end and with the prefill subtracted (a 1-token run of each).
Writes ``$OUT/transformers_gpu.json`` (or ./transformers_gpu.json) and prints a table last.
Budget: about 4 minutes on an H200; widths that would start past ``--budget`` seconds are
skipped and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


DEVICE = "cuda"
SMOKE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
"""--smoke: a tiny model on the CPU (Triton interpreter), to check the script itself."""


def build_model(layers: int, dtype, smoke=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    config = LlamaConfig(
        **(SMOKE if smoke else shape), num_hidden_layers=layers, rope_theta=500000.0,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.02)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(before)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def hf_kv_bytes(result, width, tokens, model) -> int:
    """Bytes of the DynamicCache generate returned (analytic if it returned none)."""
    cache = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if layers:
        return sum(2 * l.keys.numel() * l.keys.element_size() for l in layers
                   if getattr(l, "keys", None) is not None)
    c = model.config
    return 2 * width * tokens * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2


def check_equality(model, results):
    """A short sampled tree against SDPA per branch, and greedy against generate."""
    from deft.integrations.transformers import sample_tree

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=g).to(DEVICE)
    out = sample_tree(model, ids, width=4, max_new_tokens=8, temperature=0.8, top_p=0.95,
                      seed=0, return_logits=True)
    worst = 0.0
    with torch.no_grad():
        for b, seq in enumerate(out.sequences):
            full = torch.cat([ids, torch.tensor([seq], device=DEVICE)], 1)
            ref = model(input_ids=full).logits[0, ids.shape[1] - 1: -1].float()
            ours = torch.stack([s[b] for s in out.step_logits]).float()
            worst = max(worst, float((ours - ref).abs().max() / ref.abs().max().clamp_min(1)))
    greedy = sample_tree(model, ids, width=2, max_new_tokens=8, temperature=0)
    reference = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=8, min_new_tokens=8)[0, ids.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(greedy.sequences[0], reference))
    results["equality"] = dict(
        max_rel_logit_diff=worst, tolerance=2e-2, logits_ok=worst <= 2e-2,
        greedy_tokens_equal=same, greedy_tokens=len(reference),
        finite=bool(all(torch.isfinite(s[b]).all() for s in out.step_logits for b in s)))
    print(f"equality: max |logit diff| / max |logit| = {worst:.2e} (fp16, tolerance 2e-2); "
          f"greedy tokens equal to generate: {same}/{len(reference)}", flush=True)


def time_deft(model, ids, width, new_tokens, sampling):
    from deft.integrations.transformers import TreeDecoder, sample_tree

    def run(n):
        dec = TreeDecoder(model, max_tokens=ids.shape[1] + width * n, max_queries=width)
        sync()
        start = time.perf_counter()
        out = sample_tree(model, ids, width=width, max_new_tokens=n, decoder=dec, **sampling)
        sync()
        return time.perf_counter() - start, out

    run(2)  # warm-up: Triton compiles, the tuned table loads
    t_one, _ = run(1)
    t_all, out = run(new_tokens)
    return dict(seconds=t_all, prefill_seconds=t_one,
                tokens_per_s=width * new_tokens / t_all,
                decode_tokens_per_s=width * (new_tokens - 1) / max(t_all - t_one, 1e-9),
                kv_bytes=out.kv_bytes, kv_bytes_allocated=out.decoder.cache.kv_bytes_allocated(),
                tokens=[len(s) for s in out.sequences])


def time_hf(model, ids, width, new_tokens, sampling):
    batch = ids.expand(width, -1).contiguous()
    mask = torch.ones_like(batch)
    options = dict(do_sample=sampling["temperature"] > 0, temperature=sampling["temperature"],
                   top_p=sampling["top_p"], top_k=0, attention_mask=mask,
                   return_dict_in_generate=True)

    def run(n):
        torch.manual_seed(sampling["seed"])
        sync()
        start = time.perf_counter()
        out = model.generate(batch, max_new_tokens=n, min_new_tokens=n, **options)
        sync()
        return time.perf_counter() - start, out

    run(2)
    t_one, _ = run(1)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_all, out = run(new_tokens)
    return dict(seconds=t_all, prefill_seconds=t_one,
                tokens_per_s=width * new_tokens / t_all,
                decode_tokens_per_s=width * (new_tokens - 1) / max(t_all - t_one, 1e-9),
                kv_bytes=hf_kv_bytes(out, width, ids.shape[1] + new_tokens - 1, model),
                peak_memory_bytes=torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=4000)
    parser.add_argument("--widths", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget", type=float, default=200.0,
                        help="seconds after which no further width starts")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model on the CPU under the Triton interpreter (checks the "
                        "script, measures nothing)")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE = "cpu"
        args.layers, args.prompt, args.widths, args.new_tokens = 2, 40, [3], 3
    elif not torch.cuda.is_available():
        sys.exit("transformers_gpu.py needs a GPU (or --smoke)")
    started = time.perf_counter()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import transformers
    import triton

    import deft.integrations.transformers  # noqa: F401  (registers "deft")

    dtype = torch.float32 if args.smoke else torch.float16
    model = build_model(args.layers, dtype, args.smoke)
    results = dict(
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--smoke)",
        transformers=transformers.__version__,
        triton=triton.__version__, torch=torch.__version__, layers=args.layers,
        model="tiny LlamaForCausalLM (--smoke), fp32" if args.smoke else
        "Llama-3-8B-shaped LlamaForCausalLM, random fp16 weights"
        + ("" if args.layers == 32 else f", {args.layers} of 32 layers"),
        prompt_tokens=args.prompt, new_tokens=args.new_tokens, runs=[], skipped=[])
    print(f"{results['model']}; transformers {transformers.__version__}, triton "
          f"{triton.__version__}; built in {time.perf_counter() - started:.1f} s", flush=True)
    check_equality(model, results)
    sampling = dict(temperature=0.8, top_p=0.95, seed=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=g).to(DEVICE)
    for width in args.widths:
        if time.perf_counter() - started > args.budget:
            results["skipped"].append(width)
            print(f"width {width}: skipped, past the {args.budget:.0f} s budget", flush=True)
            continue
        row = dict(width=width)
        row["deft"] = time_deft(model, ids, width, args.new_tokens, sampling)
        empty_cache()
        try:
            row["transformers_sdpa"] = time_hf(model, ids, width, args.new_tokens, sampling)
        except torch.OutOfMemoryError as error:
            row["transformers_sdpa"] = dict(error=f"out of memory: {str(error)[:200]}")
        empty_cache()
        results["runs"].append(row)
        print(f"width {width}: done at {time.perf_counter() - started:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - started
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transformers_gpu.json").write_text(json.dumps(results, indent=2))
    print_table(results)


def print_table(results):
    print(f"\nsample_tree, prompt {results['prompt_tokens']} tokens, {results['new_tokens']} new "
          f"tokens per sample, {results['model']}")
    head = (f"{'width':>5}  {'method':<18} {'tok/s':>8} {'decode tok/s':>12} {'seconds':>8} "
            f"{'KV GB':>7}")
    print(head)
    print("-" * len(head))
    for row in results["runs"]:
        for method in ("deft", "transformers_sdpa"):
            r = row[method]
            if "error" in r:
                print(f"{row['width']:>5}  {method:<18} {r['error'][:40]}")
                continue
            print(f"{row['width']:>5}  {method:<18} {r['tokens_per_s']:>8.1f} "
                  f"{r['decode_tokens_per_s']:>12.1f} {r['seconds']:>8.2f} "
                  f"{r['kv_bytes'] / 1e9:>7.3f}")
        d, h = row["deft"], row["transformers_sdpa"]
        if "error" not in h:
            print(f"{'':>5}  {'DeFT / transformers':<18} {d['tokens_per_s'] / h['tokens_per_s']:>7.2f}x "
                  f"{d['decode_tokens_per_s'] / h['decode_tokens_per_s']:>11.2f}x {'':>8} "
                  f"{d['kv_bytes'] / h['kv_bytes']:>7.3f}x")
    e = results["equality"]
    print(f"equality: max rel logit diff {e['max_rel_logit_diff']:.2e} "
          f"({'ok' if e['logits_ok'] else 'FAILED'}), greedy {e['greedy_tokens_equal']}/"
          f"{e['greedy_tokens']} tokens equal; skipped widths: {results['skipped'] or 'none'}; "
          f"{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
