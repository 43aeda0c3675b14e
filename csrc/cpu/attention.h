// Flash-style scaled dot-product attention on the CPU (float32, float64). See attention.cpp
// and, for the math, kernels/attention.h.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "attention_params.h"

namespace pykernels {
namespace cpu {

// q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev); mask: additive, in q's dtype,
// viewed as (Z, Hq, L, S) (zero strides broadcast). Shapes, dtypes and devices are checked by
// the binding (csrc/attention.cpp). Returns (out (Z, Hq, L, Ev), lse
// (Z, Hq, L)), both contiguous in q's dtype; lse is +inf on fully masked rows.
std::tuple<at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const std::optional<at::Tensor>& mask,
                                                     const AttentionParams& p);

// (dq, dk, dv), contiguous, shaped like q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const AttentionParams& p);

}  // namespace cpu
}  // namespace pykernels
