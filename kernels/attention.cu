// Flash-style scaled dot-product attention CUDA kernels (sm_80+). API, layout and the math
// (scores, online softmax, dropout, the backward formulas) are in attention.h; this file
// refers to those formulas by name instead of repeating them.
//
// Four kernels, each on a one-dimensional grid (tiles of one head adjacent, so they share
// that head's K/V or Q/dO in L2):
//   forward_kernel:  one CTA per (z * Hq + h, tile of query rows). Its Q tile stays in shared
//                    memory; the K/V tiles of the rows' causal/window band stream through
//                    shared memory (tiles fully outside the band are never visited); an
//                    online softmax in fp32 (running max m, sum l per row) rescales the fp32
//                    output accumulator; out is written once, with lse = m + log l.
//   delta_kernel:    Delta_i = sum_e dO_ie out_ie in fp32, one warp per row, into the
//                    workspace.
//   dkdv_kernel:     one CTA per (z * Hkv + kv head, tile of keys). It keeps its K/V tile and
//                    fp32 dK/dV accumulators in shared memory and loops over the query heads
//                    of its GQA group and, per head, over the query tiles of the key tile's
//                    band, recomputing P = exp(s - lse): the group sum needs no atomics.
//   dq_kernel:       one CTA per query tile, looping over the band's key tiles: dq_i summed
//                    in a fixed order by one CTA.
// No kernel uses atomics, so the backward is deterministic by construction.
//
// Work split inside a CTA: every warp owns kWarpRows = 16 rows of the CTA's own tile (query
// rows, or keys for dkdv) and computes their products with the streamed tile on its own, so
// warps only meet at the block-wide tile loads. The per-warp products run on one of two
// cores (warp_mma):
//   * tensor cores (fp16/bf16): nvcuda::wmma 16x16x16 fragments, fp32 accumulators;
//   * SIMT (fp32): exact fp32 FFMA, no TF32.
// Score tiles go through shared memory in fp32, where the lanes of the warp apply the
// element-wise part (scale, softcap, mask, band, softmax or its gradient, dropout) one row at
// a time with lanes along the streamed dimension (coalesced mask reads in the forward and
// dQ). The running accumulators (out, dK, dV, dQ) also live in shared memory in fp32, which
// is what lets the forward rescale rows of a wmma accumulator (whose register layout is
// opaque) and keeps register use flat for head dims up to 256.
//
// Head dims: one instantiation per bucket kD in {32, 64, 128, 256} >= max(E, Ev); tiles are
// zero-padded beyond E / Ev (zeros add nothing to any product) and stores are masked.
// Lengths need not be multiples of any tile: rows and keys beyond L / S load as zeros and
// score -inf. Global offsets are int64.
#include "attention.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <utility>

#include "common/cp_async.cuh"
#include "common/dtype.cuh"
#include "common/philox.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/attention.cu needs sm_80 or newer (bf16 tensor cores, cp.async)"
#endif

namespace pykernels {
namespace cuda {
namespace {

using namespace detail;  // Elem, ceil_div, aligned16, Tag, valid_dtype, dispatch_dtype, cp_async_*

constexpr int kWarpRows = 16;  // rows per warp: one wmma fragment tall
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kMaxHeadDim = 256;
// Dynamic shared memory per CTA: configurations are chosen to fit the opt-in limit of
// sm_86/sm_89 (99 KiB), so every sm_80+ GPU runs them (sm_80 allows 163 KiB, sm_90 227 KiB:
// room for two CTAs per SM). Only where nothing fits (fp32 dK/dV for head dims > 128) the
// sm_80 limit applies; on GPUs with less, that launch reports the error.
constexpr int kSmemPortable = 99 * 1024;
constexpr int kSmemSm80 = 163 * 1024;

// ---------------------------------------------------------------------------------------
// Configuration and shared-memory layout.

enum class Pass { Forward, DkDv, Dq };

// One CTA: kWarps warps own kWarps * 16 rows; kStream rows of the other operand stream by.
struct TileConfig {
  int warps;
  int stream;
};

__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

// Byte offsets of the regions of one CTA's dynamic shared memory, each 128-byte aligned
// (wmma needs 32). Row pitches are padded by 16 bytes (element tiles) or 4 floats (fp32
// buffers): rows stay 16-byte aligned for cp.async and wmma, and consecutive rows start in
// different banks.
//   own tiles    (rows x kD elements):   forward Q; dQ pass Q, dO; dK/dV pass K, V
//   stream tiles (stream x kD elements): forward and dQ pass K, V; dK/dV pass Q, dO
//   score bufs   (rows x stream fp32):   forward S; backward S and dP
//   prob bufs    (rows x stream elems):  forward P; dQ pass dS; dK/dV pass P D/(1-p) and dS
//   accumulators (rows x kD fp32):       forward out; dQ pass dQ; dK/dV pass dK, dV
struct SmemLayout {
  int tile_ld = 0, score_ld = 0, prob_ld = 0, acc_ld = 0;  // row pitches, in elements
  int own = 0, own_size = 0;
  int stream = 0, stream_size = 0;
  int score = 0, score_size = 0;
  int prob = 0, prob_size = 0;
  int acc = 0, acc_size = 0;
  int bytes = 0;

