// Launch planning of the CUDA kernels as pure host functions: block size, vector width, shared
// memory, fallback path and splits of a launch, from the problem's shape, the kernel's static
// shared memory and the device's limits, all passed as arguments. No CUDA runtime call here: the
// header compiles with any C++17 compiler, so that the CPU build exposes the planners to a test
// (avidfast._C._plan_rows, _plan_memory_update, _plan_cma_topk; tests/test_launch_plan.py) that
// sweeps shapes and dtypes and checks every plan against the limits the kernel will meet, with
// the kernels' static shared sizes recorded at build time (csrc/ops/cuda/resource_usage.json).
//
// The CUDA launchers (cuda/row_plan.cuh, cuda/memory_update.cu, cuda/cma_topk.cu) query the
// kernel's static shared size (cudaFuncGetAttributes) and the occupancy, and call these.
//
// Shared memory: a block may use kDefaultSharedBytes (48 KiB) of static + dynamic shared memory
// without opting in (cudaFuncAttributeMaxDynamicSharedMemorySize defaults to 48 KiB minus the
// kernel's static size). The rows kernel and memory_update_ stay within it: their dynamic budget
// is 48 KiB minus their static size. cma_topk opts in to the device's per-block maximum minus
// its static size.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define AVF_PLAN_HD __host__ __device__
#else
#define AVF_PLAN_HD
#endif

