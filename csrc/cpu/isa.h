// The x86 SIMD levels of the CPU kernels, shared by every family (plain C++, no includes:
// the ISA units simd_avx2.cpp and simd_avx512.cpp read this before anything else).
//
// The units switch their ISA on with `#pragma GCC target` next to a baseline x86-64 build,
// so they have code only with GCC on x86-64; elsewhere the families keep scalar loops.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define PYKERNELS_CPU_VEC_LOOPS 1
#else
#define PYKERNELS_CPU_VEC_LOOPS 0
#endif

namespace pykernels {
namespace cpu {

enum class CpuIsa { Scalar, Avx2, Avx512 };

// The ISA level the float32 loops run at, decided once (isa.cpp, baseline code): Avx512 or
// Avx2 where the units were compiled in (PYKERNELS_CPU_VEC_LOOPS), the CPU and OS support
// the ISA (__builtin_cpu_supports), and ATen's own CPU capability allows it, so
// ATEN_CPU_CAPABILITY=avx2 / =default switch these loops down exactly like torch's.
CpuIsa cpu_isa();

}  // namespace cpu
}  // namespace pykernels
