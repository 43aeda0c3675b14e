// Softmax-cross-entropy CUDA kernels. API, (A, C, B) layout and the math of one row:
// cross_entropy.h.
//
// Forward (cross_entropy_kernel, one launch). Every row is owned by a group of tpr threads, a
// power of two from 4 to 512 picked per launch from C (plan_rows): several rows per warp for
// small vocabularies, a warp, several warps, or a whole 512-thread block for a 128k vocab.
// The group
//   1. reads the row once, each thread keeping an online (max, sum of exp) in fp32 plus the
//      sums its target mode needs (Stats), all relative to the running max, so that a large
//      common offset (logits ~1e4) cancels exactly instead of in the final subtraction;
//   2. merges the per-thread states in a fixed tree, warp xor-shuffles and then shared memory
//      between the warps of a group (reduce_row). No atomics, and the partition of a row over
//      threads depends only on the sizes, the strides and the rows' 16-byte alignment, so
//      results are bitwise reproducible from run to run;
//   3. writes the row loss and, with a gradient, re-reads the row and writes the scaled
//      gradient. The re-read is meant to hit L2: a 512-thread group needs over 64 registers a
//      thread, i.e. a whole SM, so only about one large row per SM is in flight (a 128k bf16
//      vocabulary: 256 KiB per row, ~34 MiB over an H100, within its 50 MiB L2).
// In-place gradients (grad == logits): in pass 2 every element is read and then written by
// the same thread, and the one element another thread reads (the target logit, for the
// loss) is read before the merge's barrier, so no thread can see a gradient value.
//
// Access paths. A row with unit class stride, whose gradient row (if any) has unit stride and
// the same 16-byte phase, is walked as a scalar head up to its first 16-byte boundary, whole
// 16-byte vectors (batched, so several loads are in flight per thread), and a scalar tail.
// Any other row, e.g. the spatial (N, C, d) layout, walks its classes with scalar strided
// accesses; there the small groups are interleaved across lanes so that a warp reads
// neighbouring rows, i.e. neighbouring addresses.
//
// cross_entropy_scale_grad: a scalar scale is read once per block and a block whose scale is
// 1 returns at once; otherwise a flat 16-byte multiply. Per-row scales reuse the row groups;
// a group whose row scale is 1 skips the row.
#include "cross_entropy.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dtype.cuh"

