// Warp-level row primitives of the CUDA kernels, and the generic "rows" kernel behind
// memory_scores, memory_scores_backward and nce_memory_loss.
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
// makes the score / loss NaN, and they add nothing to any accumulator.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/common.h"

namespace avidfast {
namespace gpu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Warps per block of the rows kernel (fewer when D is large, so that shared memory fits).
constexpr int kMaxWarps = 8;
// Dynamic shared memory a block may use without opting in to more.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

// ---------------------------------------------------------------------------------------------
// Host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

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

// ---------------------------------------------------------------------------------------------
// Device primitives

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char avf_dynamic_smem[];
  return reinterpret_cast<T*>(avf_dynamic_smem);
}

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return static_cast<T>(NAN);
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

// Sum over the 32 lanes of a warp (butterfly: every lane gets the same, bitwise identical sum).
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  return value;
}

// Sum over a block whose size is a multiple of 32, in a fixed order; every thread gets the sum.
// `scratch` holds one T per warp. Contains __syncthreads: call from block-uniform code only.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  value = warp_sum(value);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = blockDim.x / kWarp;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < warps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Memory rows are read as 16-byte words holding kPackElems<mem_t> elements each.
template <typename mem_t>
constexpr int kPackElems = static_cast<int>(16 / sizeof(mem_t));

__device__ __forceinline__ uint32_t word_of(const uint4& w, int i) {
  return i == 0 ? w.x : (i == 1 ? w.y : (i == 2 ? w.z : w.w));
}

// Element e of a 16-byte word of mem_t values, as acc_t (the same value static_cast gives).
template <typename acc_t, typename mem_t>
__device__ __forceinline__ acc_t unpack(const uint4& w, int e) {
  if constexpr (std::is_same_v<mem_t, float>) {
    return static_cast<acc_t>(__uint_as_float(word_of(w, e)));
  } else if constexpr (std::is_same_v<mem_t, double>) {
    return static_cast<acc_t>(__hiloint2double(static_cast<int>(word_of(w, 2 * e + 1)),
                                               static_cast<int>(word_of(w, 2 * e))));
  } else {
    const auto bits = static_cast<unsigned short>(word_of(w, e >> 1) >> ((e & 1) * 16));
    return static_cast<acc_t>(static_cast<float>(mem_t(bits, mem_t::from_bits())));
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedArray {
  T v[N];
};

// N consecutive T at p (aligned to min(16, N * sizeof(T)) bytes) with 8- or 16-byte accesses,
// so that lanes reading consecutive chunks of shared memory do not conflict on banks.
template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, T (&out)[N]) {
  constexpr int kChunk = N * sizeof(T) >= 16 ? static_cast<int>(16 / sizeof(T)) : N;
  using Chunk = AlignedArray<T, kChunk>;
#pragma unroll
  for (int i = 0; i < N; i += kChunk) {
    const Chunk c = *reinterpret_cast<const Chunk*>(p + i);
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[i + j] = c.v[j];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&in)[N]) {
  constexpr int kChunk = N * sizeof(T) >= 16 ? static_cast<int>(16 / sizeof(T)) : N;
  using Chunk = AlignedArray<T, kChunk>;
#pragma unroll
  for (int i = 0; i < N; i += kChunk) {
    Chunk c;
#pragma unroll
    for (int j = 0; j < kChunk; ++j) c.v[j] = in[i + j];
    *reinterpret_cast<Chunk*>(p + i) = c;
  }
}

// ---------------------------------------------------------------------------------------------
// The rows kernel
//
// A Policy describes one op:
//   static constexpr bool kNeedsDot, kAccumulate, kHasLoss;
//   struct Item { int64_t row; ... };                        // what is fetched per term
//   __device__ void prepare();                               // once per block
//   __device__ Item fetch(int64_t b, int64_t j) const;       // term j of batch row b
//   __device__ acc_t weight(int64_t b, int64_t j, const Item&, bool valid, acc_t dot,
//                           acc_t& loss, int lane) const;    // coefficient of the row in the sum

// Rows in flight per warp for a given number of 16-byte words per lane (0: scalar fallback).
constexpr int rows_in_flight(int vec) { return vec == 0 ? 4 : (vec >= 4 ? 1 : 4 / vec); }

struct RowsPlan {
  int vec = 0;            // 16-byte words per lane per row (1, 2, 4, 8), or 0 for the fallback
  int warps = 1;          // warps per block
  int64_t splits = 1;     // blocks per batch row (gridDim.y)
  int64_t per_split = 0;  // terms per block
  size_t smem = 0;        // dynamic shared memory bytes
  bool global = false;    // x staged and accumulators kept in global memory (very large D)
};

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
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      coef[u] = 0;
      if (live[u]) {
        const acc_t weight = policy.weight(b, g + u, cur[u], valid[u], dot[u], loss, lane);
        if (valid[u]) coef[u] = weight;
      }
    }
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
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      coef[u] = 0;
      if (live[u]) {
        const acc_t weight = policy.weight(b, g + u, cur[u], valid[u], dot[u], loss, lane);
        if (valid[u]) coef[u] = weight;
      }
    }
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

// ---------------------------------------------------------------------------------------------
// Launch planning

