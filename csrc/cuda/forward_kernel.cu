// GEMM 1 of the FF step (DESIGN section 3): h = relu(r * (x W^T) + b) with the row scale r accumulated in the same
// K loop that streams x, and the per-N-tile sum of squares of h written for the goodness (no atomics: the row
// kernel reduces the partials in a fixed order, so results are deterministic).
//
// The positive and negative batches are never concatenated: the row tiles of the grid are split between them
// (tiles [0, ceil(P/TM)) read x_pos, the rest x_neg), which costs at most one partly filled tile.
//
// Operand rows are copied with cp.async 16, 8 or 4 bytes at a time, the widest their alignment allows (VEC). Rows of
// 16-bit elements that are only 2-byte aligned (odd K) use VEC = 0: 16-byte copies of each row's covering aligned
// span (load_spans), realigned into one extra operand buffer by a shared-memory pass before the products.
#include <algorithm>
#include <climits>

#include "common.cuh"

namespace ffk {
namespace detail {
namespace {

template <class T, class C, class Mma, int VEC>
__global__ void __launch_bounds__(C::THREADS) ff_forward_kernel(const ForwardParams p) {
#if !FFK_ARCH_SUPPORTED
  __trap();
#else
  constexpr bool kSpans = VEC == 0;
  constexpr int LD = C::TR + C::PAD;
  constexpr int A_ELEMS = C::TM * LD, STAGE_ELEMS = (C::TM + C::TN) * LD;
  // Threads per row for the sum of squares of x: adjacent lanes, combined with one shuffle.
  constexpr int TPR = C::THREADS / C::TM;
  constexpr int SQ_LEN = C::TR / TPR;
  static_assert(TPR >= 1 && TPR <= 32 && (TPR & (TPR - 1)) == 0 && C::TR % TPR == 0, "row split");

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float r_s[C::TM];
  __shared__ float bias_s[C::TN];
  T* stages = reinterpret_cast<T*>(smem);
  float* Cs = reinterpret_cast<float*>(smem);  // the epilogue tile reuses the pipeline buffers

  const T* w = static_cast<const T*>(p.w);
  const T* b = static_cast<const T*>(p.b);
  const int64_t N = p.N, K = p.K;
  // N tiles vary fastest: consecutive blocks share one x row tile (read once from DRAM) while W stays in L2.
  const int64_t n_tiles = (N + C::TN - 1) / C::TN;
  const int64_t tile_n = static_cast<int64_t>(blockIdx.x) % n_tiles;
  const int64_t tile_m = static_cast<int64_t>(blockIdx.x) / n_tiles;
  const int64_t tiles_p = (p.P + C::TM - 1) / C::TM;
  const bool positive = tile_m < tiles_p;
  const T* x = static_cast<const T*>(positive ? p.x_pos : p.x_neg);
  const int64_t rows = positive ? p.P : p.Q;
  const int64_t row0 = (positive ? tile_m : tile_m - tiles_p) * C::TM;
  const int64_t out_row0 = positive ? row0 : p.P + row0;
  const int64_t n0 = tile_n * C::TN;
  const int k_tiles = static_cast<int>((K + C::TR - 1) / C::TR);

  auto x_row = [&](int r) -> const T* { return row0 + r < rows ? x + (row0 + r) * K : nullptr; };
  auto w_row = [&](int r) -> const T* { return n0 + r < N ? w + (n0 + r) * K : nullptr; };
  auto load_stage = [&](int stage, int kt) {
    T* As = stages + stage * STAGE_ELEMS;
    const int64_t k0 = static_cast<int64_t>(kt) * C::TR;
    if constexpr (kSpans) {
      load_spans<T, C::TM, C::TR, C::THREADS>(As, LD, x_row, k0, K);
      load_spans<T, C::TN, C::TR, C::THREADS>(As + A_ELEMS, LD, w_row, k0, K);
    } else {
      load_tile<T, VEC, C::TM, C::TR, C::THREADS>(As, LD, x_row, k0, K, w);
      load_tile<T, VEC, C::TN, C::TR, C::THREADS>(As + A_ELEMS, LD, w_row, k0, K, w);
    }
  };

  const bool normalize = p.normalize != static_cast<int>(Normalize::none);
  const int sq_row = static_cast<int>(threadIdx.x) / TPR;
  const int sq_part = static_cast<int>(threadIdx.x) % TPR;
  float sumsq = 0.f;
  Mma mma;
  mma.zero();

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // stage kt has landed for every thread, and stage kt - 1 is no longer being read
    const int prefetch = kt + C::STAGES - 1;
    if (prefetch < k_tiles) load_stage(prefetch % C::STAGES, prefetch);
    cp_async_commit();

    const T* As = stages + (kt % C::STAGES) * STAGE_ELEMS;
    if constexpr (kSpans) {
      // The operand buffer follows the stages; the barrier above also retired the previous products' reads of it.
      T* ops = stages + C::STAGES * STAGE_ELEMS;
      const int64_t k0 = static_cast<int64_t>(kt) * C::TR;
      realign_rows<T, C::TM, C::TR, C::THREADS>(ops, As, LD, x_row, k0, K);
      realign_rows<T, C::TN, C::TR, C::THREADS>(ops + A_ELEMS, As + A_ELEMS, LD, w_row, k0, K);
      __syncthreads();
      As = ops;
    }
    if (normalize) {
      const T* xr = As + sq_row * LD + sq_part * SQ_LEN;
#pragma unroll
      for (int j = 0; j < SQ_LEN; ++j) {
        const float v = to_float(xr[j]);
        sumsq = fmaf(v, v, sumsq);
      }
    }
    mma.template step<true, false>(As, LD, As + A_ELEMS, LD);
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps are done with the stages before Cs overwrites them

  if (normalize) {
#pragma unroll
    for (int offset = TPR / 2; offset > 0; offset >>= 1) sumsq += __shfl_xor_sync(0xffffffffu, sumsq, offset);
    if (sq_part == 0) {
      const float ms = p.normalize == static_cast<int>(Normalize::rms) ? sumsq / static_cast<float>(K) : sumsq;
      r_s[sq_row] = 1.f / (sqrtf(ms) + p.eps);
    }
  }
  if (b != nullptr) {
    for (int c = static_cast<int>(threadIdx.x); c < C::TN; c += C::THREADS)
      bias_s[c] = n0 + c < N ? to_float(b[n0 + c]) : 0.f;
  }
  mma.store(Cs);
  __syncthreads();

  if (normalize && p.r_out != nullptr && tile_n == 0) {
    for (int m = static_cast<int>(threadIdx.x); m < C::TM; m += C::THREADS)
      if (row0 + m < rows) p.r_out[out_row0 + m] = r_s[m];
  }

  // Epilogue: one warp per row, lanes along N (coalesced stores of h), then the row's partial sum of squares.
  T* h = static_cast<T*>(p.h);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  for (int m = warp; m < C::TM; m += C::WARPS) {
    if (row0 + m >= rows) break;  // warp-uniform; later rows are further out
    const float r = normalize ? r_s[m] : 1.f;
    T* h_row = h + (out_row0 + m) * N + n0;
    float sq = 0.f;
    for (int c = lane; c < C::TN; c += 32) {
      if (n0 + c < N) {
        const float z = fmaf(Cs[m * C::LDC + c], r, b != nullptr ? bias_s[c] : 0.f);
        const float hv = z <= 0.f ? 0.f : z;  // NaN propagates, as torch.relu
        h_row[c] = from_float<T>(hv);
        sq = fmaf(hv, hv, sq);  // from the fp32 value: the goodness does not see h's rounding
      }
    }
    sq = warp_sum(sq);
    if (lane == 0) p.partials[tile_n * p.M + out_row0 + m] = sq;
  }
#endif  // FFK_ARCH_SUPPORTED
}

template <class T, int CFG, bool SIMT, int VEC>
int launch(const ForwardParams& p, int device, cudaStream_t stream) {
  using C = Cfg<CFG, T>;
  using Mma = std::conditional_t<SIMT, SimtMma<C>, WmmaMma<T, C>>;
  constexpr size_t kPipe = sizeof(T) * (C::STAGES + (VEC == 0)) * (C::TM + C::TN) * (C::TR + C::PAD);
  constexpr size_t kEpilogue = sizeof(float) * C::TM * C::LDC;
  constexpr size_t kSmem = kPipe > kEpilogue ? kPipe : kEpilogue;
  const int64_t tiles = (p.N + C::TN - 1) / C::TN * ((p.P + C::TM - 1) / C::TM + (p.Q + C::TM - 1) / C::TM);
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  constexpr auto kernel = ff_forward_kernel<T, C, Mma, VEC>;
  const cudaError_t err = allow_smem<kernel>(kSmem, device);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(tiles), C::THREADS, kSmem, stream>>>(p);
  return cudaGetLastError();
}

// Copy widths compiled: 16 and 4 bytes for fp32 (its rows are always 4-byte aligned); 16, 8, 4 and aligned spans
// (0) for 16-bit types.
struct ForwardLauncher {
  int vec;
  template <class T, int CFG, bool SIMT>
  int run(const ForwardParams& p, int device, cudaStream_t stream) const {
    switch (vec) {
      case 16: return launch<T, CFG, SIMT, 16>(p, device, stream);
      case 4: return launch<T, CFG, SIMT, 4>(p, device, stream);
      default: break;
    }
    if constexpr (sizeof(T) == 2) {
      if (vec == 8) return launch<T, CFG, SIMT, 8>(p, device, stream);
      if (vec == 0) return launch<T, CFG, SIMT, 0>(p, device, stream);
    }
    return cudaErrorInvalidValue;
  }
};

}  // namespace

int launch_forward(const ForwardParams& p, DType dtype, bool allow_tf32, int cfg, int vec, int device,
                   cudaStream_t stream) {
  return dispatch(ForwardLauncher{vec}, p, dtype, allow_tf32, cfg, device, stream);
}

}  // namespace detail
}  // namespace ffk
