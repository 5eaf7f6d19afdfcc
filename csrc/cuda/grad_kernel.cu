// GEMM 2 of the FF step (DESIGN section 3): grad_W = (c r h)^T x over all P + Q rows, with the optimizer update of
// the weight tile (and of the bias slice) fused into the epilogue.
//
// Block (tile, s) of a (tiles, split) grid owns one TM x TN tile of W (TM output features by TN input features) and
// reduces over split s's range of rows (plan.h: split > 1 only when the tiles alone fill less than a wave). The
// operands are A_i = (c_i / 2^s) h_i and B_i = r_i x_i (coefficient_scale in ff_kernels.h), each formed in fp32 and
// rounded to T once in shared memory, and the epilogue multiplies the fp32 product by 2^s: c_i r_i h_ij would
// underflow fp16 at large batches and overflow it where r_i is near 1/eps, while |A| <= |h| and |B| <= 1 (sqrt(K)
// for RMS). Neither operand ever exists in global memory. The blocks of K tile 0 also reduce grad_b = sum_i c_i h_i
// in fp32 from the unscaled h they see there.
//
// Copies are always 16 bytes, whatever the alignment of h's and x's rows (N or K = 500 in 16-bit types included):
// each row's covering aligned span lands in a raw stage (load_spans), and the scaling pass, which rewrites every
// element anyway, reads it at the row's offset and writes the operand buffer the tensor cores read.
//
// With split > 1 each block stores its fp32 partial tile (and bias partial) to the workspace and takes a ticket; the
// tile's last block adds the partials in split order 0, 1, ..., split - 1, whatever order the blocks finished in,
// so the result is reproducible, and applies the optimizer once.
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

// Two 128 x 128 blocks per SM (at most 128 registers a thread, 2 x 71 KB of shared memory) for 16-bit operands,
// which fit that without spills; 0 (no minimum) leaves fp32 to the compiler: TF32's WMMA fragment loads go through
// generic addresses and spill under 128 registers.
template <class T, class C>
constexpr int grad_min_blocks() {
  return sizeof(T) == 2 && C::THREADS == 256 ? 2 : 0;
}