  __host__ __device__ constexpr SmemLayout(Pass pass, int elem, int d, TileConfig c) {
    const int rows = c.warps * kWarpRows;
    const bool fwd = pass == Pass::Forward, dkdv = pass == Pass::DkDv;
    tile_ld = d + 16 / elem;
    score_ld = c.stream + 4;
    prob_ld = c.stream + 16 / elem;
    acc_ld = d + 4;
    own_size = align128(rows * tile_ld * elem);
    stream_size = align128(c.stream * tile_ld * elem);
    score_size = align128(rows * score_ld * 4);
    prob_size = align128(rows * prob_ld * elem);
    acc_size = align128(rows * acc_ld * 4);
    own = 0;
    stream = own + (fwd ? 1 : 2) * own_size;
    score = stream + 2 * stream_size;
    prob = score + (fwd ? 1 : 2) * score_size;
    acc = prob + (dkdv ? 2 : 1) * prob_size;
    bytes = acc + (dkdv ? 2 : 1) * acc_size;
  }
};

// The largest configuration whose shared memory fits the budget (above): 4 warps (64 own
// rows) and 64 streamed rows for small head dims, fewer rows as kD and the element size grow.
__host__ __device__ constexpr TileConfig pick_config(Pass pass, int elem, int d) {
  constexpr TileConfig kOptions[] = {{4, 64}, {4, 32}, {2, 32}, {2, 16}, {1, 16}};
  for (const int budget : {kSmemPortable, kSmemSm80})
    for (const TileConfig& c : kOptions)
      if (SmemLayout(pass, elem, d, c).bytes <= budget) return c;
  return {0, 0};
}

template <typename T, int kD, Pass kPass>
struct Config {
  static constexpr TileConfig kTiles = pick_config(kPass, static_cast<int>(sizeof(T)), kD);
  static_assert(kTiles.warps > 0, "no tile configuration fits sm_80's shared memory");
  static constexpr int kWarps = kTiles.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = kWarps * kWarpRows;  // own rows per CTA
  static constexpr int kStream = kTiles.stream;     // streamed rows per step
  static constexpr SmemLayout kSmem{kPass, static_cast<int>(sizeof(T)), kD, kTiles};
  static_assert(kStream % 32 == 0 || kStream == 16, "lanes walk the streamed dimension");
};

// ---------------------------------------------------------------------------------------
// Kernel arguments.

// A 4-D tensor (z, head, row, col) through element strides. vec: 16-byte cp.async loads are
// allowed (col stride 1, other strides multiples of 16 bytes, 16-byte aligned base; checked
// on the host).
template <typename T>
struct Strided {
  T* ptr;
  int64_t s[4];
  bool vec;
  __device__ __forceinline__ T* head(int64_t z, int64_t h) const { return ptr + z * s[0] + h * s[1]; }
};

template <typename T>
struct Problem {
  int64_t Hq, Hkv, group, L, S, E, Ev;
  Strided<const T> q, k, v, mask;  // mask.ptr == nullptr: none
  float scale, softcap, rescale;   // rescale = 1 / (1 - p) (1 without dropout)
  bool causal;
  int64_t left, right;  // window sides, -1 unbounded, at most L + S
  uint32_t threshold;   // dropout_threshold(p); 0: no dropout
  uint64_t seed, offset;
};

// ---------------------------------------------------------------------------------------
// Device helpers.

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

// Copies rows [row0, row0 + kRows) x columns [0, kD) of the matrix m(r, c) = src[r * rs + c
// * cs] (rows extent, cols extent) into a shared tile with pitch ld; everything outside
// [0, rows) x [0, cols) becomes zero, so partial tiles and padded head dims need no special
// case in the products. The caller commits and waits (cp.async) and synchronises.
//   vec:    one 16-byte cp.async per chunk of kVec columns (cs == 1);
//   scalar: one bounds-checked element at a time, any strides; consecutive threads take
//           consecutive columns, so unit-stride rows still coalesce.
template <int kRows, int kD, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, int ld, const T* src, int64_t rs, int64_t cs,
                                          int64_t row0, int64_t rows, int64_t cols, bool vec) {
  if (vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    constexpr int kChunksPerRow = kD / kVec;
#pragma unroll 2
    for (int ch = static_cast<int>(threadIdx.x); ch < kRows * kChunksPerRow; ch += kThreads) {
      const int r = ch / kChunksPerRow;
      const int c = (ch % kChunksPerRow) * kVec;
      const int64_t gr = row0 + r;
      const int64_t valid = (gr < rows && c < cols) ? (cols - c < kVec ? cols - c : kVec) : 0;
      const T* from = valid > 0 ? src + gr * rs + c : src;  // never read when valid == 0
      cp_async_16(tile + r * ld + c, from, static_cast<int>(valid * sizeof(T)));
    }
  } else {
#pragma unroll 1
    for (int e = static_cast<int>(threadIdx.x); e < kRows * kD; e += kThreads) {
      const int r = e / kD;
      const int c = e % kD;
      const int64_t gr = row0 + r;
      tile[r * ld + c] = (gr < rows && c < cols) ? src[gr * rs + c * cs] : Elem<T>::from_float(0.0f);
    }
  }
}

// Keys [n0, n0 + kN) of K and V of kv head (z, hk) into the shared stream tiles, once every
// warp is done with the previous ones; on return they (and any group committed before) are
// visible to the whole block. The forward and dQ kernels' loops over key tiles begin so.
template <int kN, int kD, int kThreads, typename T>
__device__ __forceinline__ void stream_kv_tile(T* k_tile, T* v_tile, int ld, const Problem<T>& p,
                                               int64_t z, int64_t hk, int64_t n0) {
  __syncthreads();
  load_tile<kN, kD, kThreads>(k_tile, ld, p.k.head(z, hk), p.k.s[2], p.k.s[3], n0, p.S, p.E,
                              p.k.vec);
  load_tile<kN, kD, kThreads>(v_tile, ld, p.v.head(z, hk), p.v.s[2], p.v.s[3], n0, p.S, p.Ev,
                              p.v.vec);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
}

// Zeroes one warp's 16 rows (pitch ld) of an fp32 accumulator. Only the owning warp ever
// touches its rows, so its lanes need no block-wide barrier before using them.
__device__ __forceinline__ void zero_warp_rows(float* rows, int ld) {
  for (int e = static_cast<int>(threadIdx.x) % 32; e < kWarpRows * ld; e += 32) rows[e] = 0.0f;
  __syncwarp();
}

// One warp: C (16 x kN, fp32, pitch ldc) = [C +] A (16 x kK, row-major, pitch lda) @ B
// (kK x kN), B read as B(k, n) = b[k * ldb + n] (kBRowMajor) or b[n * ldb + k]. All operands
// in shared memory; the caller __syncwarp()s before other lanes read C.
template <typename T, int kN, int kK, bool kBRowMajor>
__device__ __forceinline__ void warp_mma(float* c, int ldc, const T* a, int lda, const T* b,
                                         int ldb, bool accumulate) {
  static_assert(kN % 16 == 0 && kK % 16 == 0, "fragment multiples");
  if constexpr (std::is_same<T, float>::value) {
    // Lanes take consecutive columns of a row: A reads broadcast, row-major B reads are
    // conflict-free.
    const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll 1
    for (int o = lane; o < kWarpRows * kN; o += 32) {
      const int r = o / kN;
      const int n = o % kN;
      const float* ar = a + r * lda;
      float sum = accumulate ? c[r * ldc + n] : 0.0f;
#pragma unroll 8
      for (int k = 0; k < kK; ++k) sum = fmaf(ar[k], kBRowMajor ? b[k * ldb + n] : b[n * ldb + k], sum);
      c[r * ldc + n] = sum;
    }
  } else {
    namespace wmma = nvcuda::wmma;
    using BLayout = std::conditional_t<kBRowMajor, wmma::row_major, wmma::col_major>;
#pragma unroll 1
    for (int nf = 0; nf < kN; nf += 16) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, c + nf, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
#pragma unroll 4
      for (int kk = 0; kk < kK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
        wmma::load_matrix_sync(fa, a + kk, lda);
        wmma::load_matrix_sync(fb, kBRowMajor ? b + kk * ldb + nf : b + nf * ldb + kk, ldb);
        wmma::mma_sync(acc, fa, fb, acc);
      }
      wmma::store_matrix_sync(c + nf, acc, ldc, wmma::mem_row_major);
    }
  }
}

// Whether query i may attend key j (in bounds, causal, window; attention.h).
template <typename T>
__device__ __forceinline__ bool allowed(const Problem<T>& p, int64_t i, int64_t j) {
  return i < p.L && j < p.S && (!p.causal || j <= i) && (p.left < 0 || j >= i - p.left) &&
         (p.right < 0 || j <= i + p.right);
}

// t_ij: the scaled, softcapped score before the mask.
template <typename T>
__device__ __forceinline__ float capped(const Problem<T>& p, float dot) {
  const float s = p.scale * dot;
  return p.softcap > 0.0f ? p.softcap * tanhf(s / p.softcap) : s;
}

// s_ij: t plus the mask on allowed entries, -inf elsewhere (the mask is not read there).
template <typename T>
__device__ __forceinline__ float masked(const Problem<T>& p, const T* mask_zh, float t, int64_t i,
                                        int64_t j) {
  if (!allowed(p, i, j)) return -INFINITY;
  return mask_zh != nullptr ? t + Elem<T>::to_float(mask_zh[i * p.mask.s[2] + j * p.mask.s[3]])
                            : t;
}

template <typename T>
__device__ __forceinline__ bool kept(const Problem<T>& p, int64_t zh, int64_t i, int64_t j) {
  const uint64_t element =
      (static_cast<uint64_t>(zh) * static_cast<uint64_t>(p.L) + static_cast<uint64_t>(i)) *
          static_cast<uint64_t>(p.S) +
      static_cast<uint64_t>(j);
  return dropout_keep(p.seed, p.offset, element, p.threshold);
}

// P D / (1 - p) and dS of one score element (attention.h's backward), from the raw products
// dot = <q_i, k_j> and dp = <dO_i, v_j>. P = exp(s - lse) is 0 off the band and on fully
// masked rows (lse = +inf), so such entries pass no gradient.
struct ScoreGrad {
  float pd, ds;
};
template <typename T>
__device__ __forceinline__ ScoreGrad score_grad(const Problem<T>& p, const T* mask_zh, int64_t zh,
                                                int64_t i, int64_t j, float dot, float dp,
                                                float lse, float delta) {
  const float t = capped(p, dot);
  const float prob = expf(masked(p, mask_zh, t, i, j) - lse);
  float pd = prob;
  if (p.threshold != 0) {
    const bool keep = prob != 0.0f && kept(p, zh, i, j);  // dropped or zero: same result
    pd = keep ? prob * p.rescale : 0.0f;
    dp = keep ? dp * p.rescale : 0.0f;
  }
  float ds = prob * (dp - delta);
  if (p.softcap > 0.0f) {
    const float r = t / p.softcap;
    ds *= 1.0f - r * r;
  }
  return {pd, ds};
}

// Tiles [first, end) in steps of the tile size; first is a multiple of it.
struct TileRange {
  int64_t first, end;
};

// Keys the query rows [m0, m1] may attend (attention.h's band), from the first key tile
// that holds one.
template <typename T>
__device__ __forceinline__ TileRange key_range(const Problem<T>& p, int64_t m0, int64_t m1,
                                               int tile) {
  const int64_t lo = p.left >= 0 ? max(int64_t{0}, m0 - p.left) : 0;
  int64_t hi = p.S;
  if (p.causal) hi = min(hi, m1 + 1);
  if (p.right >= 0) hi = min(hi, m1 + p.right + 1);
  return {lo / tile * tile, hi};
}

// Query rows that may attend the keys [n0, n1], from the first query tile that holds one.
template <typename T>
__device__ __forceinline__ TileRange query_range(const Problem<T>& p, int64_t n0, int64_t n1,
                                                 int tile) {
  int64_t lo = p.causal ? n0 : 0;
  if (p.right >= 0) lo = max(lo, n0 - p.right);
  int64_t hi = p.L;
  if (p.left >= 0) hi = min(hi, n1 + p.left + 1);
  return {lo / tile * tile, hi};
}

// ---------------------------------------------------------------------------------------
// Forward: out and lse of one query tile (module comment). Lane r < 16 of each warp holds
// the running max m and sum l of the warp's row r.

template <typename T, int kD>
__global__ void __launch_bounds__(Config<T, kD, Pass::Forward>::kThreads)
    forward_kernel(const Problem<T> p, const Strided<T> out, float* __restrict__ lse) {
  using Cfg = Config<T, kD, Pass::Forward>;
  constexpr int kN = Cfg::kStream;
  constexpr SmemLayout kL = Cfg::kSmem;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem + kL.own);
  T* k_tile = reinterpret_cast<T*>(smem + kL.stream);
  T* v_tile = reinterpret_cast<T*>(smem + kL.stream + kL.stream_size);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  float* w_scores = reinterpret_cast<float*>(smem + kL.score) + warp * kWarpRows * kL.score_ld;
  T* w_probs = reinterpret_cast<T*>(smem + kL.prob) + warp * kWarpRows * kL.prob_ld;
  float* w_acc = reinterpret_cast<float*>(smem + kL.acc) + warp * kWarpRows * kL.acc_ld;
  const T* w_q = q_tile + warp * kWarpRows * kL.tile_ld;

