#!/usr/bin/env bash
# The GPU machine's twin, minus the GPU (issue 12): the GPU machine's Python 3.12,
# torch==2.11.0 (the PyPI wheel, +cu130), its bundled Triton 3.6 and nvcc 13.0, in a
# virtual environment of its own. It proves on a CPU what the first GPU run needs:
#   1. the extension builds with the CUDA kernels exactly as scripts/gpu_run.sh builds it
#      (TORCH_CUDA_ARCH_LIST=9.0a), and the result holds sm_90a code;
#   2. every Triton kernel compiles with Triton 3.6 for sm_90 and sm_80 at every config
#      the code can launch (scripts/triton_aot.py; registers/spills/smem tables printed);
#   3. the CPU test suite passes on these versions (Triton kernels in its interpreter).
# usage: bash .ci/gpu_twin.sh [PYTEST ARGS]
# The environment is cached outside the checkout (~/.cache/pykernels-ci), so only the
# first run on a machine downloads torch and the nvidia-* wheels (~4 GB); the main
# environment's torch is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${PYKERNELS_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pykernels-ci}
# numpy<2.4: Triton 3.6's interpreter, which runs the CPU suite's Triton tests here, fails
# on numpy >= 2.4. The GPU machine has numpy 2.5 but compiles its Triton kernels instead
# of interpreting them. Pinned in this environment only; the main one keeps its numpy.
REQUIREMENTS=(torch==2.11.0 "numpy<2.4" ninja pybind11 pytest "setuptools>=64" wheel
              scikit-learn matplotlib)
VENV=$CACHE/py312-torch2.11.0
PY=$VENV/bin/python

t0=$SECONDS
stamp="${REQUIREMENTS[*]}"
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$stamp" ]; then
  py312=$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1 || true)
  py312=${py312:-$(command -v python3.12 || true)}
  [ -n "$py312" ] || { echo "gpu_twin: no Python 3.12 found (pyenv or PATH)" >&2; exit 1; }
  echo "== twin: creating $VENV with $py312"
  rm -rf "$VENV"
  "$py312" -m venv "$VENV"
  "$PY" -m pip install --quiet "${REQUIREMENTS[@]}"
  echo "$stamp" > "$VENV/.requirements"
fi
"$PY" -c "import sys, torch, triton, numpy; print('twin: python', sys.version.split()[0], \
'| torch', torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
echo "== twin: environment ready in $((SECONDS - t0)) s"

echo "== twin: CUDA build (TORCH_CUDA_ARCH_LIST=9.0a, as scripts/gpu_run.sh)"
t0=$SECONDS
source scripts/cuda_home.sh
CUDA_HOME=$(find_cuda_home)
[ -n "$CUDA_HOME" ] || { echo "gpu_twin: no CUDA toolkit (nvcc, CUDA_HOME)" >&2; exit 1; }
export CUDA_HOME
log=build/twin-build.log
mkdir -p build
MAX_JOBS=${MAX_JOBS:-2} bash scripts/build_cuda.sh "$PY" > "$log" 2>&1 \
  || { tail -n 60 "$log"; exit 1; }
# The environment imports this checkout (as pip install -e would), so scripts/setup.sh in
# the test step finds the extension built and builds nothing.
echo "$PWD" > "$("$PY" -c "import site; print(site.getsitepackages()[0])")/pykernels-checkout.pth"
so=$("$PY" -c "import sysconfig; print('pykernels/_C' + sysconfig.get_config_var('EXT_SUFFIX'))")
(cd /tmp && "$PY" -c "import pykernels._C as C; assert C.has_cuda(), 'has_cuda() is False'") \
  || { echo "gpu_twin: $so was built without the CUDA kernels" >&2; exit 1; }
cuobjdump=$("$PY" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), \
'backends/nvidia/bin/cuobjdump'))")
# --list-elf names a cubin sm_90 even when it is sm_90a; its ELF header says which.
cubins=$("$cuobjdump" --dump-elf "$so" | grep -c "arch = sm_90a" || true)
[ "$cubins" -gt 0 ] || { echo "gpu_twin: no sm_90a cubin in $so" >&2; exit 1; }
echo "== twin: built in $((SECONDS - t0)) s: has_cuda() true, $cubins sm_90a cubins"

echo "== twin: Triton AOT compile, sm_90 and sm_80 (one process each)"
t0=$SECONDS
bash .ci/triton_aot.sh "$PY" build/triton-aot-twin
echo "== twin: AOT done in $((SECONDS - t0)) s"

echo "== twin: CPU test suite"
t0=$SECONDS
PYTHON=$PY bash scripts/test.sh "$@"  # arguments: pytest's (CI passes none: the whole suite)
echo "== twin: tests done in $((SECONDS - t0)) s"
