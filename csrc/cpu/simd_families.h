// The list of the CPU families' SIMD bodies, read once by each ISA unit (simd_avx2.cpp,
// simd_avx512.cpp) after it has switched its ISA on, included <ATen/cpu/vec/vec.h> and
// defined
//   PYKERNELS_VEC_NAME(name)  an entry point's name suffixed with the unit's ISA (name_avx2)
//   PYKERNELS_VEC_SLEEF_TANH  Sleef's 3.5-ulp tanh for the unit's vector width
// (no include guard on purpose: each unit reads it once, for its ISA).
//
// A family's SIMD loops are two files: <family>_simd.h, plain C++ read on both sides of
// the ISA boundary, declaring each entry point once per ISA (name_avx2, name_avx512) for
// the family's .cpp to pick by cpu_isa(); and <family>_vec_impl.h, the one body over
// vec_math_impl.h's Vec and VecMath, defining the entry points as PYKERNELS_VEC_NAME(name)
// and everything else in an anonymous namespace (see "One-definition-rule hygiene" in
// vec_math_impl.h). A new family adds those two files and one line below; the ISA units
// stay as they are.
#include "cpu/vec_math_impl.h"

#include "cpu/linear_act_vec_impl.h"
#include "cpu/linear_glu_vec_impl.h"
#include "cpu/cross_entropy_vec_impl.h"
#include "cpu/attention_vec_impl.h"
