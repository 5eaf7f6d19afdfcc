// The fused CPU passes for AVX2 + FMA (ATen's AVX2 capability); empty where the compiler cannot target it.
#include "kernels_prelude.h"

#if FFK_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#pragma GCC pop_options

const ffk::cpu::Kernels* ffk::cpu::kernels_avx2() { return &AVX2::table; }
#else
const ffk::cpu::Kernels* ffk::cpu::kernels_avx2() { return nullptr; }
#endif
