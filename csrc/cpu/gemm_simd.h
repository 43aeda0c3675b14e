// The AVX-512 pieces of the CPU float32 GEMM of csrc/cpu/gemm.cpp, compiled in
// simd_avx512.cpp from gemm_avx512_impl.h: operand packing and the macro-kernel, whose
// 14 x 32 register-tile microkernel applies the fused epilogue (bias, activation) to the
// fp32 accumulators before the tile is stored. gemm.cpp owns the blocking and the threads.
//
// Plain C++ on purpose (no ATen): this header is read on both sides of the ISA boundary.
#pragma once

#include <cstdint>

#include "common/activation.h"

namespace pykernels {
namespace cpu {

// Register tile: kGemmMr rows of A (broadcast) by kGemmNr columns of B (two 16-lane
// vectors): 28 accumulators of the 32 zmm registers.
constexpr int64_t kGemmMr = 14;
constexpr int64_t kGemmNr = 32;

// What happens to a tile of C = A @ B after its last k block: v = acc + bias[col];
// preact (same layout as C) gets v when not null; C gets act(v).
struct GemmEpilogue {
  const float* bias = nullptr;  // indexed by the column of C; may be null
  float* preact = nullptr;      // indexed like C; may be null
  Activation act = Activation::None;
  float negative_slope = 0.0f;
};

// packed[s][k][r] = A(s * kGemmMr + r, k) for the rows slivers s of `rows` rows and k < kc,
// with A(i, k) = a[i * row_stride + k * col_stride]; rows past `rows` are zero.
void gemm_pack_a_avx512(const float* a, int64_t row_stride, int64_t col_stride, int64_t rows,
                        int64_t kc, float* packed);
// packed[s][k][c] = B(k, s * kGemmNr + c) for the column slivers s of `cols` columns,
// with B(k, j) = b[k * row_stride + j * col_stride]; columns past `cols` are zero.
void gemm_pack_b_avx512(const float* b, int64_t row_stride, int64_t col_stride, int64_t kc,
                        int64_t cols, float* packed);
// C[rows, cols] (+)= packed A block @ packed B panel over kc, C row-major with leading
// dimension ldc; `accumulate` adds to what C holds (a later k block). With `epilogue`
// (the last k block), its bias/preact pointers are offset like c (bias by the first column).
void gemm_macro_avx512(const float* packed_a, const float* packed_b, int64_t rows,
                       int64_t cols, int64_t kc, float* c, int64_t ldc, bool accumulate,
                       const GemmEpilogue* epilogue);

// The gated (GLU) variant, for B = [B_gate | B_up] (K x 2N) and C = act(A B_gate + b_gate) *
// (A B_up + b_up) (M x N): each packed sliver holds 16 gate columns j .. j + 15 in its first
// half and the up columns N + j .. N + j + 15 in its second, so one register tile carries
// both accumulators of 16 output columns and the epilogue gates them in registers.
// packed[s][k][c] = B(k, 16 s + c), packed[s][k][16 + c] = B(k, 16 s + c) shifted by
// up_offset elements (N * col_stride), for the `cols` output columns; the rest is zero.
void gemm_pack_b_glu_avx512(const float* b, int64_t row_stride, int64_t col_stride,
                            int64_t kc, int64_t cols, int64_t up_offset, float* packed);
// h[rows, cols] (row-major, leading dimension n) from packed A @ the packed GLU panel over
// kc; gu is the [gate | up] buffer (rows of 2 n, the up half n further on): the k blocks
// before the last store their partial sums there (accumulate: a later block adds them).
// With `epilogue` (the last block): g = sum + bias[j], u = sum + bias[n + j] (bias offset
// like h), [g | u] stored to gu when epilogue->preact is not null, h = act(g) * u.
void gemm_macro_glu_avx512(const float* packed_a, const float* packed_b, int64_t rows,
                           int64_t cols, int64_t kc, float* h, float* gu, int64_t n,
                           bool accumulate, const GemmEpilogue* epilogue);

}  // namespace cpu
}  // namespace pykernels
