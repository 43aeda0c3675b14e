// Fused linear + activation on the CPU.
//
// Forward: y = act(input @ weight^T + bias). float32 on AVX-512 CPUs runs our own GEMM
// (cpu/gemm.h), whose epilogue adds the bias and applies the activation to each register
// tile before it is stored: y is written once, and z (the pre-activation) only where the
// backward needs it. Elsewhere (float64, other CPUs, tiny products): ATen's GEMM (addmm,
// bias included) and then ONE pass over z that applies the activation, in place unless z is
// kept.
//
// Backward: with dz = dy * act'(saved) (saved = y or z, see kernels/common/activation.h),
//   grad_input  = dz @ weight        (M, K)
//   grad_weight = dz^T @ input       (N, K)
//   grad_bias   = sum over rows of dz (N)
// ONE pass computes dz and the bias column sums together; the two GEMMs are ours or
// ATen's, as in the forward.
// The pass is split into row chunks fixed by (M, N), whose fp64 partial sums are added in
// chunk order: the result does not depend on the thread count (bitwise reproducible).
//
// The float32 passes run the SIMD loops of linear_act_vec_impl.h (ATen's Vectorized<float>
// with Sleef's vector exp/tanh), built into the AVX-512 and AVX2 + FMA units simd_avx512.cpp / simd_avx2.cpp and picked at
// run time to match torch's own CPU capability; float64 (gradcheck) and other CPUs run the
// scalar loops below. Both evaluate the same formulas, those of kernels/common/activation.h.
#include "cpu/linear_act.h"

#include <ATen/Parallel.h>

#include <type_traits>
#include <utility>

#include "cpu/gemm.h"
#include "cpu/linear_act_simd.h"
#include "cpu/row_passes.h"

namespace pykernels {
namespace cpu {
namespace {

void check_activation(Activation act) {
  const int id = static_cast<int>(act);
  TORCH_CHECK(id >= 0 && id < kNumActivations, "pykernels: unknown activation id ", id);
}

// The SIMD entry points, reachable from the generic code below for any scalar_t; only
// called for float (isa_for).
template <typename scalar_t>
void forward_rows_vec(CpuIsa isa, Activation act, const scalar_t* z, scalar_t* y,
                      int64_t rows, int64_t N, scalar_t slope) {
#if PYKERNELS_CPU_VEC_LOOPS
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (isa == CpuIsa::Avx512)
      linear_act_forward_rows_avx512(act, z, y, rows, N, slope);
    else
      linear_act_forward_rows_avx2(act, z, y, rows, N, slope);
  }
#endif
}

template <typename scalar_t>
void backward_cols_vec(CpuIsa isa, Activation act, bool saved_is_output, const scalar_t* dy,
                       const scalar_t* saved, scalar_t* dz, double* acc, int64_t M, int64_t N,
                       int64_t n0, int64_t n1, scalar_t slope) {
#if PYKERNELS_CPU_VEC_LOOPS
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (isa == CpuIsa::Avx512)
      linear_act_backward_cols_avx512(act, saved_is_output, dy, saved, dz, acc, M, N, n0, n1,
                                      slope);
    else
      linear_act_backward_cols_avx2(act, saved_is_output, dy, saved, dz, acc, M, N, n0, n1,
                                    slope);
  }
#endif
}

// Scalar forward over rows [begin, end): y = act(z); y == z is allowed (in place).
template <Activation A, typename scalar_t>
void forward_rows_scalar(const scalar_t* zp, scalar_t* yp, int64_t begin, int64_t end,
                         int64_t N, scalar_t slope) {
  for (int64_t i = begin * N; i < end * N; ++i) {
    yp[i] = activation_forward<scalar_t>(A, zp[i], slope);
  }
}

// Scalar backward over columns [n0, n1) of all rows: dz = dy * act'(saved), and
// acc[n - n0] += dz in row order (acc may be null).
template <Activation A, bool SavedIsOutput, typename scalar_t>
void backward_cols_scalar(const scalar_t* dyp, const scalar_t* sp, scalar_t* dzp, double* acc,
                          int64_t M, int64_t N, int64_t n0, int64_t n1, scalar_t slope) {
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* dyrow = dyp + m * N;
    const scalar_t* srow = sp + m * N;
    scalar_t* dzrow = dzp + m * N;
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t g =
          activation_backward<SavedIsOutput, scalar_t>(A, dyrow[n], srow[n], slope);
      if (A != Activation::None) dzrow[n] = g;
      if (acc) acc[n - n0] += static_cast<double>(g);
    }
  }
}

