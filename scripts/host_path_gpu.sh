#!/usr/bin/env bash
# The GPU run of issue #16's host path, one call, from the repository root:
#
#   OUT=/some/dir scripts/host_path_gpu.sh
#
# 1. tests: the GPU tests of the run path, the custom op under torch.compile, the device plan
#    buffers and the cache's uploads (tests/test_bound_run.py, tests/test_compiled_op.py, the
#    compiled-run tests of tests/test_kernels.py, tests/test_fast_plan.py's device buffers,
#    tests/test_cache.py's cuda pool and slot uploads, tests/test_plan_buffers.py); its first plan compiles the
#    node planner (numba, 15-45 s, cached on disk for the steps after);
# 2. host: scripts/host_overhead.py on fewshot_b20 and reason_10x500 at 32/8, torch.compile's
#    records on COMPILE_ANCHORS only (default reason_10x500; "none" skips them: each anchor
#    costs several inductor compiles);
# 3. plan: scripts/plan_overhead.py --device cuda --check on four runs' first 20 steps (the
#    device buffers read back after every step and compared with the normative plan's: the
#    reads distort the times), then timed over the first 40 steps of every run;
#    then scripts/apply_probe.py cuda (where TreeCache.apply's time goes: $OUT/apply_probe_cuda.json);
#    with FILL_PROBE=1 also scripts/fill_probe.py (the fill's pieces and its modes, the
#    compiled writes against numpy's, interleaved in one process: $OUT/fill_probe.json);
# 4. bench: deft-cli bench BENCH_ARGS (default: --timing eager, L2 flushed, DeFT-Flatten and
#    the peers on the six anchors at 32/8; e.g. BENCH_ARGS="--timing eager --heads 32/8,4/1"),
#    last: FlashInfer's JIT costs about 25 s per FlashInfer method cold; BENCH_ARGS=none skips it.
# Each step has its own timeout (about 7 min in all on a cold H200 with the default bench);
# each writes under $OUT: tests.txt, host_overhead.json/.txt, plan_check.txt,
# plan_overhead.json/.txt, apply_probe.txt, apply_probe_cuda.json,
# bench.json/.txt. Peers come from .peer-wheels (scripts/peer-wheels.sh), as in
# scripts/bench_gpu.sh.
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
step tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_bound_run.py \
  tests/test_compiled_op.py \
  tests/test_fast_plan.py::test_device_buffers_followed_over_a_run_hold_every_step \
  tests/test_kernels.py::test_compiled_run_takes_each_new_plan_without_recompiling \
  tests/test_kernels.py::test_deterministic_and_compiles \
  tests/test_cache.py::test_a_cuda_pool_hands_out_the_slots_a_host_pool_does \
  tests/test_cache.py::test_slots_uploaded_ahead_of_a_busy_stream_each_hold_their_own_step \
  tests/test_plan_buffers.py
compile_anchors=${COMPILE_ANCHORS:-reason_10x500_P1104}
if [ "$compile_anchors" = none ]; then compiling=(--no-compile)
else compiling=(--compile-anchors "$compile_anchors"); fi
step host_overhead "${HOST_SECONDS:-120}" env OUT="$out" python3 scripts/host_overhead.py \
  --heads 32/8 --anchors fewshot_b20_P4000_L200,reason_10x500_P1104 "${compiling[@]}"
if compgen -G ".peer-wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/peers .peer-wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/peers
fi
step plan_check "${CHECK_SECONDS:-30}" python3 scripts/plan_overhead.py --device cuda --steps 20 \
  --runs fewshot_b20,spec_t256,spec_t256_P63000,fewshot_b256_P55296 --check
step plan_overhead 45 env OUT="$out" python3 scripts/plan_overhead.py --device cuda --steps 40
step apply_probe 60 env OUT="$out" python3 scripts/apply_probe.py cuda
[ -n "${FILL_PROBE:-}" ] && step fill_probe 120 env OUT="$out" python3 scripts/fill_probe.py
read -r -a bench_args <<< "${BENCH_ARGS:---timing eager --heads 32/8}"
[ "${bench_args[*]}" = none ] && exit $status
step bench "${BENCH_SECONDS:-300}" python3 -m cli bench "${bench_args[@]}" \
  --methods "${BENCH_METHODS:-deft_flatten,fi_decode,fi_mask,fi_cascade,sglang}" \
  --json "$out/bench.json"
exit $status
