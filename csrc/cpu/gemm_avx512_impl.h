// The body of the AVX-512 float32 GEMM pieces declared in gemm_simd.h, included once, by
// simd_avx512.cpp after vec_math_impl.h (raw __m512 intrinsics for the register tile, ATen's
// Vectorized<float> and the VecMath policy for the epilogue's activation). Everything but
// the entry points is in an anonymous namespace (see "One-definition-rule hygiene" in
// linear_act_vec_impl.h).
//
// Why our own GEMM: on the Zen 4 machines this project runs on, MKL's sgemm reaches 55-70%
// of the FMA peak (218 GFLOP/s on two cores, measured) at the linear_act shapes, while this
// 14 x 32 register tile over packed operands reaches 70-77% there; and the epilogue runs on
// the accumulators of each tile while they are in registers, not as a pass over C.

#include "cpu/gemm_simd.h"

namespace pykernels {
namespace cpu {
namespace {

constexpr int kMr = static_cast<int>(kGemmMr);
constexpr int kNr = static_cast<int>(kGemmNr);
static_assert(kNr == 32, "the register tile is two 16-lane vectors wide");

inline __mmask16 lanes_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1u);
}

// Products summed in one register before they are added to the tile in memory: a two-level
// sum (runs of kRun in registers, then the runs) whose rounding error grows with
// kRun + kc / kRun instead of kc; one long run was ~2.5x MKL's max error at k = 512.
constexpr int64_t kRun = 64;

// tile[r][c] = sum over k < kc of ap[k][r] * bp[k][c]: the 28 accumulators stay in zmm
// registers for each run of k; B comes as two aligned vector loads per k, each A value as a
// broadcast.
inline void microkernel(int64_t kc, const float* __restrict ap, const float* __restrict bp,
                        float* __restrict tile) {
  for (int64_t k0 = 0; k0 < kc; k0 += kRun) {
    __m512 acc[kMr][2];
#pragma GCC unroll 14
    for (int r = 0; r < kMr; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t k1 = std::min(kc, k0 + kRun);
    for (int64_t k = k0; k < k1; ++k) {
      const __m512 b0 = _mm512_load_ps(bp);
      const __m512 b1 = _mm512_load_ps(bp + 16);
#pragma GCC unroll 14
      for (int r = 0; r < kMr; ++r) {
        const __m512 a = _mm512_set1_ps(ap[r]);
        acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      }
      ap += kMr;
      bp += kNr;
    }
#pragma GCC unroll 14
    for (int r = 0; r < kMr; ++r) {
      float* row = tile + r * kNr;
      if (k0 > 0) {
        acc[r][0] = _mm512_add_ps(acc[r][0], _mm512_load_ps(row));
        acc[r][1] = _mm512_add_ps(acc[r][1], _mm512_load_ps(row + 16));
      }
      _mm512_store_ps(row, acc[r][0]);
      _mm512_store_ps(row + 16, acc[r][1]);
    }
  }
}

// Stores rows x cols of the tile at (row0, col0) of the macro-kernel's block of C (adding
// what C holds when accumulating), through the epilogue when there is one. Partial tiles use
// masked loads and stores: nothing outside C's rows x cols is touched.
template <Activation A>
void store_tile(const float* tile, int64_t rows, int64_t cols, float* c, int64_t ldc,
                int64_t row0, int64_t col0, bool accumulate, const GemmEpilogue* ep) {
  const Vec slope(ep ? ep->negative_slope : 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t offset = (row0 + r) * ldc + col0;  // of the row's first element in C
    for (int64_t h = 0; h < kNr && h < cols; h += 16) {
      const __mmask16 mask = lanes_mask(cols - h);
      __m512 v = _mm512_load_ps(tile + r * kNr + h);
      float* dst = c + offset + h;
      if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
      if (ep != nullptr) {
        if (ep->bias != nullptr)
          v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, ep->bias + col0 + h));
        if (ep->preact != nullptr) _mm512_mask_storeu_ps(ep->preact + offset + h, mask, v);
        v = activation_forward<Vec, VecMath>(A, Vec(v), slope);
      }
      _mm512_mask_storeu_ps(dst, mask, v);
    }
  }
}

