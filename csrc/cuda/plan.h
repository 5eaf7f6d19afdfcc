// Launch planning for the CUDA step: tile configurations, GEMM 2's split over the rows, copy widths and the
// workspace layout. Plain C++ (no CUDA, no torch), so the kernels (nvcc) and the CPU extension (host compiler, for
// the ff_kernels_ext::plan_grad test hook) share one definition and the planner is tested without a GPU.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "../ff_kernels.h"

namespace ffk {
namespace planner {

// Output tile of each GEMM configuration (common.cuh's Cfg): cfg 0 for large problems, cfg 1 where cfg 0's tiles
// would leave SMs idle.
struct TileShape {
  int m, n;
};
constexpr TileShape kTiles[2] = {{128, 128}, {64, 64}};
// Each pipeline stage reduces over 64 bytes of every operand row (32 bf16/fp16 or 16 fp32 elements).
constexpr int kChunkBytes = 64;
constexpr int kRowThreads = 256;  // threads per block of the row kernel (step.cu)
// GEMM 2's split: each split streams at least kMinSplitChunks row chunks (the 3-stage pipeline's prologue and the
// partial tile's round trip through L2 are paid once per split), and the tile's last block reduces at most
// kMaxSplit partial tiles.
constexpr int kMinSplitChunks = 8;
constexpr int kMaxSplit = 16;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }
inline int element_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }
inline int chunk_rows(DType dtype) { return kChunkBytes / element_size(dtype); }

// 128 x 128 tiles when they fill the GPU at least once, else 64 x 64.
inline int choose_cfg(int64_t rows, int64_t cols, int sms) {
  return cdiv(rows, kTiles[0].m) * cdiv(cols, kTiles[0].n) >= sms ? 0 : 1;
}

// GEMM 2 (grad_W = A^T B over M rows, W is N x K): grid (tiles, split). Split s of a tile reduces row chunks
// [s * chunks / split, (s + 1) * chunks / split) into an fp32 partial tile; the tile's last block to finish adds the
// partials in split order and applies the optimizer once. A wave is sms x `resident` blocks, `resident` being the
// blocks of the cfg-1 kernel one SM holds at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor on the device; 1
// counts SMs only). It splits only when the tiles alone fill less than one wave, by floor(2 wave / tiles) (the largest
// split within two waves; kMaxSplit and kMinSplitChunks may cap it): the grid then has more than one wave and at most
// two, and the partials take at most two waves of 64 x 64 fp32 tiles (cfg 0 never splits, since it is chosen only
// when its tiles fill every SM).
struct GradPlan {
  int cfg = 0;
  int64_t tiles = 0;   // ceil(N / TM) * ceil(K / TN): gridDim.x
  int split = 1;       // gridDim.y
  int64_t chunks = 0;  // row chunks of the whole batch
  int64_t programs() const { return tiles * split; }
};

// With split > 1: the fp32 partials, [split][tiles][TM * TN] for the weight then [split][N tiles][TM] for the bias,
// and one arrival counter per tile (zero before the launch).
struct SplitWorkspace {
  size_t weight_bytes = 0, bias_bytes = 0, ticket_bytes = 0;
};

inline SplitWorkspace split_workspace(int64_t N, int64_t K, int cfg, int split) {
  if (split <= 1) return {};
  const TileShape t = kTiles[cfg];
  const int64_t n_tiles = cdiv(N, t.m), tiles = n_tiles * cdiv(K, t.n);
  const auto bytes = [&](size_t size, int64_t count) { return size * static_cast<size_t>(count); };
  return {bytes(sizeof(float), split * tiles * t.m * t.n), bytes(sizeof(float), split * n_tiles * t.m),
          bytes(sizeof(unsigned), tiles)};
}

