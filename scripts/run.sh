#!/usr/bin/env bash
# The README's main command: set-up, then what pykernels is running on (versions, device,
# compiled kernels, backends) and every fused op checked against plain PyTorch on every
# backend available here. Without a GPU the Triton kernels run under the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
fi
"$PY" -m pykernels info
"$PY" -m pykernels check
