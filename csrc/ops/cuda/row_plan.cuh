// Launch planning of the rows kernel (row_kernel.cuh): the variant, block size, shared memory
// and splits of one launch, and the launchers of rows_kernel and sum_splits_kernel.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/host.cuh"
#include "ops/cuda/row_kernel.cuh"

namespace avidfast {
namespace gpu {

struct RowsPlan {
  int vec = 0;            // 16-byte words per lane per row (1, 2, 4, 8), or 0 for the fallback
  int warps = 1;          // warps per block
  int64_t splits = 1;     // blocks per batch row (gridDim.y)
  int64_t per_split = 0;  // terms per block
  size_t smem = 0;        // dynamic shared memory bytes
  bool global = false;    // x staged and accumulators kept in global memory (very large D)
};

// Internal linkage, as the kernels' (row_kernel.cuh).
namespace {

// Calls f(std::integral_constant<int, V>{}) with the rows_kernel variant V of a plan's vec:
// 1, 2, 4 or 8 (16-byte words per lane), else 0 (the scalar fallback).
template <typename F>
void with_rows_variant(int vec, F&& f) {
  switch (vec) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      f(std::integral_constant<int, 0>{});
      break;
  }
}

// Resident blocks per SM of one rows_kernel variant.
template <typename acc_t, typename mem_t, typename Policy>
int rows_blocks_per_sm(int vec, int threads, size_t smem) {
  int blocks = 0;
  with_rows_variant(vec, [&](auto variant) {
    constexpr int kVec = decltype(variant)::value;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, rows_kernel<kVec, acc_t, mem_t, Policy>, threads, smem));
  });
  return blocks > 0 ? blocks : 1;
}

// Picks the variant, block size, shared memory and splits. Splits: the B * S blocks should fill
// the GPU's resident block slots (blocks per SM from the occupancy API, times the SM count) in
// nearly whole waves (>= 90% of the slot-time used), so that few SMs idle at the end; each split
// keeps at least 2 groups of rows per warp.
template <typename acc_t, typename mem_t, typename Policy>
RowsPlan plan_rows(int64_t batch, int64_t terms, int64_t dim, const void* memory_ptr, int device) {
  RowsPlan plan;
  constexpr int64_t V = kPackElems<mem_t>;
  if (dim % V == 0 && reinterpret_cast<uintptr_t>(memory_ptr) % 16 == 0) {
    const int64_t per_lane = ceil_div(dim / V, kWarp);
    plan.vec = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : per_lane <= 8 ? 8 : 0;
  }
  auto bytes = [&](int warps) {
    return ((Policy::kNeedsDot ? 1 : 0) + (Policy::kAccumulate ? warps : 0)) * dim *
           static_cast<int64_t>(sizeof(acc_t));
  };
  int64_t rows = rows_in_flight(plan.vec);
  plan.warps = static_cast<int>(std::min<int64_t>(kMaxWarps, ceil_div(terms, rows)));
  while (plan.warps > 1 && bytes(plan.warps) > kMaxSharedBytes) plan.warps = (plan.warps + 1) / 2;
  if (bytes(plan.warps) > kMaxSharedBytes) {
    plan.global = true;
    plan.vec = 0;
    plan.smem = 0;
    rows = rows_in_flight(0);
  } else {
    plan.smem = static_cast<size_t>(bytes(plan.warps));
  }

  const int64_t sms = multiprocessor_count(device);
  const int64_t slots =
      rows_blocks_per_sm<acc_t, mem_t, Policy>(plan.vec, plan.warps * kWarp, plan.smem) * sms;
  const int64_t min_per_split = static_cast<int64_t>(plan.warps) * rows * 2;
  const int64_t max_splits = std::min<int64_t>(
      {std::max<int64_t>(1, terms / min_per_split), 65535, std::max<int64_t>(1, ceil_div(4 * slots, batch))});
  int64_t best = 1;
  double best_use = 0.0;
  for (int64_t splits = 1; splits <= max_splits; ++splits) {
    const int64_t blocks = batch * splits;
    const double use = static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
    if (use > best_use + 1e-9) {
      best = splits;
      best_use = use;
    }
    if (best_use >= 0.9) break;
  }
  plan.per_split = ceil_div(terms, best);
  plan.splits = ceil_div(terms, plan.per_split);  // no empty split
  return plan;
}

template <typename acc_t, typename mem_t, typename Policy>
void launch_rows(const RowsPlan& plan, const Policy& policy, const mem_t* memory,
                 int64_t num_items, int64_t dim, int64_t batch, const void* x, FloatKind x_kind,
                 const acc_t* x_staged, acc_t* acc_global, int64_t terms, acc_t* partial_grad,
                 acc_t* partial_loss, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(plan.splits));
  const dim3 block(static_cast<unsigned>(plan.warps * kWarp));
  with_rows_variant(plan.vec, [&](auto variant) {
    constexpr int kVec = decltype(variant)::value;
    rows_kernel<kVec, acc_t, mem_t, Policy><<<grid, block, plan.smem, stream>>>(
        policy, memory, num_items, dim, x, x_kind, x_staged, acc_global, terms, plan.per_split,
        partial_grad, partial_loss);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_sum_splits(const acc_t* partial_grad, const acc_t* partial_loss, int64_t batch,
                       int64_t splits, int64_t dim, acc_t* grad, acc_t* loss,
                       cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(batch * dim, kThreads), 65535);
  sum_splits_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      partial_grad, partial_loss, batch, splits, dim, grad, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace gpu
}  // namespace avidfast
