// Blocking and threading of the CPU float32 GEMM (the AVX-512 packing and register tile are
// in gemm_avx512_impl.h). Loops, outermost first:
//   column panels of kPanelCols columns of B and C,
//     k blocks of kDepth: B's panel is packed once, by all threads, then
//       each thread takes its share of C's rows and, per block of kRowBlock rows, packs
//       that slice of A and runs the macro-kernel; the epilogue runs on the last k block.
// kDepth 512 keeps a packed A sliver (14 x 512 floats, 28 KiB) in L1; at 4096 x 512 x 512
// on two Zen 4 cores it measured ~8% faster than 256 (one k block: C is written once, never
// re-read). The packed B panel (up to 4 MiB at kPanelCols 2048) streams from L3, which
// feeds the register tile's 128 bytes per 28 FMAs easily; panels of 2048 columns instead
// of 512 (A packed once instead of per 512 columns) measured 1.04x -> 1.20x MKL at
// 2048 x 1024 x 1024 and 0.97x -> 1.28x at 8192 x 768 x 3072; 4096 was no better.
#include "cpu/gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/isa.h"

namespace pykernels {
namespace cpu {
namespace {

constexpr int64_t kDepth = 512;
constexpr int64_t kPanelCols = 2048;
constexpr int64_t kRowBlock = 24 * kGemmMr;
// Where it runs: C with at least kMinRows rows (the split among threads and the packing of
// B are amortised over the rows) and at least kMinCols columns and kMinDepth of depth (the
// packing of A over the columns, the parallel regions over the k work). Measured against
// MKL's sgemm on two Zen 4 cores (forward layout, ratio of medians, 12 interleaved runs):
// 2048x256x256 1.05x, 2048x512x512 1.40x, 4096x256x256 1.07x, 8192x768x3072 1.22x, but
// 4096x128x128 0.83x, 2048x1024x128 0.90x, 1024x512x512 0.94x, 1x4096x4096 0.32x.
constexpr int64_t kMinRows = 2048;
constexpr int64_t kMinCols = 256;
constexpr int64_t kMinDepth = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The first 64-byte aligned float at or after p (buffers get 16 floats of slack for it):
// the microkernel's packed loads are aligned.
float* align64(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// A thread's buffer for a packed block of A, reused across calls.
float* packed_a_buffer() {
  thread_local std::vector<float> storage(kRowBlock * kDepth + 16);
  return align64(storage.data());
}

}  // namespace

bool gemm_f32_preferred(int64_t M, int64_t N, int64_t K) {
#if PYKERNELS_CPU_VEC_LOOPS
  return cpu_isa() == CpuIsa::Avx512 && M >= kMinRows && N >= kMinCols && K >= kMinDepth;
#else
  (void)M, (void)N, (void)K;
  return false;
#endif
}

namespace {

// The loops above, for C of M x N, where one packed B sliver of kGemmNr values per k covers
// `sliver_cols` of C's columns (32 for a product, 16 for a gated product: gate and up).
//   pack_b(k0, depth, col0, cols, packed): packs the slivers of C's columns [col0, col0 + cols)
//   macro(packed_a, packed_b, m0, rows, n0, cols, depth, accumulate, last): one row block
template <typename PackB, typename Macro>
void blocked_gemm(GemmOperand a, int64_t M, int64_t N, int64_t K, int64_t sliver_cols,
                  PackB&& pack_b, Macro&& macro) {
#if PYKERNELS_CPU_VEC_LOOPS
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t panel_max = kPanelCols / kGemmNr * sliver_cols;
  at::Tensor panel_storage =
      at::empty({kDepth * ceil_div(std::min(N, panel_max), sliver_cols) * kGemmNr + 16},
                at::TensorOptions().dtype(at::kFloat));
  float* packed_b = align64(panel_storage.data_ptr<float>());

  for (int64_t n0 = 0; n0 < N; n0 += panel_max) {
    const int64_t panel_cols = std::min(panel_max, N - n0);
    const int64_t slivers = ceil_div(panel_cols, sliver_cols);
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, K - k0);
      const bool last = k0 + depth == K;
      at::parallel_for(0, slivers, 1, [&](int64_t s0, int64_t s1) {
        pack_b(k0, depth, n0 + s0 * sliver_cols,
               std::min(panel_cols, s1 * sliver_cols) - s0 * sliver_cols,
               packed_b + s0 * kGemmNr * depth);
      });
      at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
        float* packed_a = packed_a_buffer();
        for (int64_t t = t0; t < t1; ++t) {
          // This thread's share of C's rows: whole row slivers, as even as they divide.
          const int64_t share = ceil_div(ceil_div(M, kGemmMr), threads) * kGemmMr;
          const int64_t m_begin = std::min(M, t * share);
          const int64_t m_end = std::min(M, m_begin + share);
          for (int64_t m0 = m_begin; m0 < m_end; m0 += kRowBlock) {
            const int64_t rows = std::min(kRowBlock, m_end - m0);
            gemm_pack_a_avx512(a.data + m0 * a.row_stride + k0 * a.col_stride, a.row_stride,
                               a.col_stride, rows, depth, packed_a);
            macro(packed_a, packed_b, m0, rows, n0, panel_cols, depth, k0 > 0, last);
          }
        }
      });
    }
  }
#else
  // Never called without the AVX-512 unit (gemm_f32_preferred is false); the lambdas that
  // name its entry points are then never instantiated out of line either.
  (void)a, (void)M, (void)N, (void)K, (void)sliver_cols, (void)pack_b, (void)macro;
  TORCH_CHECK(false, "pykernels: the CPU GEMM is not built into this extension");
#endif
}

}  // namespace