namespace pykernels {
namespace cuda {
namespace {

using namespace detail;  // Elem, ceil_div, aligned16, Tag, valid_dtype, dispatch_dtype

constexpr int kMaxThreads = 512;  // largest row group, and the launch bound of the row kernels
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMinBlockThreads = 256;  // smaller groups share a block of this size
constexpr int kFlatThreads = 256;      // scale_all_kernel
constexpr int64_t kMaxFlatBlocks = 1 << 16;

template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte access

// The three kernel variants, so that each row only carries the sums it needs.
enum class Target {
  Index,        // index targets, no label smoothing
  IndexSmooth,  // index targets with label smoothing: also W and sum_c w_c s_c
  Prob,         // probability targets: also Q and sum_c w_c q'_c s_c
};

// exp for the softmax: the accurate expf for fp32 data. For fp16/bf16 data, the ex2-based
// __expf (relative error ~2^-21, far below their storage rounding) keeps the per-element
// instruction count low enough that a large-vocabulary row stays memory-bound.
template <typename T>
__device__ __forceinline__ float row_exp(float x) {
  if constexpr (std::is_same<T, float>::value) {
    return expf(x);
  } else {
    return __expf(x);
  }
}

// Reference point of the running sums for a running max m. An infinite m (an empty or all
// -inf prefix, or a +inf logit) would turn s - m into NaN for the other elements, so those
// sums are kept relative to 0 instead; the result is then -inf, +inf or NaN as the math says.
__device__ __forceinline__ float shift_of(float m) { return isinf(m) ? 0.0f : m; }

// Pass-1 state of a thread, then of a row. With r = shift_of(m):
//   sum = sum_c exp(s_c - r)
//   w   = sum_c w_c,        s1 = sum_c w_c (s_c - r)          (IndexSmooth)
//   q   = sum_c w_c q'_c,   d  = sum_c w_c q'_c (s_c - r)     (Prob)
// Plain aggregate: it lives in __shared__ memory too.
struct Stats {
  float m, sum, w, s1, q, d;
};

__device__ __forceinline__ Stats empty_stats() {
  return {-CUDART_INF_F, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
}

// Moves the sums of st to the reference of a new max m >= st.m. Explicit _rn operations: no
// FMA contraction, so merge() below is commutative to the bit.
template <typename T, Target M>
__device__ __forceinline__ void rebase(Stats& st, float m) {
  if (st.m == m) return;  // also -inf == -inf and +inf == +inf, where m - st.m is NaN
  st.sum = __fmul_rn(st.sum, row_exp<T>(st.m - m));
  const float dr = shift_of(m) - shift_of(st.m);
  if constexpr (M == Target::IndexSmooth) st.s1 = __fsub_rn(st.s1, __fmul_rn(dr, st.w));
  if constexpr (M == Target::Prob) st.d = __fsub_rn(st.d, __fmul_rn(dr, st.q));
  st.m = m;
}

// merge(a, b) == merge(b, a) bit for bit, so all lanes of a butterfly end up identical.
template <typename T, Target M>
__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  const float m = fmaxf(a.m, b.m);
  rebase<T, M>(a, m);
  rebase<T, M>(b, m);
  a.sum = __fadd_rn(a.sum, b.sum);
  if constexpr (M == Target::IndexSmooth) {
    a.w = __fadd_rn(a.w, b.w);
    a.s1 = __fadd_rn(a.s1, b.s1);
  }
  if constexpr (M == Target::Prob) {
    a.q = __fadd_rn(a.q, b.q);
    a.d = __fadd_rn(a.d, b.d);
  }
  return a;
}

// Adds a chunk of N (softcapped) logits s with weights w and smoothed targets q': one rescale
// per chunk at most, so about one exp per element.
template <typename T, Target M, int N>
__device__ __forceinline__ void absorb(Stats& st, const float* s, const float* w, const float* q) {
  float chunk_max = -CUDART_INF_F;  // fmaxf skips NaN: a NaN logit reaches the sum below
#pragma unroll
  for (int i = 0; i < N; ++i) chunk_max = fmaxf(chunk_max, s[i]);
  rebase<T, M>(st, fmaxf(st.m, chunk_max));
  const float r = shift_of(st.m);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float d = s[i] - r;
    st.sum += row_exp<T>(d);
    if constexpr (M == Target::IndexSmooth) {
      st.w += w[i];
      st.s1 = fmaf(w[i], d, st.s1);
    }
    if constexpr (M == Target::Prob) {
      const float wq = w[i] * q[i];
      st.q += wq;
      st.d = fmaf(wq, d, st.d);
    }
  }
}

template <Target M>
__device__ __forceinline__ Stats shfl_xor(Stats a, int offset) {
  constexpr unsigned kAll = 0xffffffffu;
  a.m = __shfl_xor_sync(kAll, a.m, offset);
  a.sum = __shfl_xor_sync(kAll, a.sum, offset);
  if constexpr (M == Target::IndexSmooth) {
    a.w = __shfl_xor_sync(kAll, a.w, offset);
    a.s1 = __shfl_xor_sync(kAll, a.s1, offset);
  }
  if constexpr (M == Target::Prob) {
    a.q = __shfl_xor_sync(kAll, a.q, offset);
    a.d = __shfl_xor_sync(kAll, a.d, offset);
  }
  return a;
}

// ---------------------------------------------------------------------------------------
// Row groups.

// This thread's place: pos within its row group, slot = the group's index within the block.
struct Group {
  int pos;
  int slot;
};

__device__ __forceinline__ Group row_group(int tpr) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (tpr >= 32) return {(warp % (tpr / 32)) * 32 + lane, warp / (tpr / 32)};
  // Several groups per warp, interleaved: lane = pos * groups_per_warp + group.
  const int per_warp = 32 / tpr;
  return {lane / per_warp, warp * per_warp + lane % per_warp};
}

// Merges the states of a row group; every thread of the group gets the same bits. Called by
// every thread of the block (it contains the block barrier of multi-warp groups). buf holds
// one Stats per warp and must not be rewritten before every thread has passed the next
// barrier (the caller alternates two buffers).
template <typename T, Target M>
__device__ __forceinline__ Stats reduce_row(Stats st, int tpr, Stats* buf) {
  const int lowest = tpr >= 32 ? 1 : 32 / tpr;  // xor offsets below this leave the group
  for (int offset = 16; offset >= lowest; offset /= 2) st = merge<T, M>(st, shfl_xor<M>(st, offset));
  if (tpr <= 32) {
    __syncwarp();  // orders the target-logit read before any gradient write of the row
    return st;
  }
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int warps = tpr / 32;
  if (lane == 0) buf[warp] = st;
  __syncthreads();
  // Every warp of the group merges the group's warp states itself (no second barrier).
  st = lane < warps ? buf[(warp / warps) * warps + lane] : empty_stats();
  for (int offset = 16; offset >= 1; offset /= 2) st = merge<T, M>(st, shfl_xor<M>(st, offset));
  return st;
}

// ---------------------------------------------------------------------------------------
// Element access.

// A chunk as loaded, before its use: the raw 16-byte words of a vector chunk of kVec<T>
// elements of type E (fp16/bf16 values stay packed, so a batch costs half the registers), or
// the fp32 value of a scalar chunk in words[0].x.
template <typename T, typename E>
struct Slot {
  static constexpr int kWords = kVec<T> * static_cast<int>(sizeof(E)) / 16;
  uint4 words[kWords];
};

template <typename E, int kWords>
union Packed {
  uint4 words[kWords];
  E e[kWords * 16 / sizeof(E)];
};

// Loads the chunk of N elements p[i * stride] (N == 1, or N == kVec<T>) into slot: with vec
// as 16-byte loads (then stride == 1 and p is 16-byte aligned).
template <typename T, int N, typename E>
__device__ __forceinline__ void fetch(const E* p, int64_t stride, bool vec, Slot<T, E>& slot) {
  constexpr int kWords = Slot<T, E>::kWords;
  if constexpr (N == 1) {
    slot.words[0].x = __float_as_uint(Elem<E>::to_float(*p));
  } else if (vec) {
#pragma unroll
    for (int j = 0; j < kWords; ++j) slot.words[j] = reinterpret_cast<const uint4*>(p)[j];
  } else {
    Packed<E, kWords> t;
#pragma unroll
    for (int i = 0; i < N; ++i) t.e[i] = p[i * stride];
#pragma unroll
    for (int j = 0; j < kWords; ++j) slot.words[j] = t.words[j];
  }
}

// The fp32 values of a fetched chunk.
template <typename T, int N, typename E>
__device__ __forceinline__ void unpack(const Slot<T, E>& slot, float* out) {
  constexpr int kWords = Slot<T, E>::kWords;
  if constexpr (N == 1) {
    out[0] = __uint_as_float(slot.words[0].x);
  } else {
    Packed<E, kWords> t;
#pragma unroll
    for (int j = 0; j < kWords; ++j) t.words[j] = slot.words[j];
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = Elem<E>::to_float(t.e[i]);
  }
}

// p[i] = v[i] rounded to T, i < N: N == 1, or N == kVec<T> as one 16-byte store (p aligned).
template <typename T, int N>
__device__ __forceinline__ void store(T* p, const float* v) {
  if constexpr (N == 1) {
    *p = Elem<T>::from_float(v[0]);
  } else {
    Packed<T, 1> t;
#pragma unroll
    for (int i = 0; i < N; ++i) t.e[i] = Elem<T>::from_float(v[i]);
    *reinterpret_cast<uint4*>(p) = t.words[0];
  }
}

// How a group walks the C elements of a row starting at p (class stride `stride`). With vec:
// `head` scalars up to p's first 16-byte boundary, whole 16-byte vectors, then the tail; a
// partner row handled with the same chunks (the gradient row of the logits) must then have
// unit stride and the same 16-byte phase. Otherwise: all scalars at the class stride.
struct RowSplit {
  int64_t C;
  int64_t head;
  bool vec;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* p, int64_t stride, const T* partner,
                                              int64_t partner_stride, int64_t C) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  bool vec = stride == 1 && addr % sizeof(T) == 0;
  if (partner != nullptr)
    vec = vec && partner_stride == 1 && (reinterpret_cast<uintptr_t>(partner) - addr) % 16 == 0;
  const int64_t head = static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(T));
  return {C, head < C ? head : C, vec};
}

