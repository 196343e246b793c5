// CPU kernel of avidfast::memory_update_. Rows are grouped by index (stable, so a group keeps
// batch order); each group is applied to its memory row in batch order in the accumulation type
// and written back once, so repeated indices give a defined, deterministic result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "ops/checks.h"
#include "ops/cpu/rows.h"
#include "ops/dispatch.h"
#include "ops/momentum_update.h"

namespace avidfast {
namespace {

void memory_update_cpu(const at::Tensor& memory, const at::Tensor& idx, const at::Tensor& x,
                       double momentum) {
  check_memory_update(memory, idx, x, momentum);
  const int64_t batch = x.size(0), dim = x.size(1);
  if (batch == 0) return;
  const auto x_c = x.contiguous();
  const auto idx_c = idx.contiguous();
  const int64_t* idx_ptr = idx_c.data_ptr<int64_t>();

  std::vector<int64_t> order(batch);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return idx_ptr[a] < idx_ptr[b]; });
  std::vector<int64_t> group_start;  // offsets into `order` where a new index begins
  for (int64_t i = 0; i < batch; ++i) {
    if (i == 0 || idx_ptr[order[i]] != idx_ptr[order[i - 1]]) group_start.push_back(i);
  }
  const int64_t groups = static_cast<int64_t>(group_start.size());
  group_start.push_back(batch);

  AVF_DISPATCH_X_AND_MEMORY(x.scalar_type(), memory.scalar_type(), "memory_update_cpu", [&] {
    using row_t = accumulate_t<mem_t>;
    const x_t* x_ptr = x_c.data_ptr<x_t>();
    mem_t* mem_ptr = memory.data_ptr<mem_t>();
    const row_t m = static_cast<row_t>(momentum);
    // A typical batch (a few hundred rows) is too little work to share between threads.
    at::parallel_for(0, groups, cpu::rows_per_task(1, dim), [&](int64_t begin, int64_t end) {
      std::vector<row_t> row(dim);
      for (int64_t g = begin; g < end; ++g) {
        mem_t* target = mem_ptr + idx_ptr[order[group_start[g]]] * dim;
        for (int64_t d = 0; d < dim; ++d) row[d] = static_cast<row_t>(target[d]);
        for (int64_t i = group_start[g]; i < group_start[g + 1]; ++i) {
          const x_t* x_row = x_ptr + order[i] * dim;
          row_t squares = 0;
          for (int64_t d = 0; d < dim; ++d) {
            row[d] = momentum_mix(row[d], static_cast<row_t>(x_row[d]), m);
            squares += row[d] * row[d];
          }
          const row_t scale = inverse_norm(squares);
          for (int64_t d = 0; d < dim; ++d) row[d] *= scale;
        }
        for (int64_t d = 0; d < dim; ++d) target[d] = static_cast<mem_t>(row[d]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CPU, m) {
  m.impl("memory_update_", &memory_update_cpu);
}

}  // namespace avidfast
