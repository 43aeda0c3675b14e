// Launchers of the flash-style scaled dot-product attention CUDA kernels
// (kernels/attention.cu, sm_80+). Framework-free like every header in kernels/: raw
// pointers, sizes, element strides, a dtype tag and a stream; each launcher checks its own
// launches and returns the first cudaError_t. Offsets are int64. Invalid arguments (unknown
// dtype, a head dim the kernels were not built for, negative sizes, null pointers for
// tensors with elements) return cudaErrorInvalidValue.
//
// Layout. q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev), out (Z, Hq, L, Ev), each
// with its own 4 element strides (the last one need not be 1, but the fast paths want it);
// query head h reads key/value head h / (Hq / Hkv) (grouped-query attention; Hq % Hkv == 0).
// lse (Z, Hq, L) fp32, contiguous.
//
// Math, per (z, h) and query row i (fp32 throughout; p the dropout probability):
//   s_ij   = scale * <q_i, k_j>
//   s_ij   = softcap > 0 ? softcap * tanh(s_ij / softcap) : s_ij
//   s_ij  += mask_ij            (additive float mask; a boolean mask is passed as 0 / -inf)
//   s_ij   = -inf unless allowed(i, j):
//            causal: j <= i (top-left aligned, as PyTorch's is_causal)
//            window (left, right), each >= 0 or -1 for unbounded: i - left <= j <= i + right
//   lse_i  = log sum_j exp(s_ij)     (online over key tiles: running max m and sum l)
//   P_ij   = exp(s_ij - lse_i)
//   out_i  = sum_j P_ij * D_ij * v_j / (1 - p),  D_ij in {0, 1} the keep mask (below)
// A row with no allowed finite score (fully masked) gets out_i = 0 and lse_i = +inf (so
// that exp(s - lse) = 0 in the backward: it passes zero gradient), never NaN.
//
// Backward (dO given; Delta_i = sum_e dO_ie * out_ie, computed by a pre-pass):
//   dP_ij  = <dO_i, v_j> * D_ij / (1 - p)
//   dS_ij  = P_ij * (dP_ij - Delta_i)                 (the gradient of the masked score)
//   with softcap: dS_ij *= 1 - (t_ij / softcap)^2, t_ij the capped score before the mask
//   dq_i   = scale * sum_j dS_ij * k_j
//   dk_j   = scale * sum_i dS_ij * q_i    (summed over the query heads of the group)
//   dv_j   = sum_i P_ij * D_ij / (1 - p) * dO_i   (summed over the query heads of the group)
// dK/dV accumulate per key tile in fp32 and dQ in a separate pass, without atomics: results
// are bitwise identical run to run.
//
// Dropout keep mask: D_ij = 1 iff uniform(seed, offset, z, h, i, j) >= p, with the uniform
// from a counter-based generator (Philox-4x32-10 keyed by seed, counter from offset and the
// element index ((z * Hq + h) * L + i) * S + j; exact definition in common/philox.h, shared with
// the CPU backend), so forward and backward regenerate the same mask without storing it.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "attention_params.h"
#include "common/dtype.h"

namespace pykernels {
namespace cuda {

struct AttentionArgs {
  DType dtype;  // of q, k, v, out, dO, dq, dk, dv
  int64_t Z, Hq, Hkv, L, S, E, Ev;
  const void* q;
  int64_t q_strides[4];
  const void* k;
  int64_t k_strides[4];
  const void* v;
  int64_t v_strides[4];
  // Optional additive float mask in the dtype of q (bool masks are converted by the caller),
  // broadcast through zero strides over (Z, Hq, L, S); nullptr for none.
  const void* mask;
  int64_t mask_strides[4];
  AttentionParams params;  // scale and softcap are used in fp32
};

// out (Z, Hq, L, Ev) with strides out_strides, lse (Z, Hq, L) fp32 contiguous.
cudaError_t attention_forward(const AttentionArgs& args, void* out, const int64_t out_strides[4],
                              float* lse, cudaStream_t stream);

// Bytes of fp32 scratch attention_backward needs (Delta: Z * Hq * L floats).
size_t attention_backward_workspace_bytes(const AttentionArgs& args);

// dq, dk, dv with the strides of q, k, v's shapes given (dq_strides etc.); workspace as
// attention_backward_workspace_bytes says (need not be zeroed).
cudaError_t attention_backward(const AttentionArgs& args, const void* out,
                               const int64_t out_strides[4], const float* lse, const void* dout,
                               const int64_t dout_strides[4], void* dq,
                               const int64_t dq_strides[4], void* dk,
                               const int64_t dk_strides[4], void* dv,
                               const int64_t dv_strides[4], void* workspace,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace pykernels
