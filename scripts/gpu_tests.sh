#!/usr/bin/env bash
# The GPU test lane: the whole test suite on a CUDA machine (kernels compiled for the card, not
# interpreted), tests marked `gpu` included, then the oracle checks of scripts/gpu_check.py.
# Every change that touches a kernel runs this on the GPU machine before it lands:
#
#   OUT=/some/dir [GPU_CHECK_ARGS='--budget 120'] scripts/gpu_tests.sh [extra pytest arguments]
#
# Needs torch with CUDA, triton, numpy, scipy, click, rich, pytest and hypothesis (the GPU
# machine's image has them); the checkout is put on PYTHONPATH, nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-tests-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  || exit 2
status=0
python3 -m pytest -q -p no:cacheprovider -o addopts="" "$@" 2>&1 | tee "$out/gpu-tests.txt" || status=1
OUT=$out python3 scripts/gpu_check.py --no-timing ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu-check.txt" || status=1
exit $status
