// The CUDA launchers' interface: plain C++ types only (no CUDA, no torch headers), so that the kernel files
// compile with nvcc alone and the torch binding compiles with the host compiler alone.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace ffk {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };
enum class Normalize : int { none = 0, l2 = 1, rms = 2 };
enum class Loss : int { logistic = 0, symba = 1 };
enum class Opt : int { none = 0, sgd = 1, adam = 2 };

// One fused optimizer step (DESIGN 1.7), applied in fp32 in the GEMM 2 epilogue. s1/s2 are fp32 state tensors
// shaped like the parameter: SGD's momentum buffer (s1), or Adam's exp_avg (s1) and exp_avg_sq (s2).
struct OptArgs {
  Opt kind = Opt::none;
  float lr = 0.f, weight_decay = 0.f;
  float momentum = 0.f, dampening = 0.f;  // SGD
  bool nesterov = false;
  bool first_w = false, first_b = false;  // SGD: the momentum buffer is set to the gradient on its first step
  float beta1 = 0.f, beta2 = 0.f, eps = 0.f;  // Adam / AdamW
  bool decoupled = false;                     // AdamW
  float step_size_w = 0.f, bc2_sqrt_w = 1.f;  // lr / (1 - beta1^t) and sqrt(1 - beta2^t), from the host
  float step_size_b = 0.f, bc2_sqrt_b = 1.f;
  float* s1w = nullptr;
  float* s2w = nullptr;
  float* s1b = nullptr;
  float* s2b = nullptr;
};

// One layer step on the stacked batch of M = P + Q rows (positives first). All tensors contiguous, on the current
// device; x_pos/x_neg/w/b/h/grads share `dtype`; offsets, g, loss and state are fp32.
struct StepArgs {
  DType dtype = DType::f32;
  bool allow_tf32 = false;  // fp32 only: tensor-core TF32 products instead of the exact fp32 (CUDA-core) path
  const void* x_pos = nullptr;
  const void* x_neg = nullptr;
  int64_t P = 0, Q = 0, N = 0, K = 0;
  const void* w = nullptr;  // read by GEMM 1; updated in place by GEMM 2 when opt.kind != none
  const void* b = nullptr;  // nullable
  const float* offset_pos = nullptr;
  const float* offset_neg = nullptr;
  Normalize normalize = Normalize::l2;
  Loss loss = Loss::logistic;
  float eps = 1e-4f, threshold = 2.f, alpha = 4.f, kappa = 1.f;
  bool step = true;  // false: inference (GEMM 1 and the goodness only; x_neg, loss, grads, opt unused)
  // Outputs.
  void* h = nullptr;           // (M, N)
  float* g = nullptr;          // (M,)
  float* loss_out = nullptr;   // 0-dim
  void* grad_w = nullptr;      // (N, K), written when opt.kind == none
  void* grad_b = nullptr;      // (N,), written when opt.kind == none and b != nullptr
  OptArgs opt;
};

// GEMM 2's operands are A_i = (c_i / 2^s) h_i and B_i = r_i x_i, and grad_W = 2^s (A^T B) with fp32 accumulation,
// where 2^s is this power of two >= the analytic bound on |c_i|: 2 kappa / (P + Q) for the logistic loss,
// 2 kappa |alpha| / P for SymBa. Then |A_ij| <= |h_ij| and |B_ik| <= 1 (sqrt(K) for RMS) whatever the batch size or
// the row norms, so fp16 operands neither underflow (c_i alone is ~5e-7 at P = Q = 4096) nor overflow (r_i reaches
// 1/eps), and scaling by 2^s is exact. One definition for the CUDA and CPU operators; ff_kernels/ops/scaling.py
// applies the same rule.
inline double coefficient_scale(Loss loss, int64_t rows_pos, int64_t rows_neg, double kappa, double alpha) {
  const bool symba = loss == Loss::symba;
  const int64_t rows = std::max<int64_t>(symba ? rows_pos : rows_pos + rows_neg, 1);
  const double bound = 2.0 * kappa * (symba ? std::fabs(alpha) : 1.0) / static_cast<double>(rows);
  if (!(bound > 0.0) || !std::isfinite(bound)) return 1.0;
  int exponent = 0;
  std::frexp(bound, &exponent);
  return std::ldexp(1.0, exponent);
}

// Tile configurations and the workspace the launch needs, chosen for the current device (cuda/plan.h).
struct Plan {
  int forward_cfg = 0;
  int grad_cfg = 0;
  int vec_forward = 0;  // GEMM 1's bytes per global->shared copy (16, 8, 4; 0: aligned spans realigned in smem)
  int grad_split = 1;   // GEMM 2's blocks per output tile, each over a range of rows
  int64_t n_tiles = 0;  // GEMM 1 tiles along N: rows of the partial sum-of-squares buffer
  size_t workspace_bytes = 0;
};

// launch_step returns 0 on success, a cudaError_t value, or this code when the device is older than sm_80 (the
// kernels use cp.async and bf16/TF32 tensor cores); error_string explains either.
constexpr int kErrorArch = -1;

Plan plan_step(const StepArgs& args);
int launch_step(const StepArgs& args, const Plan& plan, void* workspace, void* stream);
const char* error_string(int code);

}  // namespace ffk
