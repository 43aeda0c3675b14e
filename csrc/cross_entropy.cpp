// Binding of the softmax-cross-entropy row kernels: checks, output allocation, and dispatch
// to the CPU loops (csrc/cpu/cross_entropy.cpp) or the CUDA launchers
// (kernels/cross_entropy.cu). The Python layer (pykernels/ops/cross_entropy.py) validates the
// public arguments, views the logits as (A, C, B), and reduces the row losses.
#include <torch/extension.h>

#include "checks.h"
#include "dispatch.h"
#include "cpu/cross_entropy.h"

#ifdef PYKERNELS_WITH_CUDA
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>

#include "cross_entropy.h"
#include "cuda_checks.h"
#endif

namespace pykernels {
namespace {

// float32 accumulates the half types and itself; float64 is its own.
at::ScalarType acc_type(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_acc_vector(const at::Tensor& t, const at::Tensor& logits, const char* name,
                      int64_t n1, int64_t n2) {
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == n1 || t.size(0) == n2) && t.is_contiguous(),
              "pykernels: ", name, " must be a contiguous vector of ", n1,
              n1 == n2 ? "" : " or " + std::to_string(n2), " elements, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == acc_type(logits), "pykernels: ", name, " must have dtype ",
              acc_type(logits), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), "pykernels: ", name, " is on ", t.device(),
              ", expected ", logits.device());
}

void check_rows_args(const at::Tensor& logits, const at::Tensor& target,
                     const std::optional<at::Tensor>& class_weight,
                     const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_floating_point(),
              "pykernels: logits must be a 3-D (A, C, B) floating-point view, got ",
              logits.sizes(), " ", logits.scalar_type());
  const int64_t C = logits.size(1), R = logits.size(0) * logits.size(2);
  if (target.is_floating_point()) {
    TORCH_CHECK(target.sizes() == logits.sizes(), "pykernels: probability target must have ",
                "the logits' shape ", logits.sizes(), ", got ", target.sizes());
    check_same(target, logits, "target");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 &&
                    target.size(0) == R && target.is_contiguous(),
                "pykernels: index target must be a contiguous int64 vector of ", R,
                " rows, got ", target.scalar_type(), " ", target.sizes());
    TORCH_CHECK(target.device() == logits.device(), "pykernels: target is on ",
                target.device(), ", expected ", logits.device());
  }
  if (class_weight.has_value()) check_acc_vector(*class_weight, logits, "class_weight", C, C);
  if (grad.has_value()) {
    TORCH_CHECK(grad->sizes() == logits.sizes(), "pykernels: grad must have the logits' ",
                "shape ", logits.sizes(), ", got ", grad->sizes());
    check_same(*grad, logits, "grad");
    TORCH_CHECK(scale.has_value(), "pykernels: grad needs scale");
    check_acc_vector(*scale, logits, "scale", 1, R);
  }
}

#ifdef PYKERNELS_WITH_CUDA
at::Tensor rows_cuda(const at::Tensor& logits, const at::Tensor& target,
                     const std::optional<at::Tensor>& class_weight, int64_t ignore_index,
                     double label_smoothing, double z_loss, double softcap,
                     const std::optional<at::Tensor>& grad,
                     const std::optional<at::Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t R = logits.size(0) * logits.size(2);
  at::Tensor loss = at::empty({R}, logits.options().dtype(at::kFloat));
  const bool prob = target.is_floating_point();
  cuda::CrossEntropyArgs args{};
  args.dtype = cuda_dtype(logits);
  args.logits = logits.data_ptr();
  args.A = logits.size(0), args.C = logits.size(1), args.B = logits.size(2);
  args.s_a = logits.stride(0), args.s_c = logits.stride(1), args.s_b = logits.stride(2);
  args.target_index = prob ? nullptr : target.const_data_ptr<int64_t>();
  args.target_prob = prob ? target.data_ptr() : nullptr;
  if (prob) args.t_a = target.stride(0), args.t_c = target.stride(1), args.t_b = target.stride(2);
  args.class_weight = class_weight.has_value() ? class_weight->const_data_ptr<float>() : nullptr;
  args.ignore_index = ignore_index;
  args.label_smoothing = static_cast<float>(label_smoothing);
  args.z_loss = static_cast<float>(z_loss);
  args.softcap = static_cast<float>(softcap);
  args.loss_rows = loss.data_ptr<float>();
  if (grad.has_value()) {
    args.grad = grad->data_ptr();
    args.g_a = grad->stride(0), args.g_c = grad->stride(1), args.g_b = grad->stride(2);
    args.scale = scale->const_data_ptr<float>();
    args.scale_stride = scale->numel() == 1 ? 0 : 1;
  }
  check_cuda(cuda::cross_entropy_forward(args, c10::cuda::getCurrentCUDAStream().stream()),
             "cross_entropy_forward");
  return loss;
}

