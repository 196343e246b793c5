// Cross-modal agreement and top-k bookkeeping shared by the CPU and CUDA kernels of
// avidfast::cma_topk.
//
// Agreement of items i and j from their video similarity sv = <V[i], V[j]> and audio similarity
// sa = <A[i], A[j]>: consensus min(sv, sa), union max(sv, sa), video sv, audio sa.
// Ranking: higher agreement first, equal agreement broken by the lower index.
#pragma once

#include "ops/common.h"

namespace avidfast {

enum class Agreement : int { kConsensus = 0, kUnion = 1, kVideo = 2, kAudio = 3 };

AVF_HD bool needs_video(Agreement mode) { return mode != Agreement::kAudio; }
AVF_HD bool needs_audio(Agreement mode) { return mode != Agreement::kVideo; }

AVF_HD float agreement(Agreement mode, float sv, float sa) {
  switch (mode) {
    case Agreement::kConsensus:
      return sv < sa ? sv : sa;
    case Agreement::kUnion:
      return sv > sa ? sv : sa;
    case Agreement::kVideo:
      return sv;
    default:
      return sa;
  }
}

// True when (value_a, index_a) ranks before (value_b, index_b).
AVF_HD bool ranks_before(float value_a, int64_t index_a, float value_b, int64_t index_b) {
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// A binary heap over values[0..count) / indices[0..count) whose top (slot 0) is the entry that
// ranks last: the one a better candidate replaces.
AVF_HD void heap_sift_down(float* values, int64_t* indices, int64_t count, int64_t slot) {
  while (true) {
    const int64_t left = 2 * slot + 1, right = left + 1;
    int64_t last = slot;
    if (left < count && ranks_before(values[last], indices[last], values[left], indices[left])) last = left;
    if (right < count && ranks_before(values[last], indices[last], values[right], indices[right])) last = right;
    if (last == slot) return;
    const float v = values[slot];
    const int64_t i = indices[slot];
    values[slot] = values[last];
    indices[slot] = indices[last];
    values[last] = v;
    indices[last] = i;
    slot = last;
  }
}

// Adds (value, index) to a heap holding count < capacity entries.
AVF_HD void heap_push(float* values, int64_t* indices, int64_t count, float value, int64_t index) {
  int64_t slot = count;
  while (slot > 0) {
    const int64_t parent = (slot - 1) / 2;
    if (!ranks_before(values[parent], indices[parent], value, index)) break;
    values[slot] = values[parent];
    indices[slot] = indices[parent];
    slot = parent;
  }
  values[slot] = value;
  indices[slot] = index;
}

// Replaces the heap's last-ranked entry with (value, index), which must rank before it.
AVF_HD void heap_replace_top(float* values, int64_t* indices, int64_t count, float value, int64_t index) {
  values[0] = value;
  indices[0] = index;
  heap_sift_down(values, indices, count, 0);
}

// Offers (value, index) to a heap of at most `capacity` entries holding `count`; returns the new
// count.
AVF_HD int64_t heap_offer(float* values, int64_t* indices, int64_t count, int64_t capacity,
                          float value, int64_t index) {
  if (count < capacity) {
    heap_push(values, indices, count, value, index);
    return count + 1;
  }
  if (ranks_before(value, index, values[0], indices[0])) heap_replace_top(values, indices, count, value, index);
  return count;
}

}  // namespace avidfast
