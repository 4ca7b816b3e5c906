#!/usr/bin/env bash
# The GPU run of issue #16's host path, one call, from the repository root:
#
#   OUT=/some/dir scripts/host_path_gpu.sh
#
# 1. tests: the GPU tests of the run path and the device plan buffers (tests/test_bound_run.py,
#    the compiled-run tests of tests/test_kernels.py, tests/test_fast_plan.py's device buffers);
# 2. host: scripts/host_overhead.py on fewshot_b20 and reason_10x500 at 32/8, no torch.compile
#    (inductor's compiles cost minutes; the compiled run's graph count is a test of step 1);
# 3. plan: scripts/plan_overhead.py --device cuda over the first 40 steps of every run, then on
#    four runs with PlanBuffers.fill copying one span (--coalesce) to compare the copies' cost
#    (plan_one_copy.txt: its records and table);
# 4. eager: deft-cli bench --timing eager (L2 flushed) of DeFT-Flatten and the peers on the three
#    smallest anchors at 32/8, where host time decides eager timing (last: FlashInfer's JIT,
#    about 25 s per FlashInfer method cold: 110 s was too short on 2026-12-01).
# Each step has its own timeout (about 7 min in all on a cold H200); each writes under $OUT:
# tests.txt, host_overhead.json/.txt, plan_overhead.json/.txt, plan_one_copy.txt,
# bench-eager.json/.txt (8 files: what the GPU machine hands back).
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
  tests/test_kernels.py::test_deterministic_and_compiles
step host_overhead 60 env OUT="$out" python3 scripts/host_overhead.py --heads 32/8 --no-compile \
  --anchors fewshot_b20_P4000_L200,reason_10x500_P1104
if compgen -G ".peer-wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peer-wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/peers
fi
step plan_overhead 45 env OUT="$out" python3 scripts/plan_overhead.py --device cuda --steps 40
# the fill's copies: one span (COALESCE past the whole allocation) against today's threshold
step plan_one_copy 30 env OUT= python3 scripts/plan_overhead.py --device cuda \
  --steps 40 --runs fewshot_b20,keywordToT,spec_t256,fewshot_b256_P55296 --coalesce 100000000
step bench-eager 200 python3 -m cli bench --timing eager --heads 32/8 \
  --workloads fewshot_b20_P4000_L200,reason_10x500_P1104,spec_t64_P4000 \
  --methods deft_flatten,fi_decode,fi_mask,fi_cascade,sglang --json "$out/bench-eager.json"
exit $status
