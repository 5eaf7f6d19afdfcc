// ffk::cpu::gemm (gemm.h): ATen's CPU mm, or oneDNN's matmul for fp32 where MKL is not on home ground.
#include "gemm.h"

#include <ATen/Context.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string_view>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

#include <cstring>
#endif

// ATen's oneDNN matmul (aten/src/ATen/native/mkldnn/Matmul.h, exported by libtorch_cpu; its header is not shipped):
// result = beta result + alpha mat1 mat2 for strided 2-D tensors. Declared weak, so that a torch without it leaves
// the extension loadable and the GEMMs with ATen's mm.
namespace at::native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                                         float beta, float alpha);
}  // namespace at::native

namespace ffk::cpu {
namespace {

// Below this many multiply-adds a GEMM stays with ATen: oneDNN's per-call cost is then a visible part of the work.
// Measured side by side on an AMD EPYC, 2 threads (MKL / oneDNN): 128^3 (2.1M) 35 / 47 us, 192^3 (7.1M) 98 / 105 us,
// 224^3 (11M) 154 / 156 us, 64x500x500 (16M) 239 / 198 us, 128x784x500 (50M) 629 / 536 us.
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 23;

// An x86 CPU whose vendor (CPUID leaf 0) is not "GenuineIntel"; false on other architectures.
bool x86_other_than_intel() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned int max_leaf = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &max_leaf, &ebx, &ecx, &edx) == 0) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::string_view(vendor) != "GenuineIntel";
#else
  return false;
#endif
}

bool onednn_available() { return at::native::mkldnn_matmul != nullptr && at::hasMKLDNN(); }

bool choose_onednn() {
  const char* env = std::getenv("FF_KERNELS_CPU_GEMM");
  const std::string_view choice = env == nullptr ? "auto" : env;
  if (choice == "aten") return false;
  if (choice == "onednn") {
    TORCH_CHECK(onednn_available(), "FF_KERNELS_CPU_GEMM=onednn, but this torch has no oneDNN matmul");
    return true;
  }
  TORCH_CHECK_VALUE(choice == "auto" || choice.empty(), "FF_KERNELS_CPU_GEMM must be aten, onednn or auto; got '",
                    choice, "'");
  // MKL's own kernels on Intel CPUs; elsewhere on x86 (where ATen's fp32 mm is MKL) oneDNN's.
  return x86_other_than_intel() && onednn_available() && at::hasMKL();
}

bool use_onednn() {
  static const bool chosen = choose_onednn();
  return chosen;
}

}  // namespace

std::string gemm_library() { return use_onednn() ? "onednn" : "aten"; }

void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (a.scalar_type() == at::kFloat && a.size(0) * a.size(1) * b.size(1) >= kOneDnnMinMacs && use_onednn()) {
    at::native::mkldnn_matmul(a, b, out, accumulate ? 1.0f : 0.0f, 1.0f);
    return;
  }
  if (accumulate) {
    at::cpu::addmm_(out, a, b);
  } else {
    at::cpu::mm_out(out, a, b);
  }
}

}  // namespace ffk::cpu
