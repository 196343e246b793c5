// Launch planning of the rows kernel (row_kernel.cuh) on a device: the pure planners of
// ops/launch_plan.h fed with the kernel's static shared size, occupancy and SM count; and the
// launchers of rows_kernel and sum_splits_kernel.
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

// Resident blocks per SM of one rows_kernel variant (0: the block cannot run at all).
template <typename acc_t, typename mem_t, typename Policy>
int rows_blocks_per_sm(int vec, int threads, int64_t smem) {
  int blocks = 0;
  with_rows_variant(vec, [&](auto variant) {
    constexpr int kVec = decltype(variant)::value;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &blocks, rows_kernel<kVec, acc_t, mem_t, Policy>, threads, static_cast<size_t>(smem)));
  });
  return blocks;
}

// Static shared bytes of the rows kernel of this Policy: the largest of its variants (the NCE
// policy's warp_loss; none for the others).
template <typename acc_t, typename mem_t, typename Policy>
int64_t rows_static_shared(int device) {
  int64_t most = 0;
  for (const int vec : {0, 1, 2, 4, 8}) {
    with_rows_variant(vec, [&](auto variant) {
      constexpr int kVec = decltype(variant)::value;
      const auto kernel = rows_kernel<kVec, acc_t, mem_t, Policy>;
      most = std::max(most, static_shared_bytes(reinterpret_cast<const void*>(kernel), device));
    });
  }
  return most;
}

// The launch plan (ops/launch_plan.h: plan_rows_shape, plan_rows_splits) with this device's
// static shared size, occupancy and SM count. `op` names the operator in the error raised when
// the planned block cannot run (occupancy 0).
template <typename acc_t, typename mem_t, typename Policy>
RowsPlan plan_rows(const char* op, int64_t batch, int64_t terms, int64_t dim,
                   const void* memory_ptr, int device) {
  RowsProblem problem;
  problem.terms = terms;
  problem.dim = dim;
  problem.acc_bytes = static_cast<int>(sizeof(acc_t));
  problem.mem_bytes = static_cast<int>(sizeof(mem_t));
  problem.aligned = reinterpret_cast<uintptr_t>(memory_ptr) % 16 == 0;
  problem.needs_dot = Policy::kNeedsDot;
  problem.accumulate = Policy::kAccumulate;
  const int64_t static_shared = rows_static_shared<acc_t, mem_t, Policy>(device);
  RowsPlan plan = plan_rows_shape(problem, static_shared);
  const int threads = plan.warps * kWarp;
  const int per_sm = rows_blocks_per_sm<acc_t, mem_t, Policy>(plan.vec, threads, plan.smem);
  TORCH_CHECK(per_sm > 0, op, ": the planned CUDA launch cannot run (", threads, " threads, ",
              plan.smem, " bytes of dynamic and ", static_shared,
              " of static shared memory per block, D = ", dim, ", ", terms,
              " terms per row); please report this as a bug");
  TORCH_CHECK(batch <= kMaxGridX, op, ": at most ", kMaxGridX, " rows per call on CUDA, got ",
              batch);
  plan_rows_splits(plan, batch, terms, static_cast<int64_t>(per_sm) * multiprocessor_count(device));
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
    const auto smem = static_cast<size_t>(plan.smem);
    rows_kernel<kVec, acc_t, mem_t, Policy><<<grid, block, smem, stream>>>(
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