template <Activation A>
void macro_kernel(const float* packed_a, const float* packed_b, int64_t rows, int64_t cols,
                  int64_t kc, float* c, int64_t ldc, bool accumulate, const GemmEpilogue* ep) {
  alignas(64) float tile[kMr * kNr];
  // Row slivers outside, column slivers inside: the A sliver (kc x 14) stays in L1 while
  // the B panel streams from L2 / L3.
  for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
    for (int64_t c0 = 0; c0 < cols; c0 += kNr) {
      microkernel(kc, packed_a + r0 * kc, packed_b + c0 * kc, tile);
      store_tile<A>(tile, std::min<int64_t>(kMr, rows - r0), std::min<int64_t>(kNr, cols - c0),
                    c, ldc, r0, c0, accumulate, ep);
    }
  }
}

}  // namespace

void gemm_pack_a_avx512(const float* a, int64_t row_stride, int64_t col_stride, int64_t rows,
                        int64_t kc, float* packed) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMr, packed += kc * kMr) {
    const int64_t mr = std::min<int64_t>(kMr, rows - r0);
    const float* src = a + r0 * row_stride;
    if (row_stride == 1) {  // A's rows are contiguous per k (a transposed operand)
      const __mmask16 in = lanes_mask(mr);
      for (int64_t k = 0; k < kc; ++k)
        _mm512_mask_storeu_ps(packed + k * kMr, lanes_mask(kMr),
                              _mm512_maskz_loadu_ps(in, src + k * col_stride));
      continue;
    }
    // Row by row: reads run along A's rows, contiguous for a row-major operand.
    for (int64_t r = 0; r < kMr; ++r)
      for (int64_t k = 0; k < kc; ++k)
        packed[k * kMr + r] = r < mr ? src[r * row_stride + k * col_stride] : 0.0f;
  }
}

void gemm_pack_b_avx512(const float* b, int64_t row_stride, int64_t col_stride, int64_t kc,
                        int64_t cols, float* packed) {
  for (int64_t c0 = 0; c0 < cols; c0 += kNr, packed += kc * kNr) {
    const int64_t nc = std::min<int64_t>(kNr, cols - c0);
    const float* src = b + c0 * col_stride;
    if (col_stride == 1) {  // B's rows are contiguous
      const __mmask16 lo = lanes_mask(nc), hi = lanes_mask(std::max<int64_t>(0, nc - 16));
      for (int64_t k = 0; k < kc; ++k) {
        _mm512_store_ps(packed + k * kNr, _mm512_maskz_loadu_ps(lo, src + k * row_stride));
        _mm512_store_ps(packed + k * kNr + 16,
                        _mm512_maskz_loadu_ps(hi, src + k * row_stride + 16));
      }
      continue;
    }
    // Column by column: reads run along B's columns, contiguous for a transposed operand.
    for (int64_t j = 0; j < kNr; ++j)
      for (int64_t k = 0; k < kc; ++k)
        packed[k * kNr + j] = j < nc ? src[k * row_stride + j * col_stride] : 0.0f;
  }
}

void gemm_macro_avx512(const float* packed_a, const float* packed_b, int64_t rows,
                       int64_t cols, int64_t kc, float* c, int64_t ldc, bool accumulate,
                       const GemmEpilogue* epilogue) {
  const Activation act = epilogue ? epilogue->act : Activation::None;
  with_activation(act, [&](auto tag) {
    macro_kernel<decltype(tag)::value>(packed_a, packed_b, rows, cols, kc, c, ldc, accumulate,
                                       epilogue);
  });
}

}  // namespace cpu
}  // namespace pykernels
