// The body of the SIMD float32 row loops of the attention CPU path (attention_simd.h),
// compiled once per ISA unit like linear_act_vec_impl.h (see its notes on the units and on
// one-definition-rule hygiene). The unit defines
//   PYKERNELS_VEC_ATTN(name)   the entry point `name` suffixed with the unit's ISA
// before including this file (no include guard on purpose).

#include "cpu/attention_simd.h"
#include "cpu/vec_math_impl.h"

namespace pykernels {
namespace cpu {
namespace {

// The mask of the lanes [c, c + count): unit stride loads, a broadcast mask repeats its one
// value, any other stride (a transposed mask view) is gathered lane by lane.
inline Vec attn_mask(const AttnRow<float>& r, int64_t c, int64_t count) {
  if (r.mask_stride == 1) return Vec::loadu(r.mask + c, count);
  if (r.mask_stride == 0) return Vec(r.mask[0]);
  alignas(64) float lanes[kLanes] = {};
  for (int64_t j = 0; j < count; ++j) lanes[j] = r.mask[(c + j) * r.mask_stride];
  return Vec::loadu(lanes);
}

// The capped score t and the score x = t + mask of a vector of dots.
struct AttnScores {
  const AttnRow<float>& r;
  VecSoftcap cap;
  Vec scale;
  explicit AttnScores(const AttnRow<float>& row) : r(row), cap(row.softcap), scale(row.scale) {}
  Vec t(Vec dot) const { return cap.s(dot * scale); }
  Vec x(Vec t, int64_t c, int64_t count) const {
    return r.mask == nullptr ? t : t + attn_mask(r, c, count);
  }
};

inline Vec attn_keep(const float* keep, int64_t c, int64_t count) {
  return keep == nullptr ? Vec(1.0f) : Vec::loadu(keep + c, count);
}

}  // namespace

float PYKERNELS_VEC_ATTN(attn_scores_max)(float* s, int64_t n, const AttnRow<float>& r) {
  const AttnScores sc(r);
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  Vec m = neg_inf;
  for_vectors(n, [&](int64_t c, int64_t count) {
    Vec x = sc.x(sc.t(Vec::loadu(s + c, count)), c, count);
    x.store(s + c, count);
    if (count < kLanes) x = Vec::set(neg_inf, x, count);  // dead tail lanes: -inf
    m = at::vec::maximum(m, x);                             // propagates NaN
  });
  return fold_lanes(m, [](float a, float b) { return (b > a || std::isnan(b)) ? b : a; });
}

float PYKERNELS_VEC_ATTN(attn_exp_sum)(float* s, int64_t n, float m, const float* keep) {
  const Vec vm(m);
  Vec sum(0.0f);
  for_vectors(n, [&](int64_t c, int64_t count) {
    Vec e = (Vec::loadu(s + c, count) - vm).exp();
    (e * attn_keep(keep, c, count)).store(s + c, count);
    if (count < kLanes) e = Vec::set(Vec(0.0f), e, count);
    sum = sum + e;
  });
  return fold_lanes(sum, [](float a, float b) { return a + b; });
}

void PYKERNELS_VEC_ATTN(attn_grad_row)(float* s, float* dp, int64_t n, const AttnRow<float>& r,
                                       float lse, float delta, const float* keep) {
  const AttnScores sc(r);
  const Vec vlse(lse), vdelta(delta), scale(r.scale);
  for_vectors(n, [&](int64_t c, int64_t count) {
    const Vec t = sc.t(Vec::loadu(s + c, count));
    const Vec prob = (sc.x(t, c, count) - vlse).exp();
    const Vec d = attn_keep(keep, c, count);
    (prob * d).store(s + c, count);
    const Vec g = prob * (Vec::loadu(dp + c, count) * d - vdelta) * sc.cap.ds(t) * scale;
    g.store(dp + c, count);
  });
}

}  // namespace cpu
}  // namespace pykernels

#undef PYKERNELS_VEC_ATTN
