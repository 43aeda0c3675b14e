// The body of the SIMD float32 row loops of the attention CPU path (attention_simd.h),
// compiled once per ISA unit (simd_families.h).

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

// exp for the softmax: ATen's exp_u20 (20 ulp; torch's own CPU flash attention uses it);
// against Sleef's 1-ulp exp it cut the forward's element-wise perf samples by ~15% at
// B4 H8 L512 E64. It clamps its input, which would turn NaN into a finite number: NaN lanes
// pass through instead.
inline Vec attn_exp(Vec x) { return Vec::blendv(x.exp_u20(), x, x != x); }

inline Vec attn_keep(const float* keep, int64_t c, int64_t count) {
  return keep == nullptr ? Vec(1.0f) : Vec::loadu(keep + c, count);
}

}  // namespace

float PYKERNELS_VEC_NAME(attn_scores_max)(float* s, int64_t n, const AttnRow<float>& r) {
  const AttnScores sc(r);
  const Vec neg_inf(-std::numeric_limits<float>::infinity());
  Vec m[2] = {neg_inf, neg_inf};
  for_vector_pairs(n, [&](int64_t c, int64_t count, int chain) {
    Vec x = sc.x(sc.t(Vec::loadu(s + c, count)), c, count);
    x.store(s + c, count);
    if (count < kLanes) x = Vec::set(neg_inf, x, count);  // dead tail lanes: -inf
    m[chain] = at::vec::maximum(m[chain], x);               // propagates NaN
  });
  return fold_lanes(at::vec::maximum(m[0], m[1]),
                    [](float a, float b) { return (b > a || std::isnan(b)) ? b : a; });
}

float PYKERNELS_VEC_NAME(attn_exp_sum)(float* s, int64_t n, float m, const float* keep) {
  const Vec vm(m);
  Vec sum[2] = {Vec(0.0f), Vec(0.0f)};
  for_vector_pairs(n, [&](int64_t c, int64_t count, int chain) {
    Vec e = attn_exp(Vec::loadu(s + c, count) - vm);
    (e * attn_keep(keep, c, count)).store(s + c, count);
    if (count < kLanes) e = Vec::set(Vec(0.0f), e, count);
    sum[chain] = sum[chain] + e;
  });
  return fold_lanes(sum[0] + sum[1], [](float a, float b) { return a + b; });
}

void PYKERNELS_VEC_NAME(attn_grad_row)(float* s, float* dp, int64_t n, const AttnRow<float>& r,
                                       float lse, float delta, const float* keep) {
  const AttnScores sc(r);
  const Vec vlse(lse), vdelta(delta), scale(r.scale);
  for_vectors(n, [&](int64_t c, int64_t count) {
    const Vec t = sc.t(Vec::loadu(s + c, count));
    const Vec prob = attn_exp(sc.x(t, c, count) - vlse);
    const Vec d = attn_keep(keep, c, count);
    (prob * d).store(s + c, count);
    const Vec g = prob * (Vec::loadu(dp + c, count) * d - vdelta) * sc.cap.ds(t) * scale;
    g.store(dp + c, count);
  });
}

}  // namespace cpu
}  // namespace pykernels

