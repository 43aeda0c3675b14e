#!/usr/bin/env bash
# The README's test command: set-up, then the whole pytest suite. CUDA-marked tests run
# where a GPU is present and are skipped elsewhere; Triton kernels run on CPU tensors under
# TRITON_INTERPRET=1 when there is no GPU (tests/conftest.py). Extra arguments go to pytest.
# Fails when pytest fails, when it collects nothing, and when no test passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh

log=$(mktemp)
set +e
"$PY" -m pytest tests -q "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  echo "test.sh: pytest exited with $rc" >&2
  exit "$rc"
fi
if ! tail -n 3 "$log" | grep -Eq "[0-9]+ passed"; then
  echo "test.sh: no test passed" >&2
  exit 1
fi
