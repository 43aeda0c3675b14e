// Scaled dot-product attention on the CPU, tiled like FlashAttention-2 (math in
// kernels/attention.h): memory beyond inputs and outputs is two (query block x key block)
// tiles of scores per thread plus O(L) per head (Delta), never L x S.
//
// Parallel over independent units of work, each running ATen's GEMM on its own tiles on
// its own thread (inside at::parallel_for; SequentialBlas keeps MKL from threading it
// again). This replaces GEMMs batched over (Z, H) outside the parallel region with scalar
// element-wise passes between them (0.24x F.scaled_dot_product_attention fwd+bwd at B=4,
// H=8, L=S=512, E=64): here the element-wise row loops are SIMD (attention_simd.h) and a tile
// stays in cache from its GEMM through its row loop to the next GEMM. GQA reads kv head
// h / group in place (no expanded copy of K, V).
//
// Forward, per (z, head, block of kBlockQ query rows): walk the key blocks that meet the
// causal / window band of those rows; per tile S = q k^T (GEMM), then per row the scores
// (scale, softcap, mask; -inf outside the band), an online softmax (running max m, sum l,
// output row rescaled by exp(m_old - m_new)), dropout after the normaliser, and out += P v.
//
// Backward (Delta_i = <dO_i, out_i> first), per tile of query rows i and keys j:
//   S = q k^T, dP = dO v^T (GEMMs; the element-wise row loop then makes)
//   P = exp(x - lse),  s <- P D,  dp <- dS * dt/d(dot) = P (dP D - Delta) * scale * cap'
//   dv_j += sum_i (P D)_ij dO_i,  dk_j += sum_i dp_ij q_i,  dq_i += sum_j dp_ij k_j
// (D the scaled dropout keep mask, cap' = 1 - (t / softcap)^2). The dk, dv of a kv head
// sum over its group of query heads. Units of work: (z, kv head) when there are enough of
// them for the threads (one sweep: dq of the group's heads accumulates in the same unit);
// otherwise (z, kv head, key block) for dk, dv, then (z, head, query block) for dq (two
// sweeps, recomputing S and dP: 7 GEMMs instead of 5, but parallel over the sequence).
// Both walk the same aligned tiles and sum every gradient in the same order (dk, dv: heads
// of the group, then query blocks, ascending; dq: key blocks ascending), so the results do
// not depend on the thread count.
//
// Dropout regenerates the keep mask from (seed, offset, element index) with Philox-4x32-10.
#include "cpu/attention.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/attention_simd.h"
#include "common/philox.h"

namespace pykernels {
namespace cpu {
namespace {

// Tile sizes, measured at B=4, H=8, L=S=512, E=64 float32, 1 and 2 threads (Zen 4, MKL):
// one key tile for all 512 keys beat 128 and 256 (fewer, larger GEMMs; no rescaling), and
// 128 query rows were as fast as 256 in the mean (64 won causal, lost non-causal) while the
// backward's two tiles (512 KiB) still fit a 1 MiB L2.
constexpr int64_t kBlockQ = 128;  // query rows per tile
constexpr int64_t kBlockK = 512;  // keys per tile

// ---- dropout: the keep mask of kernels/common/philox.h, one draw per score element --------------

struct Philox {
  uint64_t seed, offset;
  uint32_t threshold;  // dropout_threshold(p)

  bool keep(uint64_t element) const { return dropout_keep(seed, offset, element, threshold); }
};

// The band, mask and dropout of one call: everything a tile needs beyond the dot products.
template <typename T>
struct Scores {
  const AttentionParams& p;
  int64_t Hq, L, S;
  const T* mask;  // null: none
  int64_t ms[4];
  Philox rng;

