// What the capability variants of kernels_impl.h include before their ISA is switched on. Everything here is compiled
// for the baseline ISA: an inline function with external linkage compiled for AVX-512 in one variant could be the
// copy the linker keeps for all of them, and then fault on an AVX2 machine. So every header with such code comes
// first, and only ATen's vector headers (code in at::vec::CPU_CAPABILITY) and kernels_impl.h (code in
// ffk::cpu::CPU_CAPABILITY) are compiled for the variant's ISA.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "kernels.h"

// The x86 variants switch their ISA on with GCC's target pragma, which (unlike -m flags) does not define the ISA
// macros; sleef.h, which ATen's vector headers include, declares its vector functions only under them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FFK_CPU_X86_VARIANTS 1
#else
#define FFK_CPU_X86_VARIANTS 0
#endif
