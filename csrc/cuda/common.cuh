// Device building blocks shared by the GEMM kernels: element conversions, cp.async, the shared-memory tile loader,
// the tile configurations and the two matrix-product policies (WMMA tensor cores, CUDA-core fp32 FMA).
// CUDA headers only: these files compile with nvcc alone (tests/test_nvcc.py), without torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "../ff_kernels.h"
#include "plan.h"

// Kernel bodies compile to a trap below sm_80 (cp.async, bf16 and TF32 WMMA need Ampere), so that a build whose
// TORCH_CUDA_ARCH_LIST includes older GPUs still succeeds; launch_step refuses those devices with a clear error.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FFK_ARCH_SUPPORTED 0
#else
#define FFK_ARCH_SUPPORTED 1
#endif

namespace ffk {
namespace detail {

// ---------------------------------------------------------------------------------------------------------------
// Kernel parameters (host and device)
// ---------------------------------------------------------------------------------------------------------------
struct ForwardParams {
  const void* x_pos;
  const void* x_neg;
  const void* w;
  const void* b;        // nullable
  void* h;              // (M, N), M = P + Q
  float* r_out;         // (M,) the row scales, stored by the N-tile-0 blocks; nullable
  float* partials;      // (n_tiles, M): sum_j h_ij^2 over each N tile
  int64_t P, Q, M, N, K;
  int normalize;        // Normalize
  float eps;
};

struct GradParams {
  const void* x_pos;
  const void* x_neg;
  const void* h;        // (M, N)
  const float* c;       // (M,) c_i = 2 kappa dL/dg_i
  const float* r;       // (M,) row scales r_i, or nullptr for normalize="none" (r_i = 1)
  void* w;              // updated in place when opt.kind != none
  void* b;              // nullable
  void* grad_w;         // written when opt.kind == none
  void* grad_b;
  // gridDim.y > 1 (plan.h's split): the fp32 partial tiles, the bias partials and the per-tile arrival counters.
  float* partials;
  float* bias_partials;
  unsigned* tickets;
  int64_t P, M, N, K;
  float coef_scale;     // 2^s of coefficient_scale (ff_kernels.h): the operands are c h / 2^s and r x
  OptArgs opt;
};

// ---------------------------------------------------------------------------------------------------------------
// Element conversions. torch builds .cu files with __CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion
// is explicit.
// ---------------------------------------------------------------------------------------------------------------
template <class T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------------------------
// cp.async (sm_80+): asynchronous global->shared copies; src_bytes = 0 zero-fills (out-of-range rows/columns).
// ---------------------------------------------------------------------------------------------------------------
template <int BYTES>
__device__ __forceinline__ void copy_async(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? BYTES : 0;
  if constexpr (BYTES == 16) {
    // .cg: bypass L1, the tile is used once from shared memory.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
  } else {
    static_assert(BYTES == 8 || BYTES == 4, "cp.async copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(gmem), "n"(BYTES),
                 "r"(src_bytes));
  }
}

template <int = 0>
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Loads a ROWS x COLS tile (row-major in shared memory, leading dimension ld) whose row r starts at row_ptr(r)
// (nullptr: a row past the matrix, zero-filled) and whose columns are [col0, col0 + COLS) of a matrix `width`
// columns wide. VEC bytes per copy; the caller guarantees width and every row start are VEC-aligned, so a vector
// is either wholly inside or wholly outside the matrix.
template <class T, int VEC, int ROWS, int COLS, int THREADS, class RowPtr>
__device__ __forceinline__ void load_tile(T* smem, int ld, RowPtr row_ptr, int64_t col0, int64_t width,
                                          const T* safe) {
  constexpr int kVE = VEC / static_cast<int>(sizeof(T));
  static_assert((VEC == 16 || VEC == 8 || VEC == 4) && kVE >= 1 && COLS % kVE == 0, "vector width");
  constexpr int kChunksPerRow = COLS / kVE;
  constexpr int kChunks = ROWS * kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + THREADS - 1) / THREADS; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * THREADS;
    if (kChunks % THREADS != 0 && chunk >= kChunks) break;
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * kVE;
    const T* src = row_ptr(row);
    const bool valid = src != nullptr && col0 + col < width;
    copy_async<VEC>(smem + row * ld + col, valid ? src + col0 + col : safe, valid);
  }
}

