// Helpers of the CUDA side of the bindings (only compiled with PYKERNELS_WITH_CUDA): the
// kernels' dtype tag of a tensor, the unit column stride they read matrices with, and
// turning a launcher's cudaError_t into an exception.
#pragma once

#include <cuda_runtime.h>
#include <torch/extension.h>

#include "common/dtype.h"

namespace pykernels {

inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::Float32;
    case at::kHalf: return cuda::DType::Float16;
    case at::kBFloat16: return cuda::DType::BFloat16;
    default:
      TORCH_CHECK(false, "pykernels: the cuda backend supports float32, float16 and bfloat16, got ",
                  t.scalar_type());
  }
}

// Row-major with unit column stride, as the kernels expect; copies only when it is not.
inline at::Tensor unit_column_stride(const at::Tensor& t) {
  return (t.stride(1) == 1 && t.stride(0) >= t.size(1)) ? t : t.contiguous();
}

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "pykernels: ", what, " failed: ", cudaGetErrorString(err));
}

}  // namespace pykernels
