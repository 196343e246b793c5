// CPU kernel of avidfast::cma_topk: for every query, the k items with the highest cross-modal
// agreement, in one tiled pass over both banks that never holds a Q x N similarity matrix.
//
// Threads own contiguous ranges of 16-query blocks. Each walks the items in chunks that stay in
// cache (converted to float32 once per chunk when the banks are bf16/fp16),
// and for every query block of its range packs the block's panel and runs the register-tiled
// agreement kernel (agreement_tiles.h) over the chunk. An item reaches the top-k bookkeeping only
// when its agreement beats the query's current k-th best, a single vector comparison. Each
// query's candidates arrive in increasing item order, so with the strict comparison an equal
// agreement never displaces a lower index: ties keep the lower index, as the contract says.
// The k best per query live in a heap inside the output rows and are sorted at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "ops/agreement.h"
#include "ops/checks.h"
#include "ops/cpu/agreement_tiles.h"
#include "ops/dispatch.h"

namespace avidfast {
namespace {

// Items per chunk: 512 KiB of float32 rows per bank (1024 rows of D = 128), read from L2/L3 by
// every query block of the thread's range. Each block re-packs its panel once per chunk, so
// small chunks cost packing time: 256 rows ran at 59 GFLOP/s per thread here, 512-1024 at 73.
int64_t chunk_items(int64_t dim) { return std::max<int64_t>(cpu::kTileItems, (512 * 1024) / (dim * 4)); }

// Rows [begin, end) of a bank as float32: the bank itself when it is float32, else a conversion
// into `buffer`.
template <typename mem_t>
const float* float_rows(const mem_t* bank, int64_t dim, int64_t begin, int64_t end,
                        std::vector<float>& buffer) {
  if constexpr (std::is_same_v<mem_t, float>) {
    return bank + begin * dim;
  } else {
    buffer.resize((end - begin) * dim);
    const mem_t* src = bank + begin * dim;
    for (int64_t i = 0; i < (end - begin) * dim; ++i) buffer[i] = static_cast<float>(src[i]);
    return buffer.data();
  }
}

// panel[d * 16 + lane] = bank[rows[lane], d] (zero for lanes >= count).
template <typename mem_t>
void pack_panel(const mem_t* bank, int64_t dim, const int64_t* rows, int count, float* panel) {
  for (int lane = 0; lane < cpu::kPanelQueries; ++lane) {
    const mem_t* row = lane < count ? bank + rows[lane] * dim : nullptr;
    for (int64_t d = 0; d < dim; ++d) {
      panel[d * cpu::kPanelQueries + lane] = row == nullptr ? 0.f : static_cast<float>(row[d]);
    }
  }
}

struct TopKRows {
  float* values;     // (Q, k): heap storage while mining, sorted output at the end
  int64_t* indices;  // (Q, k)
  int64_t* counts;   // (Q,) entries held so far
  float* threshold;  // (Q,) agreement an item must exceed to enter (-inf until k are held)
  int64_t k;

  void offer(int64_t query, float value, int64_t item) {
    float* v = values + query * k;
    int64_t* ix = indices + query * k;
    counts[query] = heap_offer(v, ix, counts[query], k, value, item);
    if (counts[query] == k) threshold[query] = v[0];
  }

  // Sorts row `query`: descending agreement, ties by ascending index.
  void finish(int64_t query) {
    float* v = values + query * k;
    int64_t* ix = indices + query * k;
    std::vector<int64_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return ranks_before(v[a], ix[a], v[b], ix[b]); });
    std::vector<float> sorted_values(k);
    std::vector<int64_t> sorted_indices(k);
    for (int64_t r = 0; r < k; ++r) {
      sorted_values[r] = v[order[r]];
      sorted_indices[r] = ix[order[r]];
    }
    std::copy(sorted_values.begin(), sorted_values.end(), v);
    std::copy(sorted_indices.begin(), sorted_indices.end(), ix);
  }
};