inline GradPlan plan_grad(int64_t M, int64_t N, int64_t K, int sms, DType dtype, int resident = 1) {
  GradPlan g;
  g.cfg = choose_cfg(N, K, sms);
  g.tiles = cdiv(N, kTiles[g.cfg].m) * cdiv(K, kTiles[g.cfg].n);
  g.chunks = cdiv(M, chunk_rows(dtype));
  const int64_t wave = static_cast<int64_t>(sms) * (g.cfg == 1 ? std::max(resident, 1) : 1);
  if (g.tiles == 0 || g.tiles >= wave) return g;  // a full wave already: a split would only add traffic
  const int64_t split = std::min({2 * wave / g.tiles, g.chunks / kMinSplitChunks, static_cast<int64_t>(kMaxSplit)});
  g.split = static_cast<int>(std::max<int64_t>(split, 1));
  return g;
}

// GEMM 1's copy width: the widest cp.async (16, 8 or 4 bytes) that every row start of x and W allows, or 0 for
// 16-bit rows that are only 2-byte aligned (odd K): those load each row's covering 16-byte-aligned span and realign
// it in shared memory. fp32 uses 16 or 4. GEMM 2 always copies 16 bytes the second way: its scaling pass rewrites
// the tiles anyway.
inline int copy_width(int element, std::initializer_list<int64_t> row_elems, std::initializer_list<const void*> ptrs) {
  for (int vec : {16, 8, 4}) {
    if (element == 4 && vec == 8) continue;
    bool ok = true;
    for (int64_t n : row_elems) ok = ok && (n * element) % vec == 0;
    for (const void* ptr : ptrs) ok = ok && (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % vec == 0);
    if (ok) return vec;
  }
  return 0;
}

// Byte offsets into the step's one workspace allocation. The counters (the row kernel's, then GEMM 2's tickets)
// are contiguous so that one memset zeroes them.
struct Workspace {
  size_t partials, r, c, loss_parts, grad_partials, counters, counter_bytes, total;
};

inline Workspace workspace_layout(const StepArgs& a, const Plan& plan) {
  const int64_t M = a.P + (a.step ? a.Q : 0);
  const int64_t row_blocks = cdiv(std::max(a.P, a.step ? a.Q : 0), kRowThreads);
  const SplitWorkspace split = a.step ? split_workspace(a.N, a.K, plan.grad_cfg, plan.grad_split) : SplitWorkspace{};
  Workspace w{};
  size_t off = 0;
  w.partials = off;
  off += align256(sizeof(float) * plan.n_tiles * M);
  w.r = off;
  if (a.step && a.normalize != Normalize::none) off += align256(sizeof(float) * M);
  w.c = off;
  if (a.step) off += align256(sizeof(float) * M);
  w.loss_parts = off;
  if (a.step) off += align256(sizeof(float) * row_blocks);
  w.grad_partials = off;
  off += align256(split.weight_bytes + split.bias_bytes);
  w.counters = off;
  w.counter_bytes = a.step ? sizeof(unsigned) + split.ticket_bytes : 0;
  off += align256(w.counter_bytes);
  w.total = off;
  return w;
}

// `grad_resident`: plan_grad's `resident`, the cfg-1 GEMM 2 kernel's blocks per SM.
inline Plan make_plan(const StepArgs& a, int sms, int grad_resident = 1) {
  const int element = element_size(a.dtype);
  const int64_t M = a.P + (a.step ? a.Q : 0);
  Plan plan;
  plan.forward_cfg = choose_cfg(M, a.N, sms);
  plan.vec_forward = copy_width(element, {a.K}, {a.x_pos, a.step ? a.x_neg : nullptr, a.w});
  if (a.step) {
    const GradPlan grad = plan_grad(M, a.N, a.K, sms, a.dtype, grad_resident);
    plan.grad_cfg = grad.cfg;
    plan.grad_split = grad.split;
  }
  plan.n_tiles = cdiv(a.N, kTiles[plan.forward_cfg].n);
  plan.workspace_bytes = workspace_layout(a, plan).total;
  return plan;
}

}  // namespace planner
}  // namespace ffk
