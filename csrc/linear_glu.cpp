// Binding of the gated linear unit (the linear + activation family): checks, output
// allocation, and dispatch to the CPU kernels (csrc/cpu/linear_glu.cpp) or the CUDA
// launchers (kernels/linear_act.cu). input is 2-D here: the Python layer flattens the leading
// dimensions. The backward's GEMMs are linear_act_backward's (no activation) on [dg | du].
#include <torch/extension.h>

#include "checks.h"
#include "dispatch.h"
#include "cpu/linear_glu.h"

#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers

#include "cuda_checks.h"
#include "linear_act.h"
#include "linear_cuda.h"
#endif

namespace pykernels {
namespace {

#ifdef PYKERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> grad_preact_cuda(const at::Tensor& grad_out,
                                                    const at::Tensor& gu_arg, Activation act,
                                                    double negative_slope, bool has_bias) {
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor dh = grad_out.contiguous();
  const at::Tensor gu = gu_arg.contiguous();
  const int64_t M = dh.size(0), n = dh.size(1);
  at::Tensor dgu = at::empty({M, 2 * n}, dh.options());
  at::Tensor grad_bias = at::empty({has_bias ? 2 * n : 0}, dh.options());
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::linear_act_grad_preact_workspace_bytes(M, 2 * n))},
      dh.options().dtype(at::kByte));
  check_cuda(cuda::linear_glu_grad_preact(cuda_dtype(dh), dh.data_ptr(), gu.data_ptr(),
                                          dgu.data_ptr(),
                                          has_bias ? grad_bias.data_ptr() : nullptr,
                                          workspace.data_ptr(), M, n, act,
                                          static_cast<float>(negative_slope),
                                          c10::cuda::getCurrentCUDAStream().stream()),
             "linear_glu_grad_preact");
  return {dgu, grad_bias};
}
#endif  // PYKERNELS_WITH_CUDA

std::tuple<at::Tensor, at::Tensor> linear_glu_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      int64_t activation, double negative_slope,
                                                      bool save_preact) {
  TORCH_CHECK(input.dim() == 2, "pykernels: input must be 2-D here, got ", input.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) % 2 == 0,
              "pykernels: weight must be 2-D with an even first dimension (gate and up), got ",
              weight.sizes());
  check_linear_args(input, weight, bias);
  const Activation act = checked_activation(activation);
  return on_device(
      input,
      [&] { return cpu::linear_glu_forward(input, weight, bias, act, negative_slope, save_preact); },
      PYKERNELS_CUDA_CALL(linear_forward_cuda(true, input, weight, bias, act,
                                              negative_slope, save_preact)));
}

std::tuple<at::Tensor, at::Tensor> linear_glu_grad_preact(const at::Tensor& grad_out,
                                                          const at::Tensor& gu,
                                                          int64_t activation,
                                                          double negative_slope,
                                                          bool has_bias) {
  TORCH_CHECK(grad_out.dim() == 2, "pykernels: grad_out must be 2-D, got ", grad_out.sizes());
  check_matrix(gu, "gu", grad_out.size(0), 2 * grad_out.size(1));
  check_same(gu, grad_out, "gu");
  const Activation act = checked_activation(activation);
  return on_device(
      grad_out,
      [&] { return cpu::linear_glu_grad_preact(grad_out, gu, act, negative_slope, has_bias); },
      PYKERNELS_CUDA_CALL(grad_preact_cuda(grad_out, gu, act, negative_slope, has_bias)));
}

}  // namespace

void bind_linear_glu(pybind11::module_& m) {
  m.def("linear_glu_forward", &linear_glu_forward,
        "(h, gu): h = act(g) * u for [g | u] = input @ weight^T + bias; gu = [g | u] is "
        "empty unless save_preact",
        pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"),
        pybind11::arg("save_preact"));
  m.def("linear_glu_grad_preact", &linear_glu_grad_preact,
        "(dgu, grad_bias): dgu = [dh * u * act'(g) | dh * act(g)] and its column sums "
        "(empty unless has_bias)",
        pybind11::arg("grad_out"), pybind11::arg("gu"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"), pybind11::arg("has_bias"));
}

}  // namespace pykernels