// Chunk k < count of N elements starts at class first + k * N; thread pos of nthr takes
// k = pos, pos + nthr, ... U chunks at a time: all U loads are issued before the first use.
// A functor f provides f.load<N>(slot, c) and f.use<N>(slot, c), slot < U.
template <int N, int U, typename F>
__device__ __forceinline__ void visit_chunks(F& f, int64_t first, int64_t count, int64_t pos,
                                             int64_t nthr) {
  for (int64_t k0 = pos; k0 < count; k0 += U * nthr) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * nthr;
      if (k < count) f.template load<N>(u, first + k * N);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * nthr;
      if (k < count) f.template use<N>(u, first + k * N);
    }
  }
}

template <int V, int U, typename F>
__device__ __forceinline__ void walk_row(F& f, const RowSplit& rs, int pos, int nthr) {
  if (!rs.vec) {
    visit_chunks<1, U>(f, 0, rs.C, pos, nthr);
    return;
  }
  const int64_t nvec = (rs.C - rs.head) / V;
  const int64_t tail = rs.head + nvec * V;
  visit_chunks<1, 1>(f, 0, rs.head, pos, nthr);
  visit_chunks<V, U>(f, rs.head, nvec, pos, nthr);
  visit_chunks<1, 1>(f, tail, rs.C - tail, pos, nthr);
}

