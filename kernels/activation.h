// Activations and their derivatives, shared by the CUDA kernels (kernels/*.cu) and the
// fused C++ CPU path (csrc/cpu/*.cpp), so the math exists once. Plain C++ plus CUDA
// qualifiers: no torch. The ids match pykernels/activations.py.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PK_HOST_DEVICE inline
#endif

namespace pykernels {

enum class Activation : int {
  None = 0,
  Relu = 1,
  Gelu = 2,       // erf form: 0.5 z (1 + erf(z / sqrt 2))
  GeluTanh = 3,   // 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
  Silu = 4,       // z sigmoid(z)
  Sigmoid = 5,
  Tanh = 6,
  LeakyRelu = 7,  // z > 0 ? z : slope z
};
constexpr int kNumActivations = 8;

// The backward needs act'(z). For these activations it is a function of the output
// y = act(z) alone, so the forward saves y (which the next layer keeps alive anyway)
// instead of an extra pre-activation tensor: relu' = [y > 0], sigmoid' = y (1 - y),
// tanh' = 1 - y^2, and leaky_relu' = y > 0 ? 1 : slope, valid while slope >= 0 (then
// y > 0 exactly when z > 0). The others (gelu, gelu_tanh, silu) save z.
PK_HOST_DEVICE bool grad_from_output(Activation act, float negative_slope) {
  switch (act) {
    case Activation::None:
    case Activation::Relu:
    case Activation::Sigmoid:
    case Activation::Tanh:
      return true;
    case Activation::LeakyRelu:
      return negative_slope >= 0.0f;
    default:
      return false;
  }
}

template <typename T>
PK_HOST_DEVICE T sigmoid_of(T z) {
  using std::exp;
  return T(1) / (T(1) + exp(-z));
}

template <typename T>
PK_HOST_DEVICE T activation_forward(Activation act, T z, T negative_slope) {
  using std::erf;
  using std::tanh;
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  constexpr T kCubic = T(0.044715);
  switch (act) {
    case Activation::Relu:
      return z > T(0) ? z : T(0);
    case Activation::Gelu:
      return T(0.5) * z * (T(1) + erf(z * kInvSqrt2));
    case Activation::GeluTanh:
      return T(0.5) * z * (T(1) + tanh(kSqrt2OverPi * (z + kCubic * z * z * z)));
    case Activation::Silu:
      return z * sigmoid_of(z);
    case Activation::Sigmoid:
      return sigmoid_of(z);
    case Activation::Tanh:
      return tanh(z);
    case Activation::LeakyRelu:
      return z > T(0) ? z : z * negative_slope;
    default:
      return z;
  }
}

// d act / d z, from the pre-activation z.
//   gelu:      Phi(z) + z phi(z), Phi(z) = 0.5 (1 + erf(z/sqrt 2)), phi = exp(-z^2/2)/sqrt(2 pi)
//   gelu_tanh: 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 c z^2), t = tanh(sqrt(2/pi)(z + c z^3))
//   silu:      s (1 + z (1 - s)), s = sigmoid(z)
template <typename T>
PK_HOST_DEVICE T activation_grad_from_preact(Activation act, T z, T negative_slope) {
  using std::erf;
  using std::exp;
  using std::tanh;
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  constexpr T kCubic = T(0.044715);
  switch (act) {
    case Activation::Relu:
      return z > T(0) ? T(1) : T(0);
    case Activation::Gelu:
      return T(0.5) * (T(1) + erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * exp(T(-0.5) * z * z);
    case Activation::GeluTanh: {
      const T t = tanh(kSqrt2OverPi * (z + kCubic * z * z * z));
      return T(0.5) * (T(1) + t) +
             T(0.5) * z * (T(1) - t * t) * kSqrt2OverPi * (T(1) + T(3) * kCubic * z * z);
    }
    case Activation::Silu: {
      const T s = sigmoid_of(z);
      return s * (T(1) + z * (T(1) - s));
    }
    case Activation::Sigmoid: {
      const T s = sigmoid_of(z);
      return s * (T(1) - s);
    }
    case Activation::Tanh: {
      const T t = tanh(z);
      return T(1) - t * t;
    }
    case Activation::LeakyRelu:
      return z > T(0) ? T(1) : negative_slope;
    default:
      return T(1);
  }
}

// d act / d z, from the output y; only valid where grad_from_output(act, slope) holds.
template <typename T>
PK_HOST_DEVICE T activation_grad_from_output(Activation act, T y, T negative_slope) {
  switch (act) {
    case Activation::Relu:
      return y > T(0) ? T(1) : T(0);
    case Activation::Sigmoid:
      return y * (T(1) - y);
    case Activation::Tanh:
      return T(1) - y * y;
    case Activation::LeakyRelu:
      return y > T(0) ? T(1) : negative_slope;
    default:
      return T(1);
  }
}

// act'(saved), where saved is y or z as grad_from_output decided in the forward.
template <typename T>
PK_HOST_DEVICE T activation_grad(Activation act, T saved, bool saved_is_output, T negative_slope) {
  return saved_is_output ? activation_grad_from_output(act, saved, negative_slope)
                         : activation_grad_from_preact(act, saved, negative_slope);
}

}  // namespace pykernels
