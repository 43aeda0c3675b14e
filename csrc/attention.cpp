// Binding of the scaled dot-product attention kernels: dispatch to the CPU implementation
// (csrc/cpu/attention.cpp). The Python layer (pykernels/ops/attention.py) validates the
// public arguments, views q, k, v as (Z, H, L, E), turns masks into an additive (Z, Hq, L, S)
// view and draws the dropout seed.
#include <torch/extension.h>

#include "cpu/attention.h"

namespace pykernels {
namespace {

cpu::AttentionParams params(double scale, bool causal, int64_t window_left,
                            int64_t window_right, double softcap, double dropout_p,
                            int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1 && softcap >= 0 && window_left >= -1 &&
                  window_right >= -1,
              "pykernels: attention needs 0 <= dropout_p < 1, softcap >= 0, windows >= -1");
  return {scale, causal, window_left, window_right, softcap, dropout_p,
          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

void check_device(const at::Tensor& q) {
  TORCH_CHECK(q.is_cpu(), "pykernels._C has no CUDA attention kernels yet; use backend='triton'");
}

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, int64_t seed, int64_t offset) {
  check_device(q);
  return cpu::attention_forward(q, k, v, mask, params(scale, causal, window_left, window_right,
                                                      softcap, dropout_p, seed, offset));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    double dropout_p, int64_t seed, int64_t offset) {
  check_device(q);
  return cpu::attention_backward(dout, q, k, v, out, lse, mask,
                                 params(scale, causal, window_left, window_right, softcap,
                                        dropout_p, seed, offset));
}

}  // namespace

void bind_attention(pybind11::module_& m) {
  using pybind11::arg;
  m.def("attention_forward", &attention_forward, "(out, lse) of flash-style attention",
        arg("q"), arg("k"), arg("v"), arg("mask"), arg("scale"), arg("causal"),
        arg("window_left"), arg("window_right"), arg("softcap"), arg("dropout_p"), arg("seed"),
        arg("offset"));
  m.def("attention_backward", &attention_backward, "(dq, dk, dv) of flash-style attention",
        arg("dout"), arg("q"), arg("k"), arg("v"), arg("out"), arg("lse"), arg("mask"),
        arg("scale"), arg("causal"), arg("window_left"), arg("window_right"), arg("softcap"),
        arg("dropout_p"), arg("seed"), arg("offset"));
}

}  // namespace pykernels