// a @ b for 2-D tensors: gemm_f32 where it is preferred for float32, else ATen's mm.
at::Tensor matrix_product(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (a.scalar_type() != at::kFloat || !gemm_f32_preferred(M, N, K)) return at::mm(a, b);
  at::Tensor out = at::empty({M, N}, a.options());
  gemm_f32(gemm_operand(a), gemm_operand(b), out.data_ptr<float>(), M, N, K, GemmEpilogue{});
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_act_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      Activation act, double negative_slope,
                                                      bool save_preact) {
  check_activation(act);
  const int64_t M = input.size(0);
  const int64_t N = weight.size(0);
  const int64_t K = input.size(1);
  if (input.scalar_type() == at::kFloat && gemm_f32_preferred(M, N, K)) {
    at::Tensor out = at::empty({M, N}, input.options());
    at::Tensor preact =
        save_preact ? at::empty({M, N}, input.options()) : at::empty({0}, input.options());
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    GemmEpilogue epilogue;
    if (bias_c.defined()) epilogue.bias = bias_c.data_ptr<float>();
    if (save_preact) epilogue.preact = preact.data_ptr<float>();
    epilogue.act = act;
    epilogue.negative_slope = static_cast<float>(negative_slope);
    gemm_f32(gemm_operand(input), gemm_operand(weight.t()), out.data_ptr<float>(), M, N, K,
             epilogue);
    return {out, preact};
  }
  // The bias goes into the GEMM (beta = 1 onto the broadcast bias, as F.linear does): a
  // separate bias pass over z would cost a full read + write of (M, N).
  at::Tensor z = (bias.has_value() ? at::addmm(*bias, input, weight.t())
                                   : at::mm(input, weight.t()))
                     .contiguous();
  at::Tensor out = save_preact ? at::empty_like(z) : z;

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "linear_act_forward_cpu", [&] {
    scalar_t* zp = z.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    const scalar_t slope = static_cast<scalar_t>(negative_slope);
    // Nothing to do: z is already the output.
    if (act == Activation::None && yp == zp) return;
    const CpuIsa isa = isa_for<scalar_t>();
    if (isa != CpuIsa::Scalar) {
      at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
        forward_rows_vec<scalar_t>(isa, act, zp + begin * N, yp + begin * N, end - begin, N,
                                   slope);
      });
      return;
    }
    with_activation(act, [&](auto tag) {
      constexpr Activation A = decltype(tag)::value;
      at::parallel_for(0, M, row_grain(N), [&](int64_t begin, int64_t end) {
        forward_rows_scalar<A, scalar_t>(zp, yp, begin, end, N, slope);
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
  check_activation(act);
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
      const CpuIsa isa = isa_for<scalar_t>();
      // Each row chunk streams whole rows and sums its rows' dz into its fp64 partials.
      rows_with_column_sums(M, N, gbp, [&](int64_t row0, int64_t rows, double* acc) {
        const int64_t offset = row0 * N;
        if (isa != CpuIsa::Scalar) {
          backward_cols_vec<scalar_t>(isa, act, saved_is_output, dyp + offset, sp + offset,
                                      dzp + offset, acc, rows, N, 0, N, slope);
          return;
        }
        with_activation(act, [&](auto tag) {
          constexpr Activation A = decltype(tag)::value;
          if (saved_is_output)
            backward_cols_scalar<A, true, scalar_t>(dyp + offset, sp + offset, dzp + offset,
                                                    acc, rows, N, 0, N, slope);
          else
            backward_cols_scalar<A, false, scalar_t>(dyp + offset, sp + offset, dzp + offset,
                                                     acc, rows, N, 0, N, slope);
        });
      });
    });
  }
  at::Tensor grad_input =
      need_input_grad ? matrix_product(dz, weight) : at::empty({0}, dy.options());
  at::Tensor grad_weight =
      need_weight_grad ? matrix_product(dz.t(), input) : at::empty({0}, dy.options());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cpu
}  // namespace pykernels