// Rows of any alignment, with 16-byte copies only. Element e of a row starts misalignment(e) elements past a
// 16-byte boundary; load_spans copies the aligned span [e - misalignment(e), ...) that covers the row's COLS
// columns (COLS / VE + 1 vectors, VE = 16 / sizeof(T)) to the start of the row in shared memory, so column c of
// the tile lands at smem[row * ld + misalignment(e) + c], and ld >= COLS + VE. A span may begin before the matrix
// or end past it, but every vector it copies holds at least one element of the matrix, and a 16-byte-aligned block
// never straddles a page: no copy can fault. Vectors wholly past the row's end and rows past the matrix are not
// copied: whoever reads the tile (realign_rows, GEMM 2's scaling pass) substitutes zeros there, and also for the
// neighbouring data a span picks up past `width`.
template <class T>
__device__ __forceinline__ int misalignment(const T* p) {
  return static_cast<int>(reinterpret_cast<uintptr_t>(p) % 16) / static_cast<int>(sizeof(T));
}

template <class T, int ROWS, int COLS, int THREADS, class RowPtr>
__device__ __forceinline__ void load_spans(T* smem, int ld, RowPtr row_ptr, int64_t col0, int64_t width) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  static_assert(COLS % kVE == 0, "vector width must divide the tile");
  constexpr int kVecsPerRow = COLS / kVE + 1;
  constexpr int kVecs = ROWS * kVecsPerRow;
#pragma unroll
  for (int i = 0; i < (kVecs + THREADS - 1) / THREADS; ++i) {
    const int v = static_cast<int>(threadIdx.x) + i * THREADS;
    if (kVecs % THREADS != 0 && v >= kVecs) break;
    const int row = v / kVecsPerRow;
    const int vec = v % kVecsPerRow;
    const T* src = row_ptr(row);
    if (src == nullptr) continue;
    const int shift = misalignment(src + col0);
    const int64_t first = col0 - shift + vec * kVE;  // the vector's first column
    if (first >= width || (shift == 0 && vec == kVecsPerRow - 1)) continue;
    copy_async<16>(smem + row * ld + vec * kVE, src + first, true);
  }
}

