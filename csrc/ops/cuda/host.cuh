// Host-side helpers of the CUDA launchers: the device's SM count and a kernel's static shared
// memory (cudaFuncGetAttributes, cached). Launch planning itself is pure host code in
// ops/launch_plan.h (ceil_div, the shared-memory limits, the planners).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "ops/launch_plan.h"

namespace avidfast {
namespace gpu {

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

// Static shared memory bytes of a kernel (its __shared__ variables) on `device` (the current
// device: the caller holds a device guard). Cached: a function attribute never changes.
inline int64_t static_shared_bytes(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const auto bytes = static_cast<int64_t>(attributes.sharedSizeBytes);
  cache.emplace(key, bytes);
  return bytes;
}

}  // namespace gpu
}  // namespace avidfast