  // Tiles of one head are adjacent; with causal masking the longest rows start first.
  const int64_t tiles = ceil_div(p.L, Cfg::kRows);
  const int64_t zh = blockIdx.x / tiles;
  int64_t tile = blockIdx.x % tiles;
  if (p.causal) tile = tiles - 1 - tile;
  const int64_t z = zh / p.Hq, h = zh % p.Hq, hk = h / p.group;
  const int64_t m0 = tile * Cfg::kRows;
  const int64_t row0 = m0 + warp * kWarpRows;  // this warp's first query row
  const T* mask_zh = p.mask.ptr != nullptr ? p.mask.head(z, h) : nullptr;

  zero_warp_rows(w_acc, kL.acc_ld);
  load_tile<Cfg::kRows, kD, Cfg::kThreads>(q_tile, kL.tile_ld, p.q.head(z, h), p.q.s[2], p.q.s[3],
                                           m0, p.L, p.E, p.q.vec);
  cp_async_commit();  // waited for with the first K/V tile, or after the loop
  float m_run = -INFINITY, l_run = 0.0f;
  const TileRange keys = key_range(p, m0, min(m0 + Cfg::kRows, p.L) - 1, kN);
  for (int64_t n0 = keys.first; n0 < keys.end; n0 += kN) {
    stream_kv_tile<kN, kD, Cfg::kThreads>(k_tile, v_tile, kL.tile_ld, p, z, hk, n0);
    if (row0 >= p.L) continue;  // warp-uniform: only padding rows (still joins the syncs)

    warp_mma<T, kN, kD, false>(w_scores, kL.score_ld, w_q, kL.tile_ld, k_tile, kL.tile_ld, false);
    __syncwarp();
    // Online softmax, one row at a time, lanes along the keys. While a row has seen nothing
    // finite its exponents are taken against 0: p = 0 and alpha = 0 (out stays 0).
#pragma unroll 1
    for (int r = 0; r < kWarpRows; ++r) {
      const int64_t i = row0 + r;
      float s[(kN + 31) / 32];
      float row_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < (kN + 31) / 32; ++u) {
        const int c = lane + 32 * u;
        s[u] = c < kN ? masked(p, mask_zh, capped(p, w_scores[r * kL.score_ld + c]), i, n0 + c)
                      : -INFINITY;
        row_max = fmaxf(row_max, s[u]);
      }
      row_max = warp_max(row_max);
      const float m_old = __shfl_sync(kFullMask, m_run, r);
      const float l_old = __shfl_sync(kFullMask, l_run, r);
      const float m_new = fmaxf(m_old, row_max);
      const float m_ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m_old - m_ref);
      float sum = 0.0f;
#pragma unroll
      for (int u = 0; u < (kN + 31) / 32; ++u) {
        const int c = lane + 32 * u;
        float pr = expf(s[u] - m_ref);
        sum += pr;  // the normaliser counts dropped entries too
        if (p.threshold != 0 && pr != 0.0f && !kept(p, zh, i, n0 + c)) pr = 0.0f;
        if (c < kN) w_probs[r * kL.prob_ld + c] = Elem<T>::from_float(pr);
      }
      sum = warp_sum(sum);
      if (lane == r) {
        m_run = m_new;
        l_run = l_old * alpha + sum;
      }
      for (int c = lane; c < kD; c += 32) w_acc[r * kL.acc_ld + c] *= alpha;
    }
    __syncwarp();
    warp_mma<T, kD, kN, true>(w_acc, kL.acc_ld, w_probs, kL.prob_ld, v_tile, kL.tile_ld, true);
    __syncwarp();
  }
  cp_async_wait<0>();  // nothing in flight at exit (an empty band never waited)

  if (row0 >= p.L) return;
  T* out_zh = out.head(z, h);
