// CUDA kernel of avidfast::cma_topk: for every query, the k items with the highest cross-modal
// agreement, in one tiled pass over both banks that never holds a Q x N similarity matrix.
//
// Work. A work item is (query block of 128 queries, item split). A persistent grid of one CTA
// per SM (256 threads) walks the work items round-robin. A CTA streams its split's items in
// tiles of 128 through a 4-stage cp.async pipeline of 64-byte column chunks (queries and items
// both, so any D fits in the same 80 KiB), computes both banks' 128 x 128 similarity tiles with
// tensor cores (bf16 / fp16 m16n8k16, tf32 m16n8k8) or fp32 FMA, 64 x 32 per warp (layouts in
// cma_tiles.cuh), and combines them into the agreement in registers.
//
// Top-k. Each query has a list of its k best so far (values + int32 indices, best first, in shared
// memory when it fits, else in a per-CTA global workspace), its k-th entry as the threshold, and a
// buffer of 32 (16 when shared memory is short) candidates. An agreement is a candidate only when
// it ranks before the threshold (ranks_before: higher value, or equal value and lower index): one
// compare rejects almost every item. Candidates are appended to the query's buffer (shared-memory
// int atomics for the slot); a candidate that finds the buffer full stays pending in its thread's
// registers. When any thread has a pending candidate, the CTA runs a merge round (each warp merges
// its queries' buffers into their lists with warp_merge, exact and order-independent, and refreshes
// the thresholds), then re-offers the pending candidates against the new thresholds, until none is
// pending. Buffers are otherwise merged lazily (at the latest when the work item ends), so merge
// rounds get rarer as the thresholds converge. A rejected item never belongs to the final top k
// (thresholds only rise), and every merge keeps the exact top k of what it has seen, so each list
// ends as the exact top k by (agreement desc, index asc) of its split, whatever the order of
// arrival: the result is deterministic.
//
// Splits. With few query blocks, the items are split so that the work items fill the SMs; each
// split writes its sorted list to a (S, Q, k) workspace and merge_splits_kernel folds them,
// exactly, with the same warp_merge. Split boundaries are whole tiles, so a given (query, item)
// agreement is computed the same way for any number of splits.
//
// Precision: bf16 / fp16 banks use their tensor cores (products exact in fp32, fp32
// accumulation); fp32 banks use tf32 tensor cores with precision "high" (operands rounded to
// nearest tf32) and fp32 FMA with "highest" (dimension order as the CPU kernel: same sums);
// fp64 banks are converted to fp32 first.
//
// Limits: N < 2^31 - 256 (int32 item indices on chip); any D; any k in [1, N - 2]. Lists stay
// on chip while 128 * k * 8 bytes fit next to the 82 KiB of stages and query state and the
// candidate buffers: on an H100 (227 KiB per block) k <= 113 with 32-entry buffers, k <= 129
// with 16-entry ones; on an A100 (163 KiB) k <= 49 / 65. Beyond, the lists live in a global
// workspace of 128 * k * 8 bytes per CTA (through L2); a merge costs O(k), so very large k
// (thousands) gets slow, but stays exact.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "ops/agreement.h"
#include "ops/checks.h"
#include "ops/cuda/cma_tiles.cuh"
#include "ops/cuda/device_errors.cuh"
#include "ops/cuda/host.cuh"

