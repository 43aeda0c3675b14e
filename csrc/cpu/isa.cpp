// cpu_isa(): see isa.h.
#include "cpu/isa.h"

#include <ATen/Version.h>

#include <string>

namespace pykernels {
namespace cpu {
namespace {

CpuIsa detect_isa() {
#if PYKERNELS_CPU_VEC_LOOPS
  __builtin_cpu_init();
  // ATen's choice (ATEN_CPU_CAPABILITY, else what it detected) caps ours.
  const std::string aten = at::get_cpu_capability();
  if (aten == "AVX512" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return CpuIsa::Avx512;
  if ((aten == "AVX2" || aten == "AVX512") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return CpuIsa::Avx2;
#endif
  return CpuIsa::Scalar;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_isa();
  return isa;
}

}  // namespace cpu
}  // namespace pykernels
