#!/usr/bin/env bash
# Build, test and benchmark pykernels on the lent GPU machine, all in one device call
# (DESIGN.md section 5). Invoked from the repo root through the device tool:
#     run(command="bash scripts/gpu_run.sh [FAMILY ...]", timeout_s=600)
# FAMILY: the benchmarks to run (default: linear_act cross_entropy attention; also e2e, and
# demo for `python -m pykernels demo`, whose report lands in results.tar under demo/); one
# call may not fit them all with the tests, so a session can split them over calls.
# The machine has torch, triton and nvcc but no network: nothing is installed from an
# index here (never torch). Everything comes back through $OUT, which returns at most
# 8 files, 2 folders deep: build.log, pytest.log, bench.log, and results.tar holding every
# family's <family>_<gpu>.csv/.md/.png (one archive, so more families still fit).
# Steps are time-boxed so the whole script ends within ~9 minutes (the call's limit is 10);
# a failing test run still lets the benchmark run, and the exit status reports both.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_run_out}  # set by the device tool; the default lets it run elsewhere
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
DEADLINE=$((SECONDS + 530))
BENCH_RESERVE=240  # seconds kept for the benchmark whatever the tests take
# Seconds left before the deadline, less $1; never under 30 ("timeout 0" would mean no limit).
left() { local s=$((DEADLINE - SECONDS - ${1:-0})); echo $((s > 30 ? s : 30)); }

echo "== machine"
nvidia-smi
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
nvcc --version | tail -n 1

echo "== build (TORCH_CUDA_ARCH_LIST=9.0a: Hopper only, keeps nvcc short; log in build.log)"
export TORCH_CUDA_ARCH_LIST=9.0a
build_rc=0
timeout 300 python3 -m pip install --no-build-isolation --no-deps --no-index -e . \
  >"$OUT/build.log" 2>&1 || build_rc=$?
if [ "$build_rc" -ne 0 ] && [ "$build_rc" -ne 124 ]; then  # pip unusable, not a slow build
  echo "pip install failed (rc $build_rc); building in place with setup.py" | tee -a "$OUT/build.log"
  build_rc=0
  timeout "$(left "$BENCH_RESERVE")" python3 setup.py build_ext --inplace \
    >>"$OUT/build.log" 2>&1 || build_rc=$?
fi
if [ "$build_rc" -ne 0 ]; then
  tail -n 40 "$OUT/build.log"
  echo "build failed (rc $build_rc; 124: timed out)"
  exit "$build_rc"
fi
python3 -c "import pykernels; print('pykernels', pykernels.__version__, '| has_cuda', \
pykernels.has_cuda(), '| backends', pykernels.backends('cuda'))"

echo "== tests (cuda-marked tests run here: a GPU is present)"
test_rc=0
timeout "$(left "$BENCH_RESERVE")" python3 -m pytest -x -q tests 2>&1 \
  | tee "$OUT/pytest.log" || test_rc=$?

echo "== benchmarks (tables and plots packed into \$OUT/results.tar)"
bench_rc=0
BENCH_DIR=$(mktemp -d)
families=("$@")
[ "$#" -eq 0 ] && families=(linear_act cross_entropy attention)
for i in "${!families[@]}"; do
  after=$(( ${#families[@]} - i - 1 ))  # each family gets an equal share of what is left
  share=$(( (DEADLINE - SECONDS) / (after + 1) ))
  cmd=(python3 -m "bench.bench_${families[$i]}" --out "$BENCH_DIR")
  [ "${families[$i]}" = demo ] && cmd=(python3 -m pykernels demo --out "$BENCH_DIR/demo")
  timeout --kill-after=20 "$(left $(( (DEADLINE - SECONDS) - share )))" "${cmd[@]}" 2>&1 \
    | tee -a "$OUT/bench.log" || bench_rc=$?
done
(cd "$BENCH_DIR" && tar cf "$OUT/results.tar" .) || true

echo "== done: tests rc=$test_rc, benchmarks rc=$bench_rc (124: timed out); files in \$OUT:"
ls -l "$OUT"
exit $((test_rc || bench_rc))