namespace avidfast {
namespace {

using gpu::ceil_div;
using gpu::kFullMask;
using gpu::kWarp;
using gpu::cma::kBlockQueries;
using gpu::cma::kChunkBytes;
using gpu::cma::kRowPitch;
using gpu::cma::kStageBytes;
using gpu::cma::kStages;
using gpu::cma::kThreads;
using gpu::cma::kTileItems;
using gpu::cma::kWarps;
using gpu::cma::Math;

constexpr int64_t kMaxItems = static_cast<int64_t>(INT_MAX) - 2 * kTileItems;
// Caps on the workspaces (the split partial lists, the global lists).
constexpr int64_t kMaxWorkspaceBytes = int64_t{1} << 30;

struct Params {
  const unsigned char* banks[2];  // the bank of the first / second similarity (bytes)
  int num_banks;                  // 1 (video or audio mode) or 2
  Agreement mode;
  int num_items;
  int64_t row_bytes;  // D * element size
  int chunks;         // ceil(row_bytes / 64)
  bool vec;           // 16-byte cp.async loads (aligned banks, rows a multiple of 16 bytes)
  const int64_t* queries;  // (Q,) rows, or null for rows 0..N-1
  int64_t num_queries;
  DeviceError* errors;  // the device's value-check record, or null (ops/device_errors.h)
  int k;
  int capacity;  // candidate buffer entries per query (<= 32)
  bool lists_on_chip;
  float* list_values;  // global lists (grid * 128 * k) when !lists_on_chip
  int* list_indices;
  int64_t query_blocks;
  int splits;
  int64_t tiles_per_split;
  int64_t num_work;
  float* out_values;    // (Q, k) when splits == 1
  int64_t* out_indices;
  float* part_values;   // (S, Q, k) when splits > 1
  int* part_indices;
};

// Per-CTA state in shared memory (and the lists, wherever they are).
struct QueryState {
  float* threshold_value;  // (128,) the list's k-th entry: what a candidate must rank before
  int* threshold_index;
  int* count;        // (128,) candidates appended to the buffer (may exceed capacity)
  int* row;          // (128,) the query's row, -1 for none
  float* cand_values;  // (128, capacity)
  int* cand_indices;
  float* list_values;  // (128, k)
  int* list_indices;
  int capacity;
  int k;
};

// Offers this thread's agreements of the current tile (all of them, or the `consider` bits) to
// their queries; returns the bits of the candidates that found their buffer full.
// Bit ((mt * 2 + h) * 4 + nt) * 2 + c is acc[mt][nt][2 * h + c].
template <bool kAll>
__device__ __forceinline__ uint64_t offer_tile(const float (&agree)[4][4][4], uint64_t consider,
                                               const QueryState& s, int first_query,
                                               int first_item, int item_end) {
  uint64_t pending = 0;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int q = first_query + mt * 16 + h * 8;
      const float threshold_value = s.threshold_value[q];
      const int threshold_index = s.threshold_index[q];
      const int row = s.row[q];
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int bit = ((mt * 2 + h) * 4 + nt) * 2 + c;
          if (!kAll && ((consider >> bit) & 1u) == 0) continue;
          const float value = agree[mt][nt][2 * h + c];
          if (!(value >= threshold_value)) continue;  // the common case (NaN included)
          const int item = first_item + nt * 8 + c;
          if (item >= item_end || item == row || !(value > -INFINITY)) continue;
          if (!ranks_before(value, item, threshold_value, threshold_index)) continue;
          const int slot = atomicAdd(&s.count[q], 1);
          if (slot < s.capacity) {
            s.cand_values[q * s.capacity + slot] = value;
            s.cand_indices[q * s.capacity + slot] = item;
          } else {
            pending |= uint64_t{1} << bit;
          }
        }
      }
    }
  }
  return pending;
}

// Every warp merges the non-empty buffers of its queries (q = warp mod 8) into their lists and
// refreshes their thresholds. Call between two __syncthreads.
__device__ __forceinline__ void merge_round(const QueryState& s, int warp, int lane) {
  for (int q = warp; q < kBlockQueries; q += kWarps) {
    const int count = __shfl_sync(kFullMask, s.count[q], 0);
    if (count == 0) continue;
    const int m = count < s.capacity ? count : s.capacity;
    float value = 0.f;
    int index = 0;
    if (lane < m) {
      value = s.cand_values[q * s.capacity + lane];
      index = s.cand_indices[q * s.capacity + lane];
    }
    float* list_values = s.list_values + static_cast<int64_t>(q) * s.k;
    int* list_indices = s.list_indices + static_cast<int64_t>(q) * s.k;
    gpu::cma::warp_merge(list_values, list_indices, s.k, value, index, m, lane);
    if (lane == 0) {
      s.count[q] = 0;
      s.threshold_value[q] = list_values[s.k - 1];
      s.threshold_index[q] = list_indices[s.k - 1];
    }
  }
}

