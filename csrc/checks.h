// Argument checks shared by the bindings in csrc/. The Python layer validates every
// public argument with friendlier messages first; these guard the C++ entry points
// themselves, so no call reaches a kernel with shapes that would read out of bounds.
#pragma once

#include <torch/extension.h>

#include "activation.h"

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

}  // namespace pykernels
