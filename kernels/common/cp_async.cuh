// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers, shared by the
// tiled kernels (kernels/linear_act.cu, kernels/attention.cu). Only the first src_bytes bytes
// are read; the rest of the 16 are zero-filled, which is how partial and out-of-range chunks
// become zeros. Included by .cu files only.
#pragma once

namespace pykernels {
namespace cuda {
namespace detail {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

}  // namespace detail
}  // namespace cuda
}  // namespace pykernels
