// Negative sampling math shared by the CPU and CUDA kernels of avidfast::sample_negatives.
//
// Draw `draw` of row `row` at (seed, step) is a uniform integer r in [0, n) where
// n = num_items - |E| and E is the row's sorted, duplicate-free exclusion set (its own index and
// its `exclude` entries). r is then mapped to the r-th integer of {0..num_items-1} \ E, so every
// draw lands in the complement without rejection loops, and the result depends only on
// (seed, step, row, draw): the same on every device and rank.
#pragma once

#include "ops/philox.h"

namespace avidfast {

// Draws 2 * pair and 2 * pair + 1 of `row` at (seed, step): uniform integers in [0, n), each
// from 64 random bits of one Philox call (bias below n / 2^64).
AVF_HD void uniform_pair_below(uint64_t seed, uint64_t step, uint64_t row, uint64_t pair, uint64_t n,
                               uint64_t& first, uint64_t& second) {
  const Philox4x32Out out = philox4x32_10(
      static_cast<uint32_t>(pair), static_cast<uint32_t>(row),
      static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  first = mulhi64(static_cast<uint64_t>(out.v[0]) << 32 | out.v[1], n);
  second = mulhi64(static_cast<uint64_t>(out.v[2]) << 32 | out.v[3], n);
}

// Draw `draw` of `row` at (seed, step): a uniform integer in [0, n).
AVF_HD uint64_t uniform_below(uint64_t seed, uint64_t step, uint64_t row, uint64_t draw, uint64_t n) {
  uint64_t first, second;
  uniform_pair_below(seed, step, row, draw >> 1, n, first, second);
  return (draw & 1) ? second : first;
}

// Appends value to the sorted list out[0..n) unless it equals the last entry; returns the new n.
AVF_HD int64_t append_unique(int64_t* out, int64_t n, int64_t value) {
  if (n == 0 || out[n - 1] != value) out[n++] = value;
  return n;
}

// Writes the sorted union of {pos} and exclude[0..count) (itself sorted) without duplicates into
// `out` (room for count + 1) and returns its length.
AVF_HD int64_t merge_exclusions(int64_t pos, const int64_t* exclude, int64_t count, int64_t* out) {
  int64_t n = 0;
  bool pos_pending = true;
  for (int64_t i = 0; i < count; ++i) {
    if (pos_pending && pos <= exclude[i]) {
      n = append_unique(out, n, pos);
      pos_pending = false;
    }
    n = append_unique(out, n, exclude[i]);
  }
  if (pos_pending) n = append_unique(out, n, pos);
  return n;
}

// The r-th (0-based) integer not in the sorted, duplicate-free set excluded[0..count).
// If excluded has count entries and r < num_items - count, the result is < num_items.
AVF_HD int64_t skip_excluded(int64_t r, const int64_t* excluded, int64_t count) {
  int64_t j = r;
  for (int64_t i = 0; i < count; ++i) {
    if (excluded[i] <= j) {
      ++j;
    } else {
      break;
    }
  }
  return j;
}

}  // namespace avidfast
