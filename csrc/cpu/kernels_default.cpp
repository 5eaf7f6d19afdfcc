// The fused CPU passes for any CPU (ATen's DEFAULT vectors), and the choice of variant for this machine.
#include <ATen/Version.h>

#include <cstdlib>
#include <string>

#include "kernels_prelude.h"

#define CPU_CAPABILITY DEFAULT
#include "kernels_impl.h"

namespace ffk::cpu {

const Kernels* kernels_default() { return &DEFAULT::table; }

const Kernels& kernels() {
  static const Kernels* const chosen = [] {
    const std::string capability = at::get_cpu_capability();
    // AVX512_BF16 upgrades AVX512 unless ATEN_CPU_CAPABILITY asked for AVX512 itself (which also tests that table).
    const char* asked = std::getenv("ATEN_CPU_CAPABILITY");
    const bool plain = asked != nullptr && std::string(asked) == "avx512";
    if (capability == "AVX512" && !plain && kernels_avx512_bf16() != nullptr) return kernels_avx512_bf16();
    if (capability == "AVX512" && kernels_avx512() != nullptr) return kernels_avx512();
    if ((capability == "AVX512" || capability == "AVX2") && kernels_avx2() != nullptr) return kernels_avx2();
    return kernels_default();
  }();
  return *chosen;
}

}  // namespace ffk::cpu
