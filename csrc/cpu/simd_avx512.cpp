// The AVX-512 unit of the CPU kernels: the families' SIMD bodies (simd_families.h) compiled
// with ATen's AVX-512 Vectorized<float> (CPU_CAPABILITY=AVX512, Sleef's 16-lane functions),
// for the CPUs where torch's own kernels run AVX-512 (its vector exp/tanh are ~1.5-2x faster
// per element than the 8-lane ones even on Zen 4's 256-bit datapath, so eager would
// otherwise win the transcendental activations), and the AVX-512 GEMM (gemm_avx512_impl.h).
// Same ISA flags as torch's AVX512 kernels: avx512f, avx512bw, avx512vl, avx512dq, fma. The
// families' .cpp call in only where cpu_isa() allows.
#include "cpu/vec_prelude.h"

#if PYKERNELS_CPU_VEC_LOOPS

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// See simd_avx2.cpp.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512

// sleef.h declares its 256- and 512-bit functions only under __AVX__ / __AVX512F__, which
// `#pragma GCC target` does not define in C++ (see simd_avx2.cpp).
#if !defined(__AVX__)
#define __AVX__ 1
#define PYKERNELS_UNDEF_AVX
#endif
#if !defined(__AVX512F__)
#define __AVX512F__ 1
#define PYKERNELS_UNDEF_AVX512F
#endif
#include <sleef.h>
#if defined(PYKERNELS_UNDEF_AVX)
#undef __AVX__
#undef PYKERNELS_UNDEF_AVX
#endif
#if defined(PYKERNELS_UNDEF_AVX512F)
#undef __AVX512F__
#undef PYKERNELS_UNDEF_AVX512F
#endif

#include <ATen/cpu/vec/vec.h>

#define PYKERNELS_VEC_NAME(name) name##_avx512
#define PYKERNELS_VEC_SLEEF_TANH Sleef_tanhf16_u35
#include "cpu/simd_families.h"
#include "cpu/gemm_avx512_impl.h"
static_assert(pykernels::cpu::kLanes == 16, "expected ATen's AVX-512 Vectorized<float>");

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // PYKERNELS_CPU_VEC_LOOPS
