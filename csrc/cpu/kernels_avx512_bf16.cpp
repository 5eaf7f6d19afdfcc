// The fused CPU passes for AVX-512 with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later): ATen's AVX512
// vectors, with bf16 narrowing in one instruction (kernels_impl.h's `narrowed`). Chosen over the AVX512 variant where
// ATen runs AVX512 and the CPU reports AVX512-BF16; empty where the compiler cannot target it.
#include "kernels_prelude.h"

#if FFK_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define __AVX512BF16__ 1
#define CPU_CAPABILITY AVX512_BF16
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#pragma GCC pop_options

const ffk::cpu::Kernels* ffk::cpu::kernels_avx512_bf16() {
  return __builtin_cpu_supports("avx512bf16") ? &AVX512_BF16::table : nullptr;
}
#else
const ffk::cpu::Kernels* ffk::cpu::kernels_avx512_bf16() { return nullptr; }
#endif
