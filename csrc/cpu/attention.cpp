// Scaled dot-product attention on the CPU, tiled like FlashAttention-2 (math in
// kernels/attention.h): memory beyond inputs and outputs is one (query block x key block)
// tile of scores per thread, never L x S.
//
// Forward: per block of kBlockQ query rows, walk the key blocks that intersect the causal /
// window band of those rows; the score tiles of all (z, head) pairs come from one batched
// GEMM, then an online softmax (running max m, sum l, rescaled output rows) per row.
// Backward: per key block, for each query block of its band, recompute P = exp(s - lse)
// and accumulate (all GEMMs batched over (z, head); GQA sums the group's dk, dv; every sum
// has a fixed order, so results do not depend on the thread count)
//   dv += P_drop^T dO,  dP = dO v^T (dropout-masked),  dS = P (dP - Delta) [softcap'],
//   dk += scale dS^T q,  dq += scale dS k.
// Dropout regenerates the keep mask from (seed, offset, element index) with Philox-4x32-10.
#include "cpu/attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "philox.h"

namespace pykernels {
namespace cpu {
namespace {

constexpr int64_t kBlockQ = 256;  // query rows per tile
constexpr int64_t kBlockK = 256;  // keys per tile

// ---- dropout: the keep mask of kernels/philox.h, one draw per score element --------------

struct Philox {
  uint64_t seed, offset;
  uint32_t threshold;  // dropout_threshold(p)