  // The band of row i: keys [lo, hi] (hi < lo: none).
  int64_t lo(int64_t i) const { return p.window_left < 0 ? 0 : std::max<int64_t>(0, i - p.window_left); }
  int64_t hi(int64_t i) const {
    int64_t h = S - 1;
    if (p.causal) h = std::min(h, i);
    if (p.window_right >= 0) h = std::min(h, i + p.window_right);
    return h;
  }
  // How row (z, h, i) scores its keys from j on.
  AttnRow<T> row(int64_t z, int64_t h, int64_t i, int64_t j) const {
    const T* m = mask == nullptr ? nullptr : mask + z * ms[0] + h * ms[1] + i * ms[2] + j * ms[3];
    return {static_cast<T>(p.scale), static_cast<T>(p.softcap), m, ms[3]};
  }
  // The keep factors (1 / (1 - p) kept, 0 dropped) of the keys [j, j + n) of row (z, h, i)
  // in buf; null when there is no dropout.
  const T* keep(T* buf, int64_t z, int64_t h, int64_t i, int64_t j, int64_t n) const {
    if (!(p.dropout_p > 0)) return nullptr;
    const T kept = static_cast<T>(1.0 / (1.0 - p.dropout_p));
    const uint64_t e = ((static_cast<uint64_t>(z) * Hq + h) * L + i) * S + j;
    for (int64_t c = 0; c < n; ++c) buf[c] = rng.keep(e + c) ? kept : T(0);
    return buf;
  }
};

template <typename T>
Scores<T> make_scores(const AttentionParams& p, const at::Tensor& q, int64_t S,
                      const std::optional<at::Tensor>& mask) {
  const Philox rng{p.seed, p.offset, dropout_threshold(p.dropout_p)};
  Scores<T> sc{p, q.size(1), q.size(2), S, nullptr, {0, 0, 0, 0}, rng};
  if (mask.has_value()) {
    sc.mask = mask->const_data_ptr<T>();
    for (int d = 0; d < 4; ++d) sc.ms[d] = mask->stride(d);
  }
  return sc;
}

// First and last key the rows [i0, i1) may attend, as [first, last].
template <typename T>
std::pair<int64_t, int64_t> key_range(const Scores<T>& sc, int64_t i0, int64_t i1) {
  return {sc.lo(i0), std::min(sc.S - 1, sc.hi(i1 - 1))};
}

// Rows of the query block [i0, i1) whose band meets the keys [j0, j1), as [first, last].
template <typename T>
std::pair<int64_t, int64_t> query_range(const Scores<T>& sc, int64_t i0, int64_t i1,
                                        int64_t j0, int64_t j1) {
  int64_t first = i0, last = i1 - 1;
  if (sc.p.causal) first = std::max(first, j0);
  if (sc.p.window_right >= 0) first = std::max<int64_t>(first, j0 - sc.p.window_right);
  if (sc.p.window_left >= 0) last = std::min<int64_t>(last, j1 - 1 + sc.p.window_left);
  return {first, last};
}

// ---- the row loops (attention_simd.h): scalar templates, SIMD for float32 ----------------

template <typename T>
T capped(const AttnRow<T>& r, T dot) {
  const T s = r.scale * dot;
  return r.softcap > 0 ? r.softcap * std::tanh(s / r.softcap) : s;
}

template <typename T>
T masked(const AttnRow<T>& r, T t, int64_t c) {
  return r.mask == nullptr ? t : t + r.mask[c * r.mask_stride];
}

template <typename T>
T scalar_scores_max(T* s, int64_t n, const AttnRow<T>& r) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    s[c] = masked(r, capped(r, s[c]), c);
    if (s[c] > m || std::isnan(s[c])) m = s[c];
  }
  return m;
}

template <typename T>
T scalar_exp_sum(T* s, int64_t n, T m, const T* keep) {
  T sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    const T e = std::exp(s[c] - m);
    sum += e;
    s[c] = keep == nullptr ? e : e * keep[c];
  }
  return sum;
}

