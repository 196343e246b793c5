// CUDA kernel of avidfast::memory_update_. One block per distinct index: the block that owns
// memory row i = idx[b] (b the first batch row holding i) loads that row into shared memory in
// row_t = accumulate_t<mem_t>, applies every batch row b' with idx[b'] == i in batch order (mix,
// then normalise by a fixed-order block sum of squares), and writes the row back once. So
// repeated indices give the CPU kernel's defined, deterministic result, and no two blocks touch
// the same memory row.
//
// Finding the first occurrence: for B <= kUpdateScanBatch (ops/launch_plan.h), block b scans
// idx[0..b) (and idx(b..B) for the later occurrences) in tiles; beyond that the scan is
// quadratic, so idx is stably sorted first (at::sort) and block p owns sorted position p when it
// starts a run of equal indices.
// Indices outside [0, num_items) are skipped (and recorded: ops/device_errors.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "ops/checks.h"
#include "ops/cuda/device.cuh"
#include "ops/cuda/device_errors.cuh"
#include "ops/cuda/host.cuh"
#include "ops/dispatch.h"
#include "ops/momentum_update.h"

namespace avidfast {
namespace {

// Block size, scan tile and sort threshold: ops/launch_plan.h (plan_memory_update).
constexpr int kMaxThreads = gpu::kUpdateMaxThreads;
constexpr int kScanPerThread = gpu::kUpdateScanPerThread;

// Grid (B), block a multiple of 32 threads. Thread t owns row elements t, t + blockDim, ...
// `row` is dynamic shared memory, or `workspace` + blockIdx.x * dim when D is too large for it.
// sorted/order (both or neither): the stable sort of idx and its permutation.
template <typename x_t, typename mem_t>
__global__ void __launch_bounds__(kMaxThreads)
    memory_update_kernel(mem_t* __restrict__ memory, int64_t num_items, int64_t dim,
                         const int64_t* __restrict__ idx, const int64_t* __restrict__ sorted,
                         const int64_t* __restrict__ order, const x_t* __restrict__ x,
                         int64_t batch, double momentum,
                         accumulate_t<mem_t>* __restrict__ workspace, DeviceError* errors) {
  using row_t = accumulate_t<mem_t>;
  __shared__ row_t warp_sums[kMaxThreads / gpu::kWarp];
  __shared__ unsigned char flags[kMaxThreads * kScanPerThread];
  const int64_t p = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t threads = blockDim.x;
  const int64_t tile = threads * kScanPerThread;
  row_t* row = workspace != nullptr ? workspace + p * dim : gpu::dynamic_smem<row_t>();
  const row_t m = static_cast<row_t>(momentum);

  int64_t key;
  if (order != nullptr) {
    key = sorted[p];
    if (p > 0 && sorted[p - 1] == key) return;  // not the first of its run
  } else {
    key = idx[p];
  }
  if (key < 0 || key >= num_items) {
    if (tid == 0) gpu::report_error(errors, DeviceCheck::kUpdateIdx, key, num_items);
    return;
  }
  if (order == nullptr) {
    // Return unless p is the first batch row holding key.
    for (int64_t t0 = 0; t0 < p; t0 += tile) {
      bool earlier = false;
#pragma unroll
      for (int i = 0; i < kScanPerThread; ++i) {
        const int64_t q = t0 + i * threads + tid;
        earlier = earlier || (q < p && idx[q] == key);
      }
      if (__syncthreads_or(earlier)) return;
    }
  }

  mem_t* target = memory + key * dim;
  for (int64_t d = tid; d < dim; d += threads) row[d] = static_cast<row_t>(target[d]);

  // row <- normalize(m * row + (1 - m) * x[xb]), as the CPU kernel does it.
  auto apply = [&](int64_t xb) {
    const x_t* x_row = x + xb * dim;
    row_t squares = 0;
    for (int64_t d = tid; d < dim; d += threads) {
      const row_t value = momentum_mix(row[d], static_cast<row_t>(x_row[d]), m);
      row[d] = value;
      squares += value * value;
    }
    const row_t scale = inverse_norm(gpu::block_sum(squares, warp_sums));
    for (int64_t d = tid; d < dim; d += threads) row[d] *= scale;
  };

  if (order != nullptr) {
    for (int64_t q = p; q < batch && sorted[q] == key; ++q) apply(order[q]);
  } else {
    apply(p);
    for (int64_t t0 = p + 1; t0 < batch; t0 += tile) {
      bool any = false;
#pragma unroll
      for (int i = 0; i < kScanPerThread; ++i) {
        const int64_t slot = i * threads + tid;
        const int64_t q = t0 + slot;
        const bool match = q < batch && idx[q] == key;
        flags[slot] = match ? 1 : 0;
        any = any || match;
      }
      if (__syncthreads_or(any)) {  // also publishes flags to the block
        const int64_t limit = batch - t0 < tile ? batch - t0 : tile;
        for (int64_t slot = 0; slot < limit; ++slot) {
          if (flags[slot]) apply(t0 + slot);  // block-uniform: every thread reads the same flag
        }
      }
      __syncthreads();  // flags are rewritten by the next tile
    }
  }

  for (int64_t d = tid; d < dim; d += threads) target[d] = static_cast<mem_t>(row[d]);
}

void memory_update_cuda(const at::Tensor& memory, const at::Tensor& idx, const at::Tensor& x,
                        double momentum) {
  check_memory_update(memory, idx, x, momentum);
  c10::cuda::CUDAGuard guard(memory.device());
  DeviceError* const errors = device_error_record(memory.get_device());
  const int64_t batch = x.size(0), dim = x.size(1);
  if (batch == 0) return;
  const auto x_c = x.contiguous();
  const auto idx_c = idx.contiguous();
  const int device = memory.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AVF_DISPATCH_X_AND_MEMORY(x.scalar_type(), memory.scalar_type(), "memory_update_cuda", [&] {
    static_assert(std::is_same_v<acc_t, accumulate_t<x_t>>);
    using row_t = accumulate_t<mem_t>;
    const auto kernel = memory_update_kernel<x_t, mem_t>;
    const int64_t static_shared =
        gpu::static_shared_bytes(reinterpret_cast<const void*>(kernel), device);
    const gpu::UpdatePlan plan =
        gpu::plan_memory_update(batch, dim, static_cast<int>(sizeof(row_t)), static_shared);
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.threads,
                                                                 static_cast<size_t>(plan.smem)));
    TORCH_CHECK(per_sm > 0, "memory_update_: the planned CUDA launch cannot run (", plan.threads,
                " threads, ", plan.smem, " bytes of dynamic and ", static_shared,
                " of static shared memory per block, D = ", dim, "); please report this as a bug");
    TORCH_CHECK(batch <= gpu::kMaxGridX, "memory_update_: at most ", gpu::kMaxGridX,
                " rows per call on CUDA, got ", batch);
    at::Tensor sorted, order, workspace;
    if (plan.sorted) {
      std::tie(sorted, order) = at::sort(idx_c, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    }
    if (plan.workspace) {
      workspace = at::empty({batch, dim},
                            memory.options().dtype(c10::CppTypeToScalarType<row_t>::value));
    }
    kernel<<<static_cast<unsigned>(batch), plan.threads, static_cast<size_t>(plan.smem), stream>>>(
        memory.data_ptr<mem_t>(), memory.size(0), dim, idx_c.data_ptr<int64_t>(),
        sorted.defined() ? sorted.data_ptr<int64_t>() : nullptr,
        order.defined() ? order.data_ptr<int64_t>() : nullptr, x_c.data_ptr<x_t>(), batch,
        momentum, workspace.defined() ? workspace.data_ptr<row_t>() : nullptr, errors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CUDA, m) {
  m.impl("memory_update_", &memory_update_cuda);
}

}  // namespace avidfast
