// Binding of the fused linear + activation op: checks, output allocation, and dispatch to
// the CPU kernels (csrc/cpu/linear_act.cpp) or the CUDA launchers (kernels/linear_act.cu).
// input is 2-D here: the Python layer flattens the leading dimensions.
#include <torch/extension.h>

#include "checks.h"
#include "dispatch.h"
#include "cpu/linear_act.h"

#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>

#include "cuda_checks.h"
#include "linear_act.h"
#include "linear_cuda.h"
#endif

namespace pykernels {
namespace {

#ifdef PYKERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_arg, const at::Tensor& input_arg, const at::Tensor& weight_arg,
    const at::Tensor& saved_arg, Activation act, double negative_slope, bool saved_is_output,
    bool has_bias, bool need_input_grad, bool need_weight_grad) {
  const c10::cuda::CUDAGuard guard(grad_out_arg.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cuda::DType dtype = cuda_dtype(grad_out_arg);
  const at::Tensor dy = grad_out_arg.contiguous();
  const int64_t M = dy.size(0), N = dy.size(1);
  const at::TensorOptions options = dy.options();
  const at::Tensor empty = at::empty({0}, options);

  // dz = dy * act'(saved) and grad_bias, in one fused pass. With no activation and no
  // bias there is nothing to do: dz is dy.
  at::Tensor dz = dy;
  at::Tensor grad_bias = has_bias ? at::empty({N}, options) : empty;
  if (act != Activation::None || has_bias) {
    const at::Tensor saved = act == Activation::None ? dy : saved_arg.contiguous();
    dz = at::empty_like(dy);
    at::Tensor workspace = at::empty(
        {static_cast<int64_t>(cuda::linear_act_grad_preact_workspace_bytes(M, N))},
        options.dtype(at::kByte));
    check_cuda(cuda::linear_act_grad_preact(dtype, dy.data_ptr(), saved.data_ptr(),
                                            saved_is_output, dz.data_ptr(),
                                            has_bias ? grad_bias.data_ptr() : nullptr,
                                            workspace.data_ptr(), M, N, act,
                                            static_cast<float>(negative_slope), stream),
               "linear_act_grad_preact");
  }
  at::Tensor grad_input = empty, grad_weight = empty;
  if (need_input_grad) {  // (M, N) @ (N, K)
    const at::Tensor weight = weight_arg.contiguous();
    const int64_t K = weight.size(1);
    grad_input = at::empty({M, K}, options);
    check_cuda(cuda::gemm(dtype, dz.data_ptr(), N, 1, weight.data_ptr(), K, 1,
                          grad_input.data_ptr(), M, K, N, stream),
               "linear_act grad_input gemm");
  }
  if (need_weight_grad) {  // dz^T (N, M) @ input (M, K)
    const at::Tensor input = unit_column_stride(input_arg);
    const int64_t K = input.size(1);
    grad_weight = at::empty({N, K}, options);
    check_cuda(cuda::gemm(dtype, dz.data_ptr(), 1, N, input.data_ptr(), input.stride(0), 1,
                          grad_weight.data_ptr(), N, K, M, stream),
               "linear_act grad_weight gemm");
  }
  return {grad_input, grad_weight, grad_bias};
}
#endif  // PYKERNELS_WITH_CUDA

std::tuple<at::Tensor, at::Tensor> linear_act_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      int64_t activation, double negative_slope,
                                                      bool save_preact) {
  check_linear_args(input, weight, bias);
  const Activation act = checked_activation(activation);
  return on_device(
      input,
      [&] { return cpu::linear_act_forward(input, weight, bias, act, negative_slope, save_preact); },
      PYKERNELS_CUDA_CALL(linear_forward_cuda(false, input, weight, bias, act,
                                              negative_slope, save_preact)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, int64_t activation, double negative_slope, bool saved_is_output,
    bool has_bias, bool need_input_grad, bool need_weight_grad) {
  check_linear_args(input, weight, std::nullopt);
  const int64_t M = input.size(0), N = weight.size(0);
  check_matrix(grad_out, "grad_out", M, N);
  check_same(grad_out, input, "grad_out");
  const Activation act = checked_activation(activation);
  if (act != Activation::None) {
    check_matrix(saved, "saved", M, N);
    check_same(saved, input, "saved");
  }
  return on_device(
      input,
      [&] {
        return cpu::linear_act_backward(grad_out, input, weight, saved, act, negative_slope,
                                        saved_is_output, has_bias, need_input_grad,
                                        need_weight_grad);
      },
      PYKERNELS_CUDA_CALL(backward_cuda(grad_out, input, weight, saved, act, negative_slope,
                                        saved_is_output, has_bias, need_input_grad,
                                        need_weight_grad)));
}

}  // namespace

void bind_linear_act(pybind11::module_& m) {
  m.def("linear_act_forward", &linear_act_forward,
        "(out, preact) = act(input @ weight^T + bias); preact is empty unless save_preact",
        pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"),
        pybind11::arg("save_preact"));
  m.def("linear_act_backward", &linear_act_backward,
        "(grad_input, grad_weight, grad_bias) of linear_act; unneeded ones are empty",
        pybind11::arg("grad_out"), pybind11::arg("input"), pybind11::arg("weight"),
        pybind11::arg("saved"), pybind11::arg("activation"), pybind11::arg("negative_slope"),
        pybind11::arg("saved_is_output"), pybind11::arg("has_bias"),
        pybind11::arg("need_input_grad"), pybind11::arg("need_weight_grad"));
}

}  // namespace pykernels
