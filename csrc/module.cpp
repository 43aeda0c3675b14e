// The pybind11 module pykernels._C: one bind_<family> per op family.
#include <torch/extension.h>

namespace pykernels {
void bind_linear_act(pybind11::module_& m);
void bind_linear_glu(pybind11::module_& m);
void bind_cross_entropy(pybind11::module_& m);
void bind_attention(pybind11::module_& m);
void bind_shortcut(pybind11::module_& m);
}  // namespace pykernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pykernels compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("has_cuda", [] {
#ifdef PYKERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether this build contains the CUDA kernels");
  pykernels::bind_linear_act(m);
  pykernels::bind_linear_glu(m);
  pykernels::bind_cross_entropy(m);
  pykernels::bind_attention(m);
  pykernels::bind_shortcut(m);
}
