// The body of the SIMD float32 loops of the fused linear + activation CPU path, written once
// over ATen's at::vec::Vectorized<float> and compiled once per ISA unit:
//   simd_avx2.cpp    AVX2 + FMA   (CPU_CAPABILITY=AVX2,   8 lanes)
//   simd_avx512.cpp  AVX-512      (CPU_CAPABILITY=AVX512, 16 lanes)
// Each unit reads vec_prelude.h, switches its ISA on with `#pragma GCC target`,
// sets CPU_CAPABILITY, includes <ATen/cpu/vec/vec.h>, names its entry points and its Sleef
// tanh with the macros below, and then includes this file (no include guard on purpose).
//   PYKERNELS_VEC_FORWARD     the forward entry point (linear_act_simd.h)
//   PYKERNELS_VEC_BACKWARD    the backward entry point (linear_act_simd.h)
//   PYKERNELS_VEC_SLEEF_TANH  Sleef's 3.5-ulp tanh for this vector width (vec_math_impl.h)
// The activation math is kernels/activation.h's, instantiated with the VecMath policy.
//
// One-definition-rule hygiene. An inline function a SIMD unit emits out of line is compiled
// for that ISA; were a baseline unit to emit the same name too, the linker could keep the
// SIMD copy for both and a CPU without the ISA would fault in baseline code. So:
//   * the prelude includes the CPU_CAPABILITY-independent torch/c10 headers before the
//     pragma: their inline functions keep baseline code;
//   * ATen's vec headers come in under the pragma with CPU_CAPABILITY set, which puts them
//     in the inline namespace at::vec::AVX2 / at::vec::AVX512: names no baseline unit of
//     this extension has;
//   * everything defined here is in an anonymous namespace or is an entry point whose name
//     only its unit defines, and only Vectorized<float> instantiations of the
//     kernels/activation.h templates are made (tails use masked loads, not the scalar
//     instantiations linear_act.cpp makes).
// `nm -C --defined-only` on either object lists exactly its entry points (those of
// linear_act_simd.h, cross_entropy_simd.h and attention_simd.h) as global symbols, nothing
// weak.

#include "cpu/linear_act_simd.h"
#include "cpu/vec_math_impl.h"

namespace pykernels {
namespace cpu {
namespace {

template <Activation A>
void forward_rows(const float* z, float* y, int64_t rows, int64_t N, float negative_slope) {
  const Vec slope(negative_slope);
  const int64_t n_vec = N - N % kLanes;
  const int64_t tail = N - n_vec;
  const int64_t n_pair = N - N % (2 * kLanes);
  for (int64_t m = 0; m < rows; ++m) {
    const float* zrow = z + m * N;
    float* yrow = y + m * N;
    // Two independent vectors per step: their math interleaves around the Sleef calls.
    for (int64_t n = 0; n < n_pair; n += 2 * kLanes) {
      const Vec v0 = Vec::loadu(zrow + n);
      const Vec v1 = Vec::loadu(zrow + n + kLanes);
      activation_forward<Vec, VecMath>(A, v0, slope).store(yrow + n);
      activation_forward<Vec, VecMath>(A, v1, slope).store(yrow + n + kLanes);
    }
    for (int64_t n = n_pair; n < n_vec; n += kLanes) {
      const Vec v = Vec::loadu(zrow + n);
      activation_forward<Vec, VecMath>(A, v, slope).store(yrow + n);
    }
    if (tail != 0) {
      const Vec v = Vec::loadu(zrow + n_vec, tail);
      activation_forward<Vec, VecMath>(A, v, slope).store(yrow + n_vec, tail);
    }
  }
}

// acc[0 .. kLanes) += g, widened to float64 (exact), lane by lane.
inline void accumulate(double* acc, Vec g) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = g;
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), lo));
  _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8), hi));
#else
  const __m256 v = g;
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), lo));
  _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), hi));
#endif
}

// acc[0 .. count) += the first count lanes of g (the row tail).
inline void accumulate_tail(double* acc, Vec g, int64_t count) {
  alignas(64) float lanes[kLanes];
  g.store(lanes);
  for (int64_t j = 0; j < count; ++j) acc[j] += static_cast<double>(lanes[j]);
}

template <Activation A, bool SavedIsOutput>
void backward_cols(const float* dy, const float* saved, float* dz, double* acc, int64_t M,
                   int64_t N, int64_t n0, int64_t n1, float negative_slope) {
  const Vec slope(negative_slope);
  const int64_t width = n1 - n0;
  const int64_t w_vec = width - width % kLanes;
  const int64_t tail = width - w_vec;
  const int64_t w_pair = width - width % (2 * kLanes);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t off = m * N + n0;
    const float* dyrow = dy + off;
    const float* srow = saved + off;
    float* dzrow = dz + off;
    // Two independent vectors per step, as in forward_rows.
    for (int64_t j = 0; j < w_pair; j += 2 * kLanes) {
      Vec g0 = Vec::loadu(dyrow + j);
      Vec g1 = Vec::loadu(dyrow + j + kLanes);
      if (A != Activation::None) {
        g0 = activation_backward<SavedIsOutput, Vec, VecMath>(A, g0, Vec::loadu(srow + j), slope);
        g1 = activation_backward<SavedIsOutput, Vec, VecMath>(A, g1, Vec::loadu(srow + j + kLanes),
                                                              slope);
        g0.store(dzrow + j);
        g1.store(dzrow + j + kLanes);
      }
      if (acc != nullptr) {
        accumulate(acc + j, g0);
        accumulate(acc + j + kLanes, g1);
      }
    }
    for (int64_t j = w_pair; j < w_vec; j += kLanes) {
      Vec g = Vec::loadu(dyrow + j);
      if (A != Activation::None) {
        g = activation_backward<SavedIsOutput, Vec, VecMath>(A, g, Vec::loadu(srow + j), slope);
        g.store(dzrow + j);
      }
      if (acc != nullptr) accumulate(acc + j, g);
    }
    if (tail != 0) {
      Vec g = Vec::loadu(dyrow + w_vec, tail);
      if (A != Activation::None) {
        g = activation_backward<SavedIsOutput, Vec, VecMath>(
            A, g, Vec::loadu(srow + w_vec, tail), slope);
        g.store(dzrow + w_vec, tail);
      }
      if (acc != nullptr) accumulate_tail(acc + w_vec, g, tail);
    }
  }
}

}  // namespace

void PYKERNELS_VEC_FORWARD(Activation act, const float* z, float* y, int64_t rows, int64_t N,
                           float negative_slope) {
  with_activation(act, [&](auto tag) {
    forward_rows<decltype(tag)::value>(z, y, rows, N, negative_slope);
  });
}

void PYKERNELS_VEC_BACKWARD(Activation act, bool saved_is_output, const float* dy,
                            const float* saved, float* dz, double* acc, int64_t M, int64_t N,
                            int64_t n0, int64_t n1, float negative_slope) {
  with_activation(act, [&](auto tag) {
    constexpr Activation A = decltype(tag)::value;
    if (saved_is_output)
      backward_cols<A, true>(dy, saved, dz, acc, M, N, n0, n1, negative_slope);
    else
      backward_cols<A, false>(dy, saved, dz, acc, M, N, n0, n1, negative_slope);
  });
}

}  // namespace cpu
}  // namespace pykernels
