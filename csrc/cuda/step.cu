// The per-row step (goodness, loss, coefficients) and the orchestration of one FF layer step:
//   GEMM 1 (forward_kernel.cu) -> row kernel (here) -> GEMM 2 with the fused update (grad_kernel.cu).
// The planning (tile configurations, copy width, GEMM 2's split, workspace layout) is plan.h's, given the device's
// SM count.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common.cuh"

namespace ffk {
namespace detail {
namespace {

using planner::kRowThreads;

struct RowParams {
  const float* partials;  // (T, M)
  float* g;               // (M,)
  float* c;               // (M,)
  float* loss_parts;      // (gridDim.x,)
  float* loss;            // 0-dim
  unsigned* counter;      // zero on entry; the last block to finish reduces loss_parts
  const float* offset_pos;
  const float* offset_neg;
  int64_t P, Q, M;
  int T;
  int loss_kind;
  bool step;
  float kappa, threshold, alpha, inv_rows;
};

// softplus(x) = max(x, 0) + log1p(exp(-|x|)): never log(1 + exp(x)), which overflows.
__device__ __forceinline__ float softplus(float x) { return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float sigmoid(float x) {
  const float e = expf(-fabsf(x));
  return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kRowThreads / 32 ? scratch[lane] : 0.f;
  return warp_sum(v);  // valid in warp 0
}

// Thread j handles positive row j and negative row j (stacked row P + j): the SymBa pairing needs both, and the
// logistic loss is a sum over rows anyway. The loss is reduced deterministically: per-block partial sums, then the
// last block to finish adds them in block order.
__global__ void __launch_bounds__(kRowThreads) ff_row_kernel(const RowParams p) {
  __shared__ float scratch[kRowThreads / 32];
  __shared__ bool last;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  const bool has_pos = j < p.P, has_neg = p.step && j < p.Q;
  float g_pos = 0.f, g_neg = 0.f;
  for (int t = 0; t < p.T; ++t) {
    if (has_pos) g_pos += p.partials[t * p.M + j];
    if (has_neg) g_neg += p.partials[t * p.M + p.P + j];
  }
  g_pos *= p.kappa;
  g_neg *= p.kappa;
  if (has_pos) p.g[j] = g_pos;
  if (has_neg) p.g[p.P + j] = g_neg;
  if (!p.step) return;

  const float total_pos = g_pos + (has_pos && p.offset_pos != nullptr ? p.offset_pos[j] : 0.f);
  const float total_neg = g_neg + (has_neg && p.offset_neg != nullptr ? p.offset_neg[j] : 0.f);
  const float two_kappa = 2.f * p.kappa;
  float term = 0.f;
  if (p.loss_kind == static_cast<int>(Loss::symba)) {
    if (has_pos) {  // P == Q
      const float arg = -p.alpha * (total_pos - total_neg);
      term = softplus(arg);
      const float c_pos = -p.alpha * sigmoid(arg) * p.inv_rows * two_kappa;
      p.c[j] = c_pos;
      p.c[p.P + j] = -c_pos;
    }
  } else {
    if (has_pos) {
      const float logit = total_pos - p.threshold;
      term += softplus(-logit);
      p.c[j] = -sigmoid(-logit) * p.inv_rows * two_kappa;
    }
    if (has_neg) {
      const float logit = p.threshold - total_neg;
      term += softplus(-logit);
      p.c[p.P + j] = sigmoid(-logit) * p.inv_rows * two_kappa;
    }
  }
  const float block_total = block_sum(term, scratch);
  if (threadIdx.x == 0) {
    p.loss_parts[blockIdx.x] = block_total;
    __threadfence();  // the partial is visible device-wide before the ticket is taken
    last = atomicAdd(p.counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  float sum = 0.f;
  for (unsigned i = threadIdx.x; i < gridDim.x; i += kRowThreads) sum += __ldcg(p.loss_parts + i);
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) {
    *p.loss = sum * p.inv_rows;
    *p.counter = 0;
  }
}

int num_sms(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 1;
  return sms;
}

// Blocks of the cfg-1 GEMM 2 kernel per SM, queried once per (device < 64, math mode) and kept (0: not yet asked).
int grad_resident(const StepArgs& a, int device) {
  static std::atomic<int> known[64][4] = {};
  const int mode = math_mode(a.dtype, a.allow_tf32);
  if (device < 0 || device >= 64) return grad_blocks_per_sm(a.dtype, a.allow_tf32, 1, device);
  int blocks = known[device][mode].load(std::memory_order_relaxed);
  if (blocks == 0) {
    blocks = grad_blocks_per_sm(a.dtype, a.allow_tf32, 1, device);
    known[device][mode].store(blocks, std::memory_order_relaxed);
  }
  return blocks;
}

}  // namespace
}  // namespace detail

Plan plan_step(const StepArgs& a) {
  int device = 0;
  cudaGetDevice(&device);
  return planner::make_plan(a, detail::num_sms(device), a.step ? detail::grad_resident(a, device) : 1);
}

int launch_step(const StepArgs& a, const Plan& plan, void* workspace, void* stream_ptr) {
  using namespace detail;
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t M = a.P + (a.step ? a.Q : 0);
  if (M == 0) return cudaSuccess;
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 8) return kErrorArch;
  const planner::Workspace ws = planner::workspace_layout(a, plan);
  auto* base = static_cast<unsigned char*>(workspace);
  auto* partials = reinterpret_cast<float*>(base + ws.partials);
  float* r = a.step && a.normalize != Normalize::none ? reinterpret_cast<float*>(base + ws.r) : nullptr;
  float* c = reinterpret_cast<float*>(base + ws.c);
  auto* counter = reinterpret_cast<unsigned*>(base + ws.counters);  // the row kernel's, then GEMM 2's tickets
  if (ws.counter_bytes != 0) {
    err = cudaMemsetAsync(counter, 0, ws.counter_bytes, stream);
    if (err != cudaSuccess) return err;
  }

