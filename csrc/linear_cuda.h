// The CUDA forward shared by the bindings of linear_act (csrc/linear_act.cpp) and linear_glu
// (csrc/linear_glu.cpp), whose launchers (kernels/linear_act.h) take the same arguments.
// Only compiled with PYKERNELS_WITH_CUDA.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <torch/extension.h>

#include "cuda_checks.h"
#include "linear_act.h"

namespace pykernels {

// (out, preact) for input (M, K) and weight (R, K): linear_act (glu false) gives out (M, R)
// and preact (M, R); linear_glu (glu true, weight = [Wg; Wu]) gives out (M, R / 2) and
// preact [g | u] (M, R). preact is empty unless save_preact.
inline std::tuple<at::Tensor, at::Tensor> linear_forward_cuda(
    bool glu, const at::Tensor& input_arg, const at::Tensor& weight_arg,
    const std::optional<at::Tensor>& bias, Activation act, double negative_slope,
    bool save_preact) {
  const c10::cuda::CUDAGuard guard(input_arg.device());
  const at::Tensor input = unit_column_stride(input_arg);
  const at::Tensor weight = weight_arg.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t M = input.size(0), K = input.size(1), R = weight.size(0);
  const int64_t N = glu ? R / 2 : R;
  at::Tensor out = at::empty({M, N}, input.options());
  at::Tensor preact = at::empty(save_preact ? at::IntArrayRef{M, R} : at::IntArrayRef{0},
                                input.options());
  const auto launch = glu ? cuda::linear_glu_forward : cuda::linear_act_forward;
  check_cuda(launch(cuda_dtype(input), input.data_ptr(), input.stride(0), weight.data_ptr(),
                    bias_c.defined() ? bias_c.data_ptr() : nullptr, out.data_ptr(),
                    save_preact ? preact.data_ptr() : nullptr, M, N, K, act,
                    static_cast<float>(negative_slope),
                    c10::cuda::getCurrentCUDAStream().stream()),
             glu ? "linear_glu_forward" : "linear_act_forward");
  return {out, preact};
}

}  // namespace pykernels
