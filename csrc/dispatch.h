// The device dispatch of every binding in csrc/: the CUDA launchers for a CUDA tensor (an
// error when this build has none), the C++ CPU kernels for a CPU tensor, an error for any
// other device. Usage, with the CUDA call written as PYKERNELS_CUDA_CALL(expression) so a
// build without CUDA never compiles it:
//   return on_device(input, [&] { return cpu::f(...); }, PYKERNELS_CUDA_CALL(f_cuda(...)));
#pragma once

#include <torch/extension.h>

#include <type_traits>

namespace pykernels {

// What PYKERNELS_CUDA_CALL gives in a build without the CUDA kernels.
struct NoCudaCall {};

#ifdef PYKERNELS_WITH_CUDA
#define PYKERNELS_CUDA_CALL(...) [&] { return __VA_ARGS__; }
#else
#define PYKERNELS_CUDA_CALL(...) ::pykernels::NoCudaCall{}
#endif

template <typename OnCpu, typename OnCuda>
auto on_device(const at::Tensor& t, OnCpu&& on_cpu, OnCuda&& on_cuda) {
  if (t.is_cuda()) {
    if constexpr (std::is_same_v<std::decay_t<OnCuda>, NoCudaCall>) {
      TORCH_CHECK(false, "pykernels._C was built without CUDA; use backend='triton' or 'torch'");
    } else {
      return on_cuda();
    }
  }
  TORCH_CHECK(t.is_cpu(), "pykernels: unsupported device ", t.device());
  return on_cpu();
}

}  // namespace pykernels
