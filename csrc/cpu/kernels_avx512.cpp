// The fused CPU passes for AVX-512 F/BW/VL/DQ (ATen's AVX512 capability); empty where the compiler cannot target it.
#include "kernels_prelude.h"

#if FFK_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#pragma GCC pop_options

const ffk::cpu::Kernels* ffk::cpu::kernels_avx512() { return &AVX512::table; }
#else
const ffk::cpu::Kernels* ffk::cpu::kernels_avx512() { return nullptr; }
#endif
