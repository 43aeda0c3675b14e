// Gated linear unit on the CPU: h = act(g) * u, where [g | u] = input @ weight^T + bias and
// weight = [Wg; Wu] is (2n, K), bias = [bg; bu] is (2n).
//
// Forward. float32 products that gemm_f32_preferred takes run gemm_glu_f32 (cpu/gemm.h):
// one register tile holds the gate and the up sums of the same 16 output columns, and its
// epilogue adds both biases and stores h = act(g) u. The (M, 2n) [g | u] is written only
// when the backward keeps it, or, for depths of more than one k block, as the buffer the
// earlier k blocks accumulate in. Elsewhere (float64, CPUs without AVX-512, small products)
// ATen's GEMM writes [g | u] (M, 2n, biases included by addmm: it has no epilogue that could
// gate) and one pass forms h.
//
// Backward. Saved: [g | u], the pre-activations. Recomputing them instead would cost another
// GEMM as large as the forward's (2 M K 2n flops, a third more work for the step), while
// keeping them costs 2 M n values, less than eager PyTorch keeps (g, act(g) and u). With
// h = act(g) u:
//   dg = dh * u * act'(g)       (relu: a select on g, like torch's threshold_backward)
//   du = dh * act(g)
//   grad_bias   = column sums of [dg | du]                   (2n)
//   grad_input  = [dg | du] @ weight                        (M, K)
//   grad_weight = [dg | du]^T @ input                       (2n, K)
// ONE pass (linear_glu_grad_preact) forms [dg | du] and both bias gradients (fp64 column
// sums in row chunks fixed by the sizes: the result does not depend on the thread count);
// the two GEMMs are linear_act's backward without activation (pykernels/ops/linear_glu.py).
#include "cpu/linear_glu.h"

#include <ATen/Parallel.h>

#include <type_traits>

#include "cpu/gemm.h"
#include "cpu/linear_glu_simd.h"
#include "cpu/row_passes.h"