  ForwardParams fp{};
  fp.x_pos = a.x_pos;
  fp.x_neg = a.step ? a.x_neg : a.x_pos;
  fp.w = a.w;
  fp.b = a.b;
  fp.h = a.h;
  fp.r_out = r;
  fp.partials = partials;
  fp.P = a.P;
  fp.Q = a.step ? a.Q : 0;
  fp.M = M;
  fp.N = a.N;
  fp.K = a.K;
  fp.normalize = static_cast<int>(a.normalize);
  fp.eps = a.eps;
  err = static_cast<cudaError_t>(
      launch_forward(fp, a.dtype, a.allow_tf32, plan.forward_cfg, plan.vec_forward, device, stream));
  if (err != cudaSuccess) return err;

  RowParams rp{};
  rp.partials = partials;
  rp.g = a.g;
  rp.c = c;
  rp.loss_parts = reinterpret_cast<float*>(base + ws.loss_parts);
  rp.loss = a.loss_out;
  rp.counter = counter;
  rp.offset_pos = a.offset_pos;
  rp.offset_neg = a.offset_neg;
  rp.P = a.P;
  rp.Q = fp.Q;
  rp.M = M;
  rp.T = static_cast<int>(plan.n_tiles);
  rp.loss_kind = static_cast<int>(a.loss);
  rp.step = a.step;
  rp.kappa = a.kappa;
  rp.threshold = a.threshold;
  rp.alpha = a.alpha;
  rp.inv_rows = 1.f / static_cast<float>(a.loss == Loss::symba ? a.P : M);
  const int64_t row_blocks = planner::cdiv(std::max(a.P, fp.Q), kRowThreads);
  ff_row_kernel<<<static_cast<unsigned>(row_blocks), kRowThreads, 0, stream>>>(rp);
  err = cudaGetLastError();
  if (err != cudaSuccess || !a.step) return err;

  GradParams gp{};
  gp.x_pos = a.x_pos;
  gp.x_neg = a.x_neg;
  gp.h = a.h;
  gp.c = c;
  gp.r = r;
  gp.w = const_cast<void*>(a.w);
  gp.b = const_cast<void*>(a.b);
  gp.grad_w = a.grad_w;
  gp.grad_b = a.grad_b;
  if (plan.grad_split > 1) {
    const planner::SplitWorkspace split = planner::split_workspace(a.N, a.K, plan.grad_cfg, plan.grad_split);
    gp.partials = reinterpret_cast<float*>(base + ws.grad_partials);
    gp.bias_partials = gp.partials + split.weight_bytes / sizeof(float);
    gp.tickets = counter + 1;
  }
  gp.P = a.P;
  gp.M = M;
  gp.N = a.N;
  gp.K = a.K;
  gp.coef_scale = static_cast<float>(coefficient_scale(a.loss, a.P, a.Q, a.kappa, a.alpha));
  gp.opt = a.opt;
  return launch_grad(gp, a.dtype, a.allow_tf32, plan.grad_cfg, plan.grad_split, device, stream);
}

const char* error_string(int code) {
  if (code == kErrorArch) return "the ff_kernels CUDA kernels need a GPU of compute capability 8.0 or newer (sm_80+)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace ffk
