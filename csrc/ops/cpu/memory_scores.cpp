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
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_row(dim);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t d = 0; d < dim; ++d) x_row[d] = static_cast<acc_t>(x_ptr[b * dim + d]);
        const int64_t* row_idx = idx_ptr + b * count;
        for (int64_t m = 0; m < count; ++m) {
          if (m + cpu::kPrefetchRows < count) {
            cpu::prefetch_row(mem_ptr + row_idx[m + cpu::kPrefetchRows] * dim, dim * sizeof(mem_t));
          }
          out_ptr[b * count + m] = cpu::dot_row(x_row.data(), mem_ptr + row_idx[m] * dim, dim) * inv_t;
        }
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
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t* row_idx = idx_ptr + b * count;
        for (int64_t m = 0; m < count; ++m) {
          if (m + cpu::kPrefetchRows < count) {
            cpu::prefetch_row(mem_ptr + row_idx[m + cpu::kPrefetchRows] * dim, dim * sizeof(mem_t));
          }
          const acc_t weight = static_cast<acc_t>(grad_ptr[b * count + m]) * inv_t;
          cpu::axpy_row(weight, mem_ptr + row_idx[m] * dim, out_ptr + b * dim, dim);
        }
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
