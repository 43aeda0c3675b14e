// The SIMD math shared by the *_vec_impl.h bodies of one ISA unit (simd_avx2.cpp,
// simd_avx512.cpp): ATen's Vectorized<float> of that unit's CPU_CAPABILITY and the math
// policy the kernels/activation.h formulas and the cross-entropy loops evaluate with.
// Read inside the unit after <ATen/cpu/vec/vec.h>; everything is in an anonymous namespace
// (see "One-definition-rule hygiene" in linear_act_vec_impl.h).
#pragma once

#include <cstdint>

namespace pykernels {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// The SIMD math policy for kernels/activation.h, chosen for speed at float32 accuracy
// (one Zen 4 core, 2M floats, AVX2 8-lane / AVX-512 16-lane calls, ns per element):
//   exp:  Sleef u10 (Vectorized::exp, as torch uses), 0.75 / 0.32;
//   erf:  Vectorized::erf, the Abramowitz-Stegun 7.1.26 fit (|error| <= 1.5e-7) over Sleef
//         exp that torch's own vectorized GELU uses; Sleef's 1-ulp erf costs 4.1 / 2.7
//         and alone made gelu slower than eager;
//   tanh: Sleef u35 (3.5 ulp), 0.89 / 0.58; the u10 one torch uses costs 2.2 / 1.5.
struct VecMath {
  static inline Vec exp(Vec x) { return x.exp(); }
  static inline Vec erf(Vec x) { return x.erf(); }
  static inline Vec tanh(Vec x) { return Vec(PYKERNELS_VEC_SLEEF_TANH(x)); }
  // Ordered compares (_CMP_GT_OQ, _CMP_LE_OQ): false at NaN, so NaN takes b, like the
  // scalar `z > 0 ? a : b` and `z <= 0 ? a : b`.
  static inline Vec if_pos(Vec z, Vec a, Vec b) { return Vec::blendv(b, a, z > Vec(0.0f)); }
  static inline Vec if_nonpos(Vec z, Vec a, Vec b) { return Vec::blendv(b, a, z <= Vec(0.0f)); }
};

}  // namespace
}  // namespace cpu
}  // namespace pykernels