#pragma unroll 1
  for (int r = 0; r < kWarpRows; ++r) {
    const int64_t i = row0 + r;
    const float m = __shfl_sync(kFullMask, m_run, r);
    const float l = __shfl_sync(kFullMask, l_run, r);
    if (i >= p.L) break;  // warp-uniform
    const bool empty = !(l > 0.0f);  // no allowed finite score: out 0, lse +inf
    const float inv = empty ? 0.0f : p.rescale / l;
    for (int c = lane; c < p.Ev; c += 32)
      out_zh[i * out.s[2] + c * out.s[3]] = Elem<T>::from_float(w_acc[r * kL.acc_ld + c] * inv);
    if (lane == 0) lse[zh * p.L + i] = empty ? INFINITY : m + logf(l);
  }
}

// ---------------------------------------------------------------------------------------
// Backward (formulas: attention.h). Delta first, then dK/dV and dQ, which only read it.

constexpr int kDeltaWarps = 8;

// delta[row] = sum_e dO_ie out_ie for the flattened rows zh * L + i, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kDeltaWarps * 32)
    delta_kernel(const Strided<const T> out, const Strided<const T> dout, float* __restrict__ delta,
                 int64_t rows, int64_t Hq, int64_t L, int64_t Ev) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (row >= rows) return;  // warp-uniform
  const int64_t zh = row / L, i = row % L;
  const T* o = out.head(zh / Hq, zh % Hq) + i * out.s[2];
  const T* d = dout.head(zh / Hq, zh % Hq) + i * dout.s[2];
  float sum = 0.0f;
  for (int64_t c = lane; c < Ev; c += 32)
    sum = fmaf(Elem<T>::to_float(o[c * out.s[3]]), Elem<T>::to_float(d[c * dout.s[3]]), sum);
  sum = warp_sum(sum);
  if (lane == 0) delta[row] = sum;
}

