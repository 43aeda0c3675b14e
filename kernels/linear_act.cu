// Fused linear + activation CUDA kernels. API and contracts: linear_act.h.
//
// One templated GEMM kernel (gemm_kernel) serves the forward, c = act(a @ b + bias) with an
// optional pre-activation store, and the backward GEMMs (epilogue = identity). Each operand
// is read through arbitrary (row, col) strides and staged in shared memory in whichever
// layout keeps its unit-stride global dimension contiguous, so 16-byte cp.async copies work
// for K-contiguous and M/N-contiguous ("transposed") operands alike. The staged tiles are
// consumed by one of two cores:
//   * tensor cores (fp16/bf16): nvcuda::wmma 16x16x16 fragments, fp32 accumulators;
//   * SIMT (fp32): exact fp32 FFMA (no TF32), an 8x8 micro-tile per thread.
// The backward elementwise pass (grad_preact_kernel) computes dZ = dY * act'(saved) and,
// optionally, deterministic bias-gradient column sums through a workspace.
//
// Framework-free: CUDA headers only. Global offsets are int64; tile counts go on gridDim.x.
#include "linear_act.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/cp_async.cuh"
#include "common/dtype.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kernels/linear_act.cu needs sm_80 or newer (bf16 tensor cores, cp.async)"
#endif

