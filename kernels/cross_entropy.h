// Launchers of the softmax-cross-entropy CUDA kernels (kernels/cross_entropy.cu, sm_80+).
// Framework-free like every header in kernels/: raw pointers, sizes, element strides, a
// dtype tag and a stream; each launcher checks its own launches and returns the first
// cudaError_t. Sizes, strides and offsets are int64, so tensors past 2^31 elements are
// addressed correctly. Invalid arguments (unknown dtype, negative or overflowing sizes, a
// null pointer for a tensor that has elements, an option outside its range or not finite,
// both target pointers or neither, grad == logits with other strides, a negative
// scale_stride) return cudaErrorInvalidValue.
//
// Layout. The logits are a 3-D view (A, C, B) with element strides (s_a, s_c, s_b): C
// classes, R = A * B rows, row r = a * B + b. That covers (C,) as (1, C, 1), (N, C) as
// (N, C, 1) and (N, C, d1, ..., dk) as (N, C, d1 * ... * dk) without copies. Per-row
// arrays (index targets, loss rows, per-row scales) are contiguous in that row order.
//
// Math of one row (fp32 throughout; the Python layer in pykernels/ops/cross_entropy.py
// turns loss rows into the reduced loss):
//   s_c   = softcap > 0 ? softcap * tanh(x_c / softcap) : x_c
//   lse   = log sum_c exp(s_c)                       (online: running max and sum)
//   index target t (eps = label_smoothing, w = class weight or 1, W = sum_c w_c):
//     loss = (1 - eps) * w_t * (lse - s_t) + eps / C * sum_c w_c * (lse - s_c)
//     dloss/ds_c = p_c * ((1 - eps) * w_t + eps / C * W) - (1 - eps) * w_t * [c == t]
//                  - eps / C * w_c,                  p_c = exp(s_c - lse)
//     rows whose target is ignore_index: loss 0, gradient 0. A target outside [0, C)
//     that is not ignore_index is never used as an index: loss NaN, gradient NaN.
//   probability target q (row of C, same layout and dtype as the logits):
//     q'_c = (1 - eps) * q_c + eps / C,  Q = sum_c w_c * q'_c
//     loss = sum_c w_c * q'_c * (lse - s_c),   dloss/ds_c = p_c * Q - w_c * q'_c
//   both: z_loss adds z_loss * lse^2 to the loss and 2 * z_loss * lse * p_c to dloss/ds_c
//   (not for ignored rows); with softcap, dloss/dx_c = dloss/ds_c * (1 - (s_c/softcap)^2).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "common/dtype.h"

namespace pykernels {
namespace cuda {

struct CrossEntropyArgs {
  DType dtype;                     // of logits, prob targets and grad
  const void* logits;              // (A, C, B) view
  int64_t A, C, B;
  int64_t s_a, s_c, s_b;
  const int64_t* target_index;     // R class indices, or nullptr when target_prob is set
  const void* target_prob;         // (A, C, B) probabilities with strides t_*, or nullptr
  int64_t t_a, t_c, t_b;
  const float* class_weight;       // C weights, or nullptr (all ones)
  int64_t ignore_index;            // index targets only
  float label_smoothing;           // in [0, 1]
  float z_loss;                    // >= 0
  float softcap;                   // > 0, or 0 for none
  float* loss_rows;                // out: R fp32 row losses
  // Gradient (optional): grad (A, C, B) with strides g_*, in dtype, written as
  //   grad = scale[r * scale_stride] * dloss/dx, scale being fp32 on the device
  // (scale_stride 0: one scalar, e.g. 1 / the mean's denominator; 1: one per row). grad
  // may equal logits (same pointer and strides): each row is read completely before any
  // of its elements is written. grad == nullptr computes the loss only.
  void* grad;
  int64_t g_a, g_c, g_b;
  const float* scale;
  int64_t scale_stride;
};

// Loss rows, and the gradient when args.grad is set, in one launch (R == 0 launches
// nothing). Reads the logits at most twice per row (the second read is meant to hit L2).
cudaError_t cross_entropy_forward(const CrossEntropyArgs& args, cudaStream_t stream);

// In place: grad (A, C, B, contiguous, dtype) *= scale[r * scale_stride] for the row r of
// each element. Elements whose scale is exactly 1 are neither read nor written, so the
// usual backward (loss.backward() with grad_output 1) costs one tiny read and no pass
// over the gradient, decided on the device without a host synchronisation.
cudaError_t cross_entropy_scale_grad(DType dtype, void* grad, int64_t A, int64_t C, int64_t B,
                                     const float* scale, int64_t scale_stride,
                                     cudaStream_t stream);

}  // namespace cuda
}  // namespace pykernels
