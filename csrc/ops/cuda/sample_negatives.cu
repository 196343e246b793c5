// CUDA kernel of avidfast::sample_negatives (see ops/negatives.h for the draw). Two kernels:
//   1. (only with a non-empty `exclude`) one thread per row b merges {pos[b]} and exclude[b]
//      into a sorted, duplicate-free list in a (B, P + 1) int64 workspace, and its length;
//   2. one thread per (b, k) draws r = uniform_below(...) and maps it past the row's list.
// Both use the header functions of the CPU kernel, so the indices are bit-identical to it.
// Without `exclude` a row's list is {pos[b]} itself, read straight from pos.
// Values the host did not check (ops/device_errors.h) are checked here: pos and exclude in
// [0, num_items) and each exclude row ascending (kernel 1, or kernel 2 for pos without exclude),
// a device step >= 0 (kernel 2). A failure is recorded; the draws stay in [0, num_items).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ops/checks.h"
#include "ops/cuda/device_errors.cuh"
#include "ops/cuda/host.cuh"
#include "ops/negatives.h"

namespace avidfast {
namespace {

constexpr int kThreads = 256;

__global__ void merge_exclusions_kernel(const int64_t* __restrict__ pos,
                                        const int64_t* __restrict__ exclude, int64_t batch,
                                        int64_t excluded, int64_t num_items,
                                        int64_t* __restrict__ merged,
                                        int64_t* __restrict__ counts, DeviceError* errors) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = start; b < batch; b += step) {
    const int64_t* row = exclude + b * excluded;
    if (errors != nullptr) {
      if (pos[b] < 0 || pos[b] >= num_items) {
        gpu::report_error(errors, DeviceCheck::kSamplePos, pos[b], num_items);
      }
      for (int64_t i = 0; i < excluded; ++i) {
        if (row[i] < 0 || row[i] >= num_items) {
          gpu::report_error(errors, DeviceCheck::kSampleExcludeRange, row[i], num_items);
        } else if (i > 0 && row[i] < row[i - 1]) {
          gpu::report_error(errors, DeviceCheck::kSampleExcludeOrder, b, 0);
        }
      }
    }
    counts[b] = merge_exclusions(pos[b], row, excluded, merged + b * (excluded + 1));
  }
}

// One thread per (b, k) (grid-stride over B * K). Row b's excluded list is
// lists[b * list_stride ..] with counts[b] entries (1 entry when counts is null).
__global__ void draw_negatives_kernel(const int64_t* __restrict__ lists, int64_t list_stride,
                                      const int64_t* __restrict__ counts, int64_t batch,
                                      int64_t num_negatives, int64_t num_items, uint64_t seed,
                                      const int64_t* __restrict__ step_device, uint64_t step_host,
                                      int64_t row_offset, int64_t* __restrict__ out,
                                      DeviceError* errors) {
  const uint64_t step = step_device != nullptr ? static_cast<uint64_t>(*step_device) : step_host;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t total = batch * num_negatives;
  if (errors != nullptr && start == 0 && step_device != nullptr && *step_device < 0) {
    gpu::report_error(errors, DeviceCheck::kSampleStep, *step_device, 0);
  }
  for (int64_t i = start; i < total; i += stride) {
    const int64_t b = i / num_negatives, k = i - b * num_negatives;
    const int64_t count = counts != nullptr ? counts[b] : 1;
    if (errors != nullptr && counts == nullptr && k == 0) {
      const int64_t own = lists[b * list_stride];  // pos[b]
      if (own < 0 || own >= num_items) {
        gpu::report_error(errors, DeviceCheck::kSamplePos, own, num_items);
      }
    }
    const auto r = static_cast<int64_t>(
        uniform_below(seed, step, static_cast<uint64_t>(row_offset + b), static_cast<uint64_t>(k),
                      static_cast<uint64_t>(num_items - count)));
    out[i] = skip_excluded(r, lists + b * list_stride, count);
  }
}

at::Tensor sample_negatives_cuda(const at::Tensor& pos, int64_t num_items, int64_t num_negatives,
                                 int64_t seed, const at::Tensor& step, int64_t row_offset,
                                 const c10::optional<at::Tensor>& exclude) {
  check_sample_negatives(pos, num_items, num_negatives, step, row_offset, exclude);
  c10::cuda::CUDAGuard guard(pos.device());
  DeviceError* const errors = device_error_record(pos.get_device());
  const int64_t batch = pos.size(0);
  auto out = at::empty({batch, num_negatives}, pos.options());
  if (batch == 0) return out;
  const auto pos_c = pos.contiguous();
  const at::Tensor exclude_c = exclude.has_value() ? exclude->contiguous() : at::Tensor();
  const int64_t excluded = exclude.has_value() ? exclude_c.size(1) : 0;

  // step: a CPU scalar is read here; a device one is read (and checked) by the kernel (no sync).
  const int64_t* step_device = nullptr;
  uint64_t step_host = 0;
  at::Tensor step_c;
  if (step.is_cuda()) {
    step_c = step.contiguous();
    step_device = step_c.data_ptr<int64_t>();
  } else {
    step_host = static_cast<uint64_t>(step.item<int64_t>());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const int64_t* lists = pos_c.data_ptr<int64_t>();
  int64_t list_stride = 1;
  const int64_t* counts_ptr = nullptr;
  at::Tensor merged, counts;
  if (excluded > 0) {
    merged = at::empty({batch, excluded + 1}, pos.options());
    counts = at::empty({batch}, pos.options());
    const int64_t merge_blocks = std::min<int64_t>(gpu::ceil_div(batch, kThreads), 65535);
    merge_exclusions_kernel<<<static_cast<unsigned>(merge_blocks), kThreads, 0, stream>>>(
        pos_c.data_ptr<int64_t>(), exclude_c.data_ptr<int64_t>(), batch, excluded, num_items,
        merged.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), errors);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    lists = merged.data_ptr<int64_t>();
    list_stride = excluded + 1;
    counts_ptr = counts.data_ptr<int64_t>();
  }

  const int64_t blocks = std::min<int64_t>(gpu::ceil_div(batch * num_negatives, kThreads), 1 << 20);
  draw_negatives_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      lists, list_stride, counts_ptr, batch, num_negatives, num_items, static_cast<uint64_t>(seed),
      step_device, step_host, row_offset, out.data_ptr<int64_t>(), errors);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CUDA, m) {
  m.impl("sample_negatives", &sample_negatives_cuda);
}

}  // namespace avidfast
