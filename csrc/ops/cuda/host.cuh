// Host-side helpers of the CUDA launchers: integer ceil division, the device's SM count, the
// shared-memory budget a block may use without opting in.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace avidfast {
namespace gpu {

// Dynamic shared memory a block may use without opting in to more.
constexpr int64_t kMaxSharedBytes = 48 * 1024;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int multiprocessor_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count > 0 ? count : 1;
}

}  // namespace gpu
}  // namespace avidfast
