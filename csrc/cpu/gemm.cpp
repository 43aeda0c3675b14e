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

void gemm_f32(GemmOperand a, GemmOperand b, float* c, int64_t M, int64_t N, int64_t K,
              const GemmEpilogue& epilogue) {
#if PYKERNELS_CPU_VEC_LOOPS
  TORCH_CHECK(gemm_f32_preferred(M, N, K), "pykernels: gemm_f32 called where it does not run");
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  at::Tensor panel_storage =
      at::empty({kDepth * ceil_div(std::min(N, kPanelCols), kGemmNr) * kGemmNr + 16},
                at::TensorOptions().dtype(at::kFloat));
  float* packed_b = align64(panel_storage.data_ptr<float>());

  for (int64_t n0 = 0; n0 < N; n0 += kPanelCols) {
    const int64_t panel_cols = std::min(kPanelCols, N - n0);
    const int64_t slivers = ceil_div(panel_cols, kGemmNr);
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, K - k0);
      const bool last = k0 + depth == K;
      at::parallel_for(0, slivers, 1, [&](int64_t s0, int64_t s1) {
        gemm_pack_b_avx512(b.data + k0 * b.row_stride + (n0 + s0 * kGemmNr) * b.col_stride,
                           b.row_stride, b.col_stride, depth,
                           std::min(panel_cols, s1 * kGemmNr) - s0 * kGemmNr,
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
            GemmEpilogue ep = epilogue;
            if (ep.bias != nullptr) ep.bias += n0;
            if (ep.preact != nullptr) ep.preact += m0 * N + n0;
            gemm_macro_avx512(packed_a, packed_b, rows, panel_cols, depth, c + m0 * N + n0, N,
                              k0 > 0, last ? &ep : nullptr);
          }
        }
      });
    }
  }
#else
  (void)a, (void)b, (void)c, (void)M, (void)N, (void)K, (void)epilogue;
  TORCH_CHECK(false, "pykernels: gemm_f32 is not built into this extension");
#endif
}

}  // namespace cpu
}  // namespace pykernels
