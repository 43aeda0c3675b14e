// The AVX2 + FMA unit of the CPU kernels: the families' SIMD bodies (simd_families.h)
// compiled with ATen's AVX2 Vectorized<float> (CPU_CAPABILITY=AVX2, Sleef's 8-lane
// functions). The extension is built for baseline x86-64 (plain -O3), so this unit switches
// the ISA on for itself; the families' .cpp call in only where cpu_isa() allows.
#include "cpu/vec_prelude.h"

#if PYKERNELS_CPU_VEC_LOOPS

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// GCC checks the vector-return ABI against the command-line ISA, not the pragma's, and
// warns on ATen's 256-bit helpers; every function here is AVX2 (or inlined into one).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

// `#pragma GCC target` does not define __AVX__ in C++, and sleef.h declares its 256-bit
// functions only under __AVX__: read it here with __AVX__ defined for the while
// (declarations only; ATen's own include of it is then a no-op).
#if !defined(__AVX__)
#define __AVX__ 1
#define PYKERNELS_UNDEF_AVX
#endif
#include <sleef.h>
#if defined(PYKERNELS_UNDEF_AVX)
#undef __AVX__
#undef PYKERNELS_UNDEF_AVX
#endif

#include <ATen/cpu/vec/vec.h>

#define PYKERNELS_VEC_NAME(name) name##_avx2
#define PYKERNELS_VEC_SLEEF_TANH Sleef_tanhf8_u35
#include "cpu/simd_families.h"
static_assert(pykernels::cpu::kLanes == 8, "expected ATen's AVX2 Vectorized<float>");

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // PYKERNELS_CPU_VEC_LOOPS
