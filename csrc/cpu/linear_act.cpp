// Fused linear + activation on the CPU.
//
// Forward: z = input @ weight^T by ATen's GEMM, then ONE pass over z that adds the bias,
// applies the activation and, only where the backward needs it, keeps z; otherwise the
// output overwrites z in place, so the forward allocates a single (M, N) tensor.
//
// Backward: with dz = dy * act'(saved) (saved = y or z, see kernels/activation.h),
//   grad_input  = dz @ weight        (M, K)
//   grad_weight = dz^T @ input       (N, K)
//   grad_bias   = sum over rows of dz (N)
// ONE pass computes dz and the bias column sums together; the two GEMMs are ATen's.
// The pass is split over column blocks, so each column is summed by one thread in row
// order: the result does not depend on the thread count (bitwise reproducible).
#include "cpu/linear_act.h"

#include <ATen/Parallel.h>

#include <type_traits>
#include <utility>

namespace pykernels {
namespace cpu {
namespace {

// Calls fn(std::integral_constant<Activation, A>{}) so the per-element switch on the
// activation is resolved at compile time and the inner loops can vectorize.
template <typename Fn>
void dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::None: return fn(std::integral_constant<Activation, Activation::None>{});
    case Activation::Relu: return fn(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Gelu: return fn(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh:
      return fn(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Silu: return fn(std::integral_constant<Activation, Activation::Silu>{});
    case Activation::Sigmoid:
      return fn(std::integral_constant<Activation, Activation::Sigmoid>{});
    case Activation::Tanh: return fn(std::integral_constant<Activation, Activation::Tanh>{});
    case Activation::LeakyRelu:
      return fn(std::integral_constant<Activation, Activation::LeakyRelu>{});
  }
  TORCH_CHECK(false, "pykernels: unknown activation id ", static_cast<int>(act));
}

// Column block of the backward pass: wide enough for the vector units, narrow enough
// that two cores get several blocks each at N = 512.
constexpr int64_t kColumnBlock = 64;

// Elements per parallel task of the element-wise passes (work per task >> task overhead).
constexpr int64_t kGrainElements = 32768;

int64_t row_grain(int64_t columns) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, columns));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_act_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      Activation act, double negative_slope,
                                                      bool save_preact) {
  const int64_t M = input.size(0);
  const int64_t N = weight.size(0);
  at::Tensor z = at::mm(input, weight.t()).contiguous();
  at::Tensor out = save_preact ? at::empty_like(z) : z;
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_act_forward_cpu", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    const scalar_t* bp = bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t slope = static_cast<scalar_t>(negative_slope);
    dispatch_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
        for (int64_t m = begin; m < end; ++m) {
          scalar_t* zrow = zp + m * N;
          scalar_t* yrow = yp + m * N;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t v = bp ? zrow[n] + bp[n] : zrow[n];
            zrow[n] = v;  // the pre-activation, kept when out is a separate tensor
            yrow[n] = activation_forward<scalar_t>(A, v, slope);
          }
        }
      });
    });
  });
  at::Tensor preact = save_preact ? z : at::empty({0}, z.options());
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, Activation act, double negative_slope, bool saved_is_output,
    bool has_bias, bool need_input_grad, bool need_weight_grad) {
  const int64_t M = grad_out.size(0);
  const int64_t N = grad_out.size(1);
  const at::Tensor dy = grad_out.contiguous();
  const bool identity = act == Activation::None;
  // With no activation dz is dy itself; the pass then only sums the bias gradient.
  at::Tensor dz = identity ? dy : at::empty_like(dy);
  at::Tensor grad_bias = has_bias ? at::empty({N}, dy.options()) : at::empty({0}, dy.options());

  if (!identity || has_bias) {
    const at::Tensor s = identity ? dy : saved.contiguous();
    AT_DISPATCH_FLOATING_TYPES(dy.scalar_type(), "linear_act_backward_cpu", [&] {
      const scalar_t* dyp = dy.data_ptr<scalar_t>();
      const scalar_t* sp = s.data_ptr<scalar_t>();
      scalar_t* dzp = dz.data_ptr<scalar_t>();
      scalar_t* gbp = has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
      const scalar_t slope = static_cast<scalar_t>(negative_slope);
      const int64_t blocks = (N + kColumnBlock - 1) / kColumnBlock;
      dispatch_activation(act, [&](auto tag) {
        constexpr Activation A = decltype(tag)::value;
        at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
          const int64_t n0 = block_begin * kColumnBlock;
          const int64_t n1 = std::min(N, block_end * kColumnBlock);
          // double accumulators: the float32 bias gradient of many rows stays exact to
          // float32 rounding, like torch's cascade sum.
          std::vector<double> acc(gbp ? n1 - n0 : 0, 0.0);
          for (int64_t m = 0; m < M; ++m) {
            const scalar_t* dyrow = dyp + m * N;
            const scalar_t* srow = sp + m * N;
            scalar_t* dzrow = dzp + m * N;
            for (int64_t n = n0; n < n1; ++n) {
              const scalar_t g =
                  A == Activation::None
                      ? dyrow[n]
                      : dyrow[n] * activation_grad<scalar_t>(A, srow[n], saved_is_output, slope);
              if (A != Activation::None) dzrow[n] = g;
              if (gbp) acc[n - n0] += static_cast<double>(g);
            }
          }
          for (int64_t n = n0; n < n1 && gbp; ++n) gbp[n] = static_cast<scalar_t>(acc[n - n0]);
        });
      });
    });
  }
  at::Tensor grad_input = need_input_grad ? at::mm(dz, weight) : at::empty({0}, dy.options());
  at::Tensor grad_weight =
      need_weight_grad ? at::mm(dz.t(), input) : at::empty({0}, dy.options());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace pykernels
