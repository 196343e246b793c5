// CPU kernel of avidfast::nce_memory_loss: per row, one pass over its P positive and K negative
// memory rows computes each score, the NCE term (ops/nce_terms.h) and adds the term's gradient
// to the row's x-gradient while the memory row is still in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "ops/checks.h"
#include "ops/cpu/rows.h"
#include "ops/dispatch.h"
#include "ops/nce_terms.h"

namespace avidfast {
namespace {

// Adds the terms of `count` rows idx[0..count) to loss and grad; `positive` picks the term,
// `scale` multiplies each term (1/P for positives).
template <typename acc_t, typename mem_t>
AVF_CPU_CLONES void add_nce_terms(const acc_t* x_row, const mem_t* memory, int64_t dim, const int64_t* idx,
                   int64_t count, bool positive, acc_t scale, acc_t inv_t, acc_t log_kz,
                   acc_t& loss, acc_t* grad) {
  for (int64_t j = 0; j < count; ++j) {
    if (j + cpu::kPrefetchRows < count) {
      cpu::prefetch_row(memory + idx[j + cpu::kPrefetchRows] * dim, dim * sizeof(mem_t));
    }
    const mem_t* row = memory + idx[j] * dim;
    const acc_t score = cpu::dot_row(x_row, row, dim) * inv_t;
    acc_t term, dterm;
    if (positive) {
      nce_positive(score, log_kz, term, dterm);
    } else {
      nce_negative(score, log_kz, term, dterm);
    }
    loss += scale * term;
    cpu::axpy_row(scale * dterm * inv_t, row, grad, dim);
  }
}

std::tuple<at::Tensor, at::Tensor> nce_memory_loss_cpu(const at::Tensor& x,
                                                        const at::Tensor& memory,
                                                        const at::Tensor& pos_idx,
                                                        const at::Tensor& neg_idx,
                                                        double temperature,
                                                        const at::Tensor& partition) {
  check_nce_memory_loss(x, memory, pos_idx, neg_idx, temperature, partition);
  const int64_t batch = x.size(0), dim = x.size(1);
  const int64_t positives = pos_idx.size(1), negatives = neg_idx.size(1);
  const auto x_c = x.contiguous();
  const auto pos_c = pos_idx.contiguous();
  const auto neg_c = neg_idx.contiguous();
  const auto out_options = x.options().dtype(accumulate_dtype(x.scalar_type()));
  auto loss = at::empty({batch}, out_options);
  auto grad = at::zeros({batch, dim}, out_options);
  if (batch == 0) return {loss, grad};
  const double z = partition.item<double>();
  AVF_DISPATCH_X_AND_MEMORY(x.scalar_type(), memory.scalar_type(), "nce_memory_loss_cpu", [&] {
    const x_t* x_ptr = x_c.data_ptr<x_t>();
    const mem_t* mem_ptr = memory.data_ptr<mem_t>();
    const int64_t* pos_ptr = pos_c.data_ptr<int64_t>();
    const int64_t* neg_ptr = neg_c.data_ptr<int64_t>();
    acc_t* loss_ptr = loss.data_ptr<acc_t>();
    acc_t* grad_ptr = grad.data_ptr<acc_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t log_kz = log_(static_cast<acc_t>(negatives) * static_cast<acc_t>(z));
    const acc_t positive_scale = acc_t(1) / static_cast<acc_t>(positives);
    at::parallel_for(0, batch, cpu::rows_per_task(positives + negatives, dim), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> x_row(dim);
      for (int64_t b = begin; b < end; ++b) {
        cpu::convert_row(x_ptr + b * dim, x_row.data(), dim);
        acc_t row_loss = 0;
        acc_t* row_grad = grad_ptr + b * dim;
        add_nce_terms(x_row.data(), mem_ptr, dim, pos_ptr + b * positives, positives, true,
                      positive_scale, inv_t, log_kz, row_loss, row_grad);
        add_nce_terms(x_row.data(), mem_ptr, dim, neg_ptr + b * negatives, negatives, false,
                      acc_t(1), inv_t, log_kz, row_loss, row_grad);
        loss_ptr[b] = row_loss;
      }
    });
  });
  return {loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CPU, m) {
  m.impl("nce_memory_loss", &nce_memory_loss_cpu);
}

}  // namespace avidfast
