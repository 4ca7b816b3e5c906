#!/usr/bin/env bash
# The GPU run of docs/autotune.md (issue #19), one call on a cold card, from the repository root:
#
#   OUT=/some/dir scripts/autotune_gpu.sh [--budget SECONDS] [--dry-run] [-- extra tune options]
#
# 1. tune: DeFT-Flatten's sizes (each group size at its wave chunk on the tree, what the
#    lookup runs; the kernel's tile: --no-tiles) on the six anchors and the off-anchor suite's
#    tunable part (`--workloads all,tunable`: serving forest, token tree, balanced tree, three
#    keywordToT steps, a 256-leaf star) at each head shape 32/8, 16/2, 8/1, 4/1, fp16 (one
#    kernel compilation per shape; bf16 would double it and does not fit the budget); then
#    the lookup check (seconds, no GPU): every chosen config, looked up with the new table for
#    the tree it was tuned on, must be the one measured (else the run exits 1);
# 2. held out: with that table, the tuned choice against a chunk x group sweep at its tile on
#    the held-out trees (autotune.heldout.HELD_OUT) at 32/8, 4/1, 16/2, 8/1 (in that order, so
#    a short budget keeps both ends), and the same sweep on three anchors as the refit's tuning
#    trees;
# 3. refit: the latency model fitted to the tuning trees' sweeps, judged on the held-out ones.
#
# --budget (default 560 s) bounds the whole run: the tuning gets two fifths of it (soft), the
# sweeps what is left but 45 s (no tree is started past it), the refit the rest (killed at the
# budget; re-run it anywhere with `python3 -m cli autotune --refit heldout.json`). Partial
# results are still written. --dry-run prints the commands, checks the workloads parse, and
# runs the lookup check on the IO model's predicted H200 table of the same trees (CPU, ~10 s).
# Writes under $OUT (default autotune-out/), 7 files (the device tool returns at most 8):
#   configs/<device>.json     the chosen configs (copy to deft/kernels/configs/, commit)
#   configs/logs/<device>.json every candidate (copy to autotune/logs/, commit)
#   tune.log                  the card and versions, progress, the chosen configs, and the
#                             lookup check (mismatches, or that every entry reproduces)
#   heldout.json, heldout.log tuned / best per tree and shape, and every size measured
#                             (deft-sweep/1: the refit's records)
#   refit.json, refit.log     fitted constants, error and Spearman on held-out trees
set -uo pipefail

out=${OUT:-autotune-out}
budget=560
dry=0
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --budget) budget=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "usage: $0 [--budget SECONDS] [--dry-run] [-- deft-cli autotune options]" >&2; exit 2 ;;
  esac
done
fit_trees=fewshot_b20_P4000_L200,spec_t64_P4000,long_P20000_q64_L100
workloads=all,tunable
heads=32/8,16/2,8/1,4/1
tune=(python3 -m cli autotune --gpu auto --workloads $workloads --heads $heads --no-tiles
      --budget-s $(( budget * 2 / 5 )) --output "$out/configs/" ${extra[@]+"${extra[@]}"})

lookup_check() {  # $1: a directory a tuning run wrote (configs and logs/), looked up alone
  python3 - "$1" "$workloads" "$heads" <<'EOF'
import glob, os, sys
from pathlib import Path
from autotune.evaluation import lookup_mismatches, parse_heads
from autotune.heldout import shaped
from autotune.store import read_table
from deft.kernels import tuned
from harness.bench import parse_workloads
directory, names, heads = sys.argv[1:]
os.environ.pop(tuned.CONFIG_ENV, None)
tuned.CONFIG_DIR = Path(directory)  # the run's tables alone: no shipped table answers instead
workloads = shaped([(w.text, w.tree()) for w in parse_workloads(names)], parse_heads(heads))
logs = sorted(glob.glob(f"{directory}/logs/*.json"))
lines = [line for log in logs for line in lookup_mismatches(read_table(log), workloads)]
print("\n".join(lines) if lines else f"lookup check: every entry of {len(logs)} table(s) reproduces")
sys.exit(1 if lines or not logs else 0)
EOF
}

if [ $dry -eq 1 ]; then
  echo "${tune[*]}"
  echo "lookup check of $out/configs"
  echo "DEFT_TUNED_CONFIGS=$out/configs python3 -m cli autotune --gpu auto --held-out --heads 32/8,4/1,16/2,8/1 --fit-trees $fit_trees --budget-s LEFT --report $out/heldout.json"
  echo "python3 -m cli autotune --refit $out/heldout.json --report $out/refit.json"
  python3 -c "
from autotune.heldout import HELD_OUT, shaped
from harness.bench import parse_workloads
trees = shaped([(w.text, w.tree()) for w in parse_workloads(','.join(HELD_OUT) + ',$fit_trees')])
print(len(trees), 'trees x shapes parse')" || exit 1
  predicted=$(mktemp -d)
  python3 -m cli autotune --gpu h200 --predict --workloads $workloads --heads $heads \
    --output "$predicted/" > /dev/null || exit 1
  lookup_check "$predicted"; rc=$?
  rm -rf "$predicted"
  exit $rc
fi

if ! python3 -c "import click, rich, scipy" 2> /dev/null; then
  echo "autotune needs click, rich and scipy: python3 -m pip install click rich scipy" >&2
  exit 2
fi
mkdir -p "$out"
start=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$out/tune.log"
export COLUMNS=${COLUMNS:-180} PYTHONUNBUFFERED=1
status=0

echo "== tune (budget $(( budget * 2 / 5 )) s)" >&2
"${tune[@]}" > >(tee -a "$out/tune.log") 2> >(tee -a "$out/tune.log" >&2) || status=1
echo "== tune took $(( $(date +%s) - start )) s" >&2
lookup_check "$out/configs" 2>&1 | tee -a "$out/tune.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

left=$(( budget - ($(date +%s) - start) - 45 ))
if [ $left -gt 10 ]; then
  echo "== held out (budget $left s)" >&2
  DEFT_TUNED_CONFIGS="$out/configs" python3 -m cli autotune --gpu auto --held-out \
    --heads 32/8,4/1,16/2,8/1 --fit-trees "$fit_trees" --budget-s "$left" \
    --report "$out/heldout.json" 2>&1 | tee "$out/heldout.log" || status=1
else
  echo "== held out skipped: $left s left" >&2
fi
echo "== held out done at $(( $(date +%s) - start )) s" >&2

left=$(( budget - ($(date +%s) - start) ))
if [ -f "$out/heldout.json" ] && [ $left -gt 5 ]; then
  echo "== refit (at most $left s)" >&2
  timeout "$left" python3 -m cli autotune --refit "$out/heldout.json" \
    --report "$out/refit.json" 2>&1 | tee "$out/refit.log"
  [ "${PIPESTATUS[0]}" -eq 124 ] && echo "refit cut at the budget: re-run it on any machine" >&2
fi
echo "== all took $(( $(date +%s) - start )) s" >&2
exit $status