// Agreement of both banks' accumulators, into the first.
template <Agreement kMode>
__device__ __forceinline__ void combine(float (&first)[4][4][4], const float (&second)[4][4][4]) {
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        first[mt][nt][r] = agreement(kMode, first[mt][nt][r], second[mt][nt][r]);
      }
    }
  }
}

template <Math M>
__device__ __forceinline__ void stage_math(float (&acc)[4][4][4], const unsigned char* stage,
                                           int wq, int wn, int lane) {
  if constexpr (M == Math::kFP32) {
    gpu::cma::simt_stage(acc, stage, wq, wn, lane);
  } else {
    gpu::cma::mma_stage<M>(acc, gpu::cma::shared_address(stage), wq, wn, lane);
  }
}

template <Math M>
__global__ void __launch_bounds__(kThreads, 1) cma_topk_kernel(const Params p) {
  constexpr int kElt = gpu::cma::kElementBytes<M>;
  extern __shared__ __align__(128) unsigned char cma_smem[];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int wq = warp / 4, wn = warp % 4;
  const int g = lane >> 2, t = lane & 3;

  unsigned char* stages = cma_smem;
  QueryState s;
  s.threshold_value = reinterpret_cast<float*>(cma_smem + kStages * kStageBytes);
  s.threshold_index = reinterpret_cast<int*>(s.threshold_value + kBlockQueries);
  s.count = s.threshold_index + kBlockQueries;
  s.row = s.count + kBlockQueries;
  s.cand_values = reinterpret_cast<float*>(s.row + kBlockQueries);
  s.cand_indices = reinterpret_cast<int*>(s.cand_values + kBlockQueries * p.capacity);
  s.capacity = p.capacity;
  s.k = p.k;
  const int64_t list_entries = static_cast<int64_t>(kBlockQueries) * p.k;
  if (p.lists_on_chip) {
    s.list_values = reinterpret_cast<float*>(s.cand_indices + kBlockQueries * p.capacity);
    s.list_indices = reinterpret_cast<int*>(s.list_values + list_entries);
  } else {
    s.list_values = p.list_values + blockIdx.x * list_entries;
    s.list_indices = p.list_indices + blockIdx.x * list_entries;
  }

  // The loader: thread tid copies 16-byte segment (tid % 4) of stage rows tid / 4 + {0, 64}
  // (queries) and 128 + tid / 4 + {0, 64} (items).
  const int load_row = tid >> 2, load_seg = tid & 3;

  for (int64_t work = blockIdx.x; work < p.num_work; work += gridDim.x) {
    const int64_t query_block = work % p.query_blocks;
    const int split = static_cast<int>(work / p.query_blocks);
    const int64_t first_query = query_block * kBlockQueries;
    const int item_begin = static_cast<int>(split * p.tiles_per_split * kTileItems);
    const int item_end = static_cast<int>(
        std::min<int64_t>(p.num_items, item_begin + p.tiles_per_split * kTileItems));

    // Fresh state: empty lists, empty buffers, thresholds -inf (+inf for absent queries, which
    // take nothing).
    for (int i = tid; i < kBlockQueries; i += kThreads) {
      const int64_t qg = first_query + i;
      int row = -1;
      if (qg < p.num_queries) {
        const int64_t r = p.queries != nullptr ? p.queries[qg] : qg;
        if (r >= 0 && r < p.num_items) {
          row = static_cast<int>(r);
        } else {
          gpu::report_error(p.errors, DeviceCheck::kCmaQueries, r, p.num_items);
        }
      }
      s.row[i] = row;
      s.threshold_value[i] = row >= 0 ? -INFINITY : INFINITY;
      s.threshold_index[i] = -1;
      s.count[i] = 0;
    }
    for (int64_t i = tid; i < list_entries; i += kThreads) {
      s.list_values[i] = -INFINITY;
      s.list_indices[i] = -1;
    }
    __syncthreads();

    int64_t query_offset[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = s.row[load_row + 64 * j];
      query_offset[j] = row >= 0 ? static_cast<int64_t>(row) * p.row_bytes : -1;
    }

    const int tiles = (item_end - item_begin + kTileItems - 1) / kTileItems;
    const int steps_per_tile = p.num_banks * p.chunks;
    const int total_steps = tiles * steps_per_tile;

    // Issue side of the pipeline: step (tile, bank, chunk) -> stage.
    int issued = 0, issue_stage = 0, issue_tile = 0, issue_bank = 0, issue_chunk = 0;
    auto issue = [&]() {
      if (issued < total_steps) {
        unsigned char* stage = stages + issue_stage * kStageBytes;
        const unsigned char* bank = p.banks[issue_bank];
        const int64_t col = static_cast<int64_t>(issue_chunk) * kChunkBytes + load_seg * 16;
        const bool col_ok = col < p.row_bytes;
        const int64_t bytes_left = p.row_bytes - col;
        const int tile_first = item_begin + issue_tile * kTileItems;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int r = load_row + 64 * j;
          const bool query_ok = col_ok && query_offset[j] >= 0;
          gpu::cma::copy_segment<kElt>(stage + r * kRowPitch + load_seg * 16, bank,
                                       query_ok ? query_offset[j] + col : 0, query_ok,
                                       bytes_left, p.vec);
          const int item = tile_first + r;
          const bool item_ok = col_ok && item < item_end;
          const int64_t item_offset = item_ok ? static_cast<int64_t>(item) * p.row_bytes + col : 0;
          gpu::cma::copy_segment<kElt>(stage + (kBlockQueries + r) * kRowPitch + load_seg * 16,
                                       bank, item_offset, item_ok, bytes_left, p.vec);
        }
        if (++issue_chunk == p.chunks) {
          issue_chunk = 0;
          if (++issue_bank == p.num_banks) {
            issue_bank = 0;
            ++issue_tile;
          }
        }
      }
      gpu::cma::cp_async_commit();  // possibly empty: keeps the group count uniform
      ++issued;
      if (++issue_stage == kStages) issue_stage = 0;
    };

    for (int i = 0; i < kStages - 1; ++i) issue();

    float acc[2][4][4][4];
    int stage_index = 0, tile = 0, bank = 0, chunk = 0;
    for (int step = 0; step < total_steps; ++step) {
      gpu::cma::cp_async_wait<kStages - 2>();  // this thread's copies of `step` have landed
      __syncthreads();  // everyone's have, and everyone is done with the stage refilled next
      issue();

      if (bank == 0 && chunk == 0) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
              for (int r = 0; r < 4; ++r) acc[b][mt][nt][r] = 0.f;
            }
          }
        }
      }
      const unsigned char* stage = stages + stage_index * kStageBytes;
      if (bank == 0) {
        stage_math<M>(acc[0], stage, wq, wn, lane);
      } else {
        stage_math<M>(acc[1], stage, wq, wn, lane);
      }

      if (bank == p.num_banks - 1 && chunk == p.chunks - 1) {
        // Epilogue of the tile: agreement, filter, merges while buffers overflow.
        if (p.mode == Agreement::kConsensus) {
          combine<Agreement::kConsensus>(acc[0], acc[1]);
        } else if (p.mode == Agreement::kUnion) {
          combine<Agreement::kUnion>(acc[0], acc[1]);
        }
        const int first_q = wq * 64 + g;
        const int first_item = item_begin + tile * kTileItems + wn * 32 + 2 * t;
        uint64_t pending = offer_tile<true>(acc[0], ~uint64_t{0}, s, first_q, first_item, item_end);
        while (__syncthreads_or(pending != 0)) {
          merge_round(s, warp, lane);
          __syncthreads();
          pending = offer_tile<false>(acc[0], pending, s, first_q, first_item, item_end);
        }
      }

      if (++stage_index == kStages) stage_index = 0;
      if (++chunk == p.chunks) {
        chunk = 0;
        if (++bank == p.num_banks) {
          bank = 0;
          ++tile;
        }
      }
    }
    gpu::cma::cp_async_wait<0>();

    // The buffers' remaining candidates, then the lists out.
    __syncthreads();
    merge_round(s, warp, lane);
    __syncthreads();
    for (int q = warp; q < kBlockQueries; q += kWarps) {
      const int64_t qg = first_query + q;
      if (qg >= p.num_queries) break;
      const float* list_values = s.list_values + static_cast<int64_t>(q) * p.k;
      const int* list_indices = s.list_indices + static_cast<int64_t>(q) * p.k;
      if (p.splits == 1) {
        float* out_values = p.out_values + qg * p.k;
        int64_t* out_indices = p.out_indices + qg * p.k;
        for (int j = lane; j < p.k; j += kWarp) {
          out_values[j] = list_values[j];
          out_indices[j] = list_indices[j];
        }
      } else {
        const int64_t offset = (static_cast<int64_t>(split) * p.num_queries + qg) * p.k;
        for (int j = lane; j < p.k; j += kWarp) {
          p.part_values[offset + j] = list_values[j];
          p.part_indices[offset + j] = list_indices[j];
        }
      }
    }
    __syncthreads();  // the next work item re-initialises the state
  }
}

