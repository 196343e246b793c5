// Device building blocks of the CUDA kernel of avidfast::cma_topk (cma_topk.cu): the CTA shape,
// the shared-memory stage layout, cp.async / ldmatrix / mma.sync wrappers, the per-stage math of
// each precision, and the warp-level merge that keeps a query's top-k list exact.
//
// Stage layout. A stage holds one 64-byte column chunk of kStageRows rows: rows [0, 128) are the
// CTA's queries, rows [128, 256) the items of the current tile, each row at a pitch of 80 bytes
// (64 data + 16 pad). With that pitch the 8 row addresses of an ldmatrix phase, and the 8 (or 4)
// rows a warp reads with 16-byte SIMT loads, fall on distinct bank groups: no bank conflicts.
// A chunk is 32 bf16/fp16 or 16 fp32 dimensions: two mma k-steps (k16 for 16-bit types, k8 for
// tf32), four float4 steps for the SIMT path.
//
// Thread layout. 8 warps: warp w owns queries wq * 64 + [0, 64) (wq = w / 4) and tile items
// wn * 32 + [0, 32) (wn = w % 4). Lane (g = lane / 4, t = lane % 4) holds, per bank,
// acc[mt][nt][r] (4 x 4 x 4 floats) for query wq*64 + mt*16 + g + 8*(r/2) and item
// wn*32 + nt*8 + 2*t + r%2: the accumulator layout of mma.sync m16n8k{8,16}. The SIMT path uses
// the same layout, so the epilogue is shared.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "ops/agreement.h"
#include "ops/cuda/device.cuh"

