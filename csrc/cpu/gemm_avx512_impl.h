// The body of the AVX-512 float32 GEMM pieces declared in gemm_simd.h, included once, by
// simd_avx512.cpp after the families' bodies (simd_families.h): AVX-512 only, so not in
// that list (raw __m512 intrinsics for the register tile, ATen's Vectorized<float> and the
// VecMath policy for the epilogue's activation). Everything but the entry points is in an
// anonymous namespace (see "One-definition-rule hygiene" in vec_math_impl.h).
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

// Runs the microkernel over every register tile of the block (rows x `slivers` packed column
// slivers) and hands each to store(tile, tile_rows, row0, sliver).
template <typename Store>
void for_each_tile(const float* packed_a, const float* packed_b, int64_t rows, int64_t slivers,
                   int64_t kc, Store&& store) {
  alignas(64) float tile[kMr * kNr];
  // Row slivers outside, column slivers inside: the A sliver (kc x 14) stays in L1 while
  // the B panel streams from L2 / L3.
  for (int64_t r0 = 0; r0 < rows; r0 += kMr) {
    for (int64_t s = 0; s < slivers; ++s) {
      microkernel(kc, packed_a + r0 * kc, packed_b + s * kNr * kc, tile);
      store(tile, std::min<int64_t>(kMr, rows - r0), r0, s);
    }
  }
}

template <Activation A>
void macro_kernel(const float* packed_a, const float* packed_b, int64_t rows, int64_t cols,
                  int64_t kc, float* c, int64_t ldc, bool accumulate, const GemmEpilogue* ep) {
  for_each_tile(packed_a, packed_b, rows, (cols + kNr - 1) / kNr, kc,
                [&](const float* tile, int64_t tile_rows, int64_t r0, int64_t s) {
                  store_tile<A>(tile, tile_rows, std::min<int64_t>(kNr, cols - s * kNr), c, ldc,
                                r0, s * kNr, accumulate, ep);
                });
}

// The GLU store of a tile whose lanes 0..15 are the gate and 16..31 the up sums of the
// `cols` output columns at (row0, col0): partial sums go to / come from gu; on the last k
// block (ep) g and u get their biases, are kept in gu when ep->preact is set, and
// h = act(g) * u is stored. gu rows are 2 n long, the up half n further on (as the bias).
template <Activation A>
void store_tile_glu(const float* tile, int64_t rows, int64_t cols, float* h, float* gu,
                    int64_t n, int64_t row0, int64_t col0, bool accumulate,
                    const GemmEpilogue* ep) {
  const __mmask16 mask = lanes_mask(cols);
  const Vec slope(ep ? ep->negative_slope : 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    __m512 g = _mm512_load_ps(tile + r * kNr);
    __m512 u = _mm512_load_ps(tile + r * kNr + 16);
    // gu may be null when there is one k block and nothing is kept.
    float* gate = gu != nullptr ? gu + (row0 + r) * 2 * n + col0 : nullptr;
    float* up = gu != nullptr ? gate + n : nullptr;
    if (accumulate) {
      g = _mm512_add_ps(g, _mm512_maskz_loadu_ps(mask, gate));
      u = _mm512_add_ps(u, _mm512_maskz_loadu_ps(mask, up));
    }
    if (ep != nullptr && ep->bias != nullptr) {
      g = _mm512_add_ps(g, _mm512_maskz_loadu_ps(mask, ep->bias + col0));
      u = _mm512_add_ps(u, _mm512_maskz_loadu_ps(mask, ep->bias + n + col0));
    }
    if (ep == nullptr || ep->preact != nullptr) {  // partial sums, or the kept [g | u]
      _mm512_mask_storeu_ps(gate, mask, g);
      _mm512_mask_storeu_ps(up, mask, u);
    }
    if (ep == nullptr) continue;
    const Vec out = activation_forward<Vec, VecMath>(A, Vec(g), slope) * Vec(u);
    _mm512_mask_storeu_ps(h + (row0 + r) * n + col0, mask, out);
  }
}

// One 16-column half of a packed B sliver: half[k * kNr + j] = B(k, j) from src for j < nc
// (nc <= 16, may be <= 0), zero for the other lanes.
void pack_b_half(const float* src, int64_t row_stride, int64_t col_stride, int64_t kc,
                 int64_t nc, float* half) {
  if (col_stride == 1) {  // B's rows are contiguous
    const __mmask16 mask = lanes_mask(std::max<int64_t>(0, nc));
    for (int64_t k = 0; k < kc; ++k)
      _mm512_store_ps(half + k * kNr, _mm512_maskz_loadu_ps(mask, src + k * row_stride));
    return;
  }
  // Column by column: reads run along B's columns, contiguous for a transposed operand.
  for (int64_t j = 0; j < 16; ++j)
    for (int64_t k = 0; k < kc; ++k)
      half[k * kNr + j] = j < nc ? src[k * row_stride + j * col_stride] : 0.0f;
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
    pack_b_half(src, row_stride, col_stride, kc, nc, packed);
    pack_b_half(src + 16 * col_stride, row_stride, col_stride, kc, nc - 16, packed + 16);
  }
}

void gemm_pack_b_glu_avx512(const float* b, int64_t row_stride, int64_t col_stride,
                            int64_t kc, int64_t cols, int64_t up_offset, float* packed) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16, packed += kc * kNr) {
    const int64_t nc = std::min<int64_t>(16, cols - c0);
    const float* src = b + c0 * col_stride;
    pack_b_half(src, row_stride, col_stride, kc, nc, packed);
    pack_b_half(src + up_offset, row_stride, col_stride, kc, nc, packed + 16);
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

void gemm_macro_glu_avx512(const float* packed_a, const float* packed_b, int64_t rows,
                           int64_t cols, int64_t kc, float* h, float* gu, int64_t n,
                           bool accumulate, const GemmEpilogue* epilogue) {
  const Activation act = epilogue ? epilogue->act : Activation::None;
  with_activation(act, [&](auto tag) {
    for_each_tile(packed_a, packed_b, rows, (cols + 15) / 16, kc,
                  [&](const float* tile, int64_t tile_rows, int64_t r0, int64_t s) {
                    store_tile_glu<decltype(tag)::value>(
                        tile, tile_rows, std::min<int64_t>(16, cols - 16 * s), h, gu, n, r0,
                        16 * s, accumulate, epilogue);
                  });
  });
}

}  // namespace cpu
}  // namespace pykernels
