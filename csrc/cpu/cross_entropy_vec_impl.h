// The body of the SIMD float32 row loops of the cross-entropy CPU path
// (cross_entropy_simd.h), compiled once per ISA unit (simd_families.h).

#include "cpu/cross_entropy_simd.h"
#include "cpu/vec_math_impl.h"

namespace pykernels {
namespace cpu {
namespace {

// u_c of the lanes [c, c + count) (count < kLanes: a masked tail; lanes past it are 0).
inline Vec ce_u(const CeRowVec& row, int64_t c, int64_t count) {
  Vec u(row.gamma);
  if (row.q != nullptr) u = at::vec::fmadd(Vec(row.beta), Vec::loadu(row.q + c, count), u);
  if (row.w != nullptr) u = u * Vec::loadu(row.w + c, count);
  return count == kLanes ? u : Vec::set(Vec(0.0f), u, count);
}

}  // namespace

float PYKERNELS_VEC_NAME(ce_row_max_x)(const CeRowVec& row) {
  Vec m(-std::numeric_limits<float>::infinity());
  for_vectors(row.C, [&](int64_t c, int64_t count) {
    Vec x = Vec::loadu(row.x + c, count);
    if (count < kLanes) x = Vec::set(m, x, count);  // the tail's dead lanes keep m
    m = at::vec::maximum(m, x);                        // propagates NaN
  });
  return fold_lanes(m, [](float a, float b) { return (b > a || std::isnan(b)) ? b : a; });
}

void PYKERNELS_VEC_NAME(ce_row_sums)(const CeRowVec& row, float m, float sums[3]) {
  const VecSoftcap cap(row.softcap);
  const Vec vm(m);
  Vec sum_exp(0.0f), sum_u(0.0f), sum_us(0.0f);
  for_vectors(row.C, [&](int64_t c, int64_t count) {
    const Vec d = cap.s(Vec::loadu(row.x + c, count)) - vm;
    Vec e = d.exp();
    if (count < kLanes) e = Vec::set(Vec(0.0f), e, count);
    sum_exp = sum_exp + e;
    if (row.want_u) {
      const Vec u = ce_u(row, c, count);
      sum_u = sum_u + u;
      // Dead tail lanes: u = 0 but d may be anything; blend so 0 * inf cannot make NaN.
      const Vec ud = u * d;
      sum_us = sum_us + (count < kLanes ? Vec::set(Vec(0.0f), ud, count) : ud);
    }
  });
  auto add = [](float a, float b) { return a + b; };
  sums[0] = fold_lanes(sum_exp, add);
  sums[1] = fold_lanes(sum_u, add);
  sums[2] = fold_lanes(sum_us, add);
}

void PYKERNELS_VEC_NAME(ce_row_grad)(const CeRowVec& row, float* g, float lse, float a, float k) {
  const VecSoftcap cap(row.softcap);
  const Vec vlse(lse), va(a), vk(k);
  for_vectors(row.C, [&](int64_t c, int64_t count) {
    const Vec s = cap.s(Vec::loadu(row.x + c, count));
    Vec d = (s - vlse).exp() * va;
    if (row.want_u) d = d - ce_u(row, c, count);
    (vk * d * cap.ds(s)).store(g + c, count);
  });
}

}  // namespace cpu
}  // namespace pykernels

