// Vectorized float32 loops of the gated linear unit's CPU path (csrc/cpu/linear_glu.cpp), one
// set per x86 ISA unit (simd_avx2.cpp, simd_avx512.cpp), from the one body in
// linear_glu_vec_impl.h. Rows hold the [gate | up] pre-activations gu (2 n values: g at j,
// u at n + j) and the gated values h (n values).
//
// Plain C++ on purpose (no ATen): this header is read on both sides of the ISA boundary.
#pragma once

#include <cstdint>

#include "common/activation.h"

namespace pykernels {
namespace cpu {

// h = act(g) * u over `rows` rows (the forward where ATen's GEMM produced gu).
void linear_glu_forward_rows_avx2(Activation act, const float* gu, float* h, int64_t rows,
                                  int64_t n, float negative_slope);
void linear_glu_forward_rows_avx512(Activation act, const float* gu, float* h, int64_t rows,
                                    int64_t n, float negative_slope);

// The backward pass over `rows` rows: dgu = [dh * u * act'(g) | dh * act(g)], and, when acc
// is not null, acc[c] += dgu[m, c] in float64 for the 2 n columns, row by row in order.
void linear_glu_backward_rows_avx2(Activation act, const float* dh, const float* gu,
                                   float* dgu, double* acc, int64_t rows, int64_t n,
                                   float negative_slope);
void linear_glu_backward_rows_avx512(Activation act, const float* dh, const float* gu,
                                     float* dgu, double* acc, int64_t rows, int64_t n,
                                     float negative_slope);

}  // namespace cpu
}  // namespace pykernels
