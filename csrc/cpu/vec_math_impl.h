// The SIMD math shared by the *_vec_impl.h bodies of one ISA unit (simd_avx2.cpp,
// simd_avx512.cpp; the list of bodies is simd_families.h): ATen's Vectorized<float> of that
// unit's CPU_CAPABILITY, the math policy the kernels/common/activation.h formulas and the
// cross-entropy and attention loops evaluate with, and the row helpers (softcap, lane folds,
// masked tails, float64 column sums) those loops share. Read inside the unit after
// <ATen/cpu/vec/vec.h>.
//
// One-definition-rule hygiene. An inline function a SIMD unit emits out of line is compiled
// for that ISA; were a baseline unit to emit the same name too, the linker could keep the
// SIMD copy for both and a CPU without the ISA would fault in baseline code. So:
//   * the prelude (vec_prelude.h) includes the CPU_CAPABILITY-independent torch/c10 headers
//     before the pragma: their inline functions keep baseline code;
//   * ATen's vec headers come in under the pragma with CPU_CAPABILITY set, which puts them
//     in the inline namespace at::vec::AVX2 / at::vec::AVX512: names no baseline unit of
//     this extension has;
//   * everything defined here and in the bodies is in an anonymous namespace or is an entry
//     point whose name only its unit defines (PYKERNELS_VEC_NAME), and only
//     Vectorized<float> instantiations of the kernels/common/activation.h templates are
//     made (tails use masked loads, not the scalar instantiations the families' .cpp make).
// `nm -C --defined-only` on either object lists exactly its entry points (those of the
// *_simd.h headers) as global symbols, nothing weak.
#pragma once

#include <cstdint>

namespace pykernels {
namespace cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// The SIMD math policy for kernels/common/activation.h, chosen for speed at float32 accuracy
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

// acc[0 .. kLanes) += g, widened to float64 (exact), lane by lane.
inline void accumulate(double* acc, Vec g) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = g;
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), lo));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), hi));
#else
  const __m256 v = g;
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), lo));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), hi));
#endif
}

// acc[0 .. count) += the first count lanes of g (the row tail).
inline void accumulate_tail(double* acc, Vec g, int64_t count) {
  alignas(64) float lanes[kLanes];
  g.store(lanes);
  for (int64_t j = 0; j < count; ++j) acc[j] += static_cast<double>(lanes[j]);
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