namespace avidfast {
namespace gpu {

constexpr int kWarp = 32;

// Static + dynamic shared memory a block may use without opting in to more.
constexpr int64_t kDefaultSharedBytes = 48 * 1024;

// Largest grid.y (the rows kernel's splits); grid.x may reach 2^31 - 1.
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------
// The rows kernel (cuda/row_kernel.cuh) of memory_scores, memory_scores_backward, nce_memory_loss

// Warps per block of the rows kernel (fewer when D is large, so that shared memory fits).
constexpr int kMaxWarps = 8;

// Rows in flight per warp for a given number of 16-byte words per lane (0: scalar fallback).
AVF_PLAN_HD constexpr int rows_in_flight(int vec) {
  return vec == 0 ? 4 : (vec >= 4 ? 1 : 4 / vec);
}

struct RowsPlan {
  int vec = 0;            // 16-byte words per lane per row (1, 2, 4, 8), or 0 for the fallback
  int warps = 1;          // warps per block
  int64_t splits = 1;     // blocks per batch row (gridDim.y)
  int64_t per_split = 0;  // terms per block
  int64_t smem = 0;       // dynamic shared memory bytes
  bool global = false;    // x staged and accumulators kept in global memory (very large D)
};

// What a rows-kernel launch computes: one (B, terms) problem over rows of `dim` elements.
struct RowsProblem {
  int64_t terms = 0;       // terms per batch row (M, or P + K)
  int64_t dim = 0;         // D
  int acc_bytes = 4;       // sizeof(acc_t): 4 or 8
  int mem_bytes = 4;       // sizeof(mem_t): 2, 4 or 8
  bool aligned = true;     // the bank's base address is 16-byte aligned
  bool needs_dot = true;   // Policy::kNeedsDot: x is staged in shared memory
  bool accumulate = true;  // Policy::kAccumulate: one accumulator of D acc_t per warp
};

// Dynamic shared bytes of a block of `warps` warps: x (when needed) and one accumulator per warp.
inline int64_t rows_shared_bytes(const RowsProblem& p, int warps) {
  const int64_t rows = (p.needs_dot ? 1 : 0) + (p.accumulate ? warps : 0);
  return rows * p.dim * static_cast<int64_t>(p.acc_bytes);
}

// Variant, warps and dynamic shared memory. static_shared: the kernel's static shared bytes (the
// largest of its variants); the dynamic part gets shared_limit - static_shared. When even one
// warp does not fit, x and the accumulators go to global memory (the scalar variant, no dynamic
// shared memory).
inline RowsPlan plan_rows_shape(const RowsProblem& p, int64_t static_shared,
                                int64_t shared_limit = kDefaultSharedBytes) {
  RowsPlan plan;
  const int64_t elems = 16 / p.mem_bytes;  // elements of a 16-byte word
  if (p.dim % elems == 0 && p.aligned) {
    const int64_t per_lane = ceil_div(p.dim / elems, kWarp);
    plan.vec = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : per_lane <= 8 ? 8 : 0;
  }
  const int64_t budget = shared_limit - static_shared;
  const int64_t rows = rows_in_flight(plan.vec);
  const int64_t wanted = std::max<int64_t>(1, ceil_div(p.terms, rows));
  plan.warps = static_cast<int>(std::min<int64_t>(kMaxWarps, wanted));
  while (plan.warps > 1 && rows_shared_bytes(p, plan.warps) > budget) {
    plan.warps = (plan.warps + 1) / 2;
  }
  if (rows_shared_bytes(p, plan.warps) > budget) {
    plan.global = true;
    plan.vec = 0;
    plan.smem = 0;
  } else {
    plan.smem = rows_shared_bytes(p, plan.warps);
  }
  return plan;
}

// Splits: the B * S blocks should fill the GPU's resident block slots (blocks per SM from the
// occupancy, times the SM count) in nearly whole waves (>= 90% of the slot-time used), so that
// few SMs idle at the end; each split keeps at least 2 groups of rows per warp; S <= 65535.
inline void plan_rows_splits(RowsPlan& plan, int64_t batch, int64_t terms, int64_t slots) {
  slots = std::max<int64_t>(1, slots);
  batch = std::max<int64_t>(1, batch);
  const int64_t rows = rows_in_flight(plan.vec);
  const int64_t min_per_split = static_cast<int64_t>(plan.warps) * rows * 2;
  const int64_t max_splits = std::min<int64_t>(
      {std::max<int64_t>(1, terms / min_per_split), kMaxGridY,
       std::max<int64_t>(1, ceil_div(4 * slots, batch))});
  int64_t best = 1;
  double best_use = 0.0;
  for (int64_t splits = 1; splits <= max_splits; ++splits) {
    const int64_t blocks = batch * splits;
    const double use =
        static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
    if (use > best_use + 1e-9) {
      best = splits;
      best_use = use;
    }
    if (best_use >= 0.9) break;
  }
  plan.per_split = std::max<int64_t>(1, ceil_div(terms, best));
  plan.splits = std::max<int64_t>(1, ceil_div(terms, plan.per_split));  // no empty split
}

// ------------------------------------------------------------------------------------------------
// memory_update_ (cuda/memory_update.cu)

constexpr int kUpdateMaxThreads = 256;
constexpr int kUpdateScanPerThread = 8;     // idx entries each thread checks per scan tile
constexpr int64_t kUpdateScanBatch = 4096;  // larger batches sort idx first

struct UpdatePlan {
  int threads = kWarp;     // threads per block (one block per batch row)
  int64_t smem = 0;        // dynamic shared bytes: the row in row_t, or 0 with a workspace
  bool workspace = false;  // the row lives in a (B, D) global workspace (D too large)
  bool sorted = false;     // idx is stably sorted first (B > kUpdateScanBatch)
};

// row_bytes: sizeof(row_t) (4, or 8 for float64 banks).
inline UpdatePlan plan_memory_update(int64_t batch, int64_t dim, int row_bytes,
                                     int64_t static_shared,
                                     int64_t shared_limit = kDefaultSharedBytes) {
  UpdatePlan plan;
  plan.threads =
      static_cast<int>(std::min<int64_t>(kUpdateMaxThreads, ceil_div(dim, kWarp) * kWarp));
  plan.sorted = batch > kUpdateScanBatch;
  const int64_t bytes = dim * static_cast<int64_t>(row_bytes);
  if (bytes > shared_limit - static_shared) {
    plan.workspace = true;
  } else {
    plan.smem = bytes;
  }
  return plan;
}

// ------------------------------------------------------------------------------------------------
// cma_topk (cuda/cma_topk.cu, cuda/cma_tiles.cuh)

namespace cma {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kBlockQueries = 128;  // queries per CTA (BQ)
constexpr int kTileItems = 128;     // items per tile (BN)
constexpr int kChunkBytes = 64;     // bytes of every row per stage
constexpr int kRowPitch = 80;       // shared-memory pitch of a stage row
constexpr int kStageRows = kBlockQueries + kTileItems;
constexpr int kStageBytes = kStageRows * kRowPitch;
constexpr int kStages = 4;          // cp.async pipeline depth
constexpr int kMaxCandidates = 32;  // candidate buffer per query (one per lane of a merge)
// Bytes of shared memory besides the stages, the candidate buffers and the lists: per query the
// threshold (value, index), the buffer's count and the query's row.
constexpr int64_t kQueryStateBytes = kBlockQueries * 4 * 4;

struct SharedPlan {
  bool ok = false;             // false: the device offers too little shared memory
  int capacity = kMaxCandidates;  // candidate buffer entries per query
  bool lists_on_chip = true;   // the top-k lists live in shared memory
  int64_t smem = 0;            // dynamic shared bytes of the launch
  int64_t dynamic_limit = 0;   // what the kernel opts in to: max_optin - static_shared
  int64_t needed = 0;          // the least dynamic shared memory any plan needs
};

// max_optin: cudaDevAttrMaxSharedMemoryPerBlockOptin; static_shared: the kernel's static bytes.
// First choice: lists on chip with 32-entry buffers, then 16-entry buffers; else the lists in
// global memory (with 32-entry buffers, or 16 on devices with ~100 KiB per block).
inline SharedPlan plan_shared(int64_t k, int64_t max_optin, int64_t static_shared) {
  SharedPlan plan;
  plan.dynamic_limit = max_optin - static_shared;
  const int64_t base = static_cast<int64_t>(kStages) * kStageBytes + kQueryStateBytes;
  const int64_t list_bytes = static_cast<int64_t>(kBlockQueries) * k * 8;
  plan.needed = base + static_cast<int64_t>(kBlockQueries) * (kMaxCandidates / 2) * 8;
  for (const bool on_chip : {true, false}) {
    for (const int capacity : {kMaxCandidates, kMaxCandidates / 2}) {
      const int64_t bytes =
          base + static_cast<int64_t>(kBlockQueries) * capacity * 8 + (on_chip ? list_bytes : 0);
      if (!plan.ok && bytes <= plan.dynamic_limit) {
        plan.ok = true;
        plan.capacity = capacity;
        plan.lists_on_chip = on_chip;
        plan.smem = bytes;
      }
    }
  }
  return plan;
}

}  // namespace cma

}  // namespace gpu
}  // namespace avidfast
