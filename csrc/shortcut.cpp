// The shortcut of small eager CPU calls (pykernels/ops/_shortcut.py): each function takes a
// public function's arguments as Python objects and, when the call is one the full way
// would send straight to the torch composition, computes that composition with the very
// ATen operators torch.nn.functional calls (at::linear, at::gelu, at::cross_entropy_loss,
// at::scaled_dot_product_attention...) and returns the tensor; otherwise it returns None and
// the Python full way runs (it alone owns the error messages). One Python -> C++ crossing per
// call instead of one per operator plus the argument checks in Python: on tiny tensors a
// call's cost is mostly that host time.
//
// Accepted: ordinary CPU tensors (torch.Tensor or nn.Parameter, no subclass, no meta) of a
// float dtype, the common arguments, sizes below the family's CPU crossover (`limit`), no
// torch-function mode (the full way's torch.nn.functional calls would show it the call). An
// operator that throws also means None: the full way then raises pykernels' own error for
// what ATen rejected (shapes that do not match, a bad class index, dtypes that differ).
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cmath>
#include <optional>

#include "common/activation.h"

namespace pykernels {
namespace {

namespace py = pybind11;

// The tensor in `o` if it is an ordinary CPU tensor of a float dtype, else nullptr.
const at::Tensor* float_cpu_tensor(py::handle o) {
  if (!THPVariable_CheckExact(o.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o.ptr());
  const auto dtype = t.scalar_type();
  const bool floating = dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                        dtype == at::kBFloat16;
  return t.is_cpu() && floating ? &t : nullptr;
}

const at::Tensor* index_cpu_tensor(py::handle o) {
  if (!THPVariable_CheckExact(o.ptr())) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(o.ptr());
  return t.is_cpu() && t.scalar_type() == at::kLong ? &t : nullptr;
}

bool is_float(py::handle o) { return PyFloat_CheckExact(o.ptr()); }
double as_double(py::handle o) { return PyFloat_AS_DOUBLE(o.ptr()); }

bool is_name(py::handle o, const char* name) {
  return PyUnicode_CompareWithASCIIString(o.ptr(), name) == 0;
}

// The activation named by `o` (pykernels.activations.ACTIVATIONS, in the order of
// Activation's ids); nullopt for anything else.
std::optional<Activation> activation_of(py::handle o) {
  static const char* const kNames[kNumActivations] = {
      "none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "leaky_relu"};
  if (!PyUnicode_CheckExact(o.ptr())) return std::nullopt;
  for (int i = 0; i < kNumActivations; ++i) {
    if (is_name(o, kNames[i])) return static_cast<Activation>(i);
  }
  return std::nullopt;
}

at::Tensor activate(const at::Tensor& z, Activation activation, double negative_slope) {
  switch (activation) {
    case Activation::Relu: return at::relu(z);
    case Activation::Gelu: return at::gelu(z);
    case Activation::GeluTanh: return at::gelu(z, "tanh");
    case Activation::Silu: return at::silu(z);
    case Activation::Sigmoid: return at::sigmoid(z);
    case Activation::Tanh: return at::tanh(z);
    case Activation::LeakyRelu: return at::leaky_relu(z, negative_slope);
    case Activation::None: break;
  }
  return z;
}

// PyTorch's reduction enum (at::Reduction) of 'none' / 'mean' / 'sum'; -1 for others.
int reduction_index(py::handle o) {
  if (!PyUnicode_CheckExact(o.ptr())) return -1;
  if (is_name(o, "none")) return at::Reduction::None;
  if (is_name(o, "mean")) return at::Reduction::Mean;
  if (is_name(o, "sum")) return at::Reduction::Sum;
  return -1;
}

// An exact int that fits int64 (bool is not one), else nullopt.
std::optional<int64_t> as_int64(py::handle o) {
  if (!PyLong_CheckExact(o.ptr())) return std::nullopt;
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(o.ptr(), &overflow);
  if (overflow != 0) return std::nullopt;
  return static_cast<int64_t>(value);
}

// The result of `compute` (run without the GIL, as torch's own bindings run operators), or
// None when it throws.
template <typename F>
py::object run(F compute) {
  at::Tensor out;
  bool threw = false;
  {
    py::gil_scoped_release no_gil;
    try {
      out = compute();
    } catch (const std::exception&) {
      threw = true;  // the full way raises pykernels' own error for it
    }
  }
  if (threw) return py::none();
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

// A linear layer's call the shortcut takes: the weight and bias check_args wants where
// at::linear would take others too (a 1-D weight, a broadcasting bias; at::linear rejects the
// rest itself), a known activation, a float slope, input rows * in * out / `out_divisor`
// below `limit` (linear_glu's weight stacks two layers: out_divisor 2, an even row count).
struct LinearCall {
  const at::Tensor* input;
  const at::Tensor* weight;
  std::optional<at::Tensor> bias;
  Activation activation;
  double negative_slope;
};

std::optional<LinearCall> linear_call(py::handle input, py::handle weight, py::handle bias,
                                      py::handle activation, py::handle negative_slope,
                                      int64_t out_divisor, double limit) {
  const auto act = activation_of(activation);
  LinearCall call{float_cpu_tensor(input), float_cpu_tensor(weight), std::nullopt,
                  act.value_or(Activation::None), 0.0};
  const at::Tensor* w = call.weight;
  if (at::impl::torch_function_mode_enabled() || call.input == nullptr || w == nullptr ||
      w->dim() != 2 || w->size(0) % out_divisor != 0 || !act ||
      !is_float(negative_slope) ||
      !(static_cast<double>(call.input->numel()) * (w->size(0) / out_divisor) < limit)) {
    return std::nullopt;
  }
  if (!bias.is_none()) {
    const at::Tensor* b = float_cpu_tensor(bias);
    if (b == nullptr || b->dim() != 1 || b->size(0) != w->size(0)) return std::nullopt;
    call.bias = *b;
  }
  call.negative_slope = as_double(negative_slope);
  return call;
}

py::object linear_act(py::handle input, py::handle weight, py::handle bias,
                      py::handle activation, py::handle negative_slope, double limit) {
  const auto c = linear_call(input, weight, bias, activation, negative_slope, 1, limit);
  if (!c) return py::none();
  return run([&] {
    return activate(at::linear(*c->input, *c->weight, c->bias), c->activation,
                    c->negative_slope);
  });
}

py::object linear_glu(py::handle input, py::handle weight, py::handle bias,
                      py::handle activation, py::handle negative_slope, double limit) {
  const auto c = linear_call(input, weight, bias, activation, negative_slope, 2, limit);
  if (!c) return py::none();
  return run([&] {
    const auto gate_up = at::linear(*c->input, *c->weight, c->bias).chunk(2, -1);
    return activate(gate_up[0], c->activation, c->negative_slope) * gate_up[1];
  });
}

// The options both losses share, as F.cross_entropy computes them like the full way: no class
// weights, z_loss or softcap; valid label smoothing, ignore_index, reduction, flag.
struct LossOptions {
  int64_t ignore_index = -100;
  int reduction = -1;
  double label_smoothing = 0.0;
};

std::optional<LossOptions> loss_options(py::handle weight, py::handle ignore_index,
                                        py::handle reduction, py::handle label_smoothing,
                                        py::handle z_loss, py::handle softcap,
                                        py::handle inplace_backward) {
  const auto index = as_int64(ignore_index);
  LossOptions options;
  options.reduction = reduction_index(reduction);
  if (!weight.is_none() || !softcap.is_none() || !is_float(z_loss) || as_double(z_loss) != 0.0 ||
      !is_float(label_smoothing) || !index || options.reduction < 0 ||
      !PyBool_Check(inplace_backward.ptr())) {
    return std::nullopt;
  }
  options.label_smoothing = as_double(label_smoothing);
  if (!(options.label_smoothing >= 0.0 && options.label_smoothing <= 1.0)) return std::nullopt;
  options.ignore_index = *index;
  return options;
}

py::object cross_entropy(py::handle input, py::handle target, py::handle weight,
                         py::handle ignore_index, py::handle reduction,
                         py::handle label_smoothing, py::handle z_loss, py::handle softcap,
                         py::handle inplace_backward, double limit) {
  const at::Tensor* x = float_cpu_tensor(input);
  const at::Tensor* t = index_cpu_tensor(target);
  if (at::impl::torch_function_mode_enabled() || x == nullptr || t == nullptr ||
      !(x->numel() > 0 && static_cast<double>(x->numel()) < limit)) {
    return py::none();
  }
  const auto o = loss_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                              inplace_backward);
  if (!o) return py::none();
  return run([&] {
    return at::cross_entropy_loss(*x, *t, {}, o->reduction, o->ignore_index,
                                  o->label_smoothing);
  });
}

py::object linear_cross_entropy(py::handle input, py::handle linear_weight, py::handle target,
                                py::handle linear_bias, py::handle weight,
                                py::handle ignore_index, py::handle reduction,
                                py::handle label_smoothing, py::handle z_loss,
                                py::handle softcap, py::handle chunk_size,
                                py::handle inplace_backward, double limit) {
  const at::Tensor* x = float_cpu_tensor(input);
  const at::Tensor* w = float_cpu_tensor(linear_weight);
  const at::Tensor* t = index_cpu_tensor(target);
  if (at::impl::torch_function_mode_enabled() || x == nullptr || w == nullptr ||
      t == nullptr || !linear_bias.is_none() || !chunk_size.is_none() || x->dim() > 2 ||
      w->dim() != 2) {
    return py::none();
  }
  const double size = static_cast<double>(x->numel()) * w->size(0);
  const auto o = loss_options(weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                              inplace_backward);
  if (!(size > 0 && size < limit) || !o) return py::none();
  return run([&] {
    return at::cross_entropy_loss(at::linear(*x, *w), *t, {}, o->reduction, o->ignore_index,
                                  o->label_smoothing);
  });
}

// (B, H, L, E) query, (B, H, S, E) key, (B, H, S, Ev) value with S, E, Ev >= 1: the layout
// where at::scaled_dot_product_attention computes what the full way gives it (no broadcast
// batch or heads, at least one key); B * H * L * S * E, or 0 for any other layout.
double attention_size(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return 0;
  const auto qs = q.sizes(), ks = k.sizes(), vs = v.sizes();
  const bool same = qs[0] == ks[0] && ks[0] == vs[0] && qs[1] == ks[1] && ks[1] == vs[1] &&
                    ks[2] == vs[2] && qs[3] == ks[3];
  if (!same || ks[2] == 0 || qs[3] == 0 || vs[3] == 0) return 0;
  return static_cast<double>(q.numel()) * ks[2];
}

py::object attention(py::handle query, py::handle key, py::handle value, py::handle attn_mask,
                     py::handle dropout_p, py::handle is_causal, py::handle scale,
                     py::handle enable_gqa, py::handle window, py::handle softcap,
                     double limit) {
  const at::Tensor* q = float_cpu_tensor(query);
  const at::Tensor* k = float_cpu_tensor(key);
  const at::Tensor* v = float_cpu_tensor(value);
  if (at::impl::torch_function_mode_enabled() || q == nullptr || k == nullptr || v == nullptr ||
      !attn_mask.is_none() || !window.is_none() || !softcap.is_none() ||
      enable_gqa.ptr() != Py_False || !PyBool_Check(is_causal.ptr()) || !is_float(dropout_p) ||
      !(scale.is_none() || is_float(scale))) {
    return py::none();
  }
  const double dropout = as_double(dropout_p);
  std::optional<double> scale_value;
  if (!scale.is_none()) {
    scale_value = as_double(scale);
    if (!std::isfinite(*scale_value)) return py::none();
  }
  const double size = attention_size(*q, *k, *v);
  if (!(dropout >= 0.0 && dropout < 1.0) || !(size > 0 && size < limit)) return py::none();
  const bool causal = is_causal.ptr() == Py_True;
  return run([&] {
    return at::scaled_dot_product_attention(*q, *k, *v, {}, dropout, causal, scale_value);
  });
}

}  // namespace

void bind_shortcut(py::module_& m) {
  auto s = m.def_submodule("shortcut", "small eager CPU calls (pykernels/ops/_shortcut.py)");
  s.def("linear_act", &linear_act);
  s.def("linear_glu", &linear_glu);
  s.def("cross_entropy", &cross_entropy);
  s.def("linear_cross_entropy", &linear_cross_entropy);
  s.def("attention", &attention);
}

}  // namespace pykernels
