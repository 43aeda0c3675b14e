// Vectorized float32 row loops of the cross-entropy CPU path (csrc/cpu/cross_entropy.cpp),
// one set per x86 ISA level (simd_avx2.cpp, simd_avx512.cpp), from the one body in
// cross_entropy_vec_impl.h. cross_entropy.cpp calls them for rows with unit class stride
// where cpu_isa() allows, and runs its scalar loops otherwise (float64, strided rows).
//
// Every loop reads the row x (C floats, contiguous) and the optional per-class arrays
// w (class weights) and q (probability targets), and works on the capped logits
//   s_c = softcap > 0 ? softcap * tanh(x_c / softcap) : x_c
// and the "smoothing weights" u_c = w_c * (beta * q_c + gamma) (w null: 1, q null: 0).
//
// Plain C++ on purpose (no ATen): this header is read on both sides of the ISA boundary.
#pragma once

#include <cstdint>

#include "cpu/isa.h"

namespace pykernels {
namespace cpu {

struct CeRowVec {
  const float* x;
  const float* w;  // may be null
  const float* q;  // may be null
  int64_t C;
  float softcap;   // 0: none
  float beta, gamma;
  bool want_u;     // whether u (and so w, q) enters at all
};

// max_c x_c (NaN if any x_c is NaN); the caller caps it (tanh is monotonic).
float ce_row_max_x_avx2(const CeRowVec& row);
float ce_row_max_x_avx512(const CeRowVec& row);

// sums[0] = sum_c exp(s_c - m); and when want_u: sums[1] = sum_c u_c,
// sums[2] = sum_c u_c * (s_c - m).
void ce_row_sums_avx2(const CeRowVec& row, float m, float sums[3]);
void ce_row_sums_avx512(const CeRowVec& row, float m, float sums[3]);

// g_c = k * (exp(s_c - lse) * a - u_c) * (softcap > 0 ? 1 - (s_c / softcap)^2 : 1).
// g == row.x is allowed (in place): each element is read before it is written.
void ce_row_grad_avx2(const CeRowVec& row, float* g, float lse, float a, float k);
void ce_row_grad_avx512(const CeRowVec& row, float* g, float lse, float a, float k);

}  // namespace cpu
}  // namespace pykernels
