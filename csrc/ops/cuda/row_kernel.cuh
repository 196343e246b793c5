// The generic "rows" kernel behind memory_scores, memory_scores_backward and nce_memory_loss
// (its launch planning is in row_plan.cuh).
//
// Layout of the rows kernel: grid (B, S), block of W warps (W <= kMaxWarps). Block (b, s) owns
// the terms [s * per_split, (s + 1) * per_split) of batch row b (a term is one memory row read
// through an index: a score, a backward weight or an NCE term). x[b] is staged once in shared
// memory as acc_t. Each warp walks its share of the terms kRows at a time: lanes spread over D
// with coalesced 16-byte loads, the kRows rows' loads are all issued before any of them is used,
// and the next group's indices are fetched while those loads are in flight. A warp-shuffle
// reduction gives the dot product, the Policy turns it into the term's weight (and its loss), and
// the row, still in registers, is added with that weight to the warp's own accumulator in shared
// memory. At the end the block adds its warps' accumulators in warp order into partial (B, S, D)
// and (B, S) buffers, which sum_splits_kernel adds in split order: no float atomics, so every
// result is deterministic for a given device and shape.
//
// Rows whose index is outside [0, num_items) are never read: the Policy gets valid = false and
// makes the score / loss NaN, they add nothing to any accumulator, and the Policy records the
// index (invalid(): the device-side value check of ops/device_errors.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops/cuda/device.cuh"
#include "ops/cuda/device_errors.cuh"

namespace avidfast {
namespace gpu {

// Floating dtypes read through a type-erased pointer (x, grad_scores): the heavy kernels are
// templated on the accumulation and memory types only, not on x's dtype as well.
enum class FloatKind : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

inline FloatKind float_kind(at::ScalarType type) {
  switch (type) {
    case at::kDouble:
      return FloatKind::kDouble;
    case at::kHalf:
      return FloatKind::kHalf;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      return FloatKind::kFloat;
  }
}

// p[i] as acc_t, converted exactly as the CPU kernels' static_cast<acc_t>(x_t) does.
template <typename acc_t>
__device__ __forceinline__ acc_t load_float(const void* p, FloatKind kind, int64_t i) {
  switch (kind) {
    case FloatKind::kDouble:
      return static_cast<acc_t>(static_cast<const double*>(p)[i]);
    case FloatKind::kHalf:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case FloatKind::kBFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    default:
      return static_cast<acc_t>(static_cast<const float*>(p)[i]);
  }
}

// A Policy describes one op:
//   static constexpr bool kNeedsDot, kAccumulate, kHasLoss;
//   struct Item { int64_t row; ... };                        // what is fetched per term
//   __device__ void prepare();                               // once per block
//   __device__ Item fetch(int64_t b, int64_t j) const;       // term j of batch row b
//   __device__ acc_t weight(int64_t b, int64_t j, const Item&, bool valid, acc_t dot,
//                           acc_t& loss, int lane) const;    // coefficient of the row in the sum
//   __device__ void invalid(int64_t j, int64_t row, int64_t num_items) const;
//                                                            // records an index out of range

// The kernels and their launchers have internal linkage: every .cu gets its own instantiations
// (none is shared between translation units).
namespace {

template <int kRows, typename Policy>
__device__ __forceinline__ void fetch_group(const Policy& policy, int64_t b, int64_t g,
                                            int64_t end, typename Policy::Item (&items)[kRows]) {
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
    items[u] = g + u < end ? policy.fetch(b, g + u) : typename Policy::Item{};
  }
}

// The coefficient of each row of the group in the warp's accumulator: the Policy's weight of
// every live term (which also adds the term's loss), 0 for a row that is not valid (whose index
// lane 0 records).
template <int kRows, typename acc_t, typename Policy>
__device__ __forceinline__ void group_weights(const Policy& policy, int64_t b, int64_t g,
                                              const typename Policy::Item (&cur)[kRows],
                                              const bool (&live)[kRows],
                                              const bool (&valid)[kRows],
                                              const acc_t (&dot)[kRows], acc_t& loss, int lane,
                                              int64_t num_items, acc_t (&coef)[kRows]) {
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
    coef[u] = 0;
    if (live[u]) {
      const acc_t weight = policy.weight(b, g + u, cur[u], valid[u], dot[u], loss, lane);
      if (valid[u]) {
        coef[u] = weight;
      } else if (lane == 0) {
        policy.invalid(g + u, cur[u].row, num_items);
      }
    }
  }
}

// Vector path: rows are 16-byte aligned and a lane holds at most kVec words of each row.
template <int kVec, typename acc_t, typename mem_t, typename Policy>
__device__ __forceinline__ acc_t accumulate_rows_vec(const Policy& policy, int64_t b,
                                                     const mem_t* __restrict__ memory,
                                                     int64_t num_items, int64_t dim,
                                                     const acc_t* xs, acc_t* acc, int64_t begin,
                                                     int64_t end, int warp, int num_warps,
                                                     int lane) {
  constexpr int kRows = rows_in_flight(kVec);
  constexpr int V = kPackElems<mem_t>;
  using Item = typename Policy::Item;
  const int64_t words = dim / V;  // 16-byte words per row
  const int64_t stride = static_cast<int64_t>(num_warps) * kRows;
  acc_t loss = 0;

  Item next[kRows];
  int64_t g = begin + static_cast<int64_t>(warp) * kRows;
  fetch_group<kRows>(policy, b, g, end, next);
  for (; g < end; g += stride) {
    Item cur[kRows];
    bool live[kRows], valid[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      cur[u] = next[u];
      live[u] = g + u < end;
      valid[u] = live[u] && cur[u].row >= 0 && cur[u].row < num_items;
    }
    // Issue every load of the group before using any of them.
    uint4 raw[kRows][kVec];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const uint4* row = valid[u] ? reinterpret_cast<const uint4*>(memory + cur[u].row * dim)
                                  : nullptr;
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const int64_t w = lane + kWarp * c;
        raw[u][c] = (valid[u] && w < words) ? __ldg(row + w) : make_uint4(0u, 0u, 0u, 0u);
      }
    }
    // The next group's indices travel while the rows do.
    fetch_group<kRows>(policy, b, g + stride, end, next);