// ---------------------------------------------------------------------------------------
// Forward.

// The inputs of one row, chunk by chunk: logits, class weights (IndexSmooth and Prob; ones
// without weights) and probability targets (Prob).
template <typename T, Target M>
struct RowInputs {
  const T* x;
  int64_t xs;
  const float* w;  // nullptr: all ones
  bool w_vec;      // w 16-byte aligned at the vector chunks
  const T* q;
  int64_t qs;
  bool q_vec;  // q has the logits' chunking: unit stride, same 16-byte phase

  struct Slots {
    Slot<T, T> x;
    Slot<T, float> w;
    Slot<T, T> q;
  };

  template <int N>
  __device__ __forceinline__ void fetch_chunk(int64_t c, Slots& s) const {
    fetch<T, N>(x + c * xs, xs, true, s.x);  // vector chunks always fit the logits
    if constexpr (M != Target::Index) {
      if (w != nullptr) fetch<T, N>(w + c, 1, w_vec, s.w);
    }
    if constexpr (M == Target::Prob) fetch<T, N>(q + c * qs, qs, q_vec, s.q);
  }

  // The logits (softcapped when softcap > 0; then also th = tanh(x / softcap)), the weights
  // and the smoothed targets q'.
  template <int N>
  __device__ __forceinline__ void unpack_chunk(const Slots& s, float softcap, float keep,
                                               float eps_c, float* sv, float* th, float* wv,
                                               float* qv) const {
    unpack<T, N>(s.x, sv);
    if (softcap > 0.0f) {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        th[i] = tanhf(sv[i] / softcap);
        sv[i] = softcap * th[i];
      }
    }
    if constexpr (M != Target::Index) {
      if (w != nullptr) {
        unpack<T, N>(s.w, wv);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) wv[i] = 1.0f;
      }
    }
    if constexpr (M == Target::Prob) {
      unpack<T, N>(s.q, qv);
#pragma unroll
      for (int i = 0; i < N; ++i) qv[i] = fmaf(keep, qv[i], eps_c);
    }
  }
};