void scale_grad_cuda(at::Tensor& grad, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(grad.device());
  check_cuda(cuda::cross_entropy_scale_grad(cuda_dtype(grad), grad.data_ptr(), grad.size(0),
                                            grad.size(1), grad.size(2),
                                            scale.const_data_ptr<float>(),
                                            scale.numel() == 1 ? 0 : 1,
                                            c10::cuda::getCurrentCUDAStream().stream()),
             "cross_entropy_scale_grad");
}
#endif  // PYKERNELS_WITH_CUDA

at::Tensor cross_entropy_rows(const at::Tensor& logits, const at::Tensor& target,
                              const std::optional<at::Tensor>& class_weight,
                              int64_t ignore_index, double label_smoothing, double z_loss,
                              double softcap, const std::optional<at::Tensor>& grad,
                              const std::optional<at::Tensor>& scale) {
  check_rows_args(logits, target, class_weight, grad, scale);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1 && z_loss >= 0 && softcap >= 0,
              "pykernels: need 0 <= label_smoothing <= 1, z_loss >= 0, softcap >= 0");
  return on_device(
      logits,
      [&] {
        return cpu::cross_entropy_rows(logits, target, class_weight, ignore_index,
                                       label_smoothing, z_loss, softcap, grad, scale);
      },
      PYKERNELS_CUDA_CALL(rows_cuda(logits, target, class_weight, ignore_index,
                                    label_smoothing, z_loss, softcap, grad, scale)));
}

// grad (A, C, B), contiguous, *= scale per row ((A*B) values) or by one scalar ((1)).
void cross_entropy_scale_grad_(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && grad.is_floating_point(),
              "pykernels: grad must be a contiguous 3-D (A, C, B) floating-point tensor");
  const int64_t A = grad.size(0), B = grad.size(2);
  check_acc_vector(scale, grad, "scale", 1, A * B);
  on_device(
      grad,
      [&] {
        // On the CPU the scale is host memory: skip the pass when it is one scalar 1.
        if (scale.numel() == 1) {
          if (scale.item<double>() != 1.0) grad.mul_(scale);
          return;
        }
        grad.mul_(scale.view({A, 1, B}));
      },
      PYKERNELS_CUDA_CALL(scale_grad_cuda(grad, scale)));
}

}  // namespace

void bind_cross_entropy(pybind11::module_& m) {
  m.def("cross_entropy_rows", &cross_entropy_rows,
        "row losses of (A, C, B) logits, and scale * dloss/dlogits into grad when given",
        pybind11::arg("logits"), pybind11::arg("target"), pybind11::arg("class_weight"),
        pybind11::arg("ignore_index"), pybind11::arg("label_smoothing"),
        pybind11::arg("z_loss"), pybind11::arg("softcap"), pybind11::arg("grad"),
        pybind11::arg("scale"));
  m.def("cross_entropy_check_targets",
        [](const at::Tensor& target, int64_t num_classes, int64_t ignore_index) {
          TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong,
                      "pykernels: target must be a CPU int64 tensor, got ",
                      target.scalar_type(), " on ", target.device());
          cpu::check_targets(target, num_classes, ignore_index);
        },
        "ValueError unless every CPU int64 target is in [0, num_classes) or ignore_index",
        pybind11::arg("target"), pybind11::arg("num_classes"), pybind11::arg("ignore_index"));
  m.def("cross_entropy_scale_grad_", &cross_entropy_scale_grad_,
        "grad (A, C, B) *= scale (per row, or one scalar), in place",
        pybind11::arg("grad"), pybind11::arg("scale"));
}

}  // namespace pykernels
