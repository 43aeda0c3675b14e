// First include of the SIMD units simd_avx2.cpp and simd_avx512.cpp, read BEFORE they
// switch their ISA on. See "One-definition-rule hygiene" in vec_math_impl.h.
//
// It brings in, compiled for the baseline ISA, everything ATen/cpu/vec/vec_base.h includes
// that does not depend on CPU_CAPABILITY (checked with g++ -H: none of these pulls in a vec
// header), so the inline functions of these headers stay baseline code, identical to every
// other unit's (c10::Half, for one, changes its body with CPU_CAPABILITY_AVX2).
#pragma once

#include "cpu/isa.h"

#if PYKERNELS_CPU_VEC_LOOPS

#if defined(CPU_CAPABILITY) || defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#error "the SIMD units set CPU_CAPABILITY themselves; build them without it"
#endif

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <type_traits>

#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <immintrin.h>

#endif  // PYKERNELS_CPU_VEC_LOOPS