void gemm_f32(GemmOperand a, GemmOperand b, float* c, int64_t M, int64_t N, int64_t K,
              const GemmEpilogue& epilogue) {
  TORCH_CHECK(gemm_f32_preferred(M, N, K), "pykernels: gemm_f32 called where it does not run");
  blocked_gemm(
      a, M, N, K, kGemmNr,
      [&](int64_t k0, int64_t depth, int64_t col0, int64_t cols, float* packed) {
        gemm_pack_b_avx512(b.data + k0 * b.row_stride + col0 * b.col_stride, b.row_stride,
                           b.col_stride, depth, cols, packed);
      },
      [&](const float* packed_a, const float* packed_b, int64_t m0, int64_t rows, int64_t n0,
          int64_t cols, int64_t depth, bool accumulate, bool last) {
        GemmEpilogue ep = epilogue;
        if (ep.bias != nullptr) ep.bias += n0;
        if (ep.preact != nullptr) ep.preact += m0 * N + n0;
        gemm_macro_avx512(packed_a, packed_b, rows, cols, depth, c + m0 * N + n0, N,
                          accumulate, last ? &ep : nullptr);
      });
}

bool gemm_glu_f32_needs_gu(int64_t K) { return K > kDepth; }

GemmOperand gemm_operand(const at::Tensor& t) {
  return {t.data_ptr<float>(), t.stride(0), t.stride(1)};
}

void gemm_glu_f32(GemmOperand a, GemmOperand b, float* h, float* gu, int64_t M, int64_t N,
                  int64_t K, const GemmEpilogue& epilogue) {
  TORCH_CHECK(gemm_f32_preferred(M, 2 * N, K),
              "pykernels: gemm_glu_f32 called where it does not run");
  TORCH_CHECK(gu != nullptr || !gemm_glu_f32_needs_gu(K),
              "pykernels: gemm_glu_f32 needs its gu buffer at this depth");
  TORCH_CHECK(epilogue.preact == nullptr || epilogue.preact == gu,
              "pykernels: gemm_glu_f32 keeps [g | u] in gu only");
  blocked_gemm(
      a, M, N, K, kGemmNr / 2,
      [&](int64_t k0, int64_t depth, int64_t col0, int64_t cols, float* packed) {
        gemm_pack_b_glu_avx512(b.data + k0 * b.row_stride + col0 * b.col_stride, b.row_stride,
                               b.col_stride, depth, cols, N * b.col_stride, packed);
      },
      [&](const float* packed_a, const float* packed_b, int64_t m0, int64_t rows, int64_t n0,
          int64_t cols, int64_t depth, bool accumulate, bool last) {
        GemmEpilogue ep = epilogue;
        if (ep.bias != nullptr) ep.bias += n0;
        if (ep.preact != nullptr) ep.preact += m0 * 2 * N + n0;
        gemm_macro_glu_avx512(packed_a, packed_b, rows, cols, depth, h + m0 * N + n0,
                              gu != nullptr ? gu + m0 * 2 * N + n0 : nullptr, N, accumulate,
                              last ? &ep : nullptr);
      });
}

}  // namespace cpu
}  // namespace pykernels