template <typename mem_t>
void mine(const mem_t* video, const mem_t* audio, int64_t num_items, int64_t dim,
          const int64_t* queries, int64_t num_queries, Agreement mode, TopKRows topk) {
  const cpu::SimilarityFn similarities = cpu::best_similarity_kernel();
  const int64_t blocks = (num_queries + cpu::kPanelQueries - 1) / cpu::kPanelQueries;
  const int64_t chunk = chunk_items(dim);
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> video_chunk, audio_chunk;
    std::vector<float> panel(dim * cpu::kPanelQueries);
    std::vector<float> agree(chunk * cpu::kPanelQueries);
    std::vector<uint32_t> masks(chunk);
    float threshold[cpu::kPanelQueries];
    for (int64_t first = 0; first < num_items; first += chunk) {
      const int64_t count = std::min(num_items, first + chunk) - first;
      const float* video_items = needs_video(mode) ? float_rows(video, dim, first, first + count, video_chunk) : nullptr;
      const float* audio_items = needs_audio(mode) ? float_rows(audio, dim, first, first + count, audio_chunk) : nullptr;
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t q0 = block * cpu::kPanelQueries;
        const int lanes = static_cast<int>(std::min<int64_t>(cpu::kPanelQueries, num_queries - q0));
        const int64_t* rows = queries + q0;
        for (int lane = 0; lane < cpu::kPanelQueries; ++lane) {
          threshold[lane] = lane < lanes ? topk.threshold[q0 + lane] : std::numeric_limits<float>::infinity();
        }
        // Consensus / union: video similarities first, then audio combined with them.
        const bool both = needs_video(mode) && needs_audio(mode);
        if (needs_video(mode)) {
          pack_panel(video, dim, rows, lanes, panel.data());
          similarities(panel.data(), video_items, dim, count,
                       both ? cpu::TileOutput::kStore : cpu::TileOutput::kSelf, threshold,
                       agree.data(), masks.data());
        }
        if (needs_audio(mode)) {
          pack_panel(audio, dim, rows, lanes, panel.data());
          const cpu::TileOutput output = mode == Agreement::kConsensus ? cpu::TileOutput::kMin
                                         : mode == Agreement::kUnion   ? cpu::TileOutput::kMax
                                                                       : cpu::TileOutput::kSelf;
          similarities(panel.data(), audio_items, dim, count, output, threshold,
                       agree.data(), masks.data());
        }
        // The masks used the thresholds of the chunk's start; offers re-check the current ones.
        for (int64_t i = 0; i < count; ++i) {
          for (uint32_t mask = masks[i]; mask != 0; mask &= mask - 1) {
            const int lane = __builtin_ctz(mask);
            if (rows[lane] == first + i) continue;  // an item never agrees with itself
            topk.offer(q0 + lane, agree[i * cpu::kPanelQueries + lane], first + i);
          }
        }
      }
    }
    const int64_t last_query = std::min(num_queries, block_end * cpu::kPanelQueries);
    for (int64_t q = block_begin * cpu::kPanelQueries; q < last_query; ++q) topk.finish(q);
  });
}

std::tuple<at::Tensor, at::Tensor> cma_topk_cpu(const at::Tensor& video_memory,
                                                const at::Tensor& audio_memory, int64_t k,
                                                c10::string_view mode,
                                                const c10::optional<at::Tensor>& queries,
                                                c10::string_view precision) {
  const Agreement agreement_mode =
      check_cma_topk(video_memory, audio_memory, k, mode, queries, precision);
  const int64_t num_items = video_memory.size(0), dim = video_memory.size(1);
  const at::Tensor query_rows =
      queries.has_value() ? queries->contiguous()
                          : at::arange(num_items, video_memory.options().dtype(at::kLong));
  const int64_t num_queries = query_rows.size(0);
  auto values = at::full({num_queries, k}, -std::numeric_limits<float>::infinity(),
                         video_memory.options().dtype(at::kFloat));
  auto indices = at::full({num_queries, k}, -1, video_memory.options().dtype(at::kLong));
  auto counts = at::zeros({num_queries}, indices.options());
  auto threshold = at::full({num_queries}, -std::numeric_limits<float>::infinity(), values.options());
  if (num_queries == 0) return {values, indices};
  TopKRows topk{values.data_ptr<float>(), indices.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                threshold.data_ptr<float>(), k};
  AVF_DISPATCH_MEMORY(video_memory.scalar_type(), "cma_topk_cpu", [&] {
    mine(video_memory.data_ptr<mem_t>(), audio_memory.data_ptr<mem_t>(), num_items, dim,
         query_rows.data_ptr<int64_t>(), num_queries, agreement_mode, topk);
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CPU, m) {
  m.impl("cma_topk", &cma_topk_cpu);
}

}  // namespace avidfast
