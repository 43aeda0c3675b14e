// The SIMD math shared by the *_vec_impl.h bodies of one ISA unit (simd_avx2.cpp,
// simd_avx512.cpp): ATen's Vectorized<float> of that unit's CPU_CAPABILITY, the math
// policy the kernels/activation.h formulas and the cross-entropy and attention loops
// evaluate with, and the row helpers (softcap, lane folds, masked tails) those loops share.
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

// Softcapping (cross-entropy logits, attention scores): s = softcap * tanh(x / softcap) of a
// vector of x (x itself when softcap is 0), and ds/dx = 1 - (s / softcap)^2.
struct VecSoftcap {
  bool on;
  Vec cap, inv_cap;
  explicit VecSoftcap(float softcap)
      : on(softcap > 0.0f), cap(softcap), inv_cap(on ? 1.0f / softcap : 0.0f) {}
  Vec s(Vec x) const { return on ? cap * VecMath::tanh(x * inv_cap) : x; }
  Vec ds(Vec s) const {
    if (!on) return Vec(1.0f);
    const Vec r = s * inv_cap;
    return Vec(1.0f) - r * r;
  }
};

// The lanes of v folded with op, in lane order.
template <typename Op>
inline float fold_lanes(Vec v, Op op) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float r = lanes[0];
  for (int64_t j = 1; j < kLanes; ++j) r = op(r, lanes[j]);
  return r;
}

// Calls body(c, count) for each vector of the row: full vectors, then one masked tail.
template <typename Body>
inline void for_vectors(int64_t C, Body body) {
  const int64_t c_vec = C - C % kLanes;
  for (int64_t c = 0; c < c_vec; c += kLanes) body(c, kLanes);
  if (c_vec < C) body(c_vec, C - c_vec);
}

// for_vectors with two vectors per step, body(c, count, chain) alternating chain 0 and 1:
// a reduction kept in two accumulators, one per chain, runs two independent dependency
// chains (one chain of vmaxps made the attention row max latency-bound, perf annotate).
template <typename Body>
inline void for_vector_pairs(int64_t C, Body body) {
  const int64_t c_pair = C - C % (2 * kLanes);
  for (int64_t c = 0; c < c_pair; c += 2 * kLanes) {
    body(c, kLanes, 0);
    body(c + kLanes, kLanes, 1);
  }
  for_vectors(C - c_pair, [&](int64_t c, int64_t count) { body(c_pair + c, count, 0); });
}

}  // namespace
}  // namespace cpu
}  // namespace pykernels
