// Vectorized float32 row loops of the attention CPU path (csrc/cpu/attention.cpp), one set
// per x86 ISA level (simd_avx2.cpp, simd_avx512.cpp), from the one body in
// attention_vec_impl.h. attention.cpp calls them for float32 where cpu_isa() allows and runs
// its scalar templates of the same loops otherwise (float64, other CPUs).
//
// Each loop works on one row of a score tile: n contiguous keys that all lie inside the
// row's causal / window band (the caller zeroes the tile outside it).
//
// Plain C++ on purpose (no ATen): this header is read on both sides of the ISA boundary.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pykernels {
namespace cpu {

// How the raw dot products <q_i, k_j> of one row become scores (kernels/attention.h):
//   t = softcap > 0 ? softcap * tanh(scale * dot / softcap) : scale * dot,  x = t + mask.
template <typename T>
struct AttnRow {
  T scale, softcap;      // softcap 0: none
  const T* mask;         // the row's additive mask at its first key; null: none
  int64_t mask_stride;   // element stride of the mask along the keys (0: broadcast)
};

// s[c] = x (the score, in place) for c < n; returns max_c x (-inf for n = 0).
float attn_scores_max_avx2(float* s, int64_t n, const AttnRow<float>& r);
float attn_scores_max_avx512(float* s, int64_t n, const AttnRow<float>& r);

// s[c] = exp(s[c] - m) * (keep ? keep[c] : 1); returns sum_c exp(s[c] - m) (before keep).
float attn_exp_sum_avx2(float* s, int64_t n, float m, const float* keep);
float attn_exp_sum_avx512(float* s, int64_t n, float m, const float* keep);

// Backward, in place: s holds the raw dots, dp the raw <dO_i, v_j>; with P = exp(x - lse)
// and D = keep ? keep[c] : 1 (the scaled keep mask):
//   s[c]  = P * D                            (the weights of dv)
//   dp[c] = P * (dp * D - delta) * dt/d(dot)  (dS times the chain rule: the weights of dq, dk)
// where dt/d(dot) = scale * (softcap > 0 ? 1 - (t / softcap)^2 : 1).
void attn_grad_row_avx2(float* s, float* dp, int64_t n, const AttnRow<float>& r, float lse,
                        float delta, const float* keep);
void attn_grad_row_avx512(float* s, float* dp, int64_t n, const AttnRow<float>& r, float lse,
                          float delta, const float* keep);

}  // namespace cpu
}  // namespace pykernels
