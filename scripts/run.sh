#!/usr/bin/env bash
# The README's main command: set-up, then what pykernels is running on (versions, device,
# compiled kernels, backends), then the demo: every fused op checked against plain PyTorch
# on every backend available here, an MLP and a Transformer trained fused and plain side by
# side, timings against eager PyTorch; report.json and report.png in pykernels-demo/.
# Without a GPU the Triton kernels run under the interpreter (in the check only: the
# models train on the fastest backend). Extra arguments go to the demo (e.g. --data DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
fi
"$PY" -m pykernels info
"$PY" -m pykernels demo "$@"
