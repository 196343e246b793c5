// Device primitives shared by the CUDA kernels: warp and block sums, dynamic shared memory, and
// 16-byte words (unpacking memory rows, vector loads and stores).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ops/launch_plan.h"

namespace avidfast {
namespace gpu {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char avf_dynamic_smem[];
  return reinterpret_cast<T*>(avf_dynamic_smem);
}

template <typename T>
__device__ __forceinline__ T quiet_nan() {
  return static_cast<T>(NAN);
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

}  // namespace gpu
}  // namespace avidfast
