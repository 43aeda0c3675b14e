// Softmax-cross-entropy on the CPU: each row's loss and, in the same call, its gradient.
//
// Per row (math in kernels/cross_entropy.h): one pass for the max, one for sum exp(s - m)
// with the smoothing sums, one writing the gradient; the row (a few hundred KB even at
// vocabularies of 100k floats) stays in the core's cache between passes, so memory sees
// one read of the logits and one write of the gradient. Rows are split over threads in
// fixed blocks, and each row is reduced by one thread in a fixed order, so results do not
// depend on the thread count.
//
// float32 rows with unit class stride run the SIMD loops of cross_entropy_vec_impl.h
// (simd_avx2.cpp / simd_avx512.cpp, picked by cpu_isa()); float64 and strided rows (e.g.
// (N, C, d) inputs) run the scalar loops below, which evaluate the same formulas.
#include "cpu/cross_entropy.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "cpu/cross_entropy_simd.h"

namespace pykernels {
namespace cpu {
namespace {

// Elements per parallel task (work per task >> task overhead).
constexpr int64_t kGrainElements = 32768;

// A row of a strided (A, C, B) tensor: element c at p[c * stride].
template <typename T>
struct Strided {
  T* p;
  int64_t stride;
  T& operator[](int64_t c) const { return p[c * stride]; }
};

// Everything one row needs besides its own pointers.
template <typename T>
struct RowConsts {
  int64_t C;
  T softcap, beta, gamma, one_minus_eps, z_loss;
  const T* w;  // class weights or null
  bool prob, want_u;
};

template <typename T>
T cap(T x, T softcap) {
  return softcap > 0 ? softcap * std::tanh(x / softcap) : x;
}

template <typename T>
T cap_grad(T s, T softcap) {
  if (!(softcap > 0)) return T(1);
  const T r = s / softcap;
  return T(1) - r * r;
}

// The scalar loops: max of x, then the sums, then the gradient (see cross_entropy_simd.h).
template <typename T>
struct ScalarRow {
  const RowConsts<T>& k;
  Strided<const T> x, q;

  T u(int64_t c) const {
    T v = k.gamma;
    if (q.p != nullptr) v += k.beta * q[c];
    return k.w != nullptr ? v * k.w[c] : v;
  }
  T max_x() const {
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < k.C; ++c) m = (x[c] > m || std::isnan(x[c])) ? x[c] : m;
    return m;
  }
  void sums(T m, T out[3]) const {
    T e = 0, su = 0, sus = 0;
    for (int64_t c = 0; c < k.C; ++c) {
      const T d = cap(x[c], k.softcap) - m;
      e += std::exp(d);
      if (k.want_u) {
        const T uc = u(c);
        su += uc;
        sus += uc * d;
      }
    }
    out[0] = e, out[1] = su, out[2] = sus;
  }
  void grad(Strided<T> g, T lse, T a, T scale) const {
    for (int64_t c = 0; c < k.C; ++c) {
      const T s = cap(x[c], k.softcap);
      T d = std::exp(s - lse) * a;
      if (k.want_u) d -= u(c);
      g[c] = scale * d * cap_grad(s, k.softcap);
    }
  }
};

// The SIMD loops for one contiguous float32 row.
struct VecRow {
  CeRowVec row;
  CpuIsa isa;

