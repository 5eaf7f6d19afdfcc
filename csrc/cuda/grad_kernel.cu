// GEMM 2 of the FF step (DESIGN section 3): grad_W = (c r h)^T x over all P + Q rows, with the optimizer update of
// the weight tile (and of the bias slice) fused into the epilogue.
//
// A block owns one TM x TN tile of W (TM output features by TN input features) and reduces over every row, so the
// tile's gradient is complete in the block and the update needs no second pass and no gradient in memory. The
// operands are A_i = (c_i / 2^s) h_i and B_i = r_i x_i (coefficient_scale in ff_kernels.h), each formed in fp32
// and rounded to T once in shared memory after its tile has landed, and the epilogue multiplies the fp32 product by
// 2^s: c_i r_i h_ij would underflow fp16 at large batches and overflow it where r_i is near 1/eps, while |A| <= |h|
// and |B| <= 1 (sqrt(K) for RMS). Neither operand ever exists in global memory. The blocks of K tile 0 also reduce
// grad_b = sum_i c_i h_i in fp32 from the unscaled h they see there.
//
// No split over rows: a split needs an fp32 partial tile per split (S N K floats), which at the small layers where
// it would help (N K ~ 0.4 M, few tiles) exceeds the 5%-of-h budget for the step's extra memory; the 64 x 64
// configuration keeps the SMs busy there instead.
#include <climits>

#include "common.cuh"

namespace ffk {
namespace detail {
namespace {

struct Slot {
  float* s1;
  float* s2;
  bool first;
  float step_size, bc2_sqrt;
};

// torch.optim's single-tensor SGD / Adam / AdamW step on one element, in fp32 (DESIGN 1.7); the parameter is
// rounded once when stored. With no optimizer the gradient is stored instead.
template <class T>
__device__ __forceinline__ void apply(const OptArgs& o, T* param, T* grad_out, int64_t i, float g, const Slot& s) {
  if (o.kind == Opt::none) {
    grad_out[i] = from_float<T>(g);
    return;
  }
  float w = to_float(param[i]);
  if (o.kind == Opt::sgd) {
    if (o.weight_decay != 0.f) g = fmaf(o.weight_decay, w, g);
    if (o.momentum != 0.f) {
      const float buf = s.first ? g : fmaf(1.f - o.dampening, g, s.s1[i] * o.momentum);
      s.s1[i] = buf;
      g = o.nesterov ? fmaf(o.momentum, buf, g) : buf;
    }
    w = fmaf(-o.lr, g, w);
  } else {
    if (o.weight_decay != 0.f) {
      if (o.decoupled)
        w *= 1.f - o.lr * o.weight_decay;
      else
        g = fmaf(o.weight_decay, w, g);
    }
    float m = s.s1[i], v = s.s2[i];
    m = fmaf(1.f - o.beta1, g - m, m);             // exp_avg.lerp_(grad, 1 - beta1)
    v = fmaf(1.f - o.beta2, g * g, v * o.beta2);   // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
    s.s1[i] = m;
    s.s2[i] = v;
    const float denom = sqrtf(v) / s.bc2_sqrt + o.eps;
    w = fmaf(-s.step_size, m / denom, w);
  }
  param[i] = from_float<T>(w);
}

template <class T, class C, class Mma, int VEC>
__global__ void __launch_bounds__(C::THREADS) ff_grad_update_kernel(const GradParams p) {
#if !FFK_ARCH_SUPPORTED
  __trap();
#else
  // Stage layout: the h tile (TR rows of TM features) then the x tile (TR rows of TN features).
  constexpr int LDH = C::TM + C::PAD, LDX = C::TN + C::PAD;
  constexpr int H_ELEMS = C::TR * LDH, STAGE_ELEMS = C::TR * (LDH + LDX);
  // Scaling pass: thread -> one column of the h tile and the same column of the x tile, every RG-th row.
  constexpr int RG = C::THREADS / C::TM;
  static_assert(RG >= 1 && C::THREADS % C::TM == 0 && C::TM % 32 == 0 && C::TN == C::TM, "scaling pass mapping");

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float gb_s[RG][C::TM];
  T* stages = reinterpret_cast<T*>(smem);
  float* Cs = reinterpret_cast<float*>(smem);

  const T* xp = static_cast<const T*>(p.x_pos);
  const T* xn = static_cast<const T*>(p.x_neg);
  const T* h = static_cast<const T*>(p.h);
  const int64_t M = p.M, N = p.N, K = p.K, P = p.P;
  const int64_t k_tiles = (K + C::TN - 1) / C::TN;
  const int64_t tile_k = static_cast<int64_t>(blockIdx.x) % k_tiles;
  const int64_t tile_n = static_cast<int64_t>(blockIdx.x) / k_tiles;
  const int64_t n0 = tile_n * C::TM, k0 = tile_k * C::TN;
  const bool bias_tile = p.b != nullptr && tile_k == 0;
  const int row_tiles = static_cast<int>((M + C::TR - 1) / C::TR);
  const float inv_scale = 1.f / p.coef_scale;

  auto load_stage = [&](int stage, int rt) {
    T* Hs = stages + stage * STAGE_ELEMS;
    const int64_t i0 = static_cast<int64_t>(rt) * C::TR;
    load_tile<T, VEC, C::TR, C::TM, C::THREADS>(
        Hs, LDH, [&](int r) -> const T* { return i0 + r < M ? h + (i0 + r) * N : nullptr; }, n0, N, h);
    load_tile<T, VEC, C::TR, C::TN, C::THREADS>(
        Hs + H_ELEMS, LDX,
        [&](int r) -> const T* {
          const int64_t i = i0 + r;
          return i < P ? xp + i * K : (i < M ? xn + (i - P) * K : nullptr);
        },
        k0, K, h);
  };

  const int col = static_cast<int>(threadIdx.x) % C::TM;
  const int rg = static_cast<int>(threadIdx.x) / C::TM;
  float gb = 0.f;
  Mma mma;
  mma.zero();

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < row_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int rt = 0; rt < row_tiles; ++rt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int prefetch = rt + C::STAGES - 1;
    if (prefetch < row_tiles) load_stage(prefetch % C::STAGES, prefetch);
    cp_async_commit();

    // In place: h_ij -> (c_i / 2^s) h_ij (and grad_b += c_i h_ij), x_ik -> r_i x_ik. Rows past M stay zero.
    T* Hs = stages + (rt % C::STAGES) * STAGE_ELEMS;
    T* Xs = Hs + H_ELEMS;
    const int64_t i0 = static_cast<int64_t>(rt) * C::TR;
    const int rows = static_cast<int>(M - i0 < C::TR ? M - i0 : C::TR);
    const float* c_rows = p.c + i0;
    const float* r_rows = p.r != nullptr ? p.r + i0 : nullptr;
#pragma unroll 4
    for (int r = rg; r < rows; r += RG) {
      const float c = __ldg(c_rows + r);  // every lane of the warp reads the same row: one broadcast load
      T& he = Hs[r * LDH + col];
      const float hv = to_float(he);
      if (bias_tile) gb = fmaf(c, hv, gb);
      he = from_float<T>(hv * (c * inv_scale));
      if (r_rows != nullptr) {
        T& xe = Xs[r * LDX + col];
        xe = from_float<T>(to_float(xe) * __ldg(r_rows + r));
      }
    }
    __syncthreads();
    mma.template step<false, true>(Hs, LDH, Xs, LDX);
  }
  cp_async_wait<0>();
  __syncthreads();
  mma.store(Cs);
  if (bias_tile) gb_s[rg][col] = gb;
  __syncthreads();