// Resident blocks per SM of one rows_kernel variant.
template <typename acc_t, typename mem_t, typename Policy>
int rows_blocks_per_sm(int vec, int threads, size_t smem) {
  int blocks = 0;
  switch (vec) {
    case 1:
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, rows_kernel<1, acc_t, mem_t, Policy>, threads, smem));
      break;
    case 2:
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, rows_kernel<2, acc_t, mem_t, Policy>, threads, smem));
      break;
    case 4:
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, rows_kernel<4, acc_t, mem_t, Policy>, threads, smem));
      break;
    case 8:
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, rows_kernel<8, acc_t, mem_t, Policy>, threads, smem));
      break;
    default:
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
          &blocks, rows_kernel<0, acc_t, mem_t, Policy>, threads, smem));
      break;
  }
  return blocks > 0 ? blocks : 1;
}

// Picks the variant, block size, shared memory and splits. Splits: the B * S blocks should fill
// the GPU's resident block slots (blocks per SM from the occupancy API, times the SM count) in
// nearly whole waves (>= 90% of the slot-time used), so that few SMs idle at the end; each split
// keeps at least 2 groups of rows per warp.
template <typename acc_t, typename mem_t, typename Policy>
RowsPlan plan_rows(int64_t batch, int64_t terms, int64_t dim, const void* memory_ptr, int device) {
  RowsPlan plan;
  constexpr int64_t V = kPackElems<mem_t>;
  if (dim % V == 0 && reinterpret_cast<uintptr_t>(memory_ptr) % 16 == 0) {
    const int64_t per_lane = ceil_div(dim / V, kWarp);
    plan.vec = per_lane <= 1 ? 1 : per_lane <= 2 ? 2 : per_lane <= 4 ? 4 : per_lane <= 8 ? 8 : 0;
  }
  auto bytes = [&](int warps) {
    return ((Policy::kNeedsDot ? 1 : 0) + (Policy::kAccumulate ? warps : 0)) * dim *
           static_cast<int64_t>(sizeof(acc_t));
  };
  int64_t rows = rows_in_flight(plan.vec);
  plan.warps = static_cast<int>(std::min<int64_t>(kMaxWarps, ceil_div(terms, rows)));
  while (plan.warps > 1 && bytes(plan.warps) > kMaxSharedBytes) plan.warps = (plan.warps + 1) / 2;
  if (bytes(plan.warps) > kMaxSharedBytes) {
    plan.global = true;
    plan.vec = 0;
    plan.smem = 0;
    rows = rows_in_flight(0);
  } else {
    plan.smem = static_cast<size_t>(bytes(plan.warps));
  }

  const int64_t sms = multiprocessor_count(device);
  const int64_t slots =
      rows_blocks_per_sm<acc_t, mem_t, Policy>(plan.vec, plan.warps * kWarp, plan.smem) * sms;
  const int64_t min_per_split = static_cast<int64_t>(plan.warps) * rows * 2;
  const int64_t max_splits = std::min<int64_t>(
      {std::max<int64_t>(1, terms / min_per_split), 65535, std::max<int64_t>(1, ceil_div(4 * slots, batch))});
  int64_t best = 1;
  double best_use = 0.0;
  for (int64_t splits = 1; splits <= max_splits; ++splits) {
    const int64_t blocks = batch * splits;
    const double use = static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
    if (use > best_use + 1e-9) {
      best = splits;
      best_use = use;
    }
    if (best_use >= 0.9) break;
  }
  plan.per_split = ceil_div(terms, best);
  plan.splits = ceil_div(terms, plan.per_split);  // no empty split
  return plan;
}

template <typename acc_t, typename mem_t, typename Policy>
void launch_rows(const RowsPlan& plan, const Policy& policy, const mem_t* memory,
                 int64_t num_items, int64_t dim, int64_t batch, const void* x, FloatKind x_kind,
                 const acc_t* x_staged, acc_t* acc_global, int64_t terms, acc_t* partial_grad,
                 acc_t* partial_loss, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(plan.splits));
  const dim3 block(static_cast<unsigned>(plan.warps * kWarp));
#define AVF_LAUNCH_ROWS(VEC)                                                                  \
  rows_kernel<VEC, acc_t, mem_t, Policy><<<grid, block, plan.smem, stream>>>(                 \
      policy, memory, num_items, dim, x, x_kind, x_staged, acc_global, terms, plan.per_split, \
      partial_grad, partial_loss)
  switch (plan.vec) {
    case 1:
      AVF_LAUNCH_ROWS(1);
      break;
    case 2:
      AVF_LAUNCH_ROWS(2);
      break;
    case 4:
      AVF_LAUNCH_ROWS(4);
      break;
    case 8:
      AVF_LAUNCH_ROWS(8);
      break;
    default:
      AVF_LAUNCH_ROWS(0);
      break;
  }
#undef AVF_LAUNCH_ROWS
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_sum_splits(const acc_t* partial_grad, const acc_t* partial_loss, int64_t batch,
                       int64_t splits, int64_t dim, acc_t* grad, acc_t* loss,
                       cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>(ceil_div(batch * dim, kThreads), 65535);
  sum_splits_kernel<acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      partial_grad, partial_loss, batch, splits, dim, grad, loss);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace gpu
}  // namespace avidfast