// 16-byte chunks a thread loads before using them: 64 bytes in flight per thread on the plain
// path, fewer where weights (and targets) are buffered alongside, so no variant spills.
template <Target M>
constexpr int kBatch = M == Target::Index ? 4 : (M == Target::IndexSmooth ? 2 : 1);

template <typename T, Target M>
struct Pass1 {
  RowInputs<T, M> in;
  float softcap, keep, eps_c;
  Stats st;
  typename RowInputs<T, M>::Slots slots[kBatch<M>];

  __device__ Pass1(const RowInputs<T, M>& in_, float softcap_, float keep_, float eps_c_)
      : in(in_), softcap(softcap_), keep(keep_), eps_c(eps_c_), st(empty_stats()) {}

  template <int N>
  __device__ __forceinline__ void load(int u, int64_t c) {
    in.template fetch_chunk<N>(c, slots[u]);
  }
  template <int N>
  __device__ __forceinline__ void use(int u, int64_t) {
    float sv[N], th[N], wv[N], qv[N];
    in.template unpack_chunk<N>(slots[u], softcap, keep, eps_c, sv, th, wv, qv);
    absorb<T, M, N>(st, sv, wv, qv);
  }
};

// Gradient constants of a row, already multiplied by the row's scale.
struct RowGrad {
  float shift, ls;  // p_c = exp((s_c - shift) - ls)
  float coef;       // coefficient of p_c
  float hit;        // (1 - eps) w_t, subtracted at c == t
  float per_w;      // eps / C (IndexSmooth) or 1 (Prob), times w_c (q'_c) subtracted
  int64_t t;
};

template <typename T, Target M>
struct Pass2 {
  RowInputs<T, M> in;
  T* g;
  int64_t gs;
  RowGrad k;
  float softcap, keep, eps_c;
  typename RowInputs<T, M>::Slots slots[kBatch<M>];

  __device__ Pass2(const RowInputs<T, M>& in_, T* g_, int64_t gs_, const RowGrad& k_,
                   float softcap_, float keep_, float eps_c_)
      : in(in_), g(g_), gs(gs_), k(k_), softcap(softcap_), keep(keep_), eps_c(eps_c_) {}

  template <int N>
  __device__ __forceinline__ void load(int u, int64_t c) {
    in.template fetch_chunk<N>(c, slots[u]);
  }
  template <int N>
  __device__ __forceinline__ void use(int u, int64_t c) {
    float sv[N], th[N], wv[N], qv[N], out[N];
    in.template unpack_chunk<N>(slots[u], softcap, keep, eps_c, sv, th, wv, qv);
    // Position of the target in this chunk, or -1: one 64-bit test per chunk.
    const int hit_at = static_cast<uint64_t>(k.t - c) < static_cast<uint64_t>(N)
                           ? static_cast<int>(k.t - c)
                           : -1;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float p = row_exp<T>((sv[i] - k.shift) - k.ls);
      float gv;
      if constexpr (M == Target::Prob) {
        gv = fmaf(p, k.coef, -k.per_w * (wv[i] * qv[i]));
      } else {
        gv = fmaf(p, k.coef, i == hit_at ? -k.hit : 0.0f);
        if constexpr (M == Target::IndexSmooth) gv = fmaf(-k.per_w, wv[i], gv);
      }
      out[i] = softcap > 0.0f ? gv * fmaf(-th[i], th[i], 1.0f) : gv;  // ds/dx = 1 - th^2
    }
    store<T, N>(g + c * gs, out);
  }
};

// Gradient row of an ignored (0) or invalid (NaN) target: written without reading anything.
template <typename T>
struct FillRow {
  T* g;
  int64_t gs;
  float v;
  template <int N>
  __device__ __forceinline__ void load(int, int64_t) {}
  template <int N>
  __device__ __forceinline__ void use(int, int64_t c) {
    float out[N];
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = v;
    store<T, N>(g + c * gs, out);
  }
};

