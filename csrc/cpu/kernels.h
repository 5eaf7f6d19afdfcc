// The fused CPU passes of the layer step, between and after its two GEMMs (gemm.h; DESIGN 3 on a CPU):
//
//   scale_rows   x_pos, x_neg -> the row scales r_i and the finiteness scan in one read of x, and xs = [r_i x_i] in
//                the compute dtype when x is in another dtype (or, below, r_i is not folded);
//   (GEMM 1)     z = xs W^T, or z = x W^T with r_i folded into the epilogue
//   finish_rows  z -> h = relu(r_i z + b) in place, the goodness, and for a step the loss, c_i and GEMM 2's left
//                operand a_i = (c_i / 2^s) h_i (times r_i when folded) with grad_b / 2^s as the column sums of
//                (c_i / 2^s) h_i, all while the row is in cache;
//   (GEMM 2)     grad_w / 2^s = a^T xs (a^T x when folded)
//   update       one pass over a parameter: 2^s, then the SGD/Adam/AdamW step (or the gradient's store).
//
// Each pass is one at::parallel_for over rows (or parameter chunks) of at::vec::Vectorized code. The passes are
// compiled once per CPU capability (kernels_{default,avx2,avx512,avx512_bf16}.cpp) and kernels() returns the variant
// ATen itself uses on this machine (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=avx2 or default selects the
// others too), AVX512 becoming AVX512_BF16 where the CPU has AVX512-BF16 (unless ATEN_CPU_CAPABILITY=avx512).
// Plain types only: step_cpu.cpp owns the tensors.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../ff_kernels.h"

namespace ffk::cpu {

// Pass 1. x_pos (P, K) and x_neg (Q, K) are contiguous in x_type; xs (P + Q, K) is written in xs_type, or, when xs
// is nullptr, the row scales r_i (P + Q,) in the accumulate type (nothing with normalize = none: r_i = 1). The
// accumulate type is double for double tensors and float otherwise.
struct ScaleRows {
  const void* x_pos = nullptr;
  const void* x_neg = nullptr;
  at::ScalarType x_type = at::kFloat;
  int64_t rows_pos = 0, rows_neg = 0, cols = 0;
  void* xs = nullptr;
  at::ScalarType xs_type = at::kFloat;
  void* scales = nullptr;  // with xs == nullptr and a normalize other than none
  Normalize normalize = Normalize::l2;
  double eps = 1e-4;
  bool check_finite = false;
  // Outputs: whether a batch holds a NaN or an infinity (only with check_finite).
  bool nonfinite_pos = false, nonfinite_neg = false;
};

// Pass 2, GEMM 1's epilogue over h (P + Q, N) in h_type, which holds z = xs W^T on entry. The goodness of the
// positive (P,) and negative (Q,) rows and everything below `a` are in the accumulate type. Inference sets
// a = nullptr and needs nothing below it.
struct FinishRows {
  void* h = nullptr;
  at::ScalarType h_type = at::kFloat;
  const void* bias = nullptr;  // (N,) in bias_type, nullable; added to z before h's one rounding
  at::ScalarType bias_type = at::kFloat;
  // (P + Q,) r_i in the accumulate type, nullable: GEMM 1 and GEMM 2 then took x itself, so z is scaled by r_i
  // before the bias and a_i carries r_i, while grad_b's sums do not.
  const void* row_scale = nullptr;
  int64_t rows_pos = 0, rows_neg = 0, cols = 0;
  double kappa = 1.0;
  void* goodness_pos = nullptr;
  void* goodness_neg = nullptr;
  void* a = nullptr;  // (P + Q, N) in h_type, stacked
  Loss loss = Loss::logistic;
  double threshold = 2.0, alpha = 4.0;
  double inv_scale = 1.0;  // 2^-s, coefficient_scale in ff_kernels.h
  const void* offset_pos = nullptr;
  const void* offset_neg = nullptr;
  void* loss_out = nullptr;        // 0-dim
  void* grad_bias = nullptr;       // (N,): sum_i a_i before rounding, or nullptr without a bias
  void* bias_partials = nullptr;   // (threads, N) scratch for grad_bias, threads = at::get_num_threads()
};

// The scratch the passes need beside their inputs and outputs, in elements of the accumulate type: grad_b's
// per-thread partial sums and the sums themselves.
inline int64_t bias_scratch(int64_t cols, int threads) { return (static_cast<int64_t>(threads) + 1) * cols; }

// Pass 3 over one parameter of `numel` elements. The state tensors are in the accumulate type (fp32 state for
// fp16/bf16 parameters, as ff_kernels.optim keeps it).
struct Update {
  const void* grad = nullptr;  // 2^-s times the gradient, in grad_type
  at::ScalarType grad_type = at::kFloat;
  double grad_scale = 1.0;     // 2^s
  void* param = nullptr;       // updated in place, or the gradient's destination for Opt::none
  at::ScalarType param_type = at::kFloat;
  int64_t numel = 0;
  Opt kind = Opt::none;
  void* state1 = nullptr;      // SGD: momentum buffer (nullptr without momentum); Adam: exp_avg
  void* state2 = nullptr;      // Adam: exp_avg_sq
  double lr = 0.0, weight_decay = 0.0;
  double momentum = 0.0, dampening = 0.0;
  bool nesterov = false, first = false;  // first: the momentum buffer is set to the gradient (torch.optim)
  double beta1 = 0.0, beta2 = 0.0, eps = 0.0;
  bool decoupled = false;
  double step_size = 0.0, bc2_sqrt = 1.0;  // lr / (1 - beta1^t) and sqrt(1 - beta2^t), from the host
  void* grad_out = nullptr;    // Opt::none: 2^s grad in param_type
};

// The goodness of a convolution's (or a layer's) output per sample and channel group, for the conv steps (DESIGN 7):
// h is (rows, positions, channels) with the channels innermost (channels-last images, or (B, N) rows with one
// position); out (rows, groups) in the accumulate type gets kappa times the sum of h^2 over each group of
// channels / groups contiguous channels and all positions, the squares formed and summed in the accumulate type.
struct GroupGoodness {
  const void* h = nullptr;
  at::ScalarType h_type = at::kFloat;
  int64_t rows = 0, positions = 0, channels = 0, groups = 1;
  double kappa = 1.0;
  void* out = nullptr;
};

struct Kernels {
  const char* capability;
  void (*scale_rows)(ScaleRows&);
  void (*finish_rows)(const FinishRows&);
  void (*update)(const Update&);
  void (*group_goodness)(const GroupGoodness&);
};

// One table per capability; nullptr where this build or this compiler has none (see kernels_avx512.cpp).
const Kernels* kernels_default();
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();
const Kernels* kernels_avx512_bf16();  // also nullptr where this CPU lacks AVX512-BF16

// The table for ATen's CPU capability on this machine, chosen once.
const Kernels& kernels();

}  // namespace ffk::cpu