namespace pykernels {
namespace cpu {
namespace {

// The SIMD loops, reachable from the generic code below for any scalar_t (a template, so the
// float-only call compiles away for double); called for float only (isa_for). Return whether
// they ran.
template <typename scalar_t>
bool forward_rows_vec(CpuIsa isa, Activation act, const scalar_t* gu, scalar_t* h,
                      int64_t rows, int64_t n, scalar_t slope) {
#if PYKERNELS_CPU_VEC_LOOPS
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (isa == CpuIsa::Scalar) return false;
    (isa == CpuIsa::Avx512 ? linear_glu_forward_rows_avx512 : linear_glu_forward_rows_avx2)(
        act, gu, h, rows, n, slope);
    return true;
  }
#endif
  (void)isa, (void)act, (void)gu, (void)h, (void)rows, (void)n, (void)slope;
  return false;
}

template <typename scalar_t>
bool backward_rows_vec(CpuIsa isa, Activation act, const scalar_t* dh, const scalar_t* gu,
                       scalar_t* dgu, double* acc, int64_t rows, int64_t n, scalar_t slope) {
#if PYKERNELS_CPU_VEC_LOOPS
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (isa == CpuIsa::Scalar) return false;
    (isa == CpuIsa::Avx512 ? linear_glu_backward_rows_avx512 : linear_glu_backward_rows_avx2)(
        act, dh, gu, dgu, acc, rows, n, slope);
    return true;
  }
#endif
  (void)isa, (void)act, (void)dh, (void)gu, (void)dgu, (void)acc, (void)rows, (void)n,
      (void)slope;
  return false;
}

// Scalar forward over rows [begin, end) (float64, CPUs without the SIMD units).
template <Activation A, typename scalar_t>
void forward_rows_scalar(const scalar_t* gu, scalar_t* h, int64_t begin, int64_t end,
                         int64_t n, scalar_t slope) {
  for (int64_t m = begin; m < end; ++m)
    for (int64_t j = 0; j < n; ++j)
      h[m * n + j] =
          activation_forward<scalar_t>(A, gu[m * 2 * n + j], slope) * gu[m * 2 * n + n + j];
}

// Scalar backward over `rows` rows (the math in the file comment); acc as in
// rows_with_column_sums.
template <Activation A, typename scalar_t>
void backward_rows_scalar(const scalar_t* dh, const scalar_t* gu, scalar_t* dgu, double* acc,
                          int64_t rows, int64_t n, scalar_t slope) {
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t g = gu[m * 2 * n + j], u = gu[m * 2 * n + n + j], d = dh[m * n + j];
      const scalar_t dg = activation_backward<false, scalar_t>(A, d * u, g, slope);
      const scalar_t du = d * activation_forward<scalar_t>(A, g, slope);
      dgu[m * 2 * n + j] = dg;
      dgu[m * 2 * n + n + j] = du;
      if (acc) {
        acc[j] += static_cast<double>(dg);
        acc[n + j] += static_cast<double>(du);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_glu_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      Activation act, double negative_slope,
                                                      bool save_preact) {
  const int64_t M = input.size(0), K = input.size(1), n = weight.size(0) / 2;
  const at::Tensor none = at::empty({0}, input.options());
  at::Tensor h = at::empty({M, n}, input.options());
  if (input.scalar_type() == at::kFloat && gemm_f32_preferred(M, 2 * n, K)) {
    const bool need_gu = save_preact || gemm_glu_f32_needs_gu(K);
    at::Tensor gu = need_gu ? at::empty({M, 2 * n}, input.options()) : none;
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    GemmEpilogue epilogue;
    if (bias_c.defined()) epilogue.bias = bias_c.data_ptr<float>();
    if (save_preact) epilogue.preact = gu.data_ptr<float>();
    epilogue.act = act;
    epilogue.negative_slope = static_cast<float>(negative_slope);
    gemm_glu_f32(gemm_operand(input), gemm_operand(weight.t()), h.data_ptr<float>(),
                 need_gu ? gu.data_ptr<float>() : nullptr, M, n, K, epilogue);
    return {h, save_preact ? gu : none};
  }
  const at::Tensor gu = (bias.has_value() ? at::addmm(*bias, input, weight.t())
                                          : at::mm(input, weight.t()))
                            .contiguous();
  AT_DISPATCH_FLOATING_TYPES(gu.scalar_type(), "linear_glu_forward_cpu", [&] {
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t slope = static_cast<scalar_t>(negative_slope);
    const CpuIsa isa = isa_for<scalar_t>();
    at::parallel_for(0, M, row_grain(2 * n), [&](int64_t begin, int64_t end) {
      if (forward_rows_vec<scalar_t>(isa, act, gp + begin * 2 * n, hp + begin * n,
                                     end - begin, n, slope))
        return;
      with_activation(act, [&](auto tag) {
        forward_rows_scalar<decltype(tag)::value, scalar_t>(gp, hp, begin, end, n, slope);
      });
    });
  });
  return {h, save_preact ? gu : none};
}

std::tuple<at::Tensor, at::Tensor> linear_glu_grad_preact(const at::Tensor& grad_out,
                                                          const at::Tensor& gu_arg,
                                                          Activation act,
                                                          double negative_slope,
                                                          bool has_bias) {
  const int64_t M = grad_out.size(0), n = grad_out.size(1);
  const at::Tensor dh = grad_out.contiguous();
  const at::Tensor gu = gu_arg.contiguous();
  at::Tensor dgu = at::empty({M, 2 * n}, dh.options());
  at::Tensor grad_bias = at::empty({has_bias ? 2 * n : 0}, dh.options());
  AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "linear_glu_grad_preact_cpu", [&] {
    const scalar_t* dhp = dh.data_ptr<scalar_t>();
    const scalar_t* gp = gu.data_ptr<scalar_t>();
    scalar_t* dp = dgu.data_ptr<scalar_t>();
    const scalar_t slope = static_cast<scalar_t>(negative_slope);
    const CpuIsa isa = isa_for<scalar_t>();
    rows_with_column_sums(
        M, 2 * n, has_bias ? grad_bias.data_ptr<scalar_t>() : nullptr,
        [&](int64_t row0, int64_t rows, double* acc) {
          if (backward_rows_vec<scalar_t>(isa, act, dhp + row0 * n, gp + row0 * 2 * n,
                                          dp + row0 * 2 * n, acc, rows, n, slope))
            return;
          with_activation(act, [&](auto tag) {
            backward_rows_scalar<decltype(tag)::value, scalar_t>(
                dhp + row0 * n, gp + row0 * 2 * n, dp + row0 * 2 * n, acc, rows, n, slope);
          });
        });
  });
  return {dgu, grad_bias};
}

}  // namespace cpu
}  // namespace pykernels