// dK, dV of one key tile: each warp owns 16 keys; per query head of the group and query tile
// of the band: S^T = K Q^T, dP^T = V dO^T, then P D/(1-p) and dS element-wise (lanes along
// the queries), dV += (P D/(1-p))^T dO, dK += dS^T Q; finally dK *= scale.
template <typename T, int kD>
__global__ void __launch_bounds__(Config<T, kD, Pass::DkDv>::kThreads)
    dkdv_kernel(const Problem<T> p, const Strided<const T> dout, const float* __restrict__ lse,
                const float* __restrict__ delta, const Strided<T> dk, const Strided<T> dv) {
  using Cfg = Config<T, kD, Pass::DkDv>;
  constexpr int kM = Cfg::kStream;  // query rows per step
  constexpr SmemLayout kL = Cfg::kSmem;
  extern __shared__ __align__(128) unsigned char smem[];
  T* k_tile = reinterpret_cast<T*>(smem + kL.own);
  T* v_tile = reinterpret_cast<T*>(smem + kL.own + kL.own_size);
  T* q_tile = reinterpret_cast<T*>(smem + kL.stream);
  T* do_tile = reinterpret_cast<T*>(smem + kL.stream + kL.stream_size);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int score_off = warp * kWarpRows * kL.score_ld;
  float* w_s = reinterpret_cast<float*>(smem + kL.score) + score_off;
  float* w_dp = reinterpret_cast<float*>(smem + kL.score + kL.score_size) + score_off;
  const int prob_off = warp * kWarpRows * kL.prob_ld;
  T* w_pd = reinterpret_cast<T*>(smem + kL.prob) + prob_off;
  T* w_ds = reinterpret_cast<T*>(smem + kL.prob + kL.prob_size) + prob_off;
  const int acc_off = warp * kWarpRows * kL.acc_ld;
  float* w_dk = reinterpret_cast<float*>(smem + kL.acc) + acc_off;
  float* w_dv = reinterpret_cast<float*>(smem + kL.acc + kL.acc_size) + acc_off;
  const int tile_off = warp * kWarpRows * kL.tile_ld;

  const int64_t tiles = ceil_div(p.S, Cfg::kRows);
  const int64_t zk = blockIdx.x / tiles;
  const int64_t n0 = (blockIdx.x % tiles) * Cfg::kRows;
  const int64_t z = zk / p.Hkv, hk = zk % p.Hkv;
  const int64_t col0 = n0 + warp * kWarpRows;  // this warp's first key

  zero_warp_rows(w_dk, kL.acc_ld);
  zero_warp_rows(w_dv, kL.acc_ld);
  load_tile<Cfg::kRows, kD, Cfg::kThreads>(k_tile, kL.tile_ld, p.k.head(z, hk), p.k.s[2],
                                           p.k.s[3], n0, p.S, p.E, p.k.vec);
  load_tile<Cfg::kRows, kD, Cfg::kThreads>(v_tile, kL.tile_ld, p.v.head(z, hk), p.v.s[2],
                                           p.v.s[3], n0, p.S, p.Ev, p.v.vec);
  cp_async_commit();  // waited for with the first Q/dO tile, or after the loop
  const TileRange queries = query_range(p, n0, min(n0 + Cfg::kRows, p.S) - 1, kM);
#pragma unroll 1
  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g;
    const int64_t zh = z * p.Hq + h;
    const T* mask_zh = p.mask.ptr != nullptr ? p.mask.head(z, h) : nullptr;
    for (int64_t m0 = queries.first; m0 < queries.end; m0 += kM) {
      __syncthreads();  // every warp is done with the previous Q/dO tile
      load_tile<kM, kD, Cfg::kThreads>(q_tile, kL.tile_ld, p.q.head(z, h), p.q.s[2], p.q.s[3], m0,
                                       p.L, p.E, p.q.vec);
      load_tile<kM, kD, Cfg::kThreads>(do_tile, kL.tile_ld, dout.head(z, h), dout.s[2],
                                       dout.s[3], m0, p.L, p.Ev, dout.vec);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      if (col0 >= p.S) continue;  // warp-uniform: only padding keys (still joins the syncs)

      constexpr int kPerLane = (kM + 31) / 32;
      float row_lse[kPerLane], row_delta[kPerLane];
#pragma unroll
      for (int u = 0; u < kPerLane; ++u) {
        const int64_t i = m0 + lane + 32 * u;
        const bool ok = lane + 32 * u < kM && i < p.L;
        row_lse[u] = ok ? lse[zh * p.L + i] : INFINITY;  // +inf: P = 0 on padding rows
        row_delta[u] = ok ? delta[zh * p.L + i] : 0.0f;
      }
      warp_mma<T, kM, kD, false>(w_s, kL.score_ld, k_tile + tile_off, kL.tile_ld, q_tile,
                                 kL.tile_ld, false);
      warp_mma<T, kM, kD, false>(w_dp, kL.score_ld, v_tile + tile_off, kL.tile_ld, do_tile,
                                 kL.tile_ld, false);
      __syncwarp();
#pragma unroll 1
      for (int r = 0; r < kWarpRows; ++r) {
        const int64_t j = col0 + r;
#pragma unroll
        for (int u = 0; u < kPerLane; ++u) {
          const int c = lane + 32 * u;
          if (c >= kM) break;
          const int e = r * kL.score_ld + c;
          const ScoreGrad sg =
              score_grad(p, mask_zh, zh, m0 + c, j, w_s[e], w_dp[e], row_lse[u], row_delta[u]);
          w_pd[r * kL.prob_ld + c] = Elem<T>::from_float(sg.pd);
          w_ds[r * kL.prob_ld + c] = Elem<T>::from_float(sg.ds);
        }
      }
      __syncwarp();
      warp_mma<T, kD, kM, true>(w_dv, kL.acc_ld, w_pd, kL.prob_ld, do_tile, kL.tile_ld, true);
      warp_mma<T, kD, kM, true>(w_dk, kL.acc_ld, w_ds, kL.prob_ld, q_tile, kL.tile_ld, true);
      __syncwarp();
    }
  }
  cp_async_wait<0>();  // nothing in flight at exit (an empty band never waited)

  if (col0 >= p.S) return;
  T* dk_zk = dk.head(z, hk);
  T* dv_zk = dv.head(z, hk);
