// Gated linear unit on the CPU (float32, float64). See csrc/cpu/linear_glu.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/activation.h"

namespace pykernels {
namespace cpu {

// (h, gu): h = act(g) * u for [g | u] = input @ weight^T + bias, weight (2n, K) = [Wg; Wu];
// gu (M, 2n) holds [g | u] when save_preact, else it is empty.
std::tuple<at::Tensor, at::Tensor> linear_glu_forward(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      Activation act, double negative_slope,
                                                      bool save_preact);

// (dgu, grad_bias) from grad_out (M, n) and the saved gu (M, 2n): dgu = [dg | du] (M, 2n),
// grad_bias its column sums (2n), empty unless has_bias.
std::tuple<at::Tensor, at::Tensor> linear_glu_grad_preact(const at::Tensor& grad_out,
                                                          const at::Tensor& gu, Activation act,
                                                          double negative_slope,
                                                          bool has_bias);

}  // namespace cpu
}  // namespace pykernels