// Moves a tile loaded by load_spans into dst (same shape and ld) with column c at dst[row * ld + c], and zeros in
// the rows past the matrix and the columns past `width`.
template <class T, int ROWS, int COLS, int THREADS, class RowPtr>
__device__ __forceinline__ void realign_rows(T* dst, const T* src, int ld, RowPtr row_ptr, int64_t col0,
                                             int64_t width) {
  static_assert((ROWS * COLS) % THREADS == 0 && THREADS % COLS == 0, "whole rows per pass");
  const int col = static_cast<int>(threadIdx.x) % COLS;
  const bool in_matrix = col0 + col < width;
#pragma unroll 4
  for (int row = static_cast<int>(threadIdx.x) / COLS; row < ROWS; row += THREADS / COLS) {
    const T* row_start = row_ptr(row);
    T v = from_float<T>(0.f);
    if (row_start != nullptr && in_matrix) v = src[row * ld + misalignment(row_start + col0) + col];
    dst[row * ld + col] = v;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tile configurations. A block computes a TM x TN output tile with a reduction over chunks of TR; its warps form a
// WARPS_M x WARPS_N grid. The reduction chunk is 64 bytes of each operand row (32 bf16/fp16 or 16 fp32 elements):
// two tensor-core k-steps per stage. Three cp.async stages.
//   cfg 0: 128 x 128, 8 warps (64 x 32 per warp): large problems, one or more waves of blocks.
//   cfg 1:  64 x  64, 4 warps (32 x 32 per warp): small layers, where 128 x 128 tiles leave SMs idle.
// ---------------------------------------------------------------------------------------------------------------
template <int TM_, int TN_, int WARPS_M_, int WARPS_N_, class T>
struct TileCfg {
  static constexpr int TM = TM_, TN = TN_;
  static constexpr int TR = planner::kChunkBytes / static_cast<int>(sizeof(T));
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int WARPS = WARPS_M * WARPS_N;
  static constexpr int THREADS = 32 * WARPS;
  static constexpr int WTM = TM / WARPS_M, WTN = TN / WARPS_N;
  static constexpr int STAGES = 3;
  static constexpr int PAD = 16 / static_cast<int>(sizeof(T));  // 16-byte rows, staggered banks, room for a span
  static constexpr int LDC = TN + 4;                               // fp32 epilogue tile
};

template <int CFG, class T>
using Cfg = std::conditional_t<CFG == 0, TileCfg<planner::kTiles[0].m, planner::kTiles[0].n, 2, 4, T>,
                               TileCfg<planner::kTiles[1].m, planner::kTiles[1].n, 2, 2, T>>;

// ---------------------------------------------------------------------------------------------------------------
// Matrix-product policies. Both compute acc(TM x TN) += A(TM x TR) B(TR x TN) from one shared-memory stage and
// store the fp32 accumulators into a shared TM x LDC tile for the epilogue (whose thread mapping is then free of
// the fragment layout). A_ROW: A(m, r) = As[m * lda + r], else As[r * lda + m]; B_ROW: B(r, n) = Bs[r * ldb + n],
// else Bs[n * ldb + r].
// ---------------------------------------------------------------------------------------------------------------
template <class T>
struct WmmaType {
  using type = T;
  static constexpr int K = 16;
};
template <>
struct WmmaType<float> {
#if FFK_ARCH_SUPPORTED
  using type = nvcuda::wmma::precision::tf32;
#else
  using type = float;  // mma.h declares the TF32 type for sm_80+ only; unused below sm_80
#endif
  static constexpr int K = 8;
};

// Tensor cores through WMMA: bf16/fp16 m16n16k16, or TF32 m16n16k8 for fp32 operands; fp32 accumulators.
template <class T, class C>
struct WmmaMma {
  static constexpr int FM = C::WTM / 16, FN = C::WTN / 16, KS = WmmaType<T>::K;
  using FragT = typename WmmaType<T>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, KS, float> acc[FM][FN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }

  template <bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void step(const T* As, int lda, const T* Bs, int ldb) {
    namespace wmma = nvcuda::wmma;
    using LayA = std::conditional_t<A_ROW, wmma::row_major, wmma::col_major>;
    using LayB = std::conditional_t<B_ROW, wmma::row_major, wmma::col_major>;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int m_base = (warp / C::WARPS_N) * C::WTM;
    const int n_base = (warp % C::WARPS_N) * C::WTN;
#pragma unroll
    for (int kk = 0; kk < C::TR; kk += KS) {
      wmma::fragment<wmma::matrix_a, 16, 16, KS, FragT, LayA> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, KS, FragT, LayB> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m0 = m_base + 16 * i;
        wmma::load_matrix_sync(a[i], A_ROW ? As + m0 * lda + kk : As + kk * lda + m0, lda);
        if constexpr (std::is_same_v<T, float>) {
#pragma unroll
          for (int t = 0; t < a[i].num_elements; ++t) a[i].x[t] = wmma::__float_to_tf32(a[i].x[t]);
        }
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        const int n0 = n_base + 16 * j;
        wmma::load_matrix_sync(b[j], B_ROW ? Bs + kk * ldb + n0 : Bs + n0 * ldb + kk, ldb);
        if constexpr (std::is_same_v<T, float>) {
#pragma unroll
          for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) const {
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int m_base = (warp / C::WARPS_N) * C::WTM;
    const int n_base = (warp % C::WARPS_N) * C::WTN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
        nvcuda::wmma::store_matrix_sync(Cs + (m_base + 16 * i) * C::LDC + n_base + 16 * j, acc[i][j], C::LDC,
                                        nvcuda::wmma::mem_row_major);
  }
};

// The exact fp32 path: CUDA-core FMAs, no TF32 rounding of the operands. Thread (ty, tx) of a (THREADS/16) x 16
// grid owns rows ty + i * (THREADS/16) and columns tx + 16 j: a warp reads two A values (broadcast) and 16
// consecutive B values per step.
template <class C>
struct SimtMma {
  static constexpr int TY = C::THREADS / 16;
  static constexpr int RM = C::TM / TY, RN = C::TN / 16;
  float acc[RM][RN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = 0.f;
  }

  template <bool A_ROW, bool B_ROW>
  __device__ __forceinline__ void step(const float* As, int lda, const float* Bs, int ldb) {
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
#pragma unroll 4
    for (int kk = 0; kk < C::TR; ++kk) {
      float a[RM], b[RN];
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int m = ty + i * TY;
        a[i] = A_ROW ? As[m * lda + kk] : As[kk * lda + m];
      }
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int n = tx + 16 * j;
        b[j] = B_ROW ? Bs[kk * ldb + n] : Bs[n * ldb + kk];
      }
#pragma unroll
      for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs) const {
    const int tx = static_cast<int>(threadIdx.x) % 16, ty = static_cast<int>(threadIdx.x) / 16;
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) Cs[(ty + i * TY) * C::LDC + tx + 16 * j] = acc[i][j];
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: the kernel variants each launcher dispatches over.
// ---------------------------------------------------------------------------------------------------------------
// Math mode: 0 = fp32 exact (CUDA cores), 1 = fp32 TF32 (tensor cores), 2 = fp16, 3 = bf16 (tensor cores).
inline int math_mode(DType dtype, bool allow_tf32) {
  switch (dtype) {
    case DType::f16: return 2;
    case DType::bf16: return 3;
    default: return allow_tf32 ? 1 : 0;
  }
}

// Runtime (math mode, tile configuration) -> launcher.template run<T, CFG, SIMT>(p, device, stream): the
// compiled kernel instance; `launcher` dispatches over its own further variants.
template <class T, bool SIMT, class Launcher, class Params>
int dispatch_cfg(const Launcher& launcher, const Params& p, int cfg, int device, cudaStream_t stream) {
  return cfg == 0 ? launcher.template run<T, 0, SIMT>(p, device, stream)
                  : launcher.template run<T, 1, SIMT>(p, device, stream);
}

template <class Launcher, class Params>
int dispatch(const Launcher& launcher, const Params& p, DType dtype, bool allow_tf32, int cfg, int device,
             cudaStream_t stream) {
  switch (math_mode(dtype, allow_tf32)) {
    case 0: return dispatch_cfg<float, true>(launcher, p, cfg, device, stream);
    case 1: return dispatch_cfg<float, false>(launcher, p, cfg, device, stream);
    case 2: return dispatch_cfg<__half, false>(launcher, p, cfg, device, stream);
    default: return dispatch_cfg<__nv_bfloat16, false>(launcher, p, cfg, device, stream);
  }
}

// Sets the dynamic shared-memory limit of `Kernel` once per device (the attribute is per device context); one
// static flag word per kernel instantiation.
template <auto Kernel>
inline cudaError_t allow_smem(size_t bytes, int device) {
  static unsigned long long done = 0;  // one bit per device ordinal < 64
  const unsigned long long bit = device < 64 ? (1ull << device) : 0ull;
  if (bit && (__atomic_load_n(&done, __ATOMIC_ACQUIRE) & bit)) return cudaSuccess;
  const cudaError_t err =
      cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess && bit) __atomic_fetch_or(&done, bit, __ATOMIC_RELEASE);
  return err;
}

// Launchers of the two GEMM kernels (forward_kernel.cu, grad_kernel.cu); they return a cudaError_t.
int launch_forward(const ForwardParams& p, DType dtype, bool allow_tf32, int cfg, int vec, int device,
                   cudaStream_t stream);
int launch_grad(const GradParams& p, DType dtype, bool allow_tf32, int cfg, int split, int device,
                cudaStream_t stream);
// The blocks of GEMM 2's kernel for (dtype, allow_tf32, cfg) resident on one SM of `device` (1 if the query fails).
int grad_blocks_per_sm(DType dtype, bool allow_tf32, int cfg, int device);

}  // namespace detail
}  // namespace ffk
