// Which SIMD units of the fused linear + activation CPU path get compiled (no includes: the
// ISA units read this before anything else). The units linear_act_avx2.cpp and
// linear_act_avx512.cpp switch their ISA on with `#pragma GCC target`, next to a baseline
// x86-64 build, so they have code only with GCC on x86-64; elsewhere linear_act.cpp keeps
// its scalar loops.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__)
#define PYKERNELS_CPU_VEC_LOOPS 1
#else
#define PYKERNELS_CPU_VEC_LOOPS 0
#endif