template <typename T>
void scalar_grad_row(T* s, T* dp, int64_t n, const AttnRow<T>& r, T lse, T delta,
                     const T* keep) {
  for (int64_t c = 0; c < n; ++c) {
    const T t = capped(r, s[c]);
    const T prob = std::exp(masked(r, t, c) - lse);  // 0 where lse = +inf
    const T d = keep == nullptr ? T(1) : keep[c];
    const T cap_grad = r.softcap > 0 ? T(1) - (t / r.softcap) * (t / r.softcap) : T(1);
    s[c] = prob * d;
    dp[c] = prob * (dp[c] * d - delta) * cap_grad * r.scale;
  }
}

template <typename T>
struct RowOps {
  CpuIsa isa;  // Scalar for float64

  T scores_max(T* s, int64_t n, const AttnRow<T>& r) const {
    if constexpr (std::is_same<T, float>::value) {
      if (isa == CpuIsa::Avx512) return attn_scores_max_avx512(s, n, r);
      if (isa == CpuIsa::Avx2) return attn_scores_max_avx2(s, n, r);
    }
    return scalar_scores_max(s, n, r);
  }
  T exp_sum(T* s, int64_t n, T m, const T* keep) const {
    if constexpr (std::is_same<T, float>::value) {
      if (isa == CpuIsa::Avx512) return attn_exp_sum_avx512(s, n, m, keep);
      if (isa == CpuIsa::Avx2) return attn_exp_sum_avx2(s, n, m, keep);
    }
    return scalar_exp_sum(s, n, m, keep);
  }
  void grad_row(T* s, T* dp, int64_t n, const AttnRow<T>& r, T lse, T delta,
                const T* keep) const {
    if constexpr (std::is_same<T, float>::value) {
      if (isa == CpuIsa::Avx512) return attn_grad_row_avx512(s, dp, n, r, lse, delta, keep);
      if (isa == CpuIsa::Avx2) return attn_grad_row_avx2(s, dp, n, r, lse, delta, keep);
    }
    scalar_grad_row(s, dp, n, r, lse, delta, keep);
  }
};

template <typename T>
RowOps<T> row_ops() {
  return {std::is_same<T, float>::value ? cpu_isa() : CpuIsa::Scalar};
}

// ---- GEMMs on raw tiles -----------------------------------------------------------------

// The row-major (rows, cols) matrix at p with row stride ld, as a tensor view (no copy).
template <typename T>
at::Tensor mat(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// MKL, the BLAS of torch's x86 builds, threads a GEMM even when it is called inside
// at::parallel_for: its OpenMP driver opens a nested team per call, and at 2 threads 82% of
// the attention's CPU time went to libgomp spinning (perf). mkl_set_num_threads_local(1)
// makes the calling thread's MKL calls sequential (its C entry point: mkl_service.h maps the
// lower-case name to MKL_Set_Num_Threads_Local; the lower-case symbol is the Fortran one,
// which takes a pointer). Declared weak: with another BLAS (no such symbol in torch) it is
// null and the guard does nothing.
#if defined(__GNUC__) && defined(__ELF__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define PYKERNELS_MKL_LOCAL_THREADS MKL_Set_Num_Threads_Local
#else
#define PYKERNELS_MKL_LOCAL_THREADS nullptr
#endif

// While alive, this thread's BLAS calls run on this thread alone.
class SequentialBlas {
 public:
  SequentialBlas() {
    if (auto set = PYKERNELS_MKL_LOCAL_THREADS) previous_ = set(1);
  }
  ~SequentialBlas() {
    if (auto set = PYKERNELS_MKL_LOCAL_THREADS) set(previous_);  // 0: back to the global setting
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;

 private:
  int previous_ = 0;
};

// c = a b, or c += a b: ATen's CPU GEMM straight from its structured kernels (no dispatcher
// or autograd on the way); called inside at::parallel_for under a SequentialBlas.
void gemm(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate)
    at::cpu::addmm_out(c, c, a, b);
  else
    at::cpu::mm_out(c, a, b);
}

// Per-thread scratch: score tiles and one row of keep factors, allocated once per chunk of
// work, never per tile. From ATen's allocator, so 64-byte aligned whatever the chunking:
// MKL promises reproducible results only for aligned buffers, and the results must not
// depend on the thread count.
template <typename T>
struct Scratch {
  at::Tensor storage;
  T *s, *dp, *keep;
  explicit Scratch(bool backward)
      : storage(at::empty({(backward ? 2 : 1) * kBlockQ * kBlockK + kBlockK},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))),
        s(storage.data_ptr<T>()),
        dp(backward ? s + kBlockQ * kBlockK : nullptr),
        keep(s + (backward ? 2 : 1) * kBlockQ * kBlockK) {}
};

