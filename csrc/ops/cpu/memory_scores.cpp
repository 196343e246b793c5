// CPU kernels of avidfast::memory_scores and its backward: memory rows are read in place through
// the index, never gathered into a (B, M, D) tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/cpu/rows.h"
#include "ops/dispatch.h"

namespace avidfast {
namespace {

// out[m] = <x_row, memory[idx[m]]> * inv_t for m < count.
template <typename acc_t, typename mem_t>
AVF_CPU_CLONES void score_rows(const acc_t* x_row, const mem_t* memory, int64_t dim,
                               const int64_t* idx, int64_t count, acc_t inv_t, acc_t* out) {
  for (int64_t m = 0; m < count; ++m) {
    if (m + cpu::kPrefetchRows < count) {
      cpu::prefetch_row(memory + idx[m + cpu::kPrefetchRows] * dim, dim * sizeof(mem_t));
    }
    out[m] = cpu::dot_row(x_row, memory + idx[m] * dim, dim) * inv_t;
  }
}

// out += inv_t * sum_m weights[m] * memory[idx[m]].
template <typename acc_t, typename mem_t, typename weight_t>
AVF_CPU_CLONES void accumulate_rows(const weight_t* weights, const mem_t* memory, int64_t dim,
                                    const int64_t* idx, int64_t count, acc_t inv_t, acc_t* out) {
  for (int64_t m = 0; m < count; ++m) {
    if (m + cpu::kPrefetchRows < count) {
      cpu::prefetch_row(memory + idx[m + cpu::kPrefetchRows] * dim, dim * sizeof(mem_t));
    }
    cpu::axpy_row(static_cast<acc_t>(weights[m]) * inv_t, memory + idx[m] * dim, out, dim);
  }
}

at::Tensor memory_scores_cpu(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& idx,
                             double temperature) {
  check_memory_scores(x, memory, idx, temperature);
  const int64_t batch = x.size(0), dim = x.size(1), count = idx.size(1);
  const auto x_c = x.contiguous();
  const auto idx_c = idx.contiguous();
  auto scores = at::empty({batch, count}, x.options().dtype(accumulate_dtype(x.scalar_type())));
  if (scores.numel() == 0) return scores;
  AVF_DISPATCH_X_AND_MEMORY(x.scalar_type(), memory.scalar_type(), "memory_scores_cpu", [&] {
    const x_t* x_ptr = x_c.data_ptr<x_t>();
    const mem_t* mem_ptr = memory.data_ptr<mem_t>();
    const int64_t* idx_ptr = idx_c.data_ptr<int64_t>();
    acc_t* out_ptr = scores.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, batch, cpu::rows_per_task(count, dim), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_row(dim);
      for (int64_t b = begin; b < end; ++b) {
        cpu::convert_row(x_ptr + b * dim, x_row.data(), dim);
        score_rows(x_row.data(), mem_ptr, dim, idx_ptr + b * count, count, inv_t, out_ptr + b * count);
      }
    });
  });
  return scores;
}

at::Tensor memory_scores_backward_cpu(const at::Tensor& grad_scores, const at::Tensor& memory,
                                      const at::Tensor& idx, double temperature) {
  check_memory_scores_backward(grad_scores, memory, idx, temperature);
  const int64_t batch = idx.size(0), count = idx.size(1), dim = memory.size(1);
  const auto grad_c = grad_scores.contiguous();
  const auto idx_c = idx.contiguous();
  auto grad_x = at::zeros({batch, dim},
                          grad_scores.options().dtype(accumulate_dtype(grad_scores.scalar_type())));
  if (grad_x.numel() == 0) return grad_x;
  AVF_DISPATCH_X_AND_MEMORY(grad_scores.scalar_type(), memory.scalar_type(),
                            "memory_scores_backward_cpu", [&] {
    const x_t* grad_ptr = grad_c.data_ptr<x_t>();
    const mem_t* mem_ptr = memory.data_ptr<mem_t>();
    const int64_t* idx_ptr = idx_c.data_ptr<int64_t>();
    acc_t* out_ptr = grad_x.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, batch, cpu::rows_per_task(count, dim), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        accumulate_rows(grad_ptr + b * count, mem_ptr, dim, idx_ptr + b * count, count, inv_t,
                        out_ptr + b * dim);
      }
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CPU, m) {
  m.impl("memory_scores", &memory_scores_cpu);
  m.impl("memory_scores_backward", &memory_scores_backward_cpu);
}

}  // namespace avidfast
