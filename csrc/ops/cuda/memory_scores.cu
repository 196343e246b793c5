// CUDA kernels of avidfast::memory_scores and its backward (the rows kernel, row_kernel.cuh):
// memory rows are read in place through the index, never gathered into a (B, M, D) tensor.
//   forward:  grid (B, S), one warp per (b, m) output at a time, x[b] staged in shared memory.
//   backward: grid (B, S), grad_x[b] = sum_m grad[b, m] / T * memory[idx[b, m]], per-warp
//             accumulators, then a fixed-order reduction over warps and splits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "ops/checks.h"
#include "ops/cuda/row_plan.cuh"
#include "ops/dispatch.h"

namespace avidfast {
namespace {

template <typename acc_t>
struct ScoresPolicy {
  static constexpr bool kNeedsDot = true;
  static constexpr bool kAccumulate = false;
  static constexpr bool kHasLoss = false;
  struct Item {
    int64_t row;
  };
  const int64_t* idx;  // (B, M)
  int64_t count;       // M
  acc_t inv_t;
  acc_t* out;            // (B, M)
  DeviceError* errors;   // the device's value-check record, or null (ops/device_errors.h)

  __device__ void prepare() {}
  __device__ void invalid(int64_t, int64_t row, int64_t num_items) const {
    gpu::report_error(errors, DeviceCheck::kScoresIdx, row, num_items);
  }
  __device__ Item fetch(int64_t b, int64_t j) const { return Item{idx[b * count + j]}; }
  __device__ acc_t weight(int64_t b, int64_t j, const Item&, bool valid, acc_t dot, acc_t&,
                          int lane) const {
    if (lane == 0) out[b * count + j] = valid ? dot * inv_t : gpu::quiet_nan<acc_t>();
    return acc_t(0);
  }
};

template <typename acc_t>
struct ScoresBackwardPolicy {
  static constexpr bool kNeedsDot = false;
  static constexpr bool kAccumulate = true;
  static constexpr bool kHasLoss = false;
  struct Item {
    int64_t row;
    acc_t weight;
  };
  const int64_t* idx;  // (B, M)
  const void* grad;    // (B, M) grad_scores
  gpu::FloatKind grad_kind;
  int64_t count;  // M
  acc_t inv_t;
  DeviceError* errors;  // the device's value-check record, or null (ops/device_errors.h)

  __device__ void prepare() {}
  __device__ void invalid(int64_t, int64_t row, int64_t num_items) const {
    gpu::report_error(errors, DeviceCheck::kScoresBackwardIdx, row, num_items);
  }
  __device__ Item fetch(int64_t b, int64_t j) const {
    const int64_t i = b * count + j;
    return Item{idx[i], gpu::load_float<acc_t>(grad, grad_kind, i) * inv_t};
  }
  __device__ acc_t weight(int64_t, int64_t, const Item& item, bool, acc_t, acc_t&, int) const {
    return item.weight;
  }
};

at::Tensor memory_scores_cuda(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& idx,
                              double temperature) {
  check_memory_scores(x, memory, idx, temperature);
  c10::cuda::CUDAGuard guard(memory.device());
  DeviceError* const errors = device_error_record(memory.get_device());
  const int64_t batch = x.size(0), dim = x.size(1), count = idx.size(1);
  const auto x_c = x.contiguous();
  const auto idx_c = idx.contiguous();
  const auto acc_dtype = accumulate_dtype(x.scalar_type());
  auto scores = at::empty({batch, count}, x.options().dtype(acc_dtype));
  if (scores.numel() == 0) return scores;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AVF_DISPATCH_X_AND_MEMORY(x.scalar_type(), memory.scalar_type(), "memory_scores_cuda", [&] {
    static_assert(std::is_same_v<acc_t, accumulate_t<x_t>>);
    using Policy = ScoresPolicy<acc_t>;
    const gpu::RowsPlan plan = gpu::plan_rows<acc_t, mem_t, Policy>(
        "memory_scores", batch, count, dim, memory.data_ptr(), memory.get_device());
    at::Tensor x_staged;
    if (plan.global) x_staged = x_c.to(acc_dtype).contiguous();
    Policy policy{idx_c.data_ptr<int64_t>(), count, static_cast<acc_t>(1.0 / temperature),
                  scores.data_ptr<acc_t>(), errors};
    gpu::launch_rows<acc_t, mem_t>(
        plan, policy, memory.data_ptr<mem_t>(), memory.size(0), dim, batch, x_c.data_ptr(),
        gpu::float_kind(x.scalar_type()),
        plan.global ? x_staged.data_ptr<acc_t>() : static_cast<const acc_t*>(nullptr),
        static_cast<acc_t*>(nullptr), count, static_cast<acc_t*>(nullptr),
        static_cast<acc_t*>(nullptr), stream);
  });
  return scores;
}

at::Tensor memory_scores_backward_cuda(const at::Tensor& grad_scores, const at::Tensor& memory,
                                       const at::Tensor& idx, double temperature) {
  check_memory_scores_backward(grad_scores, memory, idx, temperature);
  c10::cuda::CUDAGuard guard(memory.device());
  DeviceError* const errors = device_error_record(memory.get_device());
  const int64_t batch = idx.size(0), count = idx.size(1), dim = memory.size(1);
  const auto grad_c = grad_scores.contiguous();
  const auto idx_c = idx.contiguous();
  const auto acc_dtype = accumulate_dtype(grad_scores.scalar_type());
  const auto acc_options = grad_scores.options().dtype(acc_dtype);
  if (batch == 0 || count == 0) return at::zeros({batch, dim}, acc_options);
  auto grad_x = at::empty({batch, dim}, acc_options);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AVF_DISPATCH_X_AND_MEMORY(grad_scores.scalar_type(), memory.scalar_type(),
                            "memory_scores_backward_cuda", [&] {
    static_assert(std::is_same_v<acc_t, accumulate_t<x_t>>);
    using Policy = ScoresBackwardPolicy<acc_t>;
    const gpu::RowsPlan plan = gpu::plan_rows<acc_t, mem_t, Policy>(
        "memory_scores_backward", batch, count, dim, memory.data_ptr(), memory.get_device());
    // One split writes grad_x directly; several write (B, S, D) partials summed in split order.
    at::Tensor partial = plan.splits == 1 ? grad_x : at::empty({batch, plan.splits, dim}, acc_options);
    at::Tensor workspace;
    if (plan.global) workspace = at::empty({batch * plan.splits * plan.warps * dim}, acc_options);
    Policy policy{idx_c.data_ptr<int64_t>(), grad_c.data_ptr(),
                  gpu::float_kind(grad_scores.scalar_type()), count,
                  static_cast<acc_t>(1.0 / temperature), errors};
    gpu::launch_rows<acc_t, mem_t>(
        plan, policy, memory.data_ptr<mem_t>(), memory.size(0), dim, batch, nullptr,
        gpu::FloatKind::kFloat, static_cast<const acc_t*>(nullptr),
        plan.global ? workspace.data_ptr<acc_t>() : static_cast<acc_t*>(nullptr), count,
        partial.data_ptr<acc_t>(), static_cast<acc_t*>(nullptr), stream);
    if (plan.splits > 1) {
      gpu::launch_sum_splits<acc_t>(partial.data_ptr<acc_t>(), nullptr, batch, plan.splits, dim,
                                    grad_x.data_ptr<acc_t>(), nullptr, stream);
    }
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CUDA, m) {
  m.impl("memory_scores", &memory_scores_cuda);
  m.impl("memory_scores_backward", &memory_scores_backward_cuda);
}

}  // namespace avidfast
