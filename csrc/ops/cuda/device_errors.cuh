// Device side of the value checks (ops/device_errors.h): a kernel that meets a bad value records
// it in the record of its device, without any sync; the host reports it at a later call.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ops/device_errors.h"

namespace avidfast {
namespace gpu {

// Records a failed check in `record` (null: checks off). The first failure wins: the record is
// claimed with a compare-and-swap (-1 while the fields are written), then published after a
// system-wide fence, so that the host never reads a half-written record.
__device__ __forceinline__ void report_error(DeviceError* record, DeviceCheck check, int64_t value,
                                             int64_t limit) {
  if (record == nullptr) return;
  if (atomicCAS(&record->check, 0, -1) != 0) return;
  record->value = value;
  record->limit = limit;
  __threadfence_system();
  atomicExch(&record->check, static_cast<int32_t>(check));
}

}  // namespace gpu
}  // namespace avidfast
