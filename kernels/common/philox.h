// The attention dropout keep mask (kernels/attention.h), one definition for the C++ CPU
// backend (csrc/cpu/attention.cpp) and the CUDA kernels (kernels/attention.cu), so both drop
// exactly the same elements (the Triton kernels draw the same bits with tl.philox). Plain
// C++ with no CUDA headers: host and device code alike.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PYKERNELS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PYKERNELS_HOST_DEVICE inline
#endif

namespace pykernels {

// The first 32-bit output word of Philox-4x32-10 (Salmon et al., SC'11) keyed by
// (k0, k1) = (low, high) halves of seed, at the counter (c0, c1) = the halves of element and
// (c2, c3) = the halves of offset.
PYKERNELS_HOST_DEVICE uint32_t philox_word0(uint64_t seed, uint64_t offset, uint64_t element) {
  uint32_t c0 = static_cast<uint32_t>(element), c1 = static_cast<uint32_t>(element >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0;
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Element ((z Hq + h) L + i) S + j is kept iff its uniform u = (word0 >> 8) / 2^24 (24 random
// bits) satisfies u >= p, i.e. iff (word0 >> 8) >= dropout_threshold(p): u * 2^24 is an
// integer and p * 2^24 is exact in double, so the integer test is the same comparison.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::ceil(p * 16777216.0));
}

PYKERNELS_HOST_DEVICE bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t element,
                                        uint32_t threshold) {
  return (philox_word0(seed, offset, element) >> 8) >= threshold;
}

}  // namespace pykernels