    acc_t dot[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) dot[u] = 0;
    if constexpr (Policy::kNeedsDot) {
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const int64_t w = lane + kWarp * c;
        if (w < words) {
          acc_t xv[V];
          load_vec(xs + w * V, xv);
#pragma unroll
          for (int u = 0; u < kRows; ++u) {
#pragma unroll
            for (int e = 0; e < V; ++e) dot[u] += xv[e] * unpack<acc_t, mem_t>(raw[u][c], e);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) dot[u] = warp_sum(dot[u]);
    }
    acc_t coef[kRows];
    group_weights<kRows>(policy, b, g, cur, live, valid, dot, loss, lane, num_items, coef);
    if constexpr (Policy::kAccumulate) {
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const int64_t w = lane + kWarp * c;
        if (w < words) {
          acc_t a[V];
          load_vec(acc + w * V, a);
#pragma unroll
          for (int u = 0; u < kRows; ++u) {
            if (valid[u]) {
#pragma unroll
              for (int e = 0; e < V; ++e) a[e] += coef[u] * unpack<acc_t, mem_t>(raw[u][c], e);
            }
          }
          store_vec(acc + w * V, a);
        }
      }
    }
  }
  return loss;
}

// Scalar fallback (any D, any alignment): lanes stride over D; with a dot the rows are read a
// second time for the accumulation (normally from L1, as the same warp has just read them).
template <typename acc_t, typename mem_t, typename Policy>
__device__ __forceinline__ acc_t accumulate_rows_scalar(const Policy& policy, int64_t b,
                                                        const mem_t* __restrict__ memory,
                                                        int64_t num_items, int64_t dim,
                                                        const acc_t* xs, acc_t* acc,
                                                        int64_t begin, int64_t end, int warp,
                                                        int num_warps, int lane) {
  constexpr int kRows = rows_in_flight(0);
  using Item = typename Policy::Item;
  const int64_t stride = static_cast<int64_t>(num_warps) * kRows;
  acc_t loss = 0;

  Item next[kRows];
  int64_t g = begin + static_cast<int64_t>(warp) * kRows;
  fetch_group<kRows>(policy, b, g, end, next);
  for (; g < end; g += stride) {
    Item cur[kRows];
    bool live[kRows], valid[kRows];
    const mem_t* rows[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      cur[u] = next[u];
      live[u] = g + u < end;
      valid[u] = live[u] && cur[u].row >= 0 && cur[u].row < num_items;
      rows[u] = valid[u] ? memory + cur[u].row * dim : memory;
    }
    fetch_group<kRows>(policy, b, g + stride, end, next);

    acc_t dot[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) dot[u] = 0;
    if constexpr (Policy::kNeedsDot) {
#pragma unroll 2
      for (int64_t d = lane; d < dim; d += kWarp) {
        const acc_t xd = xs[d];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          if (valid[u]) dot[u] += xd * static_cast<acc_t>(rows[u][d]);
        }
      }
#pragma unroll
      for (int u = 0; u < kRows; ++u) dot[u] = warp_sum(dot[u]);
    }
    acc_t coef[kRows];
    group_weights<kRows>(policy, b, g, cur, live, valid, dot, loss, lane, num_items, coef);
    if constexpr (Policy::kAccumulate) {
#pragma unroll 2
      for (int64_t d = lane; d < dim; d += kWarp) {
        acc_t a = acc[d];
#pragma unroll
        for (int u = 0; u < kRows; ++u) {
          if (valid[u]) a += coef[u] * static_cast<acc_t>(rows[u][d]);
        }
        acc[d] = a;
      }
    }
  }
  return loss;
}

