// The body of the SIMD float32 loops of linear_glu_simd.h, compiled once per ISA unit
// (simd_families.h). The math is kernels/common/activation.h's with the VecMath policy, as
// in the scalar loops of linear_glu.cpp.

#include "cpu/linear_glu_simd.h"
#include "cpu/vec_math_impl.h"

namespace pykernels {
namespace cpu {
namespace {

template <Activation A>
void glu_forward_rows(const float* gu, float* h, int64_t rows, int64_t n, float negative_slope) {
  const Vec slope(negative_slope);
  for (int64_t m = 0; m < rows; ++m) {
    const float* g = gu + m * 2 * n;
    float* hrow = h + m * n;
    for_vectors(n, [&](int64_t j, int64_t count) {
      const Vec out = activation_forward<Vec, VecMath>(A, Vec::loadu(g + j, count), slope) *
                      Vec::loadu(g + n + j, count);
      out.store(hrow + j, count);
    });
  }
}

// acc[0 .. count) += the lanes of v in float64.
inline void accumulate_lanes(double* acc, Vec v, int64_t count) {
  if (count == kLanes)
    accumulate(acc, v);
  else
    accumulate_tail(acc, v, count);
}

// h = act(g) u: dg = act'(g) (dh u) (relu as a select, like activation_backward), du = dh act(g).
template <Activation A>
void glu_backward_rows(const float* dh, const float* gu, float* dgu, double* acc, int64_t rows,
                       int64_t n, float negative_slope) {
  const Vec slope(negative_slope);
  for (int64_t m = 0; m < rows; ++m) {
    const float* grow = gu + m * 2 * n;
    const float* dhrow = dh + m * n;
    float* drow = dgu + m * 2 * n;
    for_vectors(n, [&](int64_t j, int64_t count) {
      const Vec g = Vec::loadu(grow + j, count);
      const Vec d = Vec::loadu(dhrow + j, count);
      const Vec dg = activation_backward<false, Vec, VecMath>(
          A, d * Vec::loadu(grow + n + j, count), g, slope);
      const Vec du = d * activation_forward<Vec, VecMath>(A, g, slope);
      dg.store(drow + j, count);
      du.store(drow + n + j, count);
      if (acc != nullptr) {
        accumulate_lanes(acc + j, dg, count);
        accumulate_lanes(acc + n + j, du, count);
      }
    });
  }
}

}  // namespace

void PYKERNELS_VEC_NAME(linear_glu_forward_rows)(Activation act, const float* gu, float* h,
                                                int64_t rows, int64_t n, float negative_slope) {
  with_activation(act, [&](auto tag) {
    glu_forward_rows<decltype(tag)::value>(gu, h, rows, n, negative_slope);
  });
}

void PYKERNELS_VEC_NAME(linear_glu_backward_rows)(Activation act, const float* dh,
                                                 const float* gu, float* dgu, double* acc,
                                                 int64_t rows, int64_t n,
                                                 float negative_slope) {
  with_activation(act, [&](auto tag) {
    glu_backward_rows<decltype(tag)::value>(dh, gu, dgu, acc, rows, n, negative_slope);
  });
}

}  // namespace cpu
}  // namespace pykernels
