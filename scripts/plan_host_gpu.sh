#!/usr/bin/env bash
# plan()'s host path on a GPU host (issue #16 item 1), one call, from the repository root:
#
#   OUT=/some/dir scripts/plan_host_gpu.sh          # CUDA: about 3 min on a cold H200
#   OUT=/some/dir scripts/plan_host_gpu.sh --cpu    # the same steps' dry run on the CPU
#
# 1. tests: tests/test_plan_buffers.py and the device buffers of tests/test_fast_plan.py (its
#    first plan compiles the node planner and the fill, numba, 15-45 s cold, cached on disk);
# 2. plan_check: scripts/plan_overhead.py --check on four runs' first 20 steps (the device
#    buffers read back after every step and compared with the normative plan's);
# 3. plan_overhead: scripts/plan_overhead.py over the first 40 steps of every run, wall clock
#    ($OUT/plan_overhead.json);
# 4. fill_probe: scripts/fill_probe.py, the fill's pieces and its modes interleaved in one
#    process, the compiled writes against numpy's ($OUT/fill_probe.json; CUDA only).
# Each step has its own timeout and writes $OUT/NAME.txt; the script exits 1 if any failed.
set -uo pipefail
out=${OUT:-plan-host-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} COLUMNS=${COLUMNS:-180}
device=cuda
[ "${1:-}" = --cpu ] && device=cpu
status=0
step() {  # NAME SECONDS command...: run with a timeout, note the time and a failure
  local name=$1 seconds=$2 start
  shift 2
  start=$(date +%s)
  echo "== $name" >&2
  timeout "$seconds" "$@" > "$out/$name.txt" 2>&1 || { status=1; echo "$name failed" >&2; }
  echo "== $name took $(( $(date +%s) - start )) s" >&2
  tail -n 14 "$out/$name.txt"
}
step tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_plan_buffers.py \
  tests/test_fast_plan.py::test_device_buffers_followed_over_a_run_hold_every_step
step plan_check 60 python3 scripts/plan_overhead.py --device $device --steps 20 \
  --runs fewshot_b20,spec_t256,spec_t256_P63000,fewshot_b256_P55296 --check
step plan_overhead 60 env OUT="$out" python3 scripts/plan_overhead.py --device $device --steps 40
if [ $device = cuda ]; then
  step fill_probe 120 env OUT="$out" python3 scripts/fill_probe.py
fi
exit $status