template <int kVec, typename acc_t, typename mem_t, typename Policy>
__device__ __forceinline__ acc_t accumulate_rows(const Policy& policy, int64_t b,
                                                 const mem_t* __restrict__ memory,
                                                 int64_t num_items, int64_t dim, const acc_t* xs,
                                                 acc_t* acc, int64_t begin, int64_t end, int warp,
                                                 int num_warps, int lane) {
  if constexpr (kVec > 0) {
    return accumulate_rows_vec<kVec>(policy, b, memory, num_items, dim, xs, acc, begin, end, warp,
                                     num_warps, lane);
  } else {
    return accumulate_rows_scalar(policy, b, memory, num_items, dim, xs, acc, begin, end, warp,
                                  num_warps, lane);
  }
}

// Grid (B, S), block W * 32 threads; dynamic shared memory: x (D acc_t, when the policy needs a
// dot and x_staged is null) then W accumulators of D acc_t (unless acc_global is given).
template <int kVec, typename acc_t, typename mem_t, typename Policy>
__global__ void __launch_bounds__(kMaxWarps* kWarp)
    rows_kernel(Policy policy, const mem_t* __restrict__ memory, int64_t num_items, int64_t dim,
                const void* __restrict__ x, FloatKind x_kind, const acc_t* __restrict__ x_staged,
                acc_t* __restrict__ acc_global, int64_t terms, int64_t per_split,
                acc_t* __restrict__ partial_grad, acc_t* __restrict__ partial_loss) {
  const int64_t b = blockIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int num_warps = blockDim.x / kWarp;
  acc_t* smem = dynamic_smem<acc_t>();
  policy.prepare();

  const acc_t* xs = nullptr;
  int64_t used = 0;  // acc_t elements of shared memory taken by x
  if constexpr (Policy::kNeedsDot) {
    if (x_staged != nullptr) {
      xs = x_staged + b * dim;
    } else {
      for (int64_t d = tid; d < dim; d += blockDim.x) smem[d] = load_float<acc_t>(x, x_kind, b * dim + d);
      xs = smem;
      used = dim;
    }
  }
  acc_t* accs = nullptr;
  if constexpr (Policy::kAccumulate) {
    accs = acc_global != nullptr ? acc_global + (b * splits + split) * num_warps * dim : smem + used;
    for (int64_t i = tid; i < num_warps * dim; i += blockDim.x) accs[i] = 0;
  }
  __syncthreads();

  const int64_t begin = split * per_split;
  const int64_t end = begin + per_split < terms ? begin + per_split : terms;
  acc_t* acc = accs == nullptr ? nullptr : accs + warp * dim;
  const acc_t loss = accumulate_rows<kVec>(policy, b, memory, num_items, dim, xs, acc, begin, end,
                                           warp, num_warps, lane);
  (void)loss;

  if constexpr (Policy::kAccumulate || Policy::kHasLoss) {
    __shared__ acc_t warp_loss[kMaxWarps];
    if (Policy::kHasLoss && lane == 0) warp_loss[warp] = loss;
    __syncthreads();
    const int64_t slot = b * splits + split;
    if constexpr (Policy::kAccumulate) {
      for (int64_t d = tid; d < dim; d += blockDim.x) {
        acc_t sum = 0;
        for (int w = 0; w < num_warps; ++w) sum += accs[w * dim + d];
        partial_grad[slot * dim + d] = sum;
      }
    }
    if constexpr (Policy::kHasLoss) {
      if (tid == 0) {
        acc_t sum = 0;
        for (int w = 0; w < num_warps; ++w) sum += warp_loss[w];
        partial_loss[slot] = sum;
      }
    }
  }
}

// grad[b, d] = sum_s partial_grad[b, s, d] and loss[b] = sum_s partial_loss[b, s], in split order.
template <typename acc_t>
__global__ void sum_splits_kernel(const acc_t* __restrict__ partial_grad,
                                  const acc_t* __restrict__ partial_loss, int64_t batch,
                                  int64_t splits, int64_t dim, acc_t* __restrict__ grad,
                                  acc_t* __restrict__ loss) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n = batch * dim;
  for (int64_t i = start; i < n; i += step) {
    const int64_t b = i / dim, d = i - b * dim;
    const acc_t* p = partial_grad + b * splits * dim + d;
    acc_t sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += p[s * dim];
    grad[i] = sum;
  }
  if (partial_loss != nullptr) {
    for (int64_t i = start; i < batch; i += step) {
      acc_t sum = 0;
      for (int64_t s = 0; s < splits; ++s) sum += partial_loss[i * splits + s];
      loss[i] = sum;
    }
  }
}

}  // namespace
}  // namespace gpu
}  // namespace avidfast
