#!/usr/bin/env bash
# Builds pykernels._C with the CUDA kernels for Hopper, as on the GPU machine: used by
# scripts/gpu_run.sh there and by CI's twin of it (.ci/gpu_twin.sh), so both build alike.
# build_ext --inplace keeps its objects in build/ (ninja rebuilds only what changed) and
# puts the extension next to the sources. usage: bash scripts/build_cuda.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST=9.0a
FORCE_CUDA=1 "$1" setup.py build_ext --inplace
