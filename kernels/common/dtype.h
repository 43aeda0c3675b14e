// The element-type tag of every CUDA launcher (kernels/*.h), shared by all families and by
// the bindings (csrc/cuda_checks.h maps a tensor's dtype to it). Plain C++, no CUDA
// headers: the device-side conversions are in dtype.cuh.
#pragma once

namespace pykernels {
namespace cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

}  // namespace cuda
}  // namespace pykernels
