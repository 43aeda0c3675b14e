// Softmax-cross-entropy row kernels on the CPU (float32, float64). See cross_entropy.cpp
// and, for the math, kernels/cross_entropy.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace pykernels {
namespace cpu {

// logits (A, C, B) any strides; target (R = A*B) int64 class indices or (A, C, B)
// probabilities in the logits' dtype; class_weight (C) and scale ((1) or (R)) contiguous in
// the accumulation dtype (float for float32, double for float64). Returns the (R) row
// losses in the accumulation dtype; when grad (A, C, B) is given (it may be the logits
// themselves), writes scale * dloss/dlogits into it.
at::Tensor cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& class_weight,
                              int64_t ignore_index, double label_smoothing, double z_loss,
                              double softcap, const std::optional<at::Tensor>& grad,
                              const std::optional<at::Tensor>& scale);

// Index targets (int64, any shape) must be in [0, num_classes) or ignore_index: a
// ValueError names the first other one. A loop on the host: no tensor operations.
void check_targets(const at::Tensor& target, int64_t num_classes, int64_t ignore_index);

}  // namespace cpu
}  // namespace pykernels
