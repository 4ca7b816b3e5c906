#!/usr/bin/env bash
# The GPU run of issue #16's host path, one call, from the repository root:
#
#   OUT=/some/dir scripts/host_path_gpu.sh
#
# 1. tests: the GPU tests of the run path, the device plan buffers and the cache's uploads
#    (tests/test_bound_run.py, the compiled-run tests of tests/test_kernels.py,
#    tests/test_fast_plan.py's device buffers, tests/test_cache.py's cuda pool,
#    tests/test_plan_buffers.py);
# 2. host: scripts/host_overhead.py on fewshot_b20 and reason_10x500 at 32/8, no torch.compile
#    (inductor's compiles cost minutes; the compiled run's graph count is a test of step 1);
# 3. plan: scripts/plan_overhead.py --device cuda over the first 40 steps of every run;
# 4. eager: deft-cli bench --timing eager (L2 flushed) of DeFT-Flatten and the peers on the six
#    anchors at EAGER_HEADS (default 32/8; e.g. EAGER_HEADS=32/8,4/1), last: FlashInfer's JIT
#    costs about 25 s per FlashInfer method cold, and 32/8 and 4/1 share its kernels (group 4).
# Each step has its own timeout (about 7 min in all on a cold H200 at 32/8); each writes under
# $OUT: tests.txt, host_overhead.json/.txt, plan_overhead.json/.txt, bench-eager.json/.txt.
# Peers come from .peer-wheels (scripts/peer-wheels.sh), as in scripts/bench_gpu.sh.
set -uo pipefail
out=${OUT:-host-path-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} COLUMNS=${COLUMNS:-180}
status=0
step() {  # NAME SECONDS command...: run with a timeout, note the time and a failure
  local name=$1 seconds=$2 start
  shift 2
  start=$(date +%s)
  echo "== $name" >&2
  timeout "$seconds" "$@" > "$out/$name.txt" 2>&1 || { status=1; echo "$name failed" >&2; }
  echo "== $name took $(( $(date +%s) - start )) s" >&2
  tail -n 25 "$out/$name.txt"
}
step tests 70 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_bound_run.py \
  tests/test_fast_plan.py::test_device_buffers_followed_over_a_run_hold_every_step \
  tests/test_kernels.py::test_compiled_run_takes_each_new_plan_without_recompiling \
  tests/test_kernels.py::test_deterministic_and_compiles \
  tests/test_cache.py::test_a_cuda_pool_hands_out_the_slots_a_host_pool_does tests/test_plan_buffers.py
step host_overhead 60 env OUT="$out" python3 scripts/host_overhead.py --heads 32/8 --no-compile \
  --anchors fewshot_b20_P4000_L200,reason_10x500_P1104
if compgen -G ".peer-wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peer-wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/peers
fi
step plan_overhead 45 env OUT="$out" python3 scripts/plan_overhead.py --device cuda --steps 40
step bench-eager "${EAGER_SECONDS:-300}" python3 -m cli bench --timing eager \
  --heads "${EAGER_HEADS:-32/8}" \
  --methods deft_flatten,fi_decode,fi_mask,fi_cascade,sglang --json "$out/bench-eager.json"
exit $status
