// The options of one attention call (the math is in attention.h), one struct for the C++
// CPU backend (csrc/cpu/attention.h) and the CUDA launchers (AttentionArgs in attention.h),
// so the binding (csrc/attention.cpp) validates them once and hands the same values to
// either device. Plain C++, no CUDA headers: the CPU-only build reads it too.
#pragma once

#include <cstdint>

namespace pykernels {

struct AttentionParams {
  double scale;
  bool causal;
  int64_t window_left, window_right;  // -1: unbounded
  double softcap;                     // 0: none
  // In [0, 1). Double, as both backends compare with it: the keep test against
  // dropout_threshold(p) (common/philox.h) must see the same p to drop the same elements.
  double dropout_p;
  uint64_t seed, offset;
};

}  // namespace pykernels
