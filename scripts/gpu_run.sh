#!/usr/bin/env bash
# Build, test and benchmark pykernels on the lent GPU machine in one device call of at most
# 9 minutes. From the repo root, through the device tool:
#     run(command="bash scripts/gpu_run.sh [--smoke] [FAMILY ...]", timeout_s=600)
# FAMILY: linear_act cross_entropy attention (default), also e2e and demo.
# --smoke (<= 4 minutes once built): the first cuda-marked test and the target shape of
# each family's benchmark.
# Steps, each time-boxed, each result written to $OUT as soon as it exists (so a cut call
# still returns what ran; $OUT returns at most 8 files):
#   guards    a visible GPU (nvidia-smi, torch), nvcc and CUDA_HOME; after the build
#             has_cuda(). Each stops the run with a message naming what is missing (exit 2).
#   build     TORCH_CUDA_ARCH_LIST=9.0a, one pip build into build/ (ninja: a rerun on a
#             warm machine recompiles nothing)                                 build.log
#   tests     the cuda-marked tests only (CPU tests are CI's job), one pytest per test
#             file in parallel (Triton compiles are per process), -rA, a per-test timeout
#             (PYKERNELS_TEST_TIMEOUT, tests/conftest.py), SIGINT at the time box so
#             pytest still prints its summary                       pytest.log, junit.tar
#   memcheck  compute-sanitizer on one small call of each CUDA kernel     sanitizer.log
#   bench     each family's target shapes first, torch.compile only there;
#             tables and plots                                       bench.log, results.tar
#   auto      bench/auto_order.py: the evidence for the "auto" order     auto_order.json
# Triton autotuning is off by default here (PYKERNELS_TRITON_AUTOTUNE=0: one known-good
# config per kernel, for a first contact); PYKERNELS_TRITON_AUTOTUNE=1 turns it on.
# The machine has torch, triton and nvcc but no network: nothing is installed here.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_run_out}  # set by the device tool; the default lets it run elsewhere
mkdir -p "$OUT"

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; shift; fi
families=("$@")
[ "$#" -eq 0 ] && families=(linear_act cross_entropy attention)
BUDGET=$([ "$smoke" = 1 ] && echo 230 || echo 530)
DEADLINE=$((SECONDS + BUDGET))
# Seconds left before the deadline, less $1; never under 10 ("timeout 0" means no limit).
left() { local s=$((DEADLINE - SECONDS - ${1:-0})); echo $((s > 10 ? s : 10)); }
stop() { echo "gpu_run: STOP: $*" | tee -a "$OUT/summary.txt" >&2; exit 2; }
note() { echo "gpu_run: $*" | tee -a "$OUT/summary.txt"; }

echo "== guards"
nvidia-smi -L > /dev/null 2>&1 \
  || stop "no NVIDIA GPU visible (nvidia-smi missing or failing): this script is for the GPU machine"
nvcc_path=$(command -v nvcc || true)
[ -n "$nvcc_path" ] || stop "nvcc is not on PATH: without it the extension builds CPU-only"
source scripts/cuda_home.sh
home=$(find_cuda_home)
[ -n "$home" ] || stop "no CUDA toolkit with include/cuda_runtime.h (CUDA_HOME=${CUDA_HOME:-unset}, \
nvcc at $nvcc_path): set CUDA_HOME to the toolkit"
export CUDA_HOME=$home
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" \
  || stop "this torch is a CPU build ($("$PY" -c 'import torch; print(torch.__version__)'))"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || stop "torch.cuda.is_available() is False although nvidia-smi sees a GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', \
torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
nvcc --version | tail -n 1

echo "== build (TORCH_CUDA_ARCH_LIST=9.0a; log in build.log)"
# build_ext --inplace, not pip install -e: pip's editable build compiles in a fresh temporary
# folder each time, this one keeps its objects in build/ for ninja (scripts/build_cuda.sh).
t0=$SECONDS
MAX_JOBS=$(nproc) timeout "$(left 60)" bash scripts/build_cuda.sh "$PY" > "$OUT/build.log" 2>&1
rc=$?
[ "$rc" -eq 0 ] || { tail -n 40 "$OUT/build.log"; stop "build failed (rc $rc; 124: timed out)"; }
"$PY" -c "import pykernels, sys; sys.exit(0 if pykernels.has_cuda() else 1)" \
  || stop "pykernels._C was built without the CUDA kernels (has_cuda() is False): see build.log"
note "built in $((SECONDS - t0)) s: $("$PY" -c "import pykernels; \
print('pykernels', pykernels.__version__, 'backends', pykernels.backends('cuda'))")"

export PYKERNELS_TRITON_AUTOTUNE=${PYKERNELS_TRITON_AUTOTUNE:-0}