template <class T, class C, class Mma>
__global__ void __launch_bounds__(C::THREADS, grad_min_blocks<T, C>()) ff_grad_update_kernel(const GradParams p) {
#if !FFK_ARCH_SUPPORTED
  __trap();
#else
  // Stage layout: the h tile (TR rows of TM features) then the x tile (TR rows of TN features); STAGES raw stages,
  // then the operand buffer.
  constexpr int LDH = C::TM + C::PAD, LDX = C::TN + C::PAD;
  constexpr int H_ELEMS = C::TR * LDH, STAGE_ELEMS = C::TR * (LDH + LDX);
  // Scaling pass: thread -> one column of the h tile and the same column of the x tile, every RG-th row.
  constexpr int RG = C::THREADS / C::TM;
  static_assert(RG >= 1 && C::THREADS % C::TM == 0 && C::TM % 32 == 0 && C::TN == C::TM, "scaling pass mapping");
  constexpr int TILE = C::TM * C::TN, TILE4 = TILE / 4;

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float gb_s[RG][C::TM];
  __shared__ bool last_block;
  T* stages = reinterpret_cast<T*>(smem);
  T* Hs = stages + C::STAGES * STAGE_ELEMS;
  T* Xs = Hs + H_ELEMS;
  float* Cs = reinterpret_cast<float*>(smem);  // the epilogue tile reuses the pipeline buffers

  const T* xp = static_cast<const T*>(p.x_pos);
  const T* xn = static_cast<const T*>(p.x_neg);
  const T* h = static_cast<const T*>(p.h);
  const int64_t M = p.M, N = p.N, K = p.K, P = p.P;
  const int64_t k_tiles = (K + C::TN - 1) / C::TN;
  const int64_t tile = blockIdx.x;
  const int64_t tile_k = tile % k_tiles, tile_n = tile / k_tiles;
  const int64_t n0 = tile_n * C::TM, k0 = tile_k * C::TN;
  const bool bias_tile = p.b != nullptr && tile_k == 0;
  const int split = static_cast<int>(blockIdx.y), splits = static_cast<int>(gridDim.y);
  const int64_t chunks = (M + C::TR - 1) / C::TR;
  const int64_t chunk0 = split * chunks / splits;
  const int count = static_cast<int>((split + 1) * chunks / splits - chunk0);
  const float inv_scale = 1.f / p.coef_scale;

  auto h_row = [&](int64_t i) -> const T* { return h + i * N; };
  auto x_row = [&](int64_t i) -> const T* { return i < P ? xp + i * K : xn + (i - P) * K; };
  auto load_stage = [&](int stage, int it) {
    T* raw = stages + stage * STAGE_ELEMS;
    const int64_t i0 = (chunk0 + it) * C::TR;
    load_spans<T, C::TR, C::TM, C::THREADS>(
        raw, LDH, [&](int r) -> const T* { return i0 + r < M ? h_row(i0 + r) : nullptr; }, n0, N);
    load_spans<T, C::TR, C::TN, C::THREADS>(
        raw + H_ELEMS, LDX, [&](int r) -> const T* { return i0 + r < M ? x_row(i0 + r) : nullptr; }, k0, K);
  };

  const int col = static_cast<int>(threadIdx.x) % C::TM;
  const int rg = static_cast<int>(threadIdx.x) / C::TM;
  const bool h_col = n0 + col < N, x_col = k0 + col < K;
  float gb = 0.f;
  Mma mma;
  mma.zero();

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < count) load_stage(s, s);
    cp_async_commit();
  }
  for (int it = 0; it < count; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // stage it has landed, and the previous products no longer read the operand buffer
    const int prefetch = it + C::STAGES - 1;
    if (prefetch < count) load_stage(prefetch % C::STAGES, prefetch);
    cp_async_commit();

    // h_ij -> (c_i / 2^s) h_ij (and grad_b += c_i h_ij), x_ik -> r_i x_ik, each read at its row's offset in the raw
    // stage; rows past M and columns past the matrix become zeros.
    const T* Hr = stages + (it % C::STAGES) * STAGE_ELEMS;
    const T* Xr = Hr + H_ELEMS;
    const int64_t i0 = (chunk0 + it) * C::TR;
#pragma unroll 4
    for (int r = rg; r < C::TR; r += RG) {
      const int64_t i = i0 + r;
      float hv = 0.f, xv = 0.f;
      if (i < M) {
        if (h_col) {
          const float c = __ldg(p.c + i);  // every lane of the warp reads the same row: one broadcast load
          const float v = to_float(Hr[r * LDH + misalignment(h_row(i) + n0) + col]);
          if (bias_tile) gb = fmaf(c, v, gb);
          hv = v * (c * inv_scale);
        }
        if (x_col) {
          xv = to_float(Xr[r * LDX + misalignment(x_row(i) + k0) + col]);
          if (p.r != nullptr) xv *= __ldg(p.r + i);
        }
      }
      Hs[r * LDH + col] = from_float<T>(hv);
      Xs[r * LDX + col] = from_float<T>(xv);
    }
    __syncthreads();
    mma.template step<false, true>(Hs, LDH, Xs, LDX);
  }
  cp_async_wait<0>();
  __syncthreads();
  mma.store(Cs);
  if (bias_tile) gb_s[rg][col] = gb;
  __syncthreads();
  // Thread m < TM owns the bias gradient of feature n0 + m from here on.
  const int tid = static_cast<int>(threadIdx.x);
  float gbias = 0.f;
  if (bias_tile && tid < C::TM) {
#pragma unroll
    for (int j = 0; j < RG; ++j) gbias += gb_s[j][tid];
  }

  if (splits > 1) {
    const int64_t tiles = gridDim.x;
    const int64_t n_tiles = (N + C::TM - 1) / C::TM;
    float4* slot = reinterpret_cast<float4*>(p.partials) + (split * tiles + tile) * TILE4;
    for (int e = tid; e < TILE4; e += C::THREADS) {
      const int m = e / (C::TN / 4), c4 = e % (C::TN / 4);
      slot[e] = *reinterpret_cast<const float4*>(Cs + m * C::LDC + 4 * c4);
    }
    if (bias_tile && tid < C::TM) p.bias_partials[(split * n_tiles + tile_n) * C::TM + tid] = gbias;
    __threadfence();  // this thread's partials are visible device-wide before the block takes its ticket
    __syncthreads();
    if (tid == 0) {
      last_block = atomicAdd(p.tickets + tile, 1u) == static_cast<unsigned>(splits - 1);
      __threadfence();  // and the other blocks' partials are read only after their tickets
    }
    __syncthreads();
    if (!last_block) return;
    // __ldcg: from L2, where the other blocks' stores are; never a stale L1 line.
    const float4* slots = reinterpret_cast<const float4*>(p.partials) + tile * TILE4;
    for (int e = tid; e < TILE4; e += C::THREADS) {
      float4 acc = __ldcg(slots + e);
      for (int s = 1; s < splits; ++s) {
        const float4 v = __ldcg(slots + s * tiles * TILE4 + e);
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
      }
      const int m = e / (C::TN / 4), c4 = e % (C::TN / 4);
      *reinterpret_cast<float4*>(Cs + m * C::LDC + 4 * c4) = acc;
    }
    if (bias_tile && tid < C::TM) {
      gbias = __ldcg(p.bias_partials + tile_n * C::TM + tid);
      for (int s = 1; s < splits; ++s) gbias += __ldcg(p.bias_partials + (s * n_tiles + tile_n) * C::TM + tid);
    }
    if (tid == 0) p.tickets[tile] = 0;  // leaves the workspace ready for another launch
    __syncthreads();
  }

  const Slot slot_w{p.opt.s1w, p.opt.s2w, p.opt.first_w, p.opt.step_size_w, p.opt.bc2_sqrt_w};
  T* w = static_cast<T*>(p.w);
  T* gw = static_cast<T*>(p.grad_w);
  const int warp = tid / 32, lane = tid % 32;
  for (int m = warp; m < C::TM; m += C::WARPS) {
    const int64_t n = n0 + m;
    if (n >= N) break;
    for (int c = lane; c < C::TN; c += 32) {
      const int64_t k = k0 + c;
      if (k < K) apply(p.opt, w, gw, n * K + k, Cs[m * C::LDC + c] * p.coef_scale, slot_w);
    }
  }
  if (bias_tile && tid < C::TM && n0 + tid < N) {
    const Slot slot_b{p.opt.s1b, p.opt.s2b, p.opt.first_b, p.opt.step_size_b, p.opt.bc2_sqrt_b};
    apply(p.opt, static_cast<T*>(p.b), static_cast<T*>(p.grad_b), n0 + tid, gbias, slot_b);
  }
