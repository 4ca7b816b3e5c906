#!/usr/bin/env bash
# Whole-run replays for the paper's Tables 3 and 4 (docs/reproduction.md) on one GPU: every
# step of every run, decode latency three ways (no planning, planning in line, planning
# overlapped), no sampling.
#
#   OUT=/some/dir bash scripts/replay_gpu.sh [RUN[:START:STOP] ...]   # repository root, GPU
#   OUT=/tmp/dry bash scripts/replay_gpu.sh --cpu [RUN ...]            # dry run, no GPU
#
# RUN is one of the eleven columns (default: all of them, in this order):
#   fewshot_b20 fewshot_b30 fewshot_b50            prompt 4000, 400 steps
#   reasoning_sorting reasoning_docmerge           sorting128ToT (3708 steps), docmergeToT
#   reasoning_keyword reasoning_set                (2375), keywordToT (564), set128ToT (363):
#                                                  the first complete tree, prompt padded to 4000
#   speculative_t32 speculative_t64 speculative_t128 speculative_t256
#                                                  Medusa token trees, record 0, 401 steps,
#                                                  prompt 4000
# :START:STOP replays only those steps (`--step-range`), so one run can be split across calls;
# `python3 -m harness.replay OUT/*.json` merges the ranges of a run into one full-run record,
# refusing gaps and overlaps.
#
# METHODS (default deft_flatten,deft_node_chunk,deft_node,sglang) are replayed, 32 layers each
# with its own KV cache, fp16, CUDA-graph timing; E2E_METHODS (default deft_flatten,sglang) also
# go through the Llama-3-8B-shaped decoder, three ways, beside the no-attention upper bound.
# SGLang's kernel comes from .peer-wheels/ when its wheel is there.
#
# Writes $OUT/replay_<RUN>[_<START>_<STOP>].json (format deft-replay/2), $OUT/replay.log (each
# run's seconds) and $OUT/tables.md (the tables of this call's results). Exits non-zero when a
# run failed, or when a method errored or missed the oracle check in one.
#
# --cpu: the same runs and options on the CPU with the PyTorch references (ref:deft_flatten,
# ref:radix), one layer, attention only, steps 0:2 of each run: checks the commands and the
# tables, times nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output directory}"
mkdir -p "$OUT"

cpu=0
if [ "${1:-}" = "--cpu" ]; then
    cpu=1
    shift
fi
runs=("$@")
if [ ${#runs[@]} -eq 0 ]; then
    runs=(fewshot_b20 fewshot_b30 fewshot_b50 reasoning_sorting reasoning_docmerge
          reasoning_keyword reasoning_set speculative_t32 speculative_t64 speculative_t128
          speculative_t256)
fi

run_options() {  # RUN -> the options of `python3 -m cli replay` that pick it
    case $1 in
        fewshot_b*) echo "--workload fewshot --width ${1#fewshot_b} --prompt-tokens 4000 --iterations 400" ;;
        reasoning_sorting) echo "--workload reasoning --path sorting128ToT --prompt-tokens 4000" ;;
        reasoning_docmerge) echo "--workload reasoning --path docmergeToT --prompt-tokens 4000" ;;
        reasoning_keyword) echo "--workload reasoning --path keywordToT --prompt-tokens 4000" ;;
        reasoning_set) echo "--workload reasoning --path set128ToT --prompt-tokens 4000" ;;
        speculative_t*) echo "--workload speculative --path ${1#speculative_t} --prompt-tokens 4000" ;;
        *) echo "unknown run $1" >&2; return 1 ;;
    esac
}

if [ $cpu = 1 ]; then
    export TRITON_INTERPRET=1
    measure=(--methods ref:deft_flatten,ref:radix --layers 1)
else
    if compgen -G ".peer-wheels/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peer-wheels/*.whl
        export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
    fi
    measure=(--methods "${METHODS:-deft_flatten,deft_node_chunk,deft_node,sglang}" --e2e
             --e2e-methods "${E2E_METHODS:-deft_flatten,sglang}")
fi

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true; } \
    | tee "$OUT/replay.log"
failed=0
results=()
for spec in "${runs[@]}"; do
    IFS=: read -r name start stop <<<"$spec"
    options=$(run_options "$name")
    range=()
    label=$name
    if [ -n "${start:-}" ]; then
        range=(--step-range "$start:$stop")
        label=${name}_${start}_${stop}
    elif [ $cpu = 1 ]; then
        range=(--step-range 0:2)
    fi
    json="$OUT/replay_$label.json"
    began=$SECONDS
    status=ok
    # shellcheck disable=SC2086
    python3 -m cli replay $options "${measure[@]}" "${range[@]}" --json "$json" 2>&1 \
        | tee -a "$OUT/replay.log" || status=FAILED
    if [ -f "$json" ]; then
        results+=("$json")
        python3 - "$json" <<'PY' || status="FAILED (a method errored or missed the oracle)"
import json, sys
result = json.load(open(sys.argv[1]))
tolerance = result["config"]["tolerance"]
bad = [f"{e['method']}: {e['status']} {e['reason'] or ''} rel_err {e['rel_err']}"
       for e in result["methods"]
       if e["status"] == "error" or (e["rel_err"] is not None and e["rel_err"] > tolerance)]
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
    else
        status=FAILED
    fi
    [ "$status" = ok ] || failed=1
    echo "== $label: $status, $((SECONDS - began)) s" | tee -a "$OUT/replay.log"
done
if [ ${#results[@]} -gt 0 ]; then
    python3 -m harness.replay "${results[@]}" | tee "$OUT/tables.md" || failed=1
fi
echo "== total: $SECONDS s" | tee -a "$OUT/replay.log"
exit $failed