template <typename T, Target M>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_kernel(const CrossEntropyArgs p, int64_t R, int tpr) {
  constexpr int V = kVec<T>;
  constexpr int U = kBatch<M>;
  __shared__ Stats red[2][kMaxWarps];
  const T* const logits = static_cast<const T*>(p.logits);
  const T* const target_prob = static_cast<const T*>(p.target_prob);
  T* const grad = static_cast<T*>(p.grad);
  const Group grp = row_group(tpr);
  const int64_t rows_per_block = blockDim.x / tpr;
  const float keep = 1.0f - p.label_smoothing;
  const float eps_c = p.C > 0 ? p.label_smoothing / static_cast<float>(p.C) : 0.0f;
  int parity = 0;
  // Uniform over the block: every thread reaches reduce_row's barrier in every iteration.
  for (int64_t r0 = blockIdx.x * rows_per_block; r0 < R;
       r0 += static_cast<int64_t>(gridDim.x) * rows_per_block, parity ^= 1) {
    const int64_t r = r0 + grp.slot;
    const bool active = r < R;
    const int64_t a = active ? r / p.B : 0;
    const int64_t b = active ? r - a * p.B : 0;
    const T* x = logits + (a * p.s_a + b * p.s_b);
    T* g = grad != nullptr ? grad + (a * p.g_a + b * p.g_b) : nullptr;

    // Index targets: ignored rows and targets outside [0, C) are never used as an index.
    bool compute = active;
    float fill = 0.0f;  // loss and gradient of a row that is not computed
    int64_t t = 0;
    float w_t = 1.0f, s_t = 0.0f;
    if constexpr (M != Target::Prob) {
      if (active) {
        t = p.target_index[r];
        if (t == p.ignore_index) {
          compute = false;
        } else if (t < 0 || t >= p.C) {
          compute = false;
          fill = CUDART_NAN_F;
        } else {
          if (p.class_weight != nullptr) w_t = p.class_weight[t];
          if (grp.pos == 0) s_t = Elem<T>::to_float(x[t * p.s_c]);  // for the loss only
        }
      }
    }

    Stats st = empty_stats();
    RowSplit rs{};
    RowInputs<T, M> in{};
    if (compute) {
      rs = split_row<T>(x, p.s_c, g, p.g_c, p.C);
      in.x = x;
      in.xs = p.s_c;
      in.w = p.class_weight;
      in.w_vec = p.class_weight != nullptr && aligned16(p.class_weight + rs.head);
      if constexpr (M == Target::Prob) {
        in.q = target_prob + (a * p.t_a + b * p.t_b);
        in.qs = p.t_c;
        in.q_vec = p.t_c == 1 &&
                   (reinterpret_cast<uintptr_t>(in.q) - reinterpret_cast<uintptr_t>(x)) % 16 == 0;
      }
      Pass1<T, M> f(in, p.softcap, keep, eps_c);
      walk_row<V, U>(f, rs, grp.pos, tpr);
      st = f.st;
    }
    st = reduce_row<T, M>(st, tpr, red[parity]);
    if (!active) continue;  // no barrier below

    if (!compute) {
      if (grp.pos == 0) p.loss_rows[r] = fill;
      if (g != nullptr) {
        FillRow<T> f{g, p.g_c, fill};
        walk_row<V, 4>(f, split_row<T>(g, p.g_c, nullptr, 0, p.C), grp.pos, tpr);
      }
      continue;
    }

    const float shift = shift_of(st.m);
    const float ls = logf(st.sum);  // lse = shift + ls
    const float lse = shift + ls;
    if (grp.pos == 0) {
      float loss;
      if constexpr (M == Target::Prob) {
        loss = p.C > 0 ? fmaf(st.q, ls, -st.d) : 0.0f;  // sum_c w q' (lse - s_c)
      } else {
        if (p.softcap > 0.0f) s_t = p.softcap * tanhf(s_t / p.softcap);
        loss = keep * w_t * (ls + (shift - s_t));  // (lse - s_t) without cancelling shift
        if constexpr (M == Target::IndexSmooth) loss = fmaf(eps_c, fmaf(st.w, ls, -st.s1), loss);
      }
      if (p.z_loss != 0.0f) loss = fmaf(p.z_loss * lse, lse, loss);
      p.loss_rows[r] = loss;
    }
    if (g == nullptr) continue;

    const float scale = p.scale[r * p.scale_stride];
    RowGrad k;
    k.shift = shift;
    k.ls = ls;
    k.t = t;
    float coef;
    if constexpr (M == Target::Prob) {
      coef = st.q;
      k.hit = 0.0f;
      k.per_w = scale;
    } else {
      coef = keep * w_t;
      if constexpr (M == Target::IndexSmooth) coef = fmaf(eps_c, st.w, coef);
      k.hit = keep * w_t * scale;
      k.per_w = eps_c * scale;
    }
    if (p.z_loss != 0.0f) coef = fmaf(2.0f * p.z_loss, lse, coef);
    k.coef = coef * scale;
    Pass2<T, M> f(in, g, p.g_c, k, p.softcap, keep, eps_c);
    walk_row<V, U>(f, rs, grp.pos, tpr);
  }
}