  const Slot slot_w{p.opt.s1w, p.opt.s2w, p.opt.first_w, p.opt.step_size_w, p.opt.bc2_sqrt_w};
  T* w = static_cast<T*>(p.w);
  T* gw = static_cast<T*>(p.grad_w);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  for (int m = warp; m < C::TM; m += C::WARPS) {
    const int64_t n = n0 + m;
    if (n >= N) break;
    for (int c = lane; c < C::TN; c += 32) {
      const int64_t k = k0 + c;
      if (k < K) apply(p.opt, w, gw, n * K + k, Cs[m * C::LDC + c] * p.coef_scale, slot_w);
    }
  }
  if (bias_tile) {
    const Slot slot_b{p.opt.s1b, p.opt.s2b, p.opt.first_b, p.opt.step_size_b, p.opt.bc2_sqrt_b};
    for (int m = static_cast<int>(threadIdx.x); m < C::TM; m += C::THREADS) {
      if (n0 + m >= N) break;
      float g = 0.f;
#pragma unroll
      for (int j = 0; j < RG; ++j) g += gb_s[j][m];
      apply(p.opt, static_cast<T*>(p.b), static_cast<T*>(p.grad_b), n0 + m, g, slot_b);
    }
  }
#endif  // FFK_ARCH_SUPPORTED
}

template <class T, int CFG, bool SIMT, int VEC>
int launch(const GradParams& p, int device, cudaStream_t stream) {
  using C = Cfg<CFG, T>;
  using Mma = std::conditional_t<SIMT, SimtMma<C>, WmmaMma<T, C>>;
  constexpr size_t kPipe = sizeof(T) * C::STAGES * C::TR * (C::TM + C::TN + 2 * C::PAD);
  constexpr size_t kEpilogue = sizeof(float) * C::TM * C::LDC;
  constexpr size_t kSmem = kPipe > kEpilogue ? kPipe : kEpilogue;
  const int64_t tiles = (p.N + C::TM - 1) / C::TM * ((p.K + C::TN - 1) / C::TN);
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  constexpr auto kernel = ff_grad_update_kernel<T, C, Mma, VEC>;
  const cudaError_t err = allow_smem<kernel>(kSmem, device);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(tiles), C::THREADS, kSmem, stream>>>(p);
  return cudaGetLastError();
}

struct GradLauncher {
  template <class T, int CFG, bool SIMT, int VEC>
  static int run(const GradParams& p, int device, cudaStream_t stream) {
    return launch<T, CFG, SIMT, VEC>(p, device, stream);
  }
};

}  // namespace

int launch_grad(const GradParams& p, DType dtype, bool allow_tf32, int cfg, int vec, int device,
                cudaStream_t stream) {
  return dispatch<GradLauncher>(p, dtype, allow_tf32, cfg, vec, device, stream);
}

}  // namespace detail
}  // namespace ffk