// One warp per query: folds the sorted lists of splits 1..S-1 into split 0's (in place), 32
// candidates at a time, then writes the output row.
__global__ void __launch_bounds__(kThreads)
    merge_splits_kernel(float* __restrict__ part_values, int* __restrict__ part_indices,
                        int64_t num_queries, int k, int splits, float* __restrict__ out_values,
                        int64_t* __restrict__ out_indices) {
  const int lane = threadIdx.x % kWarp;
  const int64_t q = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  if (q >= num_queries) return;  // whole warps
  float* list_values = part_values + q * k;
  int* list_indices = part_indices + q * k;
  for (int s = 1; s < splits; ++s) {
    const int64_t offset = (static_cast<int64_t>(s) * num_queries + q) * k;
    for (int j0 = 0; j0 < k; j0 += kWarp) {
      const int j = j0 + lane;
      float value = -INFINITY;
      int index = INT_MAX;
      if (j < k) {
        value = part_values[offset + j];
        index = part_indices[offset + j];
      }
      // Real entries (value > -inf) precede the padding in a sorted list.
      const int count = __popc(__ballot_sync(kFullMask, value > -INFINITY));
      if (count == 0) break;
      // The list is sorted: when its best remaining entry cannot enter, none can.
      const float best_value = __shfl_sync(kFullMask, value, 0);
      const int best_index = __shfl_sync(kFullMask, index, 0);
      if (!ranks_before(best_value, best_index, list_values[k - 1], list_indices[k - 1])) break;
      gpu::cma::warp_merge(list_values, list_indices, k, value, index, count, lane);
    }
  }
  for (int j = lane; j < k; j += kWarp) {
    out_values[q * k + j] = list_values[j];
    out_indices[q * k + j] = list_indices[j];
  }
}