// ---------------------------------------------------------------------------------------
// Gradient scaling.

template <typename T, int U>
struct ScaleRow {
  T* g;
  int64_t gs;
  float s;
  Slot<T, T> slots[U];
  template <int N>
  __device__ __forceinline__ void load(int u, int64_t c) {
    fetch<T, N>(g + c * gs, gs, true, slots[u]);
  }
  template <int N>
  __device__ __forceinline__ void use(int u, int64_t c) {
    float v[N];
    unpack<T, N>(slots[u], v);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] *= s;
    store<T, N>(g + c * gs, v);
  }
};

// One scale for everything: the whole (contiguous) tensor as 16-byte chunks when aligned.
template <typename T>
__global__ void __launch_bounds__(kFlatThreads)
    scale_all_kernel(T* g, int64_t n, const float* scale, bool vec) {
  constexpr int V = kVec<T>;
  __shared__ float s_shared;
  if (threadIdx.x == 0) s_shared = *scale;
  __syncthreads();
  const float s = s_shared;
  if (s == 1.0f) return;  // the usual backward: no pass over the gradient
  ScaleRow<T, 4> f{g, 1, s};
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthr = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t nvec = vec ? n / V : 0;
  visit_chunks<V, 4>(f, 0, nvec, tid, nthr);
  visit_chunks<1, 4>(f, nvec * V, n - nvec * V, tid, nthr);
}

