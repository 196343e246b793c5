// CPU kernel of avidfast::sample_negatives (see ops/negatives.h for the draw).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ops/checks.h"
#include "ops/negatives.h"

namespace avidfast {
namespace {

at::Tensor sample_negatives_cpu(const at::Tensor& pos, int64_t num_items, int64_t num_negatives,
                                int64_t seed, const at::Tensor& step, int64_t row_offset,
                                const c10::optional<at::Tensor>& exclude) {
  check_sample_negatives(pos, num_items, num_negatives, step, row_offset, exclude);
  const int64_t batch = pos.size(0);
  const auto pos_c = pos.contiguous();
  const at::Tensor exclude_c = exclude.has_value() ? exclude->contiguous() : at::Tensor();
  const int64_t excluded = exclude.has_value() ? exclude_c.size(1) : 0;
  const uint64_t step_value = static_cast<uint64_t>(step.item<int64_t>());
  auto out = at::empty({batch, num_negatives}, pos.options());

  const int64_t* pos_ptr = pos_c.data_ptr<int64_t>();
  const int64_t* exclude_ptr = excluded > 0 ? exclude_c.data_ptr<int64_t>() : nullptr;
  int64_t* out_ptr = out.data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, 8192 / num_negatives);
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> merged(excluded + 1);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t count = merge_exclusions(
          pos_ptr[b], exclude_ptr == nullptr ? nullptr : exclude_ptr + b * excluded, excluded,
          merged.data());
      const uint64_t choices = static_cast<uint64_t>(num_items - count);
      const uint64_t row = static_cast<uint64_t>(row_offset + b);
      int64_t* out_row = out_ptr + b * num_negatives;
      for (int64_t k = 0; k < num_negatives; k += 2) {
        uint64_t first, second;
        uniform_pair_below(static_cast<uint64_t>(seed), step_value, row, k >> 1, choices, first, second);
        out_row[k] = skip_excluded(static_cast<int64_t>(first), merged.data(), count);
        if (k + 1 < num_negatives) {
          out_row[k + 1] = skip_excluded(static_cast<int64_t>(second), merged.data(), count);
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CPU, m) {
  m.impl("sample_negatives", &sample_negatives_cpu);
}

}  // namespace avidfast
