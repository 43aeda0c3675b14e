// Vectorized float32 inner loops of the fused linear + activation CPU path
// (csrc/cpu/linear_act.cpp), one set per x86 ISA level: AVX2 + FMA (simd_avx2.cpp) and
// AVX-512 (simd_avx512.cpp), both from the one body in linear_act_vec_impl.h.
// Each unit is compiled for its ISA while the rest of the extension stays baseline x86-64;
// linear_act.cpp calls into a unit only where cpu_isa() says this CPU runs it,
// and keeps its scalar loops for float64 and for other CPUs.
//
// Plain C++ on purpose (no ATen): this header is read on both sides of the ISA boundary.
#pragma once

#include <cstdint>

#include "common/activation.h"
#include "cpu/isa.h"

namespace pykernels {
namespace cpu {

// Forward epilogue over `rows` rows of N columns (row-major, contiguous): y = act(z), where
// z already holds the bias (addmm). y == z is allowed (in place).
void linear_act_forward_rows_avx2(Activation act, const float* z, float* y, int64_t rows,
                                  int64_t N, float negative_slope);
void linear_act_forward_rows_avx512(Activation act, const float* z, float* y, int64_t rows,
                                    int64_t N, float negative_slope);

// Backward pass over the columns [n0, n1) of all M rows of (M, N) row-major tensors:
// dz = dy * act'(saved) (not stored for Activation::None), and, when acc is not null,
// acc[n - n0] += dz[m, n] in float64, row by row in order m = 0 .. M-1.
void linear_act_backward_cols_avx2(Activation act, bool saved_is_output, const float* dy,
                                   const float* saved, float* dz, double* acc, int64_t M,
                                   int64_t N, int64_t n0, int64_t n1, float negative_slope);
void linear_act_backward_cols_avx512(Activation act, bool saved_is_output, const float* dy,
                                     const float* saved, float* dz, double* acc, int64_t M,
                                     int64_t N, int64_t n0, int64_t n1, float negative_slope);

}  // namespace cpu
}  // namespace pykernels
