#!/usr/bin/env bash
# The GPU run of docs/autotune.md: tune this card on the default workload set (the six
# anchors), then judge the table (the quality study). Run from the repository root on the GPU
# machine:
#
#   OUT=/some/dir scripts/autotune_gpu.sh [tune] [quality] [-- extra deft-cli autotune options]
#
# Default: both, tune first (about 3 + 2 minutes on an H100 with a cold Triton cache; one
# 10-minute call). The spec anchors read the token trees shipped in deft/workloads/data/.
# Writes under $OUT (default autotune-out/):
#   env.txt                     the card and versions
#   <device>.json               the chosen configs: copy it to deft/kernels/configs/, commit
#   logs/<device>.json          every candidate (the quality study reads it): copy it to
#                               autotune/logs/, commit
#   autotune.txt, autotune.log  the chosen configs and the progress log
#   autotune-quality.{json,txt} tuned vs exhaustive (within 5%?), IO-model vs measured
#                               ranking (Spearman), the tuning time (docs/autotune.md, Quality)
set -uo pipefail

out=${OUT:-autotune-out}
mkdir -p "$out"
steps=()
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; extra=("$@"); break ;;
    tune|quality) steps+=("$1"); shift ;;
    *) echo "usage: $0 [tune] [quality] [-- deft-cli autotune options]" >&2; exit 2 ;;
  esac
done
[ ${#steps[@]} -eq 0 ] && steps=(tune quality)

if ! python3 -c "import click, rich, scipy" 2> /dev/null; then
  echo "autotune needs click, rich and scipy: python3 -m pip install click rich scipy" >&2
  exit 2
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$out/env.txt"

export COLUMNS=${COLUMNS:-180} PYTHONUNBUFFERED=1
status=0
for step in "${steps[@]}"; do
  start=$(date +%s)
  if [ "$step" = tune ]; then
    echo "== deft-cli autotune --gpu auto" >&2
    python3 -m cli autotune --gpu auto --output "$out/" ${extra[@]+"${extra[@]}"} \
      2> >(tee "$out/autotune.log" >&2) | tee "$out/autotune.txt" || status=1
  else
    table=$(ls "$out"/logs/nvidia-*.json 2> /dev/null | head -n 1)
    if [ -z "$table" ]; then
      echo "quality: no $out/logs/nvidia-*.json yet (run tune first)" >&2
      status=1
      continue
    fi
    echo "== quality study of $table" >&2
    python3 -m autotune.quality --table "$table" --json "$out/autotune-quality.json" \
      2>&1 | tee "$out/autotune-quality.txt" || status=1
  fi
  echo "== $step took $(( $(date +%s) - start )) s" >&2
done
exit $status