// The allowed keys of row i inside the tile's keys [j0, j0 + cols), as tile columns [a, b).
template <typename T>
std::pair<int64_t, int64_t> row_columns(const Scores<T>& sc, int64_t i, int64_t j0,
                                        int64_t cols) {
  const int64_t a = std::max(sc.lo(i), j0) - j0;
  const int64_t b = std::min(sc.hi(i) + 1, j0 + cols) - j0;
  return {a, std::max(a, b)};
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const Scores<T>& sc, at::Tensor& out, at::Tensor& lse) {
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3), group = Hq / Hkv;
  const int64_t blocks = (L + kBlockQ - 1) / kBlockQ;
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  T* lse_p = lse.data_ptr<T>();
  const RowOps<T> ops = row_ops<T>();
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, Z * Hq * blocks, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    Scratch<T> buf(false);
    T m[kBlockQ], l[kBlockQ];  // running max and sum per row of the block
    for (int64_t task = begin; task < end; ++task) {
      const int64_t zh = task / blocks, z = zh / Hq, h = zh % Hq;
      const int64_t i0 = task % blocks * kBlockQ, i1 = std::min(L, i0 + kBlockQ);
      const int64_t kv = z * Hkv + h / group;
      const T* qh = qp + zh * L * E;
      const T* kh = kp + kv * S * E;
      const T* vh = vp + kv * S * Ev;
      T* oh = out_p + zh * L * Ev;
      std::fill(oh + i0 * Ev, oh + i1 * Ev, T(0));
      std::fill(m, m + kBlockQ, kNegInf);
      std::fill(l, l + kBlockQ, T(0));
      const auto [j_first, j_last] = key_range(sc, i0, i1);
      for (int64_t j0 = j_first; j0 <= j_last; j0 += kBlockK) {
        const int64_t cols = std::min(j_last + 1, j0 + kBlockK) - j0;
        const auto [r0, r1] = query_range(sc, i0, i1, j0, j0 + cols);
        if (r1 < r0) continue;
        const int64_t rows = r1 - r0 + 1;
        T* s = buf.s;
        gemm(mat(s, rows, cols, cols), mat(qh + r0 * E, rows, E, E),
             mat(kh + j0 * E, cols, E, E).t(), false);
        for (int64_t i = r0; i <= r1; ++i) {
          T* srow = s + (i - r0) * cols;
          const auto [a, b] = row_columns(sc, i, j0, cols);
          T& mi = m[i - i0];
          const T mx = ops.scores_max(srow + a, b - a, sc.row(z, h, i, j0 + a));
          const T m_new = (mx > mi || std::isnan(mx)) ? mx : mi;  // NaN scores: a NaN row
          if (m_new == kNegInf) {  // nothing allowed yet: this tile adds nothing
            std::fill(srow, srow + cols, T(0));
            continue;
          }
          const T* keep = sc.keep(buf.keep, z, h, i, j0 + a, b - a);
          const T sum = ops.exp_sum(srow + a, b - a, m_new, keep);  // dropout after the sum
          std::fill(srow, srow + a, T(0));
          std::fill(srow + b, srow + cols, T(0));
          const T correction = std::exp(mi - m_new);  // 0 when m was -inf
          l[i - i0] = l[i - i0] * correction + sum;
          mi = m_new;
          if (correction != T(1))
            for (T *o = oh + i * Ev, *o_end = o + Ev; o < o_end; ++o) *o *= correction;
        }
        gemm(mat(oh + r0 * Ev, rows, Ev, Ev), mat(s, rows, cols, cols),
             mat(vh + j0 * Ev, cols, Ev, Ev), true);
      }
      for (int64_t i = i0; i < i1; ++i) {
        const T li = l[i - i0];
        const bool empty = li == T(0);  // fully masked row: 0 out, +inf lse (NaN stays NaN)
        for (T *o = oh + i * Ev, *o_end = o + Ev; o < o_end; ++o) *o = empty ? T(0) : *o / li;
        lse_p[zh * L + i] = empty ? std::numeric_limits<T>::infinity() : m[i - i0] + std::log(li);
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const Scores<T>& sc, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3), group = Hq / Hkv;
  const int64_t q_blocks = (L + kBlockQ - 1) / kBlockQ, k_blocks = (S + kBlockK - 1) / kBlockK;
  const T *qp = q.const_data_ptr<T>(), *kp = k.const_data_ptr<T>(), *vp = v.const_data_ptr<T>();
  const T *dop = dout.const_data_ptr<T>(), *lse_p = lse.const_data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const RowOps<T> ops = row_ops<T>();

  // Delta_i = <dO_i, out_i>, summed in index order.
  std::vector<T> delta(Z * Hq * L);
  const T* outp = out.const_data_ptr<T>();
  at::parallel_for(0, Z * Hq * L, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T acc = 0;
      for (int64_t e = 0; e < Ev; ++e) acc += dop[r * Ev + e] * outp[r * Ev + e];
      delta[r] = acc;
    }
  });

  // The tile of head (z, h): query rows of block qb that meet key block kb, and the keys of
  // kb their bands reach; false when empty. The one definition both sweeps use.
  struct Tile {
    int64_t i0, rows, j0, cols;
  };
  auto tile_of = [&](int64_t qb, int64_t kb, Tile& t) {
    const int64_t i0 = qb * kBlockQ, i1 = std::min(L, i0 + kBlockQ);
    const int64_t j0 = kb * kBlockK, j1 = std::min(S, j0 + kBlockK);
    const auto [r0, r1] = query_range(sc, i0, i1, j0, j1);
    if (r1 < r0) return false;
    const auto [k0, k1] = key_range(sc, r0, r1 + 1);
    t = {r0, r1 - r0 + 1, std::max(j0, k0), std::min(j1 - 1, k1) - std::max(j0, k0) + 1};
    return t.cols > 0;
  };
  // One tile: recompute P and dS, then accumulate dk and dv (want_kv) and/or dq (want_q).
  auto run_tile = [&](Scratch<T>& buf, int64_t z, int64_t h, const Tile& t, bool want_kv,
                      bool want_q) {
    const int64_t zh = z * Hq + h, kv = z * Hkv + h / group;
    const T* qh = qp + (zh * L + t.i0) * E;
    const T* doh = dop + (zh * L + t.i0) * Ev;
    const T* kh = kp + (kv * S + t.j0) * E;
    const T* vh = vp + (kv * S + t.j0) * Ev;
    T *s = buf.s, *dp = buf.dp;
    const at::Tensor q_t = mat(qh, t.rows, E, E), do_t = mat(doh, t.rows, Ev, Ev);
    const at::Tensor k_t = mat(kh, t.cols, E, E);
    const at::Tensor s_t = mat(s, t.rows, t.cols, t.cols), dp_t = mat(dp, t.rows, t.cols, t.cols);
    gemm(s_t, q_t, k_t.t(), false);
    gemm(dp_t, do_t, mat(vh, t.cols, Ev, Ev).t(), false);
    for (int64_t i = t.i0; i < t.i0 + t.rows; ++i) {
      T* srow = s + (i - t.i0) * t.cols;
      T* dprow = dp + (i - t.i0) * t.cols;
      const auto [a, b] = row_columns(sc, i, t.j0, t.cols);
      const T* keep = sc.keep(buf.keep, z, h, i, t.j0 + a, b - a);
      ops.grad_row(srow + a, dprow + a, b - a, sc.row(z, h, i, t.j0 + a), lse_p[zh * L + i],
                   delta[zh * L + i], keep);
      for (T* row : {srow, dprow}) {  // outside the band: no weight
        std::fill(row, row + a, T(0));
        std::fill(row + b, row + t.cols, T(0));
      }
    }
    if (want_kv) {
      gemm(mat(dvp + (kv * S + t.j0) * Ev, t.cols, Ev, Ev), s_t.t(), do_t, true);
      gemm(mat(dkp + (kv * S + t.j0) * E, t.cols, E, E), dp_t.t(), q_t, true);
    }
    if (want_q) gemm(mat(dqp + (zh * L + t.i0) * E, t.rows, E, E), dp_t, k_t, true);
  };

  // Sweep over (z, kv head, key chunk): dk, dv of the chunk, and dq too when a chunk is
  // the whole sequence.
  const bool one_sweep = Z * Hkv >= 2 * at::get_num_threads();
  const int64_t chunks = one_sweep ? 1 : k_blocks;
  at::parallel_for(0, Z * Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    Scratch<T> buf(true);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t zk = task / chunks, z = zk / Hkv, hk = zk % Hkv;
      const int64_t kb0 = one_sweep ? 0 : task % chunks, kb1 = one_sweep ? k_blocks : kb0 + 1;
      const int64_t j0 = kb0 * kBlockK, j1 = std::min(S, kb1 * kBlockK);
      std::fill(dkp + (zk * S + j0) * E, dkp + (zk * S + j1) * E, T(0));
      std::fill(dvp + (zk * S + j0) * Ev, dvp + (zk * S + j1) * Ev, T(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        if (one_sweep) std::fill(dqp + (z * Hq + h) * L * E, dqp + (z * Hq + h + 1) * L * E, T(0));
        for (int64_t kb = kb0; kb < kb1; ++kb) {
          Tile t;
          for (int64_t qb = 0; qb < q_blocks; ++qb)
            if (tile_of(qb, kb, t)) run_tile(buf, z, h, t, true, one_sweep);
        }
      }
    }
  });
  if (one_sweep) return;
  // dq per (z, head, query block), over the key blocks in ascending order.
  at::parallel_for(0, Z * Hq * q_blocks, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential;
    Scratch<T> buf(true);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t zh = task / q_blocks, qb = task % q_blocks;
      const int64_t i0 = qb * kBlockQ, i1 = std::min(L, i0 + kBlockQ);
      std::fill(dqp + (zh * L + i0) * E, dqp + (zh * L + i1) * E, T(0));
      Tile t;
      for (int64_t kb = 0; kb < k_blocks; ++kb)
        if (tile_of(qb, kb, t)) run_tile(buf, zh / Hq, zh % Hq, t, false, true);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q_arg,
                                                     const at::Tensor& k_arg,
                                                     const at::Tensor& v_arg,
                                                     const std::optional<at::Tensor>& mask,
                                                     const AttentionParams& p) {
  const at::Tensor q = q_arg.contiguous(), k = k_arg.contiguous(), v = v_arg.contiguous();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pykernels_attention_forward_cpu", [&] {
    forward_impl<scalar_t>(q, k, v, make_scores<scalar_t>(p, q, k.size(2), mask), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout_arg, const at::Tensor& q_arg, const at::Tensor& k_arg,
    const at::Tensor& v_arg, const at::Tensor& out_arg, const at::Tensor& lse_arg,
    const std::optional<at::Tensor>& mask, const AttentionParams& p) {
  const at::Tensor q = q_arg.contiguous(), k = k_arg.contiguous(), v = v_arg.contiguous();
  const at::Tensor dout = dout_arg.contiguous(), out = out_arg.contiguous();
  const at::Tensor lse = lse_arg.contiguous();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "pykernels_attention_backward_cpu", [&] {
    backward_impl<scalar_t>(dout, q, k, v, out, lse,
                            make_scores<scalar_t>(p, q, k.size(2), mask), dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace cpu
}  // namespace pykernels
