#!/usr/bin/env bash
# Installs what pykernels needs and builds it in place (pip install -e, extension _C).
# Works on a fresh CPU machine (installs torch==2.13.0, the local CPU build, and the small
# packages from PyPI) and on the GPU machine (torch and the rest preinstalled, no network:
# nothing is downloaded when everything is already importable). Never installs an
# unpinned torch, which would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet torch==2.13.0
fi

missing=()
# module:requirement; scikit-learn (its bundled digits) and matplotlib (report.png) serve
# the demo.
for spec in ninja:ninja pybind11:pybind11 pytest:pytest numpy:numpy triton:"triton>=3.2" \
            setuptools:"setuptools>=64" wheel:wheel sklearn:scikit-learn \
            matplotlib:matplotlib; do
  "$PY" -c "import ${spec%%:*}" 2>/dev/null || missing+=("${spec#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  "$PY" -m pip install --quiet "${missing[@]}"
fi
# Optional test packages, neither depending on torch: transformers (tests/models/test_hf.py) and
# expecttest (PyTorch's OpInfo samples in tests/ops/test_autograd_contract.py); the tests that
# need one skip without it. Installed where missing and reachable, skipped quietly where
# not (the GPU machine is offline).
for package in transformers expecttest; do
  "$PY" -c "import $package" 2>/dev/null \
    || "$PY" -m pip install --quiet --retries 1 --timeout 10 "$package" >/dev/null 2>&1 \
    || echo "setup: $package not installed (optional: the tests that need it skip)"
done

# Rebuild only when the extension is missing or older than a source it is built from.
# This interpreter's own extension file (CI's twin builds a second one, for Python 3.12).
so=pykernels/_C$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
stale=1
if [ -f "$so" ] && (cd /tmp && "$PY" -c "import pykernels._C") 2>/dev/null; then
  newer=$(find csrc kernels setup.py -newer "$so" -type f | head -n 1)
  [ -z "$newer" ] && stale=0
fi
if [ "$stale" = 1 ]; then
  mkdir -p build
  log=build/setup-build.log
  echo "setup: building pykernels._C (pip install --no-build-isolation -e .), a line per" \
       "compiled file; the whole output goes to $log"
  # pip -v passes on ninja's lines, "[n/N] <compiler command>"; each is shown as
  # "[n/N] <source file>". A failed build shows the end of the log.
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
    2>&1 | tee "$log" | sed -unE "s#^ *(\[[0-9]+/[0-9]+\]) .* -c ($PWD/)?([^ ]+) -o .*#  \1 \3#p" \
    || { tail -n 40 "$log"; echo "setup: the build failed; the whole output is in $log"; exit 1; }
fi