  float max_x() const {
#if PYKERNELS_CPU_VEC_LOOPS
    if (isa == CpuIsa::Avx512) return ce_row_max_x_avx512(row);
    return ce_row_max_x_avx2(row);
#else
    return 0.0f;
#endif
  }
  void sums(float m, float out[3]) const {
#if PYKERNELS_CPU_VEC_LOOPS
    if (isa == CpuIsa::Avx512) return ce_row_sums_avx512(row, m, out);
    ce_row_sums_avx2(row, m, out);
#endif
  }
  void grad(Strided<float> g, float lse, float a, float scale) const {
#if PYKERNELS_CPU_VEC_LOOPS
    if (isa == CpuIsa::Avx512) return ce_row_grad_avx512(row, g.p, lse, a, scale);
    ce_row_grad_avx2(row, g.p, lse, a, scale);
#endif
  }
};

// One row: returns its loss, writes scale * dloss/dx into g when g.p is set. h is the
// target's share (1 - eps) * w_t (0 for probability targets), x_t its logit.
//   loss = h * (lse - s_t) + sum_c u_c * (lse - s_c) + z * lse^2
//   dloss/ds_c = p_c * (h + U + 2 z lse) - u_c - h [c == t]
// Sums are taken relative to the max m, so nothing cancels when |logits| are large.
template <typename T, typename Row>
T row_loss_and_grad(const Row& row, const RowConsts<T>& k, int64_t t, T h, T x_t, Strided<T> g,
                    T scale) {
  const T m = cap(row.max_x(), k.softcap);
  T sums[3];
  row.sums(m, sums);
  const T log_sum = std::log(sums[0]);
  const T lse = m + log_sum;
  T loss = k.z_loss * lse * lse;
  T s_t = 0;
  if (h != 0) {
    s_t = cap(x_t, k.softcap);
    loss += h * (log_sum + (m - s_t));
  }
  if (k.want_u) loss += sums[1] * log_sum - sums[2];
  if (g.p != nullptr) {
    row.grad(g, lse, h + sums[1] + 2 * k.z_loss * lse, scale);
    if (h != 0) g[t] -= scale * h * cap_grad(s_t, k.softcap);
  }
  return loss;
}

template <typename T>
Strided<T> row_of(T* base, int64_t a, int64_t b, const at::Tensor& t) {
  if (base == nullptr) return {nullptr, 0};
  return {base + a * t.stride(0) + b * t.stride(2), t.stride(1)};
}

template <typename T>
void rows_impl(const at::Tensor& logits, const at::Tensor& target, const T* w,
               int64_t ignore_index, double eps, double z_loss, double softcap,
               const at::Tensor& grad, const T* scale, int64_t scale_stride, T* loss) {
  const int64_t A = logits.size(0), C = logits.size(1), B = logits.size(2);
  const bool prob = target.is_floating_point();
  RowConsts<T> k{C,
                 static_cast<T>(softcap),
                 static_cast<T>(1 - eps),
                 static_cast<T>(eps / static_cast<double>(C)),
                 static_cast<T>(1 - eps),
                 static_cast<T>(z_loss),
                 w,
                 prob,
                 prob || eps > 0};
  const T* x = logits.const_data_ptr<T>();
  const T* q = prob ? target.const_data_ptr<T>() : nullptr;
  const int64_t* idx = prob ? nullptr : target.const_data_ptr<int64_t>();
  T* g = grad.defined() ? grad.data_ptr<T>() : nullptr;
  const CpuIsa isa = std::is_same<T, float>::value ? cpu_isa() : CpuIsa::Scalar;
  const bool unit = logits.stride(1) == 1 && (!prob || target.stride(1) == 1) &&
                    (g == nullptr || grad.stride(1) == 1);
  const bool vec = isa != CpuIsa::Scalar && unit;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, C));

  at::parallel_for(0, A * B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t a = r / B, b = r % B;
      const Strided<const T> xr = row_of(x, a, b, logits);
      const Strided<T> gr = row_of(g, a, b, grad);
      int64_t t = -1;
      T h = 0;
      if (!prob) {
        t = idx[r];
        if (t == ignore_index || t < 0 || t >= C) {
          // Ignored: contributes nothing. Out of range (the Python layer rejects it, with
          // check_targets, before any kernel runs; this keeps the kernel itself safe): NaN,
          // never an index.
          const T fill = t == ignore_index ? T(0) : nan;
          loss[r] = fill;
          for (int64_t c = 0; gr.p != nullptr && c < C; ++c) gr[c] = fill;
          continue;
        }
        h = k.one_minus_eps * (w != nullptr ? w[t] : T(1));
      }
      const T x_t = t >= 0 ? xr[t] : T(0);  // read before an in-place gradient overwrites it
      const T sc = scale != nullptr ? scale[r * scale_stride] : T(1);
      if constexpr (std::is_same<T, float>::value) {
        if (vec) {
          const VecRow row{{xr.p, w, prob ? row_of(q, a, b, target).p : nullptr, C, k.softcap,
                            k.beta, k.gamma, k.want_u},
                           isa};
          loss[r] = row_loss_and_grad<T>(row, k, t, h, x_t, gr, sc);
          continue;
        }
      }
      const ScalarRow<T> row{k, xr, row_of(q, a, b, target)};
      loss[r] = row_loss_and_grad<T>(row, k, t, h, x_t, gr, sc);
    }
  });
}

}  // namespace

at::Tensor cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& class_weight,
                              int64_t ignore_index, double label_smoothing, double z_loss,
                              double softcap, const std::optional<at::Tensor>& grad,
                              const std::optional<at::Tensor>& scale) {
  const int64_t R = logits.size(0) * logits.size(2);
  at::Tensor loss = at::empty({R}, logits.options());
  const at::Tensor g = grad.has_value() ? *grad : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "pykernels_cross_entropy_cpu", [&] {
    const scalar_t* w = class_weight.has_value() ? class_weight->const_data_ptr<scalar_t>()
                                                 : nullptr;
    const scalar_t* sc = g.defined() ? scale->const_data_ptr<scalar_t>() : nullptr;
    const int64_t sc_stride = g.defined() && scale->numel() != 1 ? 1 : 0;
    rows_impl<scalar_t>(logits, target, w, ignore_index, label_smoothing, z_loss, softcap, g,
                        sc, sc_stride, loss.data_ptr<scalar_t>());
  });
  return loss;
}

void check_targets(const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
  const at::Tensor t = target.contiguous();
  const int64_t* idx = t.const_data_ptr<int64_t>();
  for (int64_t r = 0, n = t.numel(); r < n; ++r) {
    TORCH_CHECK_VALUE(idx[r] == ignore_index || (idx[r] >= 0 && idx[r] < num_classes),
                      "target contains class index ", idx[r], ", outside [0, ", num_classes,
                      ") and not ignore_index (", ignore_index, ")");
  }
}

}  // namespace cpu
}  // namespace pykernels