namespace avidfast {
namespace gpu {
namespace cma {

// The CTA shape and stage layout (kThreads, kWarps, kBlockQueries, kTileItems, kChunkBytes,
// kRowPitch, kStageRows, kStageBytes, kStages, kMaxCandidates) are defined in ops/launch_plan.h,
// which the host-side planner shares.

static_assert(kThreads == 256 && kBlockQueries == 128 && kTileItems == 128,
              "the warp layout (2 x 4 warps of 64 x 32) and the loader assume these sizes");
static_assert(kRowPitch % 16 == 0 && kChunkBytes == 64, "stage rows hold 4 16-byte segments");

// How the products are computed.
enum class Math : int {
  kBF16 = 0,  // bf16 banks, mma.sync m16n8k16 bf16, fp32 accumulation
  kF16 = 1,   // fp16 banks, mma.sync m16n8k16 f16, fp32 accumulation
  kTF32 = 2,  // fp32 banks, operands rounded to tf32, mma.sync m16n8k8, fp32 accumulation
  kFP32 = 3,  // fp32 banks, fp32 FMA (SIMT), dimensions in ascending order as on the CPU
};

template <Math M>
constexpr int kElementBytes = (M == Math::kBF16 || M == Math::kF16) ? 2 : 4;

// ---------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)

__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-fills the 16 bytes when !valid (src unread).
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, bool valid) {
  const unsigned size = valid ? 16u : 0u;
  const size_t global = __cvta_generic_to_global(src);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global),
               "r"(size)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i (16 bytes each).
// Lane l receives, of each matrix, row l / 4, bytes 4 * (l % 4) .. + 3.
__device__ __forceinline__ void ldmatrix_x4(unsigned addr, uint32_t& r0, uint32_t& r1,
                                            uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// d += a * b for one 16 x 8 tile. a: the A fragment (rows g, g+8 x the k-step), b0/b1: the B
// fragment (k-step x column g).
template <Math M>
__device__ __forceinline__ void mma_tile(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (M == Math::kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else if constexpr (M == Math::kF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(M == Math::kTF32, "mma_tile: tensor-core math only");
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// fp32 bits -> tf32 operand rounded to nearest (ties away from zero): adding half a tf32 ulp
// before the tensor core drops the low 13 mantissa bits (CUTLASS's round_half_ulp_truncate).
__device__ __forceinline__ uint32_t round_to_tf32(uint32_t bits) { return bits + 0x1000u; }

// ---------------------------------------------------------------------------------------------
// Per-stage math: acc (one bank's accumulators) += the stage's 64-byte chunk of the products.

// Tensor cores. `stage` is the shared address of the stage.
template <Math M>
__device__ __forceinline__ void mma_stage(float (&acc)[4][4][4], unsigned stage, int wq, int wn,
                                          int lane) {
  // A (queries, row-major): matrices (rows 0-7 | 8-15) x (bytes 0-15 | 16-31) of the k-step, in
  // the order a0 a1 a2 a3 of the fragment. B (items, [n][k] rows): matrices (items 0-7, bytes
  // 0-15), (items 0-7, bytes 16-31), (items 8-15, bytes 0-15), (items 8-15, bytes 16-31) =
  // b0, b1 of n-tile 2np and b0, b1 of n-tile 2np + 1. The same byte pattern gives the bf16/f16
  // (k16) and the tf32 (k8) fragments.
  const unsigned a_base =
      stage + static_cast<unsigned>((wq * 64 + (lane & 15)) * kRowPitch + (lane >> 4) * 16);
  const unsigned b_base =
      stage + static_cast<unsigned>((kBlockQueries + wn * 32 + (lane & 7) + ((lane >> 4) << 3)) *
                                        kRowPitch +
                                    ((lane >> 3) & 1) * 16);
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    uint32_t a[4][4];
    uint32_t b[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      ldmatrix_x4(a_base + static_cast<unsigned>(mt * 16 * kRowPitch + ks * 32), a[mt][0],
                  a[mt][1], a[mt][2], a[mt][3]);
    }
#pragma unroll
    for (int np = 0; np < 2; ++np) {
      ldmatrix_x4(b_base + static_cast<unsigned>(np * 16 * kRowPitch + ks * 32), b[2 * np][0],
                  b[2 * np][1], b[2 * np + 1][0], b[2 * np + 1][1]);
    }
    if constexpr (M == Math::kTF32) {
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) a[mt][r] = round_to_tf32(a[mt][r]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        b[nt][0] = round_to_tf32(b[nt][0]);
        b[nt][1] = round_to_tf32(b[nt][1]);
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) mma_tile<M>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
    }
  }
}

// fp32 FMA, 16 dimensions per stage, each accumulator in ascending dimension order (the order of
// the CPU kernel, so that both give the same sums).
__device__ __forceinline__ void simt_stage(float (&acc)[4][4][4], const unsigned char* stage,
                                           int wq, int wn, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const unsigned char* query_rows = stage + (wq * 64 + g) * kRowPitch;
  const unsigned char* item_rows = stage + (kBlockQueries + wn * 32 + 2 * t) * kRowPitch;
#pragma unroll
  for (int step = 0; step < kChunkBytes / 16; ++step) {
    float4 q[4][2];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        q[mt][h] = *reinterpret_cast<const float4*>(query_rows + (mt * 16 + h * 8) * kRowPitch +
                                                    step * 16);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float4 x =
            *reinterpret_cast<const float4*>(item_rows + (nt * 8 + c) * kRowPitch + step * 16);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float& s = acc[mt][nt][2 * h + c];
            s = fmaf(q[mt][h].x, x.x, s);
            s = fmaf(q[mt][h].y, x.y, s);
            s = fmaf(q[mt][h].z, x.z, s);
            s = fmaf(q[mt][h].w, x.w, s);
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Loading a stage

// 16 bytes of a bank row into shared memory: bytes [offset, offset + 16) of the bank (when
// valid), zero beyond `bytes_left` (the rest of the row) and for invalid rows. vec: cp.async
// (the bank is 16-byte aligned and rows are a multiple of 16 bytes); otherwise element loads.
template <int kElt>
__device__ __forceinline__ void copy_segment(unsigned char* dst, const unsigned char* bank,
                                             int64_t offset, bool valid, int64_t bytes_left,
                                             bool vec) {
  if (vec) {
    cp_async_16(shared_address(dst), valid ? bank + offset : bank, valid);
    return;
  }
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  if (valid) {
    if constexpr (kElt == 4) {
      const unsigned int* src = reinterpret_cast<const unsigned int*>(bank + offset);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (e * 4 < bytes_left) w[e] = __ldg(src + e);
      }
    } else {
      const unsigned short* src = reinterpret_cast<const unsigned short*>(bank + offset);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (e * 2 < bytes_left) {
          w[e >> 1] |= static_cast<uint32_t>(__ldg(src + e)) << ((e & 1) * 16);
        }
      }
    }
  }
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

// ---------------------------------------------------------------------------------------------
// Top-k lists

__device__ __forceinline__ int highest_power_of_two(int x) {  // x >= 1
  return 1 << (31 - __clz(x));
}

// Merges up to 32 candidates into a list, exactly, by one warp (all 32 lanes call it).
//
// list_values/list_indices: k entries ordered by ranks_before (best first), padded at the end
// with (-inf, -1); shared or global memory, read and written by this warp only.
// (value, index) of lane l < count: a candidate, any order; candidates are finite-or-+inf
// (value > -inf), their indices distinct from each other and from the list's.
// Afterwards the list holds the k best of list + candidates, best first: each element goes
// straight to its rank in the union (list entries: own position + candidates before it;
// candidates: own rank among the sorted candidates + list entries before it). The ranks are a
// permutation (distinct indices make ranks_before a strict total order on real entries, and the
// padding entries come after every real one), so the result does not depend on the candidates'
// order: merges are deterministic.
__device__ __forceinline__ void warp_merge(float* list_values, int* list_indices, int k,
                                           float value, int index, int count, int lane) {
  if (lane >= count) {  // ranks after every real element
    value = -INFINITY;
    index = INT_MAX;
  }
  // Bitonic sort of the 32 lanes, best first.
#pragma unroll
  for (int size = 2; size <= kWarp; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const float other_value = __shfl_xor_sync(kFullMask, value, stride);
      const int other_index = __shfl_xor_sync(kFullMask, index, stride);
      const bool keep_better = ((lane & stride) == 0) == ((lane & size) == 0);
      const bool take = keep_better ? ranks_before(other_value, other_index, value, index)
                                    : ranks_before(value, index, other_value, other_index);
      if (take) {
        value = other_value;
        index = other_index;
      }
    }
  }
  // Where each candidate goes: its rank among the candidates (its lane) plus the list entries
  // ranking before it (a prefix of the list: binary search).
  int target = INT_MAX;
  if (lane < count) {
    int before = 0;
    for (int step = highest_power_of_two(k); step > 0; step >>= 1) {
      const int probe = before + step - 1;
      if (probe < k && ranks_before(list_values[probe], list_indices[probe], value, index)) {
        before += step;
      }
    }
    target = lane + before;
  }
  __syncwarp();
  // List entries move down by the number of candidates ranking before them (a prefix of the
  // sorted lanes). Entries only move to higher positions, so chunks of 32 are moved last chunk
  // first: every destination has been read before it is written.
  for (int base = ((k - 1) / kWarp) * kWarp; base >= 0; base -= kWarp) {
    const int i = base + lane;
    float v = -INFINITY;
    int ix = -1;
    if (i < k) {
      v = list_values[i];
      ix = list_indices[i];
    }
    int before = 0;
#pragma unroll
    for (int step = kWarp; step > 0; step >>= 1) {
      const int probe = before + step - 1;
      const int source = probe < kWarp - 1 ? probe : kWarp - 1;
      const float probe_value = __shfl_sync(kFullMask, value, source);
      const int probe_index = __shfl_sync(kFullMask, index, source);
      if (probe < count && ranks_before(probe_value, probe_index, v, ix)) before += step;
    }
    __syncwarp();
    if (i < k && before > 0 && i + before < k) {
      list_values[i + before] = v;
      list_indices[i + before] = ix;
    }
    __syncwarp();
  }
  if (target < k) {
    list_values[target] = value;
    list_indices[target] = index;
  }
  __syncwarp();
}

}  // namespace cma
}  // namespace gpu
}  // namespace avidfast