  bool keep(uint64_t element) const { return dropout_keep(seed, offset, element, threshold); }
};

// Everything a tile needs to turn raw dot products into scores.
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
  // The capped score t (before the mask) of a dot product.
  T capped(T dot) const {
    const T s = static_cast<T>(p.scale) * dot;
    if (!(p.softcap > 0)) return s;
    const T c = static_cast<T>(p.softcap);
    return c * std::tanh(s / c);
  }
  T cap_grad(T t) const {
    if (!(p.softcap > 0)) return T(1);
    const T r = t / static_cast<T>(p.softcap);
    return T(1) - r * r;
  }
  // The final score of (z, h, i, j): -inf outside the band.
  T score(T t, int64_t z, int64_t h, int64_t i, int64_t j) const {
    if (j < lo(i) || j > hi(i)) return -std::numeric_limits<T>::infinity();
    if (mask != nullptr) t += mask[z * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]];
    return t;
  }
  // 1 / (1 - p) for kept elements, 0 for dropped ones.
  T keep(int64_t z, int64_t h, int64_t i, int64_t j) const {
    if (!(p.dropout_p > 0)) return T(1);
    const uint64_t e = ((static_cast<uint64_t>(z) * Hq + h) * L + i) * S + j;
    return rng.keep(e) ? static_cast<T>(1.0 / (1.0 - p.dropout_p)) : T(0);
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

// GQA: a key/value tensor (Z, Hkv, n, d) as (Z, Hq, n, d), each kv head repeated for the
// group of query heads that reads it. The reshape of the expanded view copies K and V
// whole (Z, Hq, S, d) when group > 1: O(S) per head, but group times the inputs' memory;
// a grouped (Z, Hkv, G, ...) matmul would avoid it.
at::Tensor per_query_head(const at::Tensor& t, int64_t group) {
  if (group == 1) return t;
  const auto s = t.sizes();
  return t.unsqueeze(2).expand({s[0], s[1], group, s[2], s[3]}).reshape(
      {s[0], s[1] * group, s[2], s[3]});
}

// The per-query-head (Z, Hq, n, d) gradient of a kv tensor summed over each group.
at::Tensor sum_over_group(const at::Tensor& t, int64_t group) {
  if (group == 1) return t;
  const auto s = t.sizes();
  return t.view({s[0], s[1] / group, group, s[2], s[3]}).sum(2);
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

// The GEMMs run on whole (Z, Hq) batches of tiles, outside any parallel region (ATen's BLAS
// threads them itself; calling it from inside parallel_for oversubscribes the cores); the
// element-wise passes between them are split over rows with at::parallel_for.
template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const Scores<T>& sc, at::Tensor& out, at::Tensor& lse) {
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2);
  const int64_t Ev = v.size(3), group = Hq / k.size(1), ZH = Z * Hq;
  const at::Tensor kq = per_query_head(k, group), vq = per_query_head(v, group);
  out.zero_();
  T* out_p = out.data_ptr<T>();
  T* lse_p = lse.data_ptr<T>();
  at::Tensor m_t = at::full({ZH, L}, -std::numeric_limits<T>::infinity(), q.options());
  at::Tensor l_t = at::zeros({ZH, L}, q.options());
  T* m = m_t.data_ptr<T>();
  T* l = l_t.data_ptr<T>();
  for (int64_t i0 = 0; i0 < L; i0 += kBlockQ) {
    const int64_t i1 = std::min(L, i0 + kBlockQ);
    const auto [j_first, j_last] = key_range(sc, i0, i1);
    for (int64_t j0 = j_first; j0 <= j_last; j0 += kBlockK) {
      const int64_t j1 = std::min(j_last + 1, j0 + kBlockK), cols = j1 - j0;
      const auto [r0, r1] = query_range(sc, i0, i1, j0, j1);
      if (r1 < r0) continue;
      const int64_t rows = r1 - r0 + 1;
      at::Tensor s = at::matmul(q.narrow(2, r0, rows), kq.narrow(2, j0, cols).transpose(2, 3))
                         .contiguous();  // (Z, Hq, rows, cols) dot products
      T* sp = s.data_ptr<T>();
      at::parallel_for(0, ZH * rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t zh = task / rows, i = r0 + task % rows;
          const int64_t z = zh / Hq, h = zh % Hq, row = zh * L + i;
          T* srow = sp + task * cols;
          T row_max = -std::numeric_limits<T>::infinity();
          for (int64_t c = 0; c < cols; ++c) {
            srow[c] = sc.score(sc.capped(srow[c]), z, h, i, j0 + c);
            row_max = std::max(row_max, srow[c]);
          }
          const T m_new = std::max(m[row], row_max);
          if (m_new == -std::numeric_limits<T>::infinity()) {  // nothing allowed yet
            std::fill(srow, srow + cols, T(0));
            continue;
          }
          const T correction = std::exp(m[row] - m_new);  // 0 when m was -inf
          T sum = 0;
          for (int64_t c = 0; c < cols; ++c) {
            const T pr = std::exp(srow[c] - m_new);
            sum += pr;
            srow[c] = pr * sc.keep(z, h, i, j0 + c);  // dropout after the normaliser
          }
          l[row] = l[row] * correction + sum;
          m[row] = m_new;
          T* acc = out_p + row * Ev;
          for (int64_t e = 0; e < Ev; ++e) acc[e] *= correction;
        }
      });
      at::Tensor acc = out.narrow(2, r0, rows);
      acc.add_(at::matmul(s, vq.narrow(2, j0, cols)));
    }
  }
  at::parallel_for(0, ZH * L, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* acc = out_p + row * Ev;
      const bool empty = !(l[row] > 0);  // fully masked row: 0 out, +inf lse
      for (int64_t e = 0; e < Ev; ++e) acc[e] = empty ? T(0) : acc[e] / l[row];
      lse_p[row] = empty ? std::numeric_limits<T>::infinity() : m[row] + std::log(l[row]);
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const Scores<T>& sc, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t Z = q.size(0), Hq = q.size(1), L = q.size(2), S = k.size(2);
  const int64_t group = Hq / k.size(1), ZH = Z * Hq;
  const T scale = static_cast<T>(sc.p.scale);
  const at::Tensor kq = per_query_head(k, group), vq = per_query_head(v, group);
  const at::Tensor delta = (dout * out).sum(-1);  // (Z, Hq, L)
  const T* delta_p = delta.const_data_ptr<T>();
  const T* lse_p = lse.const_data_ptr<T>();
  dq.zero_();
  for (int64_t j0 = 0; j0 < S; j0 += kBlockK) {
    const int64_t j1 = std::min(S, j0 + kBlockK), cols = j1 - j0;
    const auto [r0, r1] = query_range(sc, 0, L, j0, j1);
    if (r1 < r0) {
      dk.narrow(2, j0, cols).zero_();
      dv.narrow(2, j0, cols).zero_();
      continue;
    }
    at::Tensor dk_acc = at::zeros({Z, Hq, cols, q.size(3)}, q.options());
    at::Tensor dv_acc = at::zeros({Z, Hq, cols, v.size(3)}, q.options());
    const at::Tensor k_blk = kq.narrow(2, j0, cols), v_blk = vq.narrow(2, j0, cols);
    for (int64_t i0 = r0; i0 <= r1; i0 += kBlockQ) {
      const int64_t rows = std::min(r1 + 1, i0 + kBlockQ) - i0;
      const at::Tensor q_blk = q.narrow(2, i0, rows), do_blk = dout.narrow(2, i0, rows);
      at::Tensor ds = at::matmul(q_blk, k_blk.transpose(2, 3)).contiguous();  // dots, then dS
      at::Tensor dp = at::matmul(do_blk, v_blk.transpose(2, 3)).contiguous();
      at::Tensor p_drop = at::empty_like(ds);
      T* dsp = ds.data_ptr<T>();
      const T* dpp = dp.const_data_ptr<T>();
      T* pdp = p_drop.data_ptr<T>();
      at::parallel_for(0, ZH * rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t zh = task / rows, i = i0 + task % rows;
          const int64_t z = zh / Hq, h = zh % Hq, row = zh * L + i;
          const T row_lse = lse_p[row], row_delta = delta_p[row];
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t idx = task * cols + c, j = j0 + c;
            const T t = sc.capped(dsp[idx]);
            const T prob = std::exp(sc.score(t, z, h, i, j) - row_lse);  // 0 if lse = +inf
            const T keep = sc.keep(z, h, i, j);
            pdp[idx] = prob * keep;
            // dS = P (dP - Delta), dP = dO v^T on kept elements; softcap's chain rule
            dsp[idx] = prob * (dpp[idx] * keep - row_delta) * sc.cap_grad(t) * scale;
          }
        }
      });
      dv_acc.add_(at::matmul(p_drop.transpose(2, 3), do_blk));
      dk_acc.add_(at::matmul(ds.transpose(2, 3), q_blk));
      dq.narrow(2, i0, rows).add_(at::matmul(ds, k_blk));
    }
    dk.narrow(2, j0, cols).copy_(sum_over_group(dk_acc, group));
    dv.narrow(2, j0, cols).copy_(sum_over_group(dv_acc, group));
  }
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