namespace pykernels {
namespace cuda {
namespace {

using namespace detail;  // Elem, ceil_div, aligned16, Tag, valid_dtype, dispatch_dtype, cp_async_*

// ---------------------------------------------------------------------------------------
// GEMM configuration. Block tile 128 x 128, 256 threads (8 warps).
//   tensor core: BK = 32; warps 2 (M) x 4 (N), 64 x 32 per warp = 4 x 2 wmma tiles.
//   SIMT:        BK = 16; threads 16 x 16, each owns rows ty + 16 i, cols tx + 16 j (i, j < 8).
// Two pipeline stages of (A tile + B tile) stay under the 48 KiB static shared memory limit
// (40 KiB at most), which leaves room for two resident blocks per SM.

template <typename T, bool kTensorCore>
struct GemmConfig {
  static constexpr int kThreads = 256;
  static constexpr int kBM = 128;
  static constexpr int kBN = 128;
  static constexpr int kBK = kTensorCore ? 32 : 16;
};

// Shared-memory tile of one operand: kMN (rows of A or columns of B) x kK values, stored
// "outer x inner" with the inner dimension contiguous: K-major tiles keep each row's K values
// contiguous (index mn * kLd + k), MN-major tiles keep each k's M/N values contiguous
// (index k * kLd + mn). Rows are padded by 16 bytes, which keeps every row 16-byte aligned for
// cp.async and staggers the rows across shared-memory banks.
template <typename T, int kMN, int kK, bool kKMajorTile>
struct Tile {
  static constexpr bool kKMajor = kKMajorTile;
  static constexpr int kInner = kKMajor ? kK : kMN;
  static constexpr int kOuter = kKMajor ? kMN : kK;
  static constexpr int kLd = kInner + 16 / static_cast<int>(sizeof(T));
  static constexpr int kElems = kOuter * kLd;
  static __device__ __forceinline__ int index(int mn, int k) {
    return kKMajor ? mn * kLd + k : k * kLd + mn;
  }
};

// A GEMM operand viewed as an (extent x K) matrix X(i, k) = ptr[i * stride_mn + k * stride_k]:
// A (M x K) as is, B (K x N) transposed, X(n, k) = B(k, n).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t stride_mn;
  int64_t stride_k;
  bool vec;  // 16-byte cp.async loads allowed (set by plan_operand on the host)
};

// c = act(a @ b + bias), written to out (M x N, contiguous); a @ b + bias also to preact when
// non-null. The backward GEMMs pass bias = preact = nullptr and act = None: c = a @ b.
template <typename T>
struct GemmParams {
  Operand<T> a;  // M x K
  Operand<T> b;  // B^T, N x K
  int64_t M, N, K;
  int64_t tiles_m, tiles_n;
  T* out;
  T* preact;
  const T* bias;
  Activation act;
  float slope;
  bool out_vec;  // out/preact 16-byte aligned and N * sizeof(T) % 16 == 0: vector stores allowed
};

// Copies the tile of operand `op` at (mn0, k0) into shared memory; elements outside
// [0, extent) x [0, K) become zero, so partial tiles need no special case in the math.
//   vec:    one 16-byte cp.async per chunk of kVec inner elements (inner stride 1, outer
//           stride a multiple of kVec, base 16-byte aligned: checked on the host);
//   scalar: one bounds-checked element at a time, any strides; consecutive threads take
//           consecutive inner elements, so unit-stride operands still coalesce.
template <typename Tile, int kThreads, typename T>
__device__ __forceinline__ void load_tile(const Operand<T>& op, int64_t extent, int64_t K,
                                          int64_t mn0, int64_t k0, T* tile) {
  const int64_t outer0 = Tile::kKMajor ? mn0 : k0;
  const int64_t inner0 = Tile::kKMajor ? k0 : mn0;
  const int64_t outer_end = Tile::kKMajor ? extent : K;
  const int64_t inner_end = Tile::kKMajor ? K : extent;
  const int64_t outer_stride = Tile::kKMajor ? op.stride_mn : op.stride_k;
  const int64_t inner_stride = Tile::kKMajor ? op.stride_k : op.stride_mn;
  if (op.vec) {
    constexpr int kVec = 16 / static_cast<int>(sizeof(T));
    constexpr int kChunksPerRow = Tile::kInner / kVec;
    constexpr int kChunks = Tile::kOuter * kChunksPerRow;
    // (a half-height GLU tile of 16-bit values with kBK = 16 has fewer chunks than threads)
    static_assert(Tile::kInner % kVec == 0 &&
                      (kChunks % kThreads == 0 || kThreads % kChunks == 0),
                  "tile/vector mismatch");
#pragma unroll
    for (int it = 0; it < (kChunks + kThreads - 1) / kThreads; ++it) {
      const int c = static_cast<int>(threadIdx.x) + it * kThreads;
      if (kChunks < kThreads && c >= kChunks) break;
      const int o = c / kChunksPerRow;
      const int i = (c % kChunksPerRow) * kVec;
      const int64_t go = outer0 + o;
      const int64_t gi = inner0 + i;
      const int64_t valid =
          (go < outer_end && gi < inner_end) ? (inner_end - gi < kVec ? inner_end - gi : kVec) : 0;
      const T* src = valid > 0 ? op.ptr + go * outer_stride + gi : op.ptr;  // inner stride 1
      cp_async_16(tile + o * Tile::kLd + i, src, static_cast<int>(valid * sizeof(T)));
    }
  } else {
    constexpr int kElems = Tile::kOuter * Tile::kInner;
    static_assert(kElems % kThreads == 0, "tile/thread mismatch");
#pragma unroll 1  // (unrolling lets the compiler hoist 64-bit offsets into many registers)
    for (int it = 0; it < kElems / kThreads; ++it) {
      const int e = static_cast<int>(threadIdx.x) + it * kThreads;
      const int o = e / Tile::kInner;
      const int i = e % Tile::kInner;
      const int64_t go = outer0 + o;
      const int64_t gi = inner0 + i;
      tile[o * Tile::kLd + i] = (go < outer_end && gi < inner_end)
                                    ? op.ptr[go * outer_stride + gi * inner_stride]
                                    : Elem<T>::from_float(0.0f);
    }
  }
}

// Streams K through a two-stage shared-memory pipeline: while tile kt is consumed by
// compute(A_tile, B_tile), tile kt + 1 is in flight into the other stage. K == 0 runs no
// iteration (the accumulators stay zero).
//
// kGlu (the gated linear unit): B is [B_gate | B_up] with N columns each, and the B tile of
// the output columns n0 .. n0 + kBN/2 - 1 holds their gate columns in its first kBN/2 rows
// and their up columns (N further on) in the last kBN/2, so one tile computes both
// accumulators of the same outputs. Each half is loaded as a tile of its own, bounded by N;
// the tile must be K-major, where the halves are contiguous with the same row pitch.
template <typename Cfg, typename TileA, typename TileB, bool kGlu, typename T, typename Compute>
__device__ __forceinline__ void gemm_mainloop(const GemmParams<T>& p, T* smem, int64_t m0,
                                              int64_t n0, Compute&& compute) {
  constexpr int kStage = TileA::kElems + TileB::kElems;
  auto load_stage = [&](int stage, int64_t k0) {
    T* base = smem + stage * kStage;
    load_tile<TileA, Cfg::kThreads>(p.a, p.M, p.K, m0, k0, base);
    if constexpr (kGlu) {
      using Half = Tile<T, Cfg::kBN / 2, Cfg::kBK, true>;
      static_assert(TileB::kKMajor && Half::kLd == TileB::kLd, "GLU tiles are K-major");
      Operand<T> up = p.b;
      up.ptr += p.N * p.b.stride_mn;
      load_tile<Half, Cfg::kThreads>(p.b, p.N, p.K, n0, k0, base + TileA::kElems);
      load_tile<Half, Cfg::kThreads>(up, p.N, p.K, n0, k0, base + TileA::kElems + Half::kElems);
    } else {
      load_tile<TileB, Cfg::kThreads>(p.b, p.N, p.K, n0, k0, base + TileA::kElems);
    }
  };
  const int64_t num_k_tiles = ceil_div(p.K, Cfg::kBK);
  if (num_k_tiles > 0) load_stage(0, 0);
  cp_async_commit();
  for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
    if (kt + 1 < num_k_tiles) load_stage(static_cast<int>((kt + 1) & 1), (kt + 1) * Cfg::kBK);
    cp_async_commit();   // (possibly empty) group for tile kt + 1
    cp_async_wait<1>();  // everything but that newest group has landed: tile kt is complete
    __syncthreads();     // ... for the copies and plain stores of every thread
    const T* stage = smem + static_cast<int>(kt & 1) * kStage;
    compute(stage, stage + TileA::kElems);
    __syncthreads();  // tile kt fully read before iteration kt + 1 refills its stage
  }
  cp_async_wait<0>();  // nothing in flight once the caller reuses shared memory
}

// Stores the first min(8, valid) of v to dst: two/four 16-byte vectors when `whole` (8 valid,
// dst 16-byte aligned), else element by element.
template <typename T>
__device__ __forceinline__ void store8(T* dst, const T* v, bool whole, int64_t valid) {
  if (whole) {
    constexpr int kWords = 8 * static_cast<int>(sizeof(T)) / 16;
#pragma unroll
    for (int w = 0; w < kWords; ++w)
      reinterpret_cast<uint4*>(dst)[w] = reinterpret_cast<const uint4*>(v)[w];
    return;
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    if (c >= valid) break;
    dst[c] = v[c];
  }
}

// Epilogue for the 8 columns n0 .. n0 + 7 of row m (m < M, n0 < N, n0 % 8 == 0), from the
// fp32 accumulators acc[0..8): z = acc + bias[n]; preact = z; out = act(z), each rounded once
// from fp32. 16-byte vector stores when the row segment is whole and out_vec holds, else
// per-element stores of the in-bounds columns.
template <typename T>
__device__ __forceinline__ void epilogue_store8(const GemmParams<T>& p, int64_t m, int64_t n0,
                                                const float* acc) {
  alignas(16) T z[8];
  alignas(16) T y[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float zc = acc[c];
    if (p.bias != nullptr && n0 + c < p.N) zc += Elem<T>::to_float(p.bias[n0 + c]);
    z[c] = Elem<T>::from_float(zc);
    y[c] = Elem<T>::from_float(activation_forward<float>(p.act, zc, p.slope));
  }
  const int64_t off = m * p.N + n0;
  const bool whole = p.out_vec && n0 + 8 <= p.N;
  store8(p.out + off, y, whole, p.N - n0);
  if (p.preact != nullptr) store8(p.preact + off, z, whole, p.N - n0);
}

// The GLU epilogue for the 8 output columns n0 .. n0 + 7 of row m, from the fp32 gate and up
// accumulators: g = gate + bias[n], u = up + bias[N + n]; out (M x N) = act(g) * u, and
// [g | u] to preact (M x 2N: g at n, u at N + n) when non-null, each rounded once.
template <typename T>
__device__ __forceinline__ void epilogue_store8_glu(const GemmParams<T>& p, int64_t m,
                                                    int64_t n0, const float* gate,
                                                    const float* up) {
  alignas(16) T g[8];
  alignas(16) T u[8];
  alignas(16) T h[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    float zg = gate[c], zu = up[c];
    if (p.bias != nullptr && n0 + c < p.N) {
      zg += Elem<T>::to_float(p.bias[n0 + c]);
      zu += Elem<T>::to_float(p.bias[p.N + n0 + c]);
    }
    g[c] = Elem<T>::from_float(zg);
    u[c] = Elem<T>::from_float(zu);
    h[c] = Elem<T>::from_float(activation_forward<float>(p.act, zg, p.slope) * zu);
  }
  const bool whole = p.out_vec && n0 + 8 <= p.N;
  store8(p.out + m * p.N + n0, h, whole, p.N - n0);
  if (p.preact != nullptr) {
    store8(p.preact + m * 2 * p.N + n0, g, whole, p.N - n0);
    store8(p.preact + m * 2 * p.N + p.N + n0, u, whole, p.N - n0);
  }
}

// Both cores hand their accumulators to the epilogue through shared memory, one slab of
// kSlabRows consecutive rows of the block tile at a time (fp32, kSlabLd floats per row); the
// block then finishes the slab in 8-column row segments, so stores are coalesced and, where
// allowed, 16-byte vectors whatever the core's register layout.
constexpr int kSlabRows = 64;
constexpr int kSlabLd = 128 + 4;  // kBN + 16 bytes of padding against bank conflicts

// kGlu: slab columns 0 .. kBN/2 - 1 hold the gate and kBN/2 .. kBN - 1 the up sums of the
// output columns n0 .. n0 + kBN/2 - 1.
template <typename Cfg, bool kGlu, typename T>
__device__ __forceinline__ void epilogue_slab(const GemmParams<T>& p, const float* slab,
                                              int64_t m_first, int64_t n0) {
  constexpr int kCols = kGlu ? Cfg::kBN / 2 : Cfg::kBN;  // output columns of the tile
  constexpr int kSegsPerRow = kCols / 8;
  static_assert((kSlabRows * kSegsPerRow) % Cfg::kThreads == 0, "slab/thread mismatch");
#pragma unroll 1
  for (int s = static_cast<int>(threadIdx.x); s < kSlabRows * kSegsPerRow; s += Cfg::kThreads) {
    const int r = s / kSegsPerRow;
    const int c = (s % kSegsPerRow) * 8;
    const int64_t m = m_first + r;
    const int64_t n = n0 + c;
    if (m >= p.M || n >= p.N) continue;
    if constexpr (kGlu)
      epilogue_store8_glu(p, m, n, slab + r * kSlabLd + c, slab + r * kSlabLd + kCols + c);
    else
      epilogue_store8(p, m, n, slab + r * kSlabLd + c);
  }
}

// C tile (tile_m, tile_n) of c = act(a @ b + bias): acc(m, n) = sum_k A(m, k) B(k, n) in fp32,
// then the epilogue above. Blocks are ordered in groups of 8 tile rows (column-major inside a
// group) so that blocks running together share A row panels and B column panels in L2.
// kGlu: the gated linear unit (see gemm_mainloop): a tile covers kBN/2 output columns.
template <typename T, bool kTensorCore, bool kAKMajor, bool kBKMajor, bool kGlu>
__global__ void __launch_bounds__(256, 2) gemm_kernel(const GemmParams<T> p) {
  using Cfg = GemmConfig<T, kTensorCore>;
  using TileA = Tile<T, Cfg::kBM, Cfg::kBK, kAKMajor>;
  using TileB = Tile<T, Cfg::kBN, Cfg::kBK, kBKMajor>;
  // Shared memory holds the two pipeline stages, and afterwards the fp32 epilogue slab.
  constexpr int kPipeBytes = 2 * (TileA::kElems + TileB::kElems) * static_cast<int>(sizeof(T));
  constexpr int kSlabBytes = kSlabRows * kSlabLd * static_cast<int>(sizeof(float));
  constexpr int kSmemBytes = kPipeBytes > kSlabBytes ? kPipeBytes : kSlabBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  static_assert(Cfg::kBN == 128 && Cfg::kBM % kSlabRows == 0, "slab shape");
  __shared__ __align__(128) unsigned char smem_raw[kSmemBytes];
  T* smem = reinterpret_cast<T*>(smem_raw);
  float* slab = reinterpret_cast<float*>(smem_raw);

  constexpr int64_t kGroupM = 8;
  const int64_t pid = blockIdx.x;
  const int64_t group_size = kGroupM * p.tiles_n;
  const int64_t first_m = (pid / group_size) * kGroupM;
  const int64_t group_rows = p.tiles_m - first_m < kGroupM ? p.tiles_m - first_m : kGroupM;
  const int64_t m0 = (first_m + (pid % group_size) % group_rows) * Cfg::kBM;
  const int64_t n0 = ((pid % group_size) / group_rows) * (kGlu ? Cfg::kBN / 2 : Cfg::kBN);

  if constexpr (kTensorCore) {
    namespace wmma = nvcuda::wmma;
    static_assert(!std::is_same<T, float>::value, "tensor-core path is fp16/bf16 only");
    // wmma needs 32-byte aligned fragment pointers: tiles and 16-row/16-k steps keep that.
    static_assert((TileA::kElems * sizeof(T)) % 32 == 0 && (TileB::kElems * sizeof(T)) % 32 == 0 &&
                      (TileA::kLd * sizeof(T)) % 16 == 0 && (TileB::kLd * sizeof(T)) % 16 == 0,
                  "wmma alignment");
    // matrix_a element (m, k): row_major at [m * ld + k] (K-major tile), col_major at
    // [k * ld + m]; matrix_b element (k, n): col_major at [n * ld + k] (K-major tile),
    // row_major at [k * ld + n].
    using ALayout = std::conditional_t<kAKMajor, wmma::row_major, wmma::col_major>;
    using BLayout = std::conditional_t<kBKMajor, wmma::col_major, wmma::row_major>;
    constexpr int kFragsM = 4, kFragsN = 2;  // warp tile 64 x 32
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int wm = (warp / 4) * 16 * kFragsM;
    const int wn = (warp % 4) * 16 * kFragsN;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragsM][kFragsN];
#pragma unroll
    for (int i = 0; i < kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    gemm_mainloop<Cfg, TileA, TileB, kGlu>(p, smem, m0, n0, [&](const T* As, const T* Bs) {
#pragma unroll 1  // unrolled, sm_90a bf16 spills a few bytes at the 128-register cap
      for (int kk = 0; kk < Cfg::kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[kFragsM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[kFragsN];
#pragma unroll
        for (int i = 0; i < kFragsM; ++i)
          wmma::load_matrix_sync(fa[i], As + TileA::index(wm + 16 * i, kk), TileA::kLd);
#pragma unroll
        for (int j = 0; j < kFragsN; ++j)
          wmma::load_matrix_sync(fb[j], Bs + TileB::index(wn + 16 * j, kk), TileB::kLd);
#pragma unroll
        for (int i = 0; i < kFragsM; ++i)
#pragma unroll
          for (int j = 0; j < kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    });

    // Epilogue, one 64-row slab at a time: slab pass q holds block rows 64 q .. 64 q + 63,
    // i.e. the accumulators of the 4 warps with wm == 64 q; all 256 threads finish it.
    __syncthreads();
#pragma unroll 1
    for (int q = 0; q < Cfg::kBM / kSlabRows; ++q) {
      if (wm == q * kSlabRows) {
#pragma unroll
        for (int i = 0; i < kFragsM; ++i)
#pragma unroll
          for (int j = 0; j < kFragsN; ++j)
            wmma::store_matrix_sync(slab + (16 * i) * kSlabLd + wn + 16 * j, acc[i][j], kSlabLd,
                                    wmma::mem_row_major);
      }
      __syncthreads();
      epilogue_slab<Cfg, kGlu>(p, slab, m0 + q * kSlabRows, n0);
      __syncthreads();  // slab is rewritten by the next pass
    }
  } else {
    const int tx = static_cast<int>(threadIdx.x) % 16;
    const int ty = static_cast<int>(threadIdx.x) / 16;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    gemm_mainloop<Cfg, TileA, TileB, kGlu>(p, smem, m0, n0, [&](const T* As, const T* Bs) {
#pragma unroll 2  // full unrolling batches shared loads across k and spills at 128 regs
      for (int k = 0; k < Cfg::kBK; ++k) {
        float a[8], b[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = Elem<T>::to_float(As[TileA::index(ty + 16 * i, k)]);
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = Elem<T>::to_float(Bs[TileB::index(tx + 16 * j, k)]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    });

    // Epilogue, one 64-row slab at a time: slab pass q holds block rows 64 q .. 64 q + 63,
    // which are this thread's rows ty + 16 i for i = 4 q .. 4 q + 3. (The passes are not
    // unrolled, so the epilogue code exists once; acc stays statically indexed.)
    constexpr int kIPerSlab = kSlabRows / 16;
    __syncthreads();
#pragma unroll 1
    for (int q = 0; q < Cfg::kBM / kSlabRows; ++q) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (i / kIPerSlab == q)
            slab[(16 * (i % kIPerSlab) + ty) * kSlabLd + tx + 16 * j] = acc[i][j];
      __syncthreads();
      epilogue_slab<Cfg, kGlu>(p, slab, m0 + q * kSlabRows, n0);
      __syncthreads();  // slab is rewritten by the next pass
    }
  }
}

// ---------------------------------------------------------------------------------------
// GEMM host side.

// Whether an operand's tile can be filled with 16-byte copies along its `inner` dimension.
template <typename T>
bool vec_loads_ok(const void* ptr, int64_t inner_stride, int64_t outer_stride,
                  int64_t outer_extent) {
  constexpr int64_t kVec = 16 / sizeof(T);
  return inner_stride == 1 && (outer_extent <= 1 || outer_stride % kVec == 0) && aligned16(ptr);
}

// Picks the operand's shared-memory layout and load path; returns true for a K-major tile.
// Prefers a vectorizable layout (K-major first); otherwise the layout whose unit-stride
// dimension is innermost, so the scalar loads still coalesce.
template <typename T>
bool plan_operand(Operand<T>& op, int64_t extent, int64_t K) {
  const bool k_vec = vec_loads_ok<T>(op.ptr, op.stride_k, op.stride_mn, extent);
  const bool mn_vec = vec_loads_ok<T>(op.ptr, op.stride_mn, op.stride_k, K);
  const bool k_major = k_vec || (!mn_vec && !(op.stride_mn == 1 && op.stride_k != 1));
  op.vec = k_major ? k_vec : mn_vec;
  return k_major;
}

template <typename T, bool kTensorCore, bool kGlu>
cudaError_t launch_gemm(GemmParams<T> p, cudaStream_t stream) {
  using Cfg = GemmConfig<T, kTensorCore>;
  p.tiles_m = ceil_div(p.M, Cfg::kBM);
  p.tiles_n = ceil_div(p.N, kGlu ? Cfg::kBN / 2 : Cfg::kBN);
  if (p.tiles_m > INT_MAX / p.tiles_n) return cudaErrorInvalidValue;  // gridDim.x limit
  p.out_vec = aligned16(p.out) && (p.preact == nullptr || aligned16(p.preact)) &&
              (p.N * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const bool a_k = plan_operand(p.a, p.M, p.K);
  const bool b_k = plan_operand(p.b, kGlu ? 2 * p.N : p.N, p.K);
  void (*kernel)(GemmParams<T>);
  if constexpr (kGlu) {
    // GLU tiles are K-major: the weight has unit stride along K, so b_k always holds.
    if (!b_k) return cudaErrorInvalidValue;
    kernel = a_k ? gemm_kernel<T, kTensorCore, true, true, true>
                 : gemm_kernel<T, kTensorCore, false, true, true>;
  } else {
    kernel = a_k ? (b_k ? gemm_kernel<T, kTensorCore, true, true, false>
                        : gemm_kernel<T, kTensorCore, true, false, false>)
                 : (b_k ? gemm_kernel<T, kTensorCore, false, true, false>
                        : gemm_kernel<T, kTensorCore, false, false, false>);
  }
  kernel<<<static_cast<unsigned>(p.tiles_m * p.tiles_n), Cfg::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Core selection: tensor cores for fp16/bf16, SIMT for fp32 (no TF32).
template <bool kGlu = false, typename T>
cudaError_t run_gemm(const GemmParams<T>& p, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return launch_gemm<T, !std::is_same<T, float>::value, kGlu>(p, stream);
}

// ---------------------------------------------------------------------------------------
// Backward elementwise pass.
//
// dZ[m, n] = dY[m, n] * act'(saved[m, n]) in fp32, stored rounded to T. With a bias, also
// db[n] = sum_m dZ[m, n] over the fp32 dZ values, reduced deterministically in two steps:
//   grad_preact_kernel:  block = 32 columns x 8 row lanes over one chunk of rows; lane ty
//                        sums rows ty, ty + 8, ... of the chunk, then the 8 lane sums are
//                        added in order and written to partial[chunk * N + n];
//   bias_grad_kernel:    db[n] = sum over chunks c = 0, 1, ... of partial[c * N + n].
// The row chunking depends on M only, so the result is bitwise reproducible for given sizes.

constexpr int kEwCols = 32;     // columns per block (one per lane: coalesced rows)
constexpr int kEwRowLanes = 8;  // blockDim.y
constexpr int64_t kBiasMaxChunks = 512;
constexpr int64_t kBiasMinChunkRows = 64;

int64_t bias_chunk_rows(int64_t M) {
  const int64_t rows = ceil_div(M, kBiasMaxChunks);
  return rows > kBiasMinChunkRows ? rows : kBiasMinChunkRows;
}
int64_t bias_num_chunks(int64_t M) { return M > 0 ? ceil_div(M, bias_chunk_rows(M)) : 0; }

// *dst = the sum of `sum` over the block's kEwRowLanes row lanes (in lane order) for this
// thread's column, when valid. Every thread of the block calls it (it synchronises).
__device__ __forceinline__ void store_lane_sums(float sum, float* dst, bool valid) {
  __shared__ float lane_sums[kEwRowLanes][kEwCols];
  __syncthreads();  // the reads of a previous call are done
  lane_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < kEwRowLanes; ++r) s += lane_sums[r][threadIdx.x];
    *dst = s;
  }
}

template <typename T>
__global__ void __launch_bounds__(kEwCols * kEwRowLanes)
    grad_preact_kernel(const T* __restrict__ grad_out, const T* __restrict__ saved,
                       T* __restrict__ grad_preact, float* __restrict__ partial, int64_t M,
                       int64_t N, int64_t chunk_rows, int64_t col_blocks, Activation act,
                       bool saved_is_output, float slope) {
  const int64_t chunk = blockIdx.x / col_blocks;
  const int64_t n = (blockIdx.x % col_blocks) * kEwCols + threadIdx.x;
  const int64_t row_begin = chunk * chunk_rows;
  const int64_t row_end = row_begin + chunk_rows < M ? row_begin + chunk_rows : M;
  float sum = 0.0f;
  if (n < N) {
#pragma unroll 4
    for (int64_t m = row_begin + threadIdx.y; m < row_end; m += kEwRowLanes) {
      const int64_t off = m * N + n;
      const float dz = Elem<T>::to_float(grad_out[off]) *
                       activation_grad<float>(act, Elem<T>::to_float(saved[off]),
                                              saved_is_output, slope);
      grad_preact[off] = Elem<T>::from_float(dz);
      sum += dz;
    }
  }
  if (partial == nullptr) return;  // uniform over the launch
  store_lane_sums(sum, partial + chunk * N + n, n < N);
}

// The GLU backward pass, blocked like grad_preact_kernel (each thread owns output column n
// of N and writes both of its columns in the 2N-wide rows). With h = act(g) u:
//   dg = d act(g) u / dg = dh * u * act'(g)   (relu: a select on g, activation_backward)
//   du =                   dh * act(g)
// dgu[m] = [dg | du] and, with partial, the chunk's fp32 column sums of both halves.
template <typename T>
__global__ void __launch_bounds__(kEwCols * kEwRowLanes)
    glu_grad_kernel(const T* __restrict__ grad_out, const T* __restrict__ gu,
                    T* __restrict__ dgu, float* __restrict__ partial, int64_t M, int64_t N,
                    int64_t chunk_rows, int64_t col_blocks, Activation act, float slope) {
  const int64_t chunk = blockIdx.x / col_blocks;
  const int64_t n = (blockIdx.x % col_blocks) * kEwCols + threadIdx.x;
  const int64_t row_begin = chunk * chunk_rows;
  const int64_t row_end = row_begin + chunk_rows < M ? row_begin + chunk_rows : M;
  float sum_g = 0.0f, sum_u = 0.0f;
  if (n < N) {
#pragma unroll 4
    for (int64_t m = row_begin + threadIdx.y; m < row_end; m += kEwRowLanes) {
      const int64_t off = m * 2 * N + n;
      const float dh = Elem<T>::to_float(grad_out[m * N + n]);
      const float g = Elem<T>::to_float(gu[off]);
      const float dg = activation_backward<false, float>(
          act, dh * Elem<T>::to_float(gu[off + N]), g, slope);
      const float du = dh * activation_forward<float>(act, g, slope);
      dgu[off] = Elem<T>::from_float(dg);
      dgu[off + N] = Elem<T>::from_float(du);
      sum_g += dg;
      sum_u += du;
    }
  }
  if (partial == nullptr) return;  // uniform over the launch
  store_lane_sums(sum_g, partial + chunk * 2 * N + n, n < N);
  store_lane_sums(sum_u, partial + chunk * 2 * N + N + n, n < N);
}

// db[n] = sum_{c < num_chunks} partial[c * N + n] in increasing c; 0 when M == 0.
template <typename T>
__global__ void bias_grad_kernel(const float* __restrict__ partial, T* __restrict__ grad_bias,
                                 int64_t num_chunks, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float s = 0.0f;
  for (int64_t c = 0; c < num_chunks; ++c) s += partial[c * N + n];
  grad_bias[n] = Elem<T>::from_float(s);
}

// ---------------------------------------------------------------------------------------
// Argument checks and dtype dispatch.

bool valid_activation(Activation a) {
  return static_cast<int>(a) >= 0 && static_cast<int>(a) < kNumActivations;
}

// The backward passes' arguments: the two inputs and the output are needed when (M, N)
// has elements, the workspace when the bias gradient is asked for too.
bool valid_grad_pass_args(DType dtype, Activation act, int64_t M, int64_t N, const void* in_a,
                          const void* in_b, const void* out, const void* grad_bias,
                          const void* workspace) {
  if (!valid_dtype(dtype) || !valid_activation(act) || M < 0 || N < 0) return false;
  const bool has_elems = M > 0 && N > 0;
  if (has_elems && (in_a == nullptr || in_b == nullptr || out == nullptr)) return false;
  return !(grad_bias != nullptr && has_elems && workspace == nullptr);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers (see linear_act.h). A pointer is required only when its tensor has elements.

namespace {

// The forward launchers' common body: out = act(input @ weight^T + bias), or for kGlu the
// gated act(input @ Wg^T + bg) * (input @ Wu^T + bu) with weight = [Wg; Wu] (2N rows).
template <bool kGlu>
cudaError_t forward_gemm(DType dtype, const void* input, int64_t input_row_stride,
                         const void* weight, const void* bias, void* out, void* preact,
                         int64_t M, int64_t N, int64_t K, Activation act, float negative_slope,
                         cudaStream_t stream) {
  if (!valid_dtype(dtype) || !valid_activation(act) || M < 0 || N < 0 || K < 0)
    return cudaErrorInvalidValue;
  if ((M > 0 && K > 0 && input == nullptr) || (N > 0 && K > 0 && weight == nullptr) ||
      (M > 0 && N > 0 && out == nullptr))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GemmParams<T> p{};
    p.a = {static_cast<const T*>(input), input_row_stride, 1, false};
    p.b = {static_cast<const T*>(weight), K, 1, false};  // X(n, k) = weight[n * K + k]
    p.M = M;
    p.N = N;
    p.K = K;
    p.out = static_cast<T*>(out);
    p.preact = static_cast<T*>(preact);
    p.bias = static_cast<const T*>(bias);
    p.act = act;
    p.slope = negative_slope;
    return run_gemm<kGlu>(p, stream);
  });
}

// The backward passes' common launch: launch(grid, partial, chunk_rows, col_blocks) runs the
// element-wise kernel over M rows of `cols` thread columns (blocks of kEwCols x kEwRowLanes),
// writing fp32 column partials of `width` columns per row chunk to partial (workspace) when
// grad_bias is non-null; then bias_grad_kernel adds them up (zeros when M == 0).
template <typename T, typename Launch>
cudaError_t run_grad_pass(int64_t M, int64_t cols, int64_t width, void* grad_bias,
                          void* workspace, cudaStream_t stream, Launch&& launch) {
  const int64_t num_chunks = bias_num_chunks(M);
  float* partial = grad_bias != nullptr ? static_cast<float*>(workspace) : nullptr;
  if (M > 0 && cols > 0) {
    const int64_t col_blocks = ceil_div(cols, kEwCols);
    if (num_chunks > INT_MAX / col_blocks) return cudaErrorInvalidValue;
    launch(static_cast<unsigned>(num_chunks * col_blocks), partial, bias_chunk_rows(M),
           col_blocks);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (grad_bias == nullptr) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(width, kThreads);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  bias_grad_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      partial, static_cast<T*>(grad_bias), num_chunks, width);
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_act_forward(DType dtype, const void* input, int64_t input_row_stride,
                               const void* weight, const void* bias, void* out, void* preact,
                               int64_t M, int64_t N, int64_t K, Activation act,
                               float negative_slope, cudaStream_t stream) {
  return forward_gemm<false>(dtype, input, input_row_stride, weight, bias, out, preact, M, N,
                             K, act, negative_slope, stream);
}

cudaError_t linear_glu_forward(DType dtype, const void* input, int64_t input_row_stride,
                               const void* weight, const void* bias, void* out, void* preact,
                               int64_t M, int64_t N, int64_t K, Activation act,
                               float negative_slope, cudaStream_t stream) {
  return forward_gemm<true>(dtype, input, input_row_stride, weight, bias, out, preact, M, N, K,
                            act, negative_slope, stream);
}

cudaError_t gemm(DType dtype, const void* a, int64_t a_row_stride, int64_t a_col_stride,
                 const void* b, int64_t b_row_stride, int64_t b_col_stride, void* c, int64_t M,
                 int64_t N, int64_t K, cudaStream_t stream) {
  if (!valid_dtype(dtype) || M < 0 || N < 0 || K < 0)
    return cudaErrorInvalidValue;
  if ((M > 0 && K > 0 && a == nullptr) || (K > 0 && N > 0 && b == nullptr) ||
      (M > 0 && N > 0 && c == nullptr))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    GemmParams<T> p{};
    p.a = {static_cast<const T*>(a), a_row_stride, a_col_stride, false};
    p.b = {static_cast<const T*>(b), b_col_stride, b_row_stride, false};  // X(n, k) = B(k, n)
    p.M = M;
    p.N = N;
    p.K = K;
    p.out = static_cast<T*>(c);
    p.act = Activation::None;
    return run_gemm(p, stream);
  });
}

size_t linear_act_grad_preact_workspace_bytes(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  return static_cast<size_t>(bias_num_chunks(M)) * static_cast<size_t>(N) * sizeof(float);
}

cudaError_t linear_act_grad_preact(DType dtype, const void* grad_out, const void* saved,
                                   bool saved_is_output, void* grad_preact, void* grad_bias,
                                   void* workspace, int64_t M, int64_t N, Activation act,
                                   float negative_slope, cudaStream_t stream) {
  if (!valid_grad_pass_args(dtype, act, M, N, grad_out, saved, grad_preact, grad_bias,
                            workspace))
    return cudaErrorInvalidValue;
  // act'(y) is only defined for the activations grad_from_output admits.
  if (saved_is_output && !grad_from_output(act, negative_slope)) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return run_grad_pass<T>(
        M, N, N, grad_bias, workspace, stream,
        [&](unsigned grid, float* partial, int64_t chunk_rows, int64_t col_blocks) {
          grad_preact_kernel<T><<<grid, dim3(kEwCols, kEwRowLanes), 0, stream>>>(
              static_cast<const T*>(grad_out), static_cast<const T*>(saved),
              static_cast<T*>(grad_preact), partial, M, N, chunk_rows, col_blocks, act,
              saved_is_output, negative_slope);
        });
  });
}

cudaError_t linear_glu_grad_preact(DType dtype, const void* grad_out, const void* gu,
                                   void* dgu, void* grad_bias, void* workspace, int64_t M,
                                   int64_t N, Activation act, float negative_slope,
                                   cudaStream_t stream) {
  if (!valid_grad_pass_args(dtype, act, M, N, grad_out, gu, dgu, grad_bias, workspace))
    return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return run_grad_pass<T>(
        M, N, 2 * N, grad_bias, workspace, stream,
        [&](unsigned grid, float* partial, int64_t chunk_rows, int64_t col_blocks) {
          glu_grad_kernel<T><<<grid, dim3(kEwCols, kEwRowLanes), 0, stream>>>(
              static_cast<const T*>(grad_out), static_cast<const T*>(gu), static_cast<T*>(dgu),
              partial, M, N, chunk_rows, col_blocks, act, negative_slope);
        });
  });
}

}  // namespace cuda
}  // namespace pykernels