echo "== tests: cuda-marked, one pytest per file in parallel (pytest.log)"
t0=$SECONDS
JUNIT_DIR=$(mktemp -d)
export PYKERNELS_TEST_TIMEOUT=${PYKERNELS_TEST_TIMEOUT:-90}
test_box=$([ "$smoke" = 1 ] && echo 70 || echo 230)
test_box=$((test_box < $(left 150) ? test_box : $(left 150)))
pids=()
# Test files sit in folders that mirror the package (tests/ops, tests/nn, ...); their base
# names are unique, so each names its log prefix and junit file.
for file in $(grep -rl --include="test_*.py" "mark.cuda" tests | sort); do
  name=$(basename "$file" .py)
  selection=("$file")
  if [ "$smoke" = 1 ]; then  # the file's first cuda-marked test
    first=$("$PY" -m pytest -q --collect-only -m cuda "$file" 2>/dev/null | grep -m 1 "::")
    [ -n "$first" ] || continue
    selection=("$first")
  fi
  # A subshell per file, so that waiting on it gives pytest's status (pipefail), not sed's.
  (timeout -s INT --kill-after=15 "$test_box" "$PY" -m pytest -m cuda -rA -p no:cacheprovider \
     --junitxml="$JUNIT_DIR/$name.xml" "${selection[@]}" 2>&1 \
     | sed -u "s/^/[$name] /" >> "$OUT/pytest.log") &
  pids+=($!)
done
test_rc=0
for pid in "${pids[@]}"; do wait "$pid" || test_rc=1; done
(cd "$JUNIT_DIR" && tar cf "$OUT/junit.tar" .)
grep -h -E "^\[[a-z0-9_]+\] =+ .*(passed|failed|error|no tests ran).* =+$" "$OUT/pytest.log" \
  | tee -a "$OUT/summary.txt"
note "tests rc=$test_rc in $((SECONDS - t0)) s"

echo "== compute-sanitizer memcheck: one small call of each CUDA kernel (sanitizer.log)"
sanitizer=$(command -v compute-sanitizer || ls "$CUDA_HOME"/bin/compute-sanitizer 2>/dev/null)
san_rc=0
if [ -z "$sanitizer" ]; then
  note "compute-sanitizer not found (PATH, \$CUDA_HOME/bin): memcheck skipped"
elif [ "$smoke" = 0 ]; then
  timeout --kill-after=10 "$(left 120)" "$sanitizer" --tool memcheck --error-exitcode 3 \
    "$PY" scripts/cuda_calls.py > "$OUT/sanitizer.log" 2>&1 || san_rc=$?
  tail -n 5 "$OUT/sanitizer.log"
  note "memcheck rc=$san_rc (3: errors found, 124: timed out; others: the tool could not run,
e.g. 'Device not supported' on some container runtimes)"
fi
san_errors=$((san_rc == 3))  # only memory errors fail the run

echo "== benchmarks: target shapes first (bench.log, results.tar)"
# Per family: the shapes its targets are checked at (bench/common.py, PYKERNELS_BENCH_SHAPES).
declare -A TARGET_SHAPES=(
  [linear_act]="8192,1024,4096;8192,4096,16384"
  [cross_entropy]="ce,16384,131072;lce,16384,4096,131072"
  [attention]="4,16,4096,128,False;2,16,8192,128,True"
)
[ "$smoke" = 1 ] && export PYKERNELS_BENCH_ONLY_LISTED=1
bench_rc=0
BENCH_DIR=$(mktemp -d)
for i in "${!families[@]}"; do
  family=${families[$i]}
  shapes=${TARGET_SHAPES[$family]:-}
  [ "$smoke" = 1 ] && shapes=${shapes%%;*}
  after=$(( ${#families[@]} - i - 1 ))  # each family gets an equal share of what is left
  share=$(( (DEADLINE - 15 - SECONDS) / (after + 1) ))
  cmd=("$PY" -m "bench.bench_$family" --out "$BENCH_DIR")
  [ "$family" = demo ] && cmd=("$PY" -m pykernels demo --out "$BENCH_DIR/demo")
  PYKERNELS_BENCH_SHAPES=$shapes timeout --kill-after=15 "$((share > 10 ? share : 10))" \
    "${cmd[@]}" 2>&1 | tee -a "$OUT/bench.log" || bench_rc=1
  (cd "$BENCH_DIR" && tar cf "$OUT/results.tar" .)
done

"$PY" -m bench.auto_order --junit "$JUNIT_DIR"/*.xml --results "$BENCH_DIR" \
  --out "$OUT/auto_order.json" || true
note "done in $SECONDS s: tests rc=$test_rc, memcheck rc=$san_rc, benchmarks rc=$bench_rc"
ls -l "$OUT"
exit $((test_rc || san_errors || bench_rc))
