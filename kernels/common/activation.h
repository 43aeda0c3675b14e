// Activations and their derivatives, shared by the CUDA kernels (kernels/*.cu) and the
// fused C++ CPU path (csrc/cpu/*.cpp), so the math exists once. Plain C++ plus CUDA
// qualifiers: no torch. The ids match pykernels/activations.py.
//
// Every formula is written once, generic over the value type T and a math policy Math
// that supplies the transcendental functions and the two branch selects. The default
// policy ScalarMath<T> is plain <cmath> (host, float or double) / CUDA's math library
// (device); the CPU path also instantiates the same formulas with a SIMD policy over
// at::vec::Vectorized<float> (VecMath in csrc/cpu/vec_math_impl.h). A policy provides
//   static T exp(T), erf(T), tanh(T)
//   static T if_pos(T z, T a, T b)     // z > 0 ? a : b   (b where z is NaN)
//   static T if_nonpos(T z, T a, T b)  // z <= 0 ? a : b  (b where z is NaN)
// and T needs T(double) constants and + - * / and unary -.
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define PK_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced so a compile-time activation id folds the switch away in the CPU loops.
#define PK_HOST_DEVICE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define PK_HOST_DEVICE __forceinline
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

// The scalar math policy: <cmath> on the host, CUDA's math library on the device.
template <typename T>
struct ScalarMath {
  static PK_HOST_DEVICE T exp(T x) {
    using std::exp;
    return exp(x);
  }
  static PK_HOST_DEVICE T erf(T x) {
    using std::erf;
    return erf(x);
  }
  static PK_HOST_DEVICE T tanh(T x) {
    using std::tanh;
    return tanh(x);
  }
  static PK_HOST_DEVICE T if_pos(T z, T a, T b) { return z > T(0) ? a : b; }
  static PK_HOST_DEVICE T if_nonpos(T z, T a, T b) { return z <= T(0) ? a : b; }
};

template <typename T, typename Math = ScalarMath<T>>
PK_HOST_DEVICE T sigmoid_of(T z) {
  return T(1) / (T(1) + Math::exp(-z));
}

// act(z), with the semantics of torch.nn.functional: relu and leaky_relu propagate NaN.
template <typename T, typename Math = ScalarMath<T>>
PK_HOST_DEVICE T activation_forward(Activation act, T z, T negative_slope) {
  switch (act) {
    case Activation::Relu:
      return Math::if_nonpos(z, T(0), z);
    case Activation::Gelu:
      return T(0.5) * z * (T(1) + Math::erf(z * T(0.70710678118654752440)));
    case Activation::GeluTanh:
      return T(0.5) * z *
             (T(1) + Math::tanh(T(0.79788456080286535588) * (z + T(0.044715) * z * z * z)));
    case Activation::Silu:
      return z * sigmoid_of<T, Math>(z);
    case Activation::Sigmoid:
      return sigmoid_of<T, Math>(z);
    case Activation::Tanh:
      return Math::tanh(z);
    case Activation::LeakyRelu:
      return Math::if_pos(z, z, z * negative_slope);
    default:
      return z;
  }
}

