# Sourced by scripts/gpu_run.sh and .ci/gpu_twin.sh: prints the CUDA toolkit to build with,
# the one torch.utils.cpp_extension must find: $CUDA_HOME when set, else the toolkit of the
# nvcc on PATH (through a symlink or a wrapper script: /usr/local/bin/nvcc may be either),
# else /usr/local/cuda. Prints nothing when none of them has include/cuda_runtime.h.
find_cuda_home() {
  local nvcc candidates home
  if [ -n "${CUDA_HOME:-}" ]; then
    candidates=("$CUDA_HOME")
  else
    nvcc=$(command -v nvcc || true)
    candidates=(/usr/local/cuda)
    if [ -n "$nvcc" ]; then
      candidates=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")"
                  "$(sed -n 's|^exec \(.*\)/bin/nvcc .*|\1|p' "$nvcc" 2>/dev/null | head -n 1)"
                  /usr/local/cuda)
    fi
  fi
  for home in "${candidates[@]}"; do
    if [ -n "$home" ] && [ -f "$home/include/cuda_runtime.h" ]; then
      echo "$home"
      return
    fi
  done
}
