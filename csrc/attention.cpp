// Binding of the scaled dot-product attention kernels: argument checks, then dispatch to the
// CPU implementation (csrc/cpu/attention.cpp) or the CUDA launchers (kernels/attention.cu).
// The Python layer (pykernels/ops/attention.py) validates the public arguments, views q, k, v
// as (Z, H, L, E), turns masks into an additive (Z, Hq, L, S) view in q's dtype and draws the
// dropout seed; the checks here guard the entry points themselves, so no call reaches a
// kernel with shapes, dtypes or devices that would read out of bounds.
#include <torch/extension.h>

#include "checks.h"
#include "dispatch.h"
#include "cpu/attention.h"

#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>

#include "attention.h"
#include "cuda_checks.h"
#endif

namespace pykernels {
namespace {

AttentionParams params(double scale, bool causal, int64_t window_left, int64_t window_right,
                       double softcap, double dropout_p, int64_t seed, int64_t offset) {
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1 && softcap >= 0 && window_left >= -1 &&
                  window_right >= -1,
              "pykernels: attention needs 0 <= dropout_p < 1, softcap >= 0, windows >= -1");
  return {scale, causal, window_left, window_right, softcap, dropout_p,
          static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "pykernels: q, k, v must be 4-D");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) &&
                  k.size(2) == v.size(2) && k.size(3) == q.size(3) && k.size(1) > 0 &&
                  q.size(1) % k.size(1) == 0,
              "pykernels: attention shapes do not match: q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  check_same(k, q, "k");
  check_same(v, q, "v");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 4 && mask->size(0) == q.size(0) && mask->size(1) == q.size(1) &&
                    mask->size(2) == q.size(2) && mask->size(3) == k.size(2),
                "pykernels: mask must be a (Z, Hq, L, S) view, got ", mask->sizes());
    check_same(*mask, q, "mask (in q's dtype)");
  }
}

// out and dout (Z, Hq, L, Ev) in q's dtype; lse (Z, Hq, L) as the forward returned it.
void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& v,
                           const at::Tensor& out, const at::Tensor& lse) {
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) &&
                  dout.sizes() == at::IntArrayRef(out_shape) &&
                  lse.sizes() == q.sizes().slice(0, 3),
              "pykernels: attention_backward: dout ", dout.sizes(), ", out ", out.sizes(),
              " and lse ", lse.sizes(), " do not match q ", q.sizes(), " and v ", v.sizes());
  check_same(out, q, "out");
  check_same(dout, q, "dout");
  TORCH_CHECK(lse.device() == q.device(), "pykernels: lse is on ", lse.device(), ", expected ",
              q.device());
}

#ifdef PYKERNELS_WITH_CUDA
void copy_strides(const at::Tensor& t, int64_t* strides) {
  for (int d = 0; d < 4; ++d) strides[d] = t.stride(d);
}

// The launchers' arguments; q, k, v, mask are passed with their own strides (no copies).
cuda::AttentionArgs cuda_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& mask,
                              const AttentionParams& p) {
  cuda::AttentionArgs a{};
  a.dtype = cuda_dtype(q);  // rejects anything but float32, float16, bfloat16
  a.Z = q.size(0);
  a.Hq = q.size(1);
  a.Hkv = k.size(1);
  a.L = q.size(2);
  a.S = k.size(2);
  a.E = q.size(3);
  a.Ev = v.size(3);
  TORCH_CHECK(a.E <= 256 && a.Ev <= 256,
              "pykernels: the cuda attention kernels take head dims up to 256, got E = ", a.E,
              ", Ev = ", a.Ev);
  a.q = q.data_ptr();
  copy_strides(q, a.q_strides);
  a.k = k.data_ptr();
  copy_strides(k, a.k_strides);
  a.v = v.data_ptr();
  copy_strides(v, a.v_strides);
  a.mask = mask.has_value() ? mask->data_ptr() : nullptr;
  if (mask.has_value()) copy_strides(*mask, a.mask_strides);
  a.params = p;
  return a;
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v,
                                                const std::optional<at::Tensor>& mask,
                                                const AttentionParams& p) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cuda::AttentionArgs args = cuda_args(q, k, v, mask, p);
  at::Tensor out = at::empty({args.Z, args.Hq, args.L, args.Ev}, q.options());
  at::Tensor lse = at::empty({args.Z, args.Hq, args.L}, q.options().dtype(at::kFloat));
  int64_t out_strides[4];
  copy_strides(out, out_strides);
  check_cuda(cuda::attention_forward(args, out.data_ptr(), out_strides, lse.data_ptr<float>(),
                                     c10::cuda::getCurrentCUDAStream().stream()),
             "attention_forward (cuda)");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse_arg, const std::optional<at::Tensor>& mask,
    const AttentionParams& p) {
  TORCH_CHECK(lse_arg.scalar_type() == at::kFloat,
              "pykernels: attention_backward (cuda): lse must be float32, got ",
              lse_arg.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const cuda::AttentionArgs args = cuda_args(q, k, v, mask, p);
  const at::Tensor lse = lse_arg.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::attention_backward_workspace_bytes(args))},
      q.options().dtype(at::kByte));
  int64_t out_strides[4], dout_strides[4], dq_strides[4], dk_strides[4], dv_strides[4];
  copy_strides(out, out_strides);
  copy_strides(dout, dout_strides);
  copy_strides(dq, dq_strides);
  copy_strides(dk, dk_strides);
  copy_strides(dv, dv_strides);
  check_cuda(cuda::attention_backward(args, out.data_ptr(), out_strides, lse.data_ptr<float>(),
                                      dout.data_ptr(), dout_strides, dq.data_ptr(), dq_strides,
                                      dk.data_ptr(), dk_strides, dv.data_ptr(), dv_strides,
                                      workspace.data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
             "attention_backward (cuda)");
  return {dq, dk, dv};
}
#endif  // PYKERNELS_WITH_CUDA

std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, double scale, bool causal, int64_t window_left,
    int64_t window_right, double softcap, double dropout_p, int64_t seed, int64_t offset) {
  check_inputs(q, k, v, mask);
  const AttentionParams p =
      params(scale, causal, window_left, window_right, softcap, dropout_p, seed, offset);
  return on_device(q, [&] { return cpu::attention_forward(q, k, v, mask, p); },
                   PYKERNELS_CUDA_CALL(forward_cuda(q, k, v, mask, p)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    double scale, bool causal, int64_t window_left, int64_t window_right, double softcap,
    double dropout_p, int64_t seed, int64_t offset) {
  check_inputs(q, k, v, mask);
  check_backward_inputs(dout, q, v, out, lse);
  const AttentionParams p =
      params(scale, causal, window_left, window_right, softcap, dropout_p, seed, offset);
  return on_device(q, [&] { return cpu::attention_backward(dout, q, k, v, out, lse, mask, p); },
                   PYKERNELS_CUDA_CALL(backward_cuda(dout, q, k, v, out, lse, mask, p)));
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
