#!/usr/bin/env bash
# Nsight Compute profile of the partials kernel on anchors, one launch per variant of
# scripts/perf_flatten.py (its correctness run; no timing). Run from the repository root on the
# GPU machine:
#
#   OUT=/some/dir scripts/profile_gpu.sh [ANCHORS] [VARIANTS]
#
# ANCHORS, VARIANTS: comma-separated (defaults: fewshot_b20_P4000_L200, current). Writes under
# $OUT: ncu-details.txt (every section of every profiled launch, in launch order: variant by
# variant as perf_flatten.log lists them) and ncu-hot.txt (per launch, the SASS instructions
# with the most warp-stall samples and their main stall reasons). Clocks are left alone
# (--clock-control none), as the GPU machine's notes ask.
set -uo pipefail
out=${OUT:-profile-out}
mkdir -p "$out"
anchors=${1:-fewshot_b20_P4000_L200}
variants=${2:-current}
ncu --clock-control none --set full --import-source no -k regex:_partials_kernel \
  -o "$out/prof" -f \
  python3 scripts/perf_flatten.py --anchors "$anchors" \
  --variants "$variants" --no-timing > "$out/perf_flatten.log" 2>&1
echo "ncu exit $?"
tail -5 "$out/perf_flatten.log"
ncu -i "$out/prof.ncu-rep" --page details > "$out/ncu-details.txt" 2>&1
ncu -i "$out/prof.ncu-rep" --page source --print-source sass --csv > "$out/ncu-sass.csv" 2>&1
python3 scripts/ncu_hot.py "$out/ncu-sass.csv" > "$out/ncu-hot.txt" 2>&1
rm -f "$out/ncu-sass.csv"
head -c 3000 "$out/ncu-hot.txt"
