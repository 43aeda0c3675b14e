// Fused linear + activation on the CPU (float32, float64). See csrc/cpu/linear_act.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/activation.h"

namespace pykernels {
namespace cpu {

std::tuple<at::Tensor, at::Tensor> linear_act_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      Activation act, double negative_slope,
                                                      bool save_preact);

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& saved, Activation act, double negative_slope, bool saved_is_output,
    bool has_bias, bool need_input_grad, bool need_weight_grad);

}  // namespace cpu
}  // namespace pykernels