// d act / d z, from the pre-activation z.
//   relu:      z <= 0 ? 0 : 1 (1 at NaN, as torch's threshold_backward passes the gradient)
//   gelu:      Phi(z) + z phi(z), Phi(z) = 0.5 (1 + erf(z/sqrt 2)), phi = exp(-z^2/2)/sqrt(2 pi)
//   gelu_tanh: 0.5 (1 + t) + 0.5 z (1 - t^2) sqrt(2/pi) (1 + 3 c z^2), t = tanh(sqrt(2/pi)(z + c z^3))
//   silu:      s (1 + z (1 - s)), s = sigmoid(z)
template <typename T, typename Math = ScalarMath<T>>
PK_HOST_DEVICE T activation_grad_from_preact(Activation act, T z, T negative_slope) {
  const T kSqrt2OverPi = T(0.79788456080286535588);
  const T kCubic = T(0.044715);
  switch (act) {
    case Activation::Relu:
      return Math::if_nonpos(z, T(0), T(1));
    case Activation::Gelu:
      return T(0.5) * (T(1) + Math::erf(z * T(0.70710678118654752440))) +
             z * T(0.39894228040143267794) * Math::exp(T(-0.5) * z * z);
    case Activation::GeluTanh: {
      const T t = Math::tanh(kSqrt2OverPi * (z + kCubic * z * z * z));
      return T(0.5) * (T(1) + t) +
             T(0.5) * z * (T(1) - t * t) * kSqrt2OverPi * (T(1) + T(3) * kCubic * z * z);
    }
    case Activation::Silu: {
      const T s = sigmoid_of<T, Math>(z);
      return s * (T(1) + z * (T(1) - s));
    }
    case Activation::Sigmoid: {
      const T s = sigmoid_of<T, Math>(z);
      return s * (T(1) - s);
    }
    case Activation::Tanh: {
      const T t = Math::tanh(z);
      return T(1) - t * t;
    }
    case Activation::LeakyRelu:
      return Math::if_pos(z, T(1), negative_slope);
    default:
      return T(1);
  }
}

// d act / d z, from the output y; only valid where grad_from_output(act, slope) holds.
// relu: y <= 0 ? 0 : 1 (1 at NaN, like torch's threshold_backward on the result).
template <typename T, typename Math = ScalarMath<T>>
PK_HOST_DEVICE T activation_grad_from_output(Activation act, T y, T negative_slope) {
  switch (act) {
    case Activation::Relu:
      return Math::if_nonpos(y, T(0), T(1));
    case Activation::Sigmoid:
      return y * (T(1) - y);
    case Activation::Tanh:
      return T(1) - y * y;
    case Activation::LeakyRelu:
      return Math::if_pos(y, T(1), negative_slope);
    default:
      return T(1);
  }
}

// act'(saved), where saved is y or z as grad_from_output decided in the forward.
template <typename T, typename Math = ScalarMath<T>>
PK_HOST_DEVICE T activation_grad(Activation act, T saved, bool saved_is_output, T negative_slope) {
  return saved_is_output ? activation_grad_from_output<T, Math>(act, saved, negative_slope)
                         : activation_grad_from_preact<T, Math>(act, saved, negative_slope);
}

// dz = dy * act'(saved), the branch on saved_is_output fixed at compile time. relu
// selects instead of multiplying, so a masked entry is exactly 0 even where dy is inf or
// NaN (torch's threshold_backward); every other activation is dy * act'(saved).
template <bool SavedIsOutput, typename T, typename Math = ScalarMath<T>>
PK_HOST_DEVICE T activation_backward(Activation act, T dy, T saved, T negative_slope) {
  if (act == Activation::None) return dy;
  if (act == Activation::Relu) return Math::if_nonpos(saved, T(0), dy);
  return dy * (SavedIsOutput ? activation_grad_from_output<T, Math>(act, saved, negative_slope)
                             : activation_grad_from_preact<T, Math>(act, saved, negative_slope));
}

// Calls fn(std::integral_constant<Activation, A>{}) for the runtime id act, so loops
// instantiated per activation resolve the switch at compile time and can vectorize. An
// id outside the enum calls nothing: callers validate ids first.
template <typename Fn>
PK_HOST_DEVICE void with_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::None: return fn(std::integral_constant<Activation, Activation::None>{});
    case Activation::Relu: return fn(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Gelu: return fn(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh:
      return fn(std::integral_constant<Activation, Activation::GeluTanh>{});
    case Activation::Silu: return fn(std::integral_constant<Activation, Activation::Silu>{});
    case Activation::Sigmoid:
      return fn(std::integral_constant<Activation, Activation::Sigmoid>{});
    case Activation::Tanh: return fn(std::integral_constant<Activation, Activation::Tanh>{});
    case Activation::LeakyRelu:
      return fn(std::integral_constant<Activation, Activation::LeakyRelu>{});
  }
}

}  // namespace pykernels