template <Math M>
void launch(Params p, int device, cudaStream_t stream, const at::TensorOptions& options) {
  const auto kernel = cma_topk_kernel<M>;
  int max_optin = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int sms = gpu::multiprocessor_count(device);
  const int64_t static_shared =
      gpu::static_shared_bytes(reinterpret_cast<const void*>(kernel), device);

  // Shared memory: stages, query state, candidate buffers, and the lists when they fit
  // (ops/launch_plan.h), within what the kernel can opt in to beside its static shared memory.
  const gpu::cma::SharedPlan shared = gpu::cma::plan_shared(p.k, max_optin, static_shared);
  TORCH_CHECK(shared.ok, "cma_topk: the device offers ", max_optin,
              " bytes of shared memory per block, the kernel needs at least ",
              shared.needed + static_shared);
  p.capacity = shared.capacity;
  p.lists_on_chip = shared.lists_on_chip;
  const int64_t smem = shared.smem;
  const int64_t list_bytes = static_cast<int64_t>(kBlockQueries) * p.k * 8;
  // The device's limit (not this call's size): idempotent, so concurrent calls with other k
  // cannot lower it under each other's launch.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(shared.dynamic_limit)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads,
                                                               static_cast<size_t>(smem)));
  TORCH_CHECK(per_sm > 0, "cma_topk: the kernel cannot run with ", smem, " bytes of shared memory");
  int64_t slots = static_cast<int64_t>(sms) * per_sm;
  if (!p.lists_on_chip) {
    // Global lists: one 128 x k list set per CTA.
    slots = std::max<int64_t>(1, std::min(slots, kMaxWorkspaceBytes / list_bytes));
  }

  // Splits: minimise waves * (tiles per split + a warm-up allowance), the partial lists within
  // the workspace cap.
  const int64_t tiles = ceil_div(p.num_items, kTileItems);
  p.query_blocks = ceil_div(p.num_queries, kBlockQueries);
  constexpr double kWarmupTiles = 64.0;
  int64_t best_splits = 1;
  double best_cost = std::numeric_limits<double>::infinity();
  for (int64_t splits = 1; splits <= std::min<int64_t>(tiles, 4096); ++splits) {
    const int64_t per = ceil_div(tiles, splits);
    if (ceil_div(tiles, per) != splits) continue;  // the same as fewer splits
    if (splits > 1 && splits * p.num_queries * p.k * 8 > kMaxWorkspaceBytes) break;
    const int64_t work = p.query_blocks * splits;
    const int64_t waves = ceil_div(work, std::min(work, slots));
    const double cost = static_cast<double>(waves) * (static_cast<double>(per) + kWarmupTiles);
    if (cost < best_cost * 0.999) {
      best_cost = cost;
      best_splits = splits;
    }
  }
  p.splits = static_cast<int>(best_splits);
  p.tiles_per_split = ceil_div(tiles, best_splits);
  p.num_work = p.query_blocks * best_splits;
  const int64_t grid = std::min(p.num_work, slots);

  at::Tensor list_values, list_indices, part_values, part_indices;
  if (!p.lists_on_chip) {
    list_values = at::empty({grid * kBlockQueries * p.k}, options.dtype(at::kFloat));
    list_indices = at::empty({grid * kBlockQueries * p.k}, options.dtype(at::kInt));
    p.list_values = list_values.data_ptr<float>();
    p.list_indices = list_indices.data_ptr<int>();
  }
  if (p.splits > 1) {
    part_values = at::empty({p.splits, p.num_queries, p.k}, options.dtype(at::kFloat));
    part_indices = at::empty({p.splits, p.num_queries, p.k}, options.dtype(at::kInt));
    p.part_values = part_values.data_ptr<float>();
    p.part_indices = part_indices.data_ptr<int>();
  }

  kernel<<<static_cast<unsigned>(grid), kThreads, static_cast<size_t>(smem), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.splits > 1) {
    constexpr int64_t kQueriesPerBlock = kThreads / kWarp;
    const int64_t blocks = ceil_div(p.num_queries, kQueriesPerBlock);
    TORCH_CHECK(blocks <= INT_MAX, "cma_topk: too many queries");
    merge_splits_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        p.part_values, p.part_indices, p.num_queries, p.k, p.splits, p.out_values,
        p.out_indices);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> cma_topk_cuda(const at::Tensor& video_memory,
                                                 const at::Tensor& audio_memory, int64_t k,
                                                 c10::string_view mode,
                                                 const c10::optional<at::Tensor>& queries,
                                                 c10::string_view precision) {
  const Agreement agreement_mode =
      check_cma_topk(video_memory, audio_memory, k, mode, queries, precision);
  c10::cuda::CUDAGuard guard(video_memory.device());
  const int64_t num_items = video_memory.size(0), dim = video_memory.size(1);
  TORCH_CHECK_VALUE(num_items <= kMaxItems, "cma_topk on CUDA supports at most ", kMaxItems,
                    " items, got ", num_items);
  at::Tensor query_rows;
  if (queries.has_value()) query_rows = queries->contiguous();
  const int64_t num_queries = queries.has_value() ? query_rows.size(0) : num_items;
  const auto options = video_memory.options();
  auto values = at::empty({num_queries, k}, options.dtype(at::kFloat));
  auto indices = at::empty({num_queries, k}, options.dtype(at::kLong));
  if (num_queries == 0) return {values, indices};

  // The banks of the first and (consensus, union) second similarity.
  const bool both = needs_video(agreement_mode) && needs_audio(agreement_mode);
  at::Tensor first = agreement_mode == Agreement::kAudio ? audio_memory : video_memory;
  at::Tensor second = both ? audio_memory : at::Tensor();
  if (first.scalar_type() == at::kDouble) {
    first = first.to(at::kFloat).contiguous();
    if (second.defined()) second = second.to(at::kFloat).contiguous();
  }
  Math math;
  switch (first.scalar_type()) {
    case at::kBFloat16:
      math = Math::kBF16;
      break;
    case at::kHalf:
      math = Math::kF16;
      break;
    default:
      math = precision == "high" ? Math::kTF32 : Math::kFP32;
      break;
  }
  const int64_t element_bytes = first.element_size();

  Params p{};
  p.banks[0] = static_cast<const unsigned char*>(first.data_ptr());
  p.banks[1] = second.defined() ? static_cast<const unsigned char*>(second.data_ptr()) : p.banks[0];
  p.num_banks = both ? 2 : 1;
  p.mode = agreement_mode;
  p.num_items = static_cast<int>(num_items);
  p.row_bytes = dim * element_bytes;
  p.chunks = static_cast<int>(ceil_div(p.row_bytes, kChunkBytes));
  TORCH_CHECK_VALUE(ceil_div(num_items, kTileItems) * p.num_banks * p.chunks <= INT_MAX,
                    "cma_topk: num_items * dim is too large for the CUDA kernel");
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  p.vec = p.row_bytes % 16 == 0 && aligned(p.banks[0]) && aligned(p.banks[1]);
  p.queries = queries.has_value() ? query_rows.data_ptr<int64_t>() : nullptr;
  p.errors = queries.has_value() ? device_error_record(video_memory.get_device()) : nullptr;
  p.num_queries = num_queries;
  p.k = static_cast<int>(k);
  p.out_values = values.data_ptr<float>();
  p.out_indices = indices.data_ptr<int64_t>();

  const int device = video_memory.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (math) {
    case Math::kBF16:
      launch<Math::kBF16>(p, device, stream, options);
      break;
    case Math::kF16:
      launch<Math::kF16>(p, device, stream, options);
      break;
    case Math::kTF32:
      launch<Math::kTF32>(p, device, stream, options);
      break;
    case Math::kFP32:
      launch<Math::kFP32>(p, device, stream, options);
      break;
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(avidfast, CUDA, m) {
  m.impl("cma_topk", &cma_topk_cuda);
}

}  // namespace avidfast