#endif  // FFK_ARCH_SUPPORTED
}

// One GEMM 2 instantiation: its kernel and its dynamic shared memory (STAGES raw stages and the operand buffer, or
// the fp32 epilogue tile that reuses them).
template <class T, int CFG, bool SIMT>
struct GradKernel {
  using C = Cfg<CFG, T>;
  using Mma = std::conditional_t<SIMT, SimtMma<C>, WmmaMma<T, C>>;
  static constexpr size_t kPipe = sizeof(T) * (C::STAGES + 1) * C::TR * (C::TM + C::TN + 2 * C::PAD);
  static constexpr size_t kEpilogue = sizeof(float) * C::TM * C::LDC;
  static constexpr size_t kSmem = kPipe > kEpilogue ? kPipe : kEpilogue;
  static constexpr auto kernel = ff_grad_update_kernel<T, C, Mma>;
};

template <class T, int CFG, bool SIMT>
int launch(const GradParams& p, int split, int device, cudaStream_t stream) {
  using G = GradKernel<T, CFG, SIMT>;
  using C = typename G::C;
  const int64_t tiles = (p.N + C::TM - 1) / C::TM * ((p.K + C::TN - 1) / C::TN);
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX || split < 1 || split > 65535) return cudaErrorInvalidConfiguration;
  const cudaError_t err = allow_smem<G::kernel>(G::kSmem, device);
  if (err != cudaSuccess) return err;
  G::kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(split)), C::THREADS, G::kSmem, stream>>>(p);
  return cudaGetLastError();
}

struct GradLauncher {
  int split;
  template <class T, int CFG, bool SIMT>
  int run(const GradParams& p, int device, cudaStream_t stream) const {
    return launch<T, CFG, SIMT>(p, split, device, stream);
  }
};

// Writes the blocks of an instantiation that one SM holds at once (registers, shared memory, threads).
struct GradOccupancy {
  int* blocks;
  template <class T, int CFG, bool SIMT>
  int run(const GradParams&, int device, cudaStream_t) const {
    using G = GradKernel<T, CFG, SIMT>;
    const cudaError_t err = allow_smem<G::kernel>(G::kSmem, device);
    if (err != cudaSuccess) return err;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, G::kernel, G::C::THREADS, G::kSmem);
  }
};

}  // namespace

int launch_grad(const GradParams& p, DType dtype, bool allow_tf32, int cfg, int split, int device,
                cudaStream_t stream) {
  return dispatch(GradLauncher{split}, p, dtype, allow_tf32, cfg, device, stream);
}

int grad_blocks_per_sm(DType dtype, bool allow_tf32, int cfg, int device) {
  int blocks = 0;
  const int err = dispatch(GradOccupancy{&blocks}, GradParams{}, dtype, allow_tf32, cfg, device, nullptr);
  if (err != cudaSuccess) cudaGetLastError();  // cleared, so that the step's next launch check does not report it
  return err == cudaSuccess && blocks > 0 ? blocks : 1;
}

}  // namespace detail
}  // namespace ffk
