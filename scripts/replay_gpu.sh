#!/usr/bin/env bash
# Whole-run replays for the paper's Tables 3 and 4 (docs/reproduction.md) on one GPU.
#
#   OUT=/some/dir bash scripts/replay_gpu.sh          # from the repository root, GPU machine
#
# Eleven runs, every method (this project's six Triton strategies and SGLang's kernel when its
# wheel is in .peer-wheels/), 32 layers each with its own KV cache, fp16, CUDA-graph timing:
#   few-shot prompting: prompt 4000, width 20 / 30 / 50, 400 steps;
#   multi-step reasoning: the first complete tree of sorting128ToT and of docmergeToT, with the
#     recorded prompt and with the prompt padded to 4000;
#   speculative decoding: Medusa token trees of 32 / 64 / 128 / 256, record 0's 401 acceptance
#     lengths, prompt 4000.
# Sampling, to fit about 8 minutes of GPU time: each run replays STEPS steps evenly spaced over
# it (default 80; the reasoning runs have 2375 to 3708) and runs the Llama-3-8B-shaped decoder
# on E2E_STEPS of them (default 16); whole-run totals are extrapolated as mean x steps of the
# run (the JSON keeps the measured sums and every per-step time). STEPS=400 E2E_STEPS=400
# replays the few-shot and speculative runs whole (about 5x the time: more than one 10-minute
# call; run single `python3 -m cli replay` commands then).
#
# Writes $OUT/replay_<run>.json (format deft-replay/1), $OUT/tables.md (Tables 3 and 4 in
# Markdown, `python -m harness.replay`) and $OUT/replay.log.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output directory}"
STEPS=${STEPS:-80}
E2E_STEPS=${E2E_STEPS:-16}
mkdir -p "$OUT"

if compgen -G ".peer-wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peer-wheels/*.whl
    export PYTHONPATH=/tmp/peers
fi

results=()
replay() {  # NAME, then the run's options; a failing run is logged and the others go on
    local name=$1 start=$SECONDS status=ok
    shift
    python3 -m cli replay "$@" --max-steps "$STEPS" --e2e --e2e-steps "$E2E_STEPS" \
        --json "$OUT/replay_$name.json" 2>&1 | tee -a "$OUT/replay.log" || status=FAILED
    [ -f "$OUT/replay_$name.json" ] && results+=("$OUT/replay_$name.json")
    echo "== $name: $status, $((SECONDS - start)) s" | tee -a "$OUT/replay.log"
}

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; } | tee "$OUT/replay.log"
for width in 20 30 50; do
    replay "fewshot_b$width" --workload fewshot --width "$width" --prompt-tokens 4000 \
        --iterations 400
done
for file in sorting128ToT docmergeToT; do
    replay "reasoning_$file" --workload reasoning --path "$file"
    replay "reasoning_${file}_P4000" --workload reasoning --path "$file" --prompt-tokens 4000
done
for size in 32 64 128 256; do
    replay "speculative_t$size" --workload speculative --path "$size" --prompt-tokens 4000
done
python3 -m harness.replay "${results[@]}" | tee "$OUT/tables.md"
echo "== total: $SECONDS s" | tee -a "$OUT/replay.log"
