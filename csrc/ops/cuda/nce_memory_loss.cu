// CUDA kernel of avidfast::nce_memory_loss (the rows kernel, row_kernel.cuh): grid (B, S), block
// (b, s) reads its share of row b's P positive and K negative memory rows once each, computes
// each score, its NCE term (ops/nce_terms.h), and adds the term's gradient to a per-warp
// accumulator while the row is still in registers; warps, then splits, are summed in a fixed
// order (no atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <tuple>
#include <type_traits>

#include "ops/checks.h"
#include "ops/cuda/row_plan.cuh"
#include "ops/dispatch.h"
#include "ops/nce_terms.h"

namespace avidfast {
namespace {

template <typename acc_t>
struct NcePolicy {
  static constexpr bool kNeedsDot = true;
  static constexpr bool kAccumulate = true;
  static constexpr bool kHasLoss = true;
  struct Item {
    int64_t row;
  };
  const int64_t* pos;  // (B, P)
  const int64_t* neg;  // (B, K)
  int64_t positives, negatives;
  acc_t inv_t, positive_scale;
  const double* z_device;  // Z on the device (float64), or null: use z_host
  double z_host;
  DeviceError* errors;  // the device's value-check record, or null (ops/device_errors.h)
  acc_t log_kz;         // set by prepare()

  __device__ void prepare() {
    const double z = z_device != nullptr ? *z_device : z_host;
    log_kz = log_(static_cast<acc_t>(negatives) * static_cast<acc_t>(z));
    // A device Z was not checked on the host: one thread of the grid checks it here.
    if (z_device != nullptr && !(z > 0.0 && z <= DBL_MAX) && threadIdx.x == 0 &&
        blockIdx.x == 0 && blockIdx.y == 0) {
      gpu::report_error(errors, DeviceCheck::kNcePartition, __double_as_longlong(z), 0);
    }
  }
  __device__ void invalid(int64_t j, int64_t row, int64_t num_items) const {
    gpu::report_error(errors, j < positives ? DeviceCheck::kNcePosIdx : DeviceCheck::kNceNegIdx,
                      row, num_items);
  }
  // Terms 0..P-1 are the positives, P..P+K-1 the negatives (the CPU kernel's order).
  __device__ Item fetch(int64_t b, int64_t j) const {
    return Item{j < positives ? pos[b * positives + j] : neg[b * negatives + (j - positives)]};
  }
  __device__ acc_t weight(int64_t, int64_t j, const Item&, bool valid, acc_t dot, acc_t& loss,
                          int) const {
    if (!valid) {
      loss += gpu::quiet_nan<acc_t>();
      return acc_t(0);
    }
    const acc_t score = dot * inv_t;
    acc_t term, dterm;
    acc_t scale;
    if (j < positives) {
      nce_positive(score, log_kz, term, dterm);
      scale = positive_scale;
    } else {
      nce_negative(score, log_kz, term, dterm);
      scale = acc_t(1);
    }
    loss += scale * term;
    return scale * dterm * inv_t;
  }
};

std::tuple<at::Tensor, at::Tensor> nce_memory_loss_cuda(const at::Tensor& x,
                                                         const at::Tensor& memory,
                                                         const at::Tensor& pos_idx,
                                                         const at::Tensor& neg_idx,
                                                         double temperature,
                                                         const at::Tensor& partition) {
  check_nce_memory_loss(x, memory, pos_idx, neg_idx, temperature, partition);
  c10::cuda::CUDAGuard guard(memory.device());
  DeviceError* const errors = device_error_record(memory.get_device());
  const int64_t batch = x.size(0), dim = x.size(1);
  const int64_t positives = pos_idx.size(1), negatives = neg_idx.size(1);
  const auto x_c = x.contiguous();
  const auto pos_c = pos_idx.contiguous();
  const auto neg_c = neg_idx.contiguous();
  const auto acc_dtype = accumulate_dtype(x.scalar_type());
  const auto out_options = x.options().dtype(acc_dtype);
  auto loss = at::empty({batch}, out_options);
  auto grad = at::empty({batch, dim}, out_options);
  if (batch == 0) return {loss, grad};

  // Z: a CPU scalar is read here; a device one is read (and checked) by the kernel (no host sync).
  at::Tensor z_device;
  double z_host = 0.0;
  if (partition.is_cuda()) {
    z_device = partition.to(at::kDouble);
  } else {
    z_host = partition.item<double>();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t terms = positives + negatives;
  AVF_DISPATCH_X_AND_MEMORY(x.scalar_type(), memory.scalar_type(), "nce_memory_loss_cuda", [&] {
    static_assert(std::is_same_v<acc_t, accumulate_t<x_t>>);
    using Policy = NcePolicy<acc_t>;
    const gpu::RowsPlan plan = gpu::plan_rows<acc_t, mem_t, Policy>(
        "nce_memory_loss", batch, terms, dim, memory.data_ptr(), memory.get_device());
    // One split writes loss and grad directly; several write (B, S) and (B, S, D) partials
    // that are summed in split order.
    at::Tensor partial_loss = loss, partial_grad = grad;
    if (plan.splits > 1) {
      partial_loss = at::empty({batch, plan.splits}, out_options);
      partial_grad = at::empty({batch, plan.splits, dim}, out_options);
    }
    at::Tensor x_staged, workspace;
    if (plan.global) {
      x_staged = x_c.to(acc_dtype).contiguous();
      workspace = at::empty({batch * plan.splits * plan.warps * dim}, out_options);
    }
    Policy policy{};
    policy.pos = pos_c.data_ptr<int64_t>();
    policy.neg = neg_c.data_ptr<int64_t>();
    policy.positives = positives;
    policy.negatives = negatives;
    policy.inv_t = static_cast<acc_t>(1.0 / temperature);
    policy.positive_scale = acc_t(1) / static_cast<acc_t>(positives);
    policy.z_device = z_device.defined() ? z_device.data_ptr<double>() : nullptr;
    policy.z_host = z_host;
    policy.errors = errors;
    policy.log_kz = acc_t(0);
    gpu::launch_rows<acc_t, mem_t>(
        plan, policy, memory.data_ptr<mem_t>(), memory.size(0), dim, batch, x_c.data_ptr(),
        gpu::float_kind(x.scalar_type()),
        plan.global ? x_staged.data_ptr<acc_t>() : static_cast<const acc_t*>(nullptr),
        plan.global ? workspace.data_ptr<acc_t>() : static_cast<acc_t*>(nullptr), terms,
        partial_grad.data_ptr<acc_t>(), partial_loss.data_ptr<acc_t>(), stream);
    if (plan.splits > 1) {
      gpu::launch_sum_splits<acc_t>(partial_grad.data_ptr<acc_t>(),
                                    partial_loss.data_ptr<acc_t>(), batch, plan.splits, dim,
                                    grad.data_ptr<acc_t>(), loss.data_ptr<acc_t>(), stream);
    }
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CUDA, m) {
  m.impl("nce_memory_loss", &nce_memory_loss_cuda);
}

}  // namespace avidfast
