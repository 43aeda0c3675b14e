// A float32 GEMM with a fused bias + activation epilogue for the CPU paths (gemm.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "cpu/gemm_simd.h"

namespace pykernels {
namespace cpu {

// A strided matrix operand: element (i, j) is data[i * row_stride + j * col_stride].
struct GemmOperand {
  const float* data;
  int64_t row_stride;
  int64_t col_stride;
};

// Whether gemm_f32 runs here (the AVX-512 unit is built in and cpu_isa() allows it) and
// is worth it for an M x N x K product (large ones, see gemm.cpp); otherwise the callers
// use ATen's GEMM.
bool gemm_f32_preferred(int64_t M, int64_t N, int64_t K);

// c (M x N, row-major, contiguous) = epilogue(a (M x K) @ b (K x N)), fp32 accumulation.
// Each element of c is computed by one thread in a fixed k order, so the
// result does not depend on the number of threads. Call only where gemm_f32_preferred.
void gemm_f32(GemmOperand a, GemmOperand b, float* c, int64_t M, int64_t N, int64_t K,
              const GemmEpilogue& epilogue);

// A 2-D float32 tensor (any strides) as a GEMM operand.
GemmOperand gemm_operand(const at::Tensor& t);

// h (M x N, row-major, contiguous) = act(a @ b_gate + bias[:N]) * (a @ b_up + bias[N:]) for
// b = [b_gate | b_up] (K x 2N) and the epilogue's bias (2N, may be null) and activation: the
// gated linear unit, both products of a tile in one register tile, gated in its epilogue.
// gu (M x 2N, row-major) holds [g | u]: with the biases after the last k block when
// epilogue.preact == gu (kept for the backward; else epilogue.preact must be null), and the
// partial sums of the earlier k blocks; it may be null only where !gemm_glu_f32_needs_gu(K)
// (one k block) and nothing is kept, and then no (M x 2N) intermediate is written at all.
// Call only where gemm_f32_preferred(M, 2N, K).
bool gemm_glu_f32_needs_gu(int64_t K);
void gemm_glu_f32(GemmOperand a, GemmOperand b, float* h, float* gu, int64_t M, int64_t N,
                  int64_t K, const GemmEpilogue& epilogue);

}  // namespace cpu
}  // namespace pykernels
