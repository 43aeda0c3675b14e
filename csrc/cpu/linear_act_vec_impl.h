// The body of the SIMD float32 loops of the fused linear + activation CPU path
// (linear_act_simd.h), compiled once per ISA unit (simd_families.h). The activation math is
// kernels/common/activation.h's, instantiated with the VecMath policy.

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

void PYKERNELS_VEC_NAME(linear_act_forward_rows)(Activation act, const float* z, float* y,
                                                 int64_t rows, int64_t N, float negative_slope) {
  with_activation(act, [&](auto tag) {
    forward_rows<decltype(tag)::value>(z, y, rows, N, negative_slope);
  });
}

void PYKERNELS_VEC_NAME(linear_act_backward_cols)(Activation act, bool saved_is_output,
                                                  const float* dy, const float* saved, float* dz,
                                                  double* acc, int64_t M, int64_t N, int64_t n0,
                                                  int64_t n1, float negative_slope) {
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
