// The CPU step's two GEMMs, through the library that runs them fastest here. ATen's fp32 mm calls MKL, which takes
// its generic code paths on CPUs other than Intel's: on an AMD EPYC (Zen 4) with 2 threads it runs the step's GEMMs
// (M = 1024, K = 784 or 500, N = 500) at about 0.78x the speed of oneDNN's matmul, which ATen carries and calls for
// bf16 and fp16 but not for fp32. So fp32 GEMMs of a useful size go to oneDNN where MKL is not on home ground;
// everything else, and every GEMM on Intel CPUs, stays with ATen's choice.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace ffk::cpu {

// out = a b (accumulate: out += a b). a, b and out are 2-D CPU tensors in one dtype, rows or transposed views.
void gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// Which library gemm() gives fp32 products of a useful size: "onednn" or "aten". FF_KERNELS_CPU_GEMM=aten|onednn|auto
// overrides the choice (read once, at the first call); an unknown value raises.
std::string gemm_library();

}  // namespace ffk::cpu