// One scale per row r = a * B + b, the row being g[a * C * B + b + c * B], c < C.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    scale_rows_kernel(T* g, int64_t R, int64_t C, int64_t B, const float* scale,
                      int64_t scale_stride, int tpr) {
  constexpr int V = kVec<T>;
  const Group grp = row_group(tpr);
  const int64_t rows_per_block = blockDim.x / tpr;
  for (int64_t r = blockIdx.x * rows_per_block + grp.slot; r < R;
       r += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const float s = scale[r * scale_stride];
    if (s == 1.0f) continue;
    const int64_t a = r / B;
    T* row = g + (a * C * B + (r - a * B));
    ScaleRow<T, 4> f{row, B, s};
    walk_row<V, 4>(f, split_row<T>(row, B, nullptr, 0, C), grp.pos, tpr);
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

struct RowPlan {
  int tpr;
  int threads;
  unsigned blocks;
};

// Threads per row: the largest power of two (4 to kMaxThreads) that still leaves every
// thread per_thread elements: four 16-byte vectors on unit-stride rows, 16 scalars otherwise.
template <typename T>
RowPlan plan_rows(int64_t R, int64_t C, bool unit_stride) {
  const int64_t per_thread = unit_stride ? 4 * kVec<T> : 16;
  int tpr = 4;
  while (tpr < kMaxThreads && 2 * tpr * per_thread <= C) tpr *= 2;
  const int threads = std::max(tpr, kMinBlockThreads);
  const int64_t blocks = std::min<int64_t>(ceil_div(R, threads / tpr), INT_MAX);  // grid-stride
  return {tpr, threads, static_cast<unsigned>(blocks)};
}

// *out = a * b for a, b >= 0; true when that overflows int64.
bool mul_overflows(int64_t a, int64_t b, int64_t* out) {
  if (a != 0 && b > INT64_MAX / a) return true;
  *out = a * b;
  return false;
}

bool finite_at_least_zero(float v) { return v >= 0.0f && std::isfinite(v); }

}  // namespace

cudaError_t cross_entropy_forward(const CrossEntropyArgs& args, cudaStream_t stream) {
  int64_t R = 0, n = 0;
  if (!valid_dtype(args.dtype) || args.A < 0 || args.C < 0 || args.B < 0 ||
      mul_overflows(args.A, args.B, &R) || mul_overflows(R, args.C, &n))
    return cudaErrorInvalidValue;
  if (!finite_at_least_zero(args.label_smoothing) || args.label_smoothing > 1.0f ||
      !finite_at_least_zero(args.z_loss) || !finite_at_least_zero(args.softcap))
    return cudaErrorInvalidValue;
  const bool prob = args.target_prob != nullptr;
  if (prob && args.target_index != nullptr) return cudaErrorInvalidValue;
  if (args.grad != nullptr) {
    if (args.scale_stride < 0) return cudaErrorInvalidValue;
    // In place only with the very same view (strides of size-1 dimensions do not matter).
    if (args.grad == args.logits &&
        ((args.A > 1 && args.g_a != args.s_a) || (args.C > 1 && args.g_c != args.s_c) ||
         (args.B > 1 && args.g_b != args.s_b)))
      return cudaErrorInvalidValue;
  }
  if (R == 0) return cudaSuccess;
  if (args.loss_rows == nullptr || (!prob && args.target_index == nullptr) ||
      (n > 0 && args.logits == nullptr) || (args.grad != nullptr && args.scale == nullptr))
    return cudaErrorInvalidValue;

  return dispatch_dtype(args.dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const RowPlan plan = plan_rows<T>(R, args.C, args.s_c == 1);
    void (*kernel)(CrossEntropyArgs, int64_t, int) =
        prob ? cross_entropy_kernel<T, Target::Prob>
             : (args.label_smoothing > 0.0f ? cross_entropy_kernel<T, Target::IndexSmooth>
                                            : cross_entropy_kernel<T, Target::Index>);
    kernel<<<plan.blocks, plan.threads, 0, stream>>>(args, R, plan.tpr);
    return cudaGetLastError();
  });
}

cudaError_t cross_entropy_scale_grad(DType dtype, void* grad, int64_t A, int64_t C, int64_t B,
                                     const float* scale, int64_t scale_stride,
                                     cudaStream_t stream) {
  int64_t R = 0, n = 0;
  if (!valid_dtype(dtype) || A < 0 || C < 0 || B < 0 || scale_stride < 0 ||
      mul_overflows(A, B, &R) || mul_overflows(R, C, &n))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (grad == nullptr || scale == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    T* g = static_cast<T*>(grad);
    if (scale_stride == 0) {
      const bool vec = aligned16(g);
      const int64_t chunks = vec ? n / kVec<T> + n % kVec<T> : n;
      const int64_t blocks = std::min(ceil_div(chunks, kFlatThreads), kMaxFlatBlocks);
      scale_all_kernel<T><<<static_cast<unsigned>(blocks), kFlatThreads, 0, stream>>>(g, n, scale,
                                                                                     vec);
    } else {
      const RowPlan plan = plan_rows<T>(R, C, B == 1);
      scale_rows_kernel<T><<<plan.blocks, plan.threads, 0, stream>>>(g, R, C, B, scale,
                                                                    scale_stride, plan.tpr);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace pykernels