#pragma unroll 1
  for (int r = 0; r < kWarpRows; ++r) {
    const int64_t j = col0 + r;
    if (j >= p.S) break;
    for (int c = lane; c < p.E; c += 32)
      dk_zk[j * dk.s[2] + c * dk.s[3]] = Elem<T>::from_float(w_dk[r * kL.acc_ld + c] * p.scale);
    for (int c = lane; c < p.Ev; c += 32)
      dv_zk[j * dv.s[2] + c * dv.s[3]] = Elem<T>::from_float(w_dv[r * kL.acc_ld + c]);
  }
}

// dQ of one query tile: each warp owns 16 query rows; per key tile of the band: S = Q K^T,
// dP = dO V^T, dS element-wise (lanes along the keys), dQ += dS K; finally dQ *= scale.
template <typename T, int kD>
__global__ void __launch_bounds__(Config<T, kD, Pass::Dq>::kThreads)
    dq_kernel(const Problem<T> p, const Strided<const T> dout, const float* __restrict__ lse,
              const float* __restrict__ delta, const Strided<T> dq) {
  using Cfg = Config<T, kD, Pass::Dq>;
  constexpr int kN = Cfg::kStream;
  constexpr SmemLayout kL = Cfg::kSmem;
  extern __shared__ __align__(128) unsigned char smem[];
  T* q_tile = reinterpret_cast<T*>(smem + kL.own);
  T* do_tile = reinterpret_cast<T*>(smem + kL.own + kL.own_size);
  T* k_tile = reinterpret_cast<T*>(smem + kL.stream);
  T* v_tile = reinterpret_cast<T*>(smem + kL.stream + kL.stream_size);
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int score_off = warp * kWarpRows * kL.score_ld;
  float* w_s = reinterpret_cast<float*>(smem + kL.score) + score_off;
  float* w_dp = reinterpret_cast<float*>(smem + kL.score + kL.score_size) + score_off;
  T* w_ds = reinterpret_cast<T*>(smem + kL.prob) + warp * kWarpRows * kL.prob_ld;
  float* w_dq = reinterpret_cast<float*>(smem + kL.acc) + warp * kWarpRows * kL.acc_ld;
  const int tile_off = warp * kWarpRows * kL.tile_ld;

  const int64_t tiles = ceil_div(p.L, Cfg::kRows);
  const int64_t zh = blockIdx.x / tiles;
  int64_t tile = blockIdx.x % tiles;
  if (p.causal) tile = tiles - 1 - tile;
  const int64_t z = zh / p.Hq, h = zh % p.Hq, hk = h / p.group;
  const int64_t m0 = tile * Cfg::kRows;
  const int64_t row0 = m0 + warp * kWarpRows;
  const T* mask_zh = p.mask.ptr != nullptr ? p.mask.head(z, h) : nullptr;

  // Lane r < 16 holds lse and Delta of the warp's row r (+inf / 0 on padding rows: P = 0).
  const bool lane_row = lane < kWarpRows && row0 + lane < p.L;
  const float my_lse = lane_row ? lse[zh * p.L + row0 + lane] : INFINITY;
  const float my_delta = lane_row ? delta[zh * p.L + row0 + lane] : 0.0f;

  zero_warp_rows(w_dq, kL.acc_ld);
  load_tile<Cfg::kRows, kD, Cfg::kThreads>(q_tile, kL.tile_ld, p.q.head(z, h), p.q.s[2], p.q.s[3],
                                           m0, p.L, p.E, p.q.vec);
  load_tile<Cfg::kRows, kD, Cfg::kThreads>(do_tile, kL.tile_ld, dout.head(z, h), dout.s[2],
                                           dout.s[3], m0, p.L, p.Ev, dout.vec);
  cp_async_commit();  // waited for with the first K/V tile, or after the loop
  const TileRange keys = key_range(p, m0, min(m0 + Cfg::kRows, p.L) - 1, kN);
  for (int64_t n0 = keys.first; n0 < keys.end; n0 += kN) {
    stream_kv_tile<kN, kD, Cfg::kThreads>(k_tile, v_tile, kL.tile_ld, p, z, hk, n0);
    if (row0 >= p.L) continue;  // warp-uniform: only padding rows (still joins the syncs)

    warp_mma<T, kN, kD, false>(w_s, kL.score_ld, q_tile + tile_off, kL.tile_ld, k_tile,
                               kL.tile_ld, false);
    warp_mma<T, kN, kD, false>(w_dp, kL.score_ld, do_tile + tile_off, kL.tile_ld, v_tile,
                               kL.tile_ld, false);
    __syncwarp();
#pragma unroll 1
    for (int r = 0; r < kWarpRows; ++r) {
      const int64_t i = row0 + r;
      const float row_lse = __shfl_sync(kFullMask, my_lse, r);
      const float row_delta = __shfl_sync(kFullMask, my_delta, r);
#pragma unroll
      for (int u = 0; u < (kN + 31) / 32; ++u) {
        const int c = lane + 32 * u;
        if (c >= kN) break;
        const int e = r * kL.score_ld + c;
        const ScoreGrad sg =
            score_grad(p, mask_zh, zh, i, n0 + c, w_s[e], w_dp[e], row_lse, row_delta);
        w_ds[r * kL.prob_ld + c] = Elem<T>::from_float(sg.ds);
      }
    }
    __syncwarp();
    warp_mma<T, kD, kN, true>(w_dq, kL.acc_ld, w_ds, kL.prob_ld, k_tile, kL.tile_ld, true);
    __syncwarp();
  }
  cp_async_wait<0>();  // nothing in flight at exit (an empty band never waited)

  if (row0 >= p.L) return;
  T* dq_zh = dq.head(z, h);
#pragma unroll 1
  for (int r = 0; r < kWarpRows; ++r) {
    const int64_t i = row0 + r;
    if (i >= p.L) break;
    for (int c = lane; c < p.E; c += 32)
      dq_zh[i * dq.s[2] + c * dq.s[3]] = Elem<T>::from_float(w_dq[r * kL.acc_ld + c] * p.scale);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

template <typename T>
bool vec_ok(const void* ptr, const int64_t s[4]) {
  constexpr int64_t kVec = 16 / sizeof(T);
  return ptr != nullptr && aligned16(ptr) && s[3] == 1 && s[0] % kVec == 0 && s[1] % kVec == 0 &&
         s[2] % kVec == 0;
}

template <typename T, typename U>
Strided<T> strided(U* ptr, const int64_t s[4]) {
  Strided<T> t{static_cast<T*>(ptr), {s[0], s[1], s[2], s[3]}, false};
  t.vec = vec_ok<std::remove_const_t<T>>(ptr, s);
  return t;
}

int64_t clamp_window(int64_t side, int64_t reach) { return side < 0 ? -1 : (side < reach ? side : reach); }

template <typename T>
Problem<T> make_problem(const AttentionArgs& a) {
  const AttentionParams& o = a.params;
  Problem<T> p{};
  p.Hq = a.Hq;
  p.Hkv = a.Hkv;
  p.group = a.Hq / a.Hkv;
  p.L = a.L;
  p.S = a.S;
  p.E = a.E;
  p.Ev = a.Ev;
  p.q = strided<const T>(a.q, a.q_strides);
  p.k = strided<const T>(a.k, a.k_strides);
  p.v = strided<const T>(a.v, a.v_strides);
  p.mask = strided<const T>(a.mask, a.mask_strides);
  p.scale = static_cast<float>(o.scale);
  p.softcap = static_cast<float>(o.softcap);
  p.causal = o.causal;
  // A side of L + S or more bounds nothing; clamping keeps i + right, j + left far from
  // int64 overflow whatever the caller passes.
  p.left = clamp_window(o.window_left, a.L + a.S);
  p.right = clamp_window(o.window_right, a.L + a.S);
  p.threshold = o.dropout_p > 0 ? dropout_threshold(o.dropout_p) : 0;
  p.rescale = o.dropout_p > 0 ? static_cast<float>(1.0 / (1.0 - o.dropout_p)) : 1.0f;
  p.seed = o.seed;
  p.offset = o.offset;
  return p;
}

bool valid_args(const AttentionArgs& a) {
  if (!valid_dtype(a.dtype) || a.Z < 0 || a.Hq < 0 || a.Hkv < 1 || a.Hq % a.Hkv != 0 || a.L < 0 ||
      a.S < 0 || a.E < 1 || a.E > kMaxHeadDim || a.Ev < 1 || a.Ev > kMaxHeadDim)
    return false;
  const AttentionParams& o = a.params;
  if (o.window_left < -1 || o.window_right < -1 || !(o.dropout_p >= 0 && o.dropout_p < 1) ||
      !(o.softcap >= 0))
    return false;
  // int64 offsets: L + S and the element index of the dropout counter must not overflow.
  if (a.L > INT64_MAX / 4 || a.S > INT64_MAX / 4) return false;
  const bool has_q = a.Z > 0 && a.Hq > 0 && a.L > 0;
  const bool has_kv = a.Z > 0 && a.S > 0;
  return !(has_q && a.q == nullptr) && !(has_kv && (a.k == nullptr || a.v == nullptr));
}

// Calls f(std::integral_constant<int, kD>) with the head-dim bucket kD >= d.
template <typename F>
cudaError_t dispatch_head_dim(int64_t d, F&& f) {
  if (d <= 32) return f(std::integral_constant<int, 32>{});
  if (d <= 64) return f(std::integral_constant<int, 64>{});
  if (d <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// Launches kernel on `blocks` CTAs (none: nothing to do) with `smem` bytes of dynamic shared
// memory, raising the kernel's limit first (needed beyond 48 KiB).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), int64_t blocks, int threads, int smem,
                   cudaStream_t stream, Args&&... args) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;  // gridDim.x limit
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers (see attention.h).

cudaError_t attention_forward(const AttentionArgs& args, void* out, const int64_t out_strides[4],
                              float* lse, cudaStream_t stream) {
  if (!valid_args(args)) return cudaErrorInvalidValue;
  const int64_t rows = args.Z * args.Hq * args.L;
  if (rows == 0) return cudaSuccess;
  if (out == nullptr || lse == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_head_dim(args.E > args.Ev ? args.E : args.Ev, [&](auto dim) {
      constexpr int kD = decltype(dim)::value;
      using Cfg = Config<T, kD, Pass::Forward>;
      const int64_t blocks = args.Z * args.Hq * ceil_div(args.L, Cfg::kRows);
      return launch(forward_kernel<T, kD>, blocks, Cfg::kThreads, Cfg::kSmem.bytes, stream,
                    make_problem<T>(args), strided<T>(out, out_strides), lse);
    });
  });
}

size_t attention_backward_workspace_bytes(const AttentionArgs& args) {
  if (!valid_args(args)) return 0;
  return static_cast<size_t>(args.Z * args.Hq * args.L) * sizeof(float);
}

cudaError_t attention_backward(const AttentionArgs& args, const void* out,
                               const int64_t out_strides[4], const float* lse, const void* dout,
                               const int64_t dout_strides[4], void* dq,
                               const int64_t dq_strides[4], void* dk,
                               const int64_t dk_strides[4], void* dv,
                               const int64_t dv_strides[4], void* workspace,
                               cudaStream_t stream) {
  if (!valid_args(args)) return cudaErrorInvalidValue;
  const int64_t rows = args.Z * args.Hq * args.L;
  const int64_t keys = args.Z * args.Hkv * args.S;
  if ((rows > 0 && (out == nullptr || lse == nullptr || dout == nullptr || dq == nullptr ||
                    workspace == nullptr)) ||
      (keys > 0 && (dk == nullptr || dv == nullptr)))
    return cudaErrorInvalidValue;
  float* delta = static_cast<float*>(workspace);
  return dispatch_dtype(args.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const Strided<const T> o = strided<const T>(out, out_strides);
    const Strided<const T> d_o = strided<const T>(dout, dout_strides);
    cudaError_t err = launch(delta_kernel<T>, ceil_div(rows, kDeltaWarps), kDeltaWarps * 32, 0,
                             stream, o, d_o, delta, rows, args.Hq, args.L, args.Ev);
    if (err != cudaSuccess) return err;
    return dispatch_head_dim(args.E > args.Ev ? args.E : args.Ev, [&](auto dim) -> cudaError_t {
      constexpr int kD = decltype(dim)::value;
      const Problem<T> p = make_problem<T>(args);
      using KvCfg = Config<T, kD, Pass::DkDv>;
      const cudaError_t kv_err =
          launch(dkdv_kernel<T, kD>, args.Z * args.Hkv * ceil_div(args.S, KvCfg::kRows),
                 KvCfg::kThreads, KvCfg::kSmem.bytes, stream, p, d_o, lse,
                 static_cast<const float*>(delta), strided<T>(dk, dk_strides),
                 strided<T>(dv, dv_strides));
      if (kv_err != cudaSuccess) return kv_err;
      using QCfg = Config<T, kD, Pass::Dq>;
      return launch(dq_kernel<T, kD>, args.Z * args.Hq * ceil_div(args.L, QCfg::kRows),
                    QCfg::kThreads, QCfg::kSmem.bytes, stream, p, d_o, lse,
                    static_cast<const float*>(delta), strided<T>(dq, dq_strides));
    });
  });
}

}  // namespace cuda
}  // namespace pykernels
