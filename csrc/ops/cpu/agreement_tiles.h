// Register-tiled similarities and agreement for the CPU kernel of avidfast::cma_topk.
//
// A query panel holds 16 queries transposed, panel[d * 16 + lane], so that one vector load gives
// dimension d of every query; item rows stay in their natural (row-major) layout and each of
// their elements is broadcast. A tile is 16 queries x kTileItems items: per dimension, 2 panel
// loads, kTileItems broadcasts and 2 * kTileItems fused multiply-adds into 2 * kTileItems
// accumulator registers. Consensus and union take two passes over a chunk: the first stores the
// video similarities, the second combines the audio ones with them as each tile finishes. The
// last pass compares each agreement with its query's current k-th best, giving one 16-bit mask
// per item, so the top-k bookkeeping runs only for the few items that can enter a top k.
#pragma once

#include <cstdint>

#include "ops/agreement.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define AVF_HAVE_AVX2_TILES 1
#include <immintrin.h>
#endif

namespace avidfast {
namespace cpu {

constexpr int kPanelQueries = 16;
constexpr int kTileItems = 6;

// What a similarity pass does with each finished tile.
enum class TileOutput : int {
  kStore = 0,  // out = similarity (the first of two banks)
  kSelf = 1,   // out = agreement = similarity (video or audio mode), plus masks
  kMin = 2,    // out = agreement = min(out, similarity) (consensus), plus masks
  kMax = 3,    // out = agreement = max(out, similarity) (union), plus masks
};

// One similarity pass over items [0, count) (row-major, `dim` floats each) for the panel's 16
// queries, finishing each tile as `output` says. masks[item] gets the lanes whose agreement is
// above threshold[lane] (not written for kStore).
using SimilarityFn = void (*)(const float* panel, const float* rows, int64_t dim, int64_t count,
                              TileOutput output, const float* threshold, float* out,
                              uint32_t* masks);

// Portable version.
inline void similarities_generic(const float* panel, const float* rows, int64_t dim,
                                 int64_t count, TileOutput output, const float* threshold,
                                 float* out, uint32_t* masks) {
  for (int64_t i = 0; i < count; ++i) {
    float acc[kPanelQueries] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const float item = rows[i * dim + d];
      for (int l = 0; l < kPanelQueries; ++l) acc[l] += panel[d * kPanelQueries + l] * item;
    }
    uint32_t mask = 0;
    for (int l = 0; l < kPanelQueries; ++l) {
      float* slot = out + i * kPanelQueries + l;
      if (output == TileOutput::kMin) acc[l] = *slot < acc[l] ? *slot : acc[l];
      if (output == TileOutput::kMax) acc[l] = *slot > acc[l] ? *slot : acc[l];
      *slot = acc[l];
      mask |= static_cast<uint32_t>(acc[l] > threshold[l]) << l;
    }
    if (output != TileOutput::kStore) masks[i] = mask;
  }
}

#if AVF_HAVE_AVX2_TILES

// Items [begin, end), a multiple of kItems apart, kItems at a time. The tile loop, the
// accumulators and the output kind (a template argument) all live in this one function: split
// into helpers or behind runtime branches, GCC keeps the accumulator arrays in memory (__m256
// may alias any float) and stores them at every step, at half the speed.
template <int kItems, TileOutput kOutput>
__attribute__((target("avx2,fma"))) void similarity_tiles_avx2(const float* panel,
                                                               const float* rows, int64_t dim,
                                                               int64_t begin, int64_t end,
                                                               const float* threshold,
                                                               float* out, uint32_t* masks) {
  const __m256 low_threshold = _mm256_loadu_ps(threshold);
  const __m256 high_threshold = _mm256_loadu_ps(threshold + 8);
  for (int64_t j = begin; j < end; j += kItems) {
    __m256 low[kItems], high[kItems];
    for (int i = 0; i < kItems; ++i) low[i] = high[i] = _mm256_setzero_ps();
    const float* tile = rows + j * dim;
#pragma GCC unroll 4
    for (int64_t d = 0; d < dim; ++d) {
      const __m256 panel_low = _mm256_loadu_ps(panel + d * kPanelQueries);
      const __m256 panel_high = _mm256_loadu_ps(panel + d * kPanelQueries + 8);
      for (int i = 0; i < kItems; ++i) {
        const __m256 item = _mm256_broadcast_ss(tile + i * dim + d);
        low[i] = _mm256_fmadd_ps(panel_low, item, low[i]);
        high[i] = _mm256_fmadd_ps(panel_high, item, high[i]);
      }
    }
    for (int i = 0; i < kItems; ++i) {
      float* slot = out + (j + i) * kPanelQueries;
      if constexpr (kOutput == TileOutput::kMin) {
        low[i] = _mm256_min_ps(_mm256_loadu_ps(slot), low[i]);
        high[i] = _mm256_min_ps(_mm256_loadu_ps(slot + 8), high[i]);
      } else if constexpr (kOutput == TileOutput::kMax) {
        low[i] = _mm256_max_ps(_mm256_loadu_ps(slot), low[i]);
        high[i] = _mm256_max_ps(_mm256_loadu_ps(slot + 8), high[i]);
      }
      _mm256_storeu_ps(slot, low[i]);
      _mm256_storeu_ps(slot + 8, high[i]);
      if constexpr (kOutput != TileOutput::kStore) {
        const uint32_t low_mask = static_cast<uint32_t>(
            _mm256_movemask_ps(_mm256_cmp_ps(low[i], low_threshold, _CMP_GT_OQ)));
        const uint32_t high_mask = static_cast<uint32_t>(
            _mm256_movemask_ps(_mm256_cmp_ps(high[i], high_threshold, _CMP_GT_OQ)));
        masks[j + i] = low_mask | (high_mask << 8);
      }
    }
  }
}

template <TileOutput kOutput>
void similarities_avx2_as(const float* panel, const float* rows, int64_t dim, int64_t count,
                          const float* threshold, float* out, uint32_t* masks) {
  const int64_t full = count - count % kTileItems;
  similarity_tiles_avx2<kTileItems, kOutput>(panel, rows, dim, 0, full, threshold, out, masks);
  similarity_tiles_avx2<1, kOutput>(panel, rows, dim, full, count, threshold, out, masks);
}

// AVX2 + FMA version: tiles of kTileItems, then the rest one by one.
inline void similarities_avx2(const float* panel, const float* rows, int64_t dim, int64_t count,
                              TileOutput output, const float* threshold, float* out,
                              uint32_t* masks) {
  switch (output) {
    case TileOutput::kStore:
      return similarities_avx2_as<TileOutput::kStore>(panel, rows, dim, count, threshold, out, masks);
    case TileOutput::kSelf:
      return similarities_avx2_as<TileOutput::kSelf>(panel, rows, dim, count, threshold, out, masks);
    case TileOutput::kMin:
      return similarities_avx2_as<TileOutput::kMin>(panel, rows, dim, count, threshold, out, masks);
    case TileOutput::kMax:
      return similarities_avx2_as<TileOutput::kMax>(panel, rows, dim, count, threshold, out, masks);
  }
}

#endif  // AVF_HAVE_AVX2_TILES

// The fastest similarity kernel this processor runs.
inline SimilarityFn best_similarity_kernel() {
#if AVF_HAVE_AVX2_TILES
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return similarities_avx2;
#endif
  return similarities_generic;
}

// Names the kernel best_similarity_kernel() picks, for `avidfast info`.
inline const char* similarity_kernel_name() {
  return best_similarity_kernel() == similarities_generic ? "portable" : "AVX2+FMA tiles";
}

}  // namespace cpu
}  // namespace avidfast
