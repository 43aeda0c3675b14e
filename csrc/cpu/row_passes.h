// Helpers of the element-wise row passes of the linear families' CPU paths (linear_act.cpp,
// linear_glu.cpp): task sizes, the ISA a dtype runs at, and bias-gradient column sums that do
// not depend on the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/isa.h"

namespace pykernels {
namespace cpu {

// Elements per parallel task of the element-wise passes (work per task >> task overhead).
constexpr int64_t kGrainElements = 32768;

inline int64_t row_grain(int64_t columns) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, columns));
}

// The ISA the passes run at for scalar_t: float32 takes the SIMD units, float64 the scalar
// loops.
template <typename scalar_t>
CpuIsa isa_for() {
  return std::is_same<scalar_t, float>::value ? cpu_isa() : CpuIsa::Scalar;
}

// A pass over M rows of `width` columns in parallel row chunks: body(row_begin, rows, acc)
// processes rows [row_begin, row_begin + rows) and adds their column values to acc (width
// float64 partial sums of the chunk, zeroed; null when sums is null). The chunks are sized
// from (M, width) alone (at most kMaxRowChunks of them), and sums[c] is the sum of the
// chunks' partials in chunk order: bitwise the same for any thread count.
template <typename scalar_t, typename Body>
void rows_with_column_sums(int64_t M, int64_t width, scalar_t* sums, Body&& body) {
  constexpr int64_t kMaxRowChunks = 256;  // keeps the fp64 partials small whatever M is
  const int64_t chunk_rows =
      std::max(row_grain(width), (M + kMaxRowChunks - 1) / kMaxRowChunks);
  const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
  std::vector<double> partial(sums ? chunks * width : 0, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c)
      body(c * chunk_rows, std::min(chunk_rows, M - c * chunk_rows),
           sums ? partial.data() + c * width : nullptr);
  });
  if (sums == nullptr) return;
  at::parallel_for(0, width, kGrainElements, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      double sum = 0.0;  // fp64: the float32 bias gradient is exact to its rounding
      for (int64_t c = 0; c < chunks; ++c) sum += partial[c * width + n];
      sums[n] = static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace cpu
}  // namespace pykernels
