#!/usr/bin/env bash
# The GPU run of docs/benchmarks.md: every strategy and peer over the six anchors, against the
# floor measured in the same run. Run from the repository root on the GPU machine:
#
#   OUT=/some/dir scripts/bench_gpu.sh [MODE ...] [-- extra deft-cli bench options]
#
# MODE is graph and/or eager (default: both, graph first) and calibrate (fit the IO model to
# the graph JSON; done after graph by default). One mode fits a 10-minute call: on a machine
# with such a limit run `scripts/bench_gpu.sh graph`, then `eager`, as separate calls (FlashInfer's
# JIT cache and Inductor's cache make the second faster).
#
# The modes of issue #15's target (graph timing, methods TARGET_METHODS unless -- --methods):
#   shards     the six anchors at heads 32/8, 16/2, 8/1 and 4/1 (head dim 128), one run:
#              bench-shards$TAG.json (24 cells; about 5 min on a cold H200, at most ~7,
#              75 s of it FlashInfer's JIT)
#   offanchor  the off-anchor suite at 32/8/128, then the six anchors at 32/8/64:
#              bench-offanchor$TAG.json, bench-hd64$TAG.json (20 cells, two runs; about 5-7
#              min cold: FlashInfer compiles again for head dim 64)
#   verdicts   no GPU: merges whichever of those three JSONs exist and prints the verdict of
#              every target clause: verdicts$TAG.{txt,json}
#   dry        no GPU: alone, builds every cell of shards and offanchor and lists them (a
#              check of the command before a GPU call); beside shards/offanchor, they list
#              their cells instead of running
# shards and offanchor exit non-zero when a row of this project's methods is wrong or errors.
# On a 10-minute limit: `scripts/bench_gpu.sh shards`, then `scripts/bench_gpu.sh offanchor
# verdicts`, as two calls of one lease.
#
# Peers come from .peer-wheels (scripts/peer-wheels.sh fetches them): installed with
# pip --no-index --no-deps into /tmp/peers and put on PYTHONPATH; without them FlashInfer and
# SGLang show as skipped. The spec anchors read the token trees shipped in
# deft/workloads/data/ (APPS_tree_size{64,256}.json).
# Writes under $OUT (default bench-out/): bench-MODE$TAG.{txt,json,png},
# calibration-graph$TAG.{txt,json}, env.txt. Set TAG (e.g. TAG=-part1) when splitting the
# workloads over several calls (-- --workloads a,b,c), so that the files do not collide.
set -uo pipefail

out=${OUT:-bench-out}
tag=${TAG:-}
mkdir -p "$out"
modes=()
extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; extra=("$@"); break ;;
    graph|eager|calibrate|shards|offanchor|verdicts|dry) modes+=("$1"); shift ;;
    *) echo "usage: $0 [graph] [eager] [calibrate] [shards] [offanchor] [verdicts] [dry]" \
            "[-- deft-cli bench options]" >&2; exit 2 ;;
  esac
done
[ ${#modes[@]} -eq 0 ] && modes=(graph calibrate eager)
target_methods=${TARGET_METHODS:-deft_flatten,fi_decode,fi_mask,fi_cascade,sglang}

if compgen -G ".peer-wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peer-wheels/*.whl \
    && export PYTHONPATH=/tmp/peers${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .peer-wheels/*.whl: FlashInfer and SGLang will be reported as skipped" >&2
fi
if ! python3 -c "import click, rich" 2> /dev/null; then
  echo "deft-cli needs click and rich: python3 -m pip install click rich" >&2
  exit 2
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$out/env.txt"

export COLUMNS=${COLUMNS:-180}  # rich wraps tables at 80 columns when not on a terminal
status=0

dry_run=0
for mode in "${modes[@]}"; do [ "$mode" = dry ] && dry_run=1; done

target_bench() {  # NAME, then deft-cli bench options: one graph run of the target's methods
  local name=$1
  shift
  echo "== bench $name" >&2
  if [ $dry_run = 1 ]; then
    python3 -m cli bench --dry-run --methods "$target_methods" "$@" ${extra[@]+"${extra[@]}"} \
      || status=1
    return
  fi
  python3 -m cli bench --timing graph --methods "$target_methods" \
    --json "$out/bench-$name$tag.json" "$@" ${extra[@]+"${extra[@]}"} \
    | tee "$out/bench-$name$tag.txt" || status=1
  check_rows "$out/bench-$name$tag.json"
}

check_rows() {  # JSON: fail the call when a row of this project's methods failed its oracle check
  python3 - "$1" <<'PY' || status=1
import json, sys
rows = json.load(open(sys.argv[1]))["results"]
bad = [r for r in rows if r["kind"] == "deft" and r["status"] in ("wrong", "error")]
for r in bad:
    print(f"check failed: {r['method']} on {r['workload']} at {r['shape']}: {r['reason']}",
          file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

for mode in "${modes[@]}"; do
  start=$(date +%s)
  case $mode in
    calibrate)
      if [ ! -f "$out/bench-graph$tag.json" ]; then
        echo "calibrate: no $out/bench-graph$tag.json yet (run graph first)" >&2
        continue
      fi
      python3 -m cli bench --calibrate "$out/bench-graph$tag.json" \
        --json "$out/calibration-graph$tag.json" | tee "$out/calibration-graph$tag.txt" \
        || status=1 ;;
    shards)
      target_bench shards --workloads all --heads 32/8,16/2,8/1,4/1 ;;
    offanchor)
      target_bench offanchor --workloads offanchor --heads 32/8
      target_bench hd64 --workloads all --heads 32/8/64 ;;
    dry)
      [ ${#modes[@]} -eq 1 ] || continue  # with shards/offanchor: they list their cells
      target_bench shards --workloads all --heads 32/8,16/2,8/1,4/1
      target_bench offanchor --workloads offanchor --heads 32/8
      target_bench hd64 --workloads all --heads 32/8/64 ;;
    verdicts)
      found=()
      for name in shards offanchor hd64; do
        [ -f "$out/bench-$name$tag.json" ] && found+=("$out/bench-$name$tag.json")
      done
      if [ ${#found[@]} -eq 0 ]; then
        echo "verdicts: no bench-{shards,offanchor,hd64}$tag.json in $out yet" >&2
        continue
      fi
      python3 -m cli bench --verdicts "$(IFS=,; echo "${found[*]}")" \
        --json "$out/verdicts$tag.json" | tee "$out/verdicts$tag.txt" || status=1 ;;
    *)
      echo "== bench, $mode timing" >&2
      python3 -m cli bench --timing "$mode" --json "$out/bench-$mode$tag.json" \
        --plot "$out/bench-$mode$tag.png" ${extra[@]+"${extra[@]}"} | tee "$out/bench-$mode$tag.txt" || status=1 ;;
  esac
  echo "== $mode took $(( $(date +%s) - start )) s" >&2
done
exit $status
