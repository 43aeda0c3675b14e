// Argument checks shared by the bindings in csrc/. The Python layer validates every
// public argument with friendlier messages first; these guard the C++ entry points
// themselves, so no call reaches a kernel with shapes that would read out of bounds.
#pragma once

#include <torch/extension.h>

#include "common/activation.h"

namespace pykernels {

inline Activation checked_activation(int64_t id) {
  TORCH_CHECK(id >= 0 && id < kNumActivations, "pykernels: activation id must be in [0, ",
              kNumActivations, "), got ", id);
  return static_cast<Activation>(id);
}

inline void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "pykernels: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "pykernels: ", name, " has dtype ",
              t.scalar_type(), ", expected ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "pykernels: ", name, " is on ", t.device(),
              ", expected ", ref.device());
}

// The operands of a linear layer, input (M, K) (2-D: the Python layer flattens the leading
// dimensions), weight (N, K) and bias (N), all of input's dtype and device.
inline void check_linear_args(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(input.dim() == 2, "pykernels: input must be 2-D here, got ", input.dim(), "-D");
  check_matrix(weight, "weight", weight.size(0), input.size(1));
  check_same(weight, input, "weight");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "pykernels: bias must have shape (", weight.size(0), "), got ", bias->sizes());
    check_same(*bias, input, "bias");
  }
}

}  // namespace pykernels
