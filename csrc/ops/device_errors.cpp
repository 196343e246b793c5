#include "ops/device_errors.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>

#if defined(AVIDFAST_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

namespace avidfast {
namespace {

constexpr int kMaxDevices = 64;

std::atomic<int> value_checks_override{-1};
std::atomic<bool> cpu_as_device{false};
std::atomic<int64_t> host_read_count{0};

// kMaxDevices records, one per device: their host address, and (CUDA) the device address of the
// same mapped memory; null until first used. Never freed (kernels captured in CUDA graphs keep
// the address).
std::mutex records_mutex;
std::atomic<DeviceError*> records{nullptr};
std::atomic<DeviceError*> device_records{nullptr};
std::atomic<bool> device_used[kMaxDevices];

bool env_flag(const char* name, bool fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  return std::strcmp(value, "0") != 0;
}

ValueChecks environment_mode() {
  static const ValueChecks mode = [] {
    if (env_flag("AVIDFAST_SYNC_CHECKS", false)) return ValueChecks::kHost;
    if (!env_flag("AVIDFAST_CHECK_INDICES", true)) return ValueChecks::kOff;
    return ValueChecks::kDevice;
  }();
  return mode;
}

// Host records (zeroed), allocated when absent; the caller holds records_mutex.
DeviceError* host_records_locked() {
  DeviceError* host = records.load();
  if (host == nullptr) {
    host = new DeviceError[kMaxDevices]();  // replaced by mapped memory on the first CUDA use
    records.store(host);
  }
  return host;
}

// What a claimed record holds while its kernel is still writing the fields.
constexpr int32_t kClaimed = -1;

}  // namespace

ValueChecks cuda_value_checks() {
  const int mode = value_checks_override.load(std::memory_order_relaxed);
  return mode >= 0 ? static_cast<ValueChecks>(mode) : environment_mode();
}

DeviceError* device_error_record(int device) {
  if (cuda_value_checks() != ValueChecks::kDevice) return nullptr;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "avidfast: device index ", device,
              " is beyond the ", kMaxDevices, " devices the value checks support");
  DeviceError* mapped = device_records.load(std::memory_order_acquire);
#if defined(AVIDFAST_WITH_CUDA)
  if (mapped == nullptr) {
    std::lock_guard<std::mutex> lock(records_mutex);
    mapped = device_records.load();
    if (mapped == nullptr) {
      void* host = nullptr;
      const size_t bytes = sizeof(DeviceError) * kMaxDevices;
      C10_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
      std::memset(host, 0, bytes);
      if (DeviceError* before = records.load()) std::memcpy(host, before, bytes);  // injected
      void* on_device = nullptr;
      C10_CUDA_CHECK(cudaHostGetDevicePointer(&on_device, host, 0));
      records.store(static_cast<DeviceError*>(host));
      mapped = static_cast<DeviceError*>(on_device);
      device_records.store(mapped, std::memory_order_release);
    }
  }
#else
  TORCH_CHECK(false, "avidfast: device_error_record needs a CUDA build");
#endif
  device_used[device].store(true, std::memory_order_relaxed);
  return mapped + device;
}

void raise_device_errors(bool synchronize) {
  DeviceError* host = records.load(std::memory_order_acquire);
  if (host == nullptr) return;
#if defined(AVIDFAST_WITH_CUDA)
  if (synchronize && device_records.load() != nullptr) {
    for (int d = 0; d < kMaxDevices; ++d) {
      if (!device_used[d].load(std::memory_order_relaxed)) continue;
      c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(d));
      C10_CUDA_CHECK(cudaDeviceSynchronize());
    }
  }
#else
  (void)synchronize;
#endif
  for (int d = 0; d < kMaxDevices; ++d) {
    volatile DeviceError* record = host + d;
    const int32_t check = record->check;
    if (check <= 0) continue;  // none, or a kernel is still writing it (seen at a later call)
    std::atomic_thread_fence(std::memory_order_acquire);
    DeviceError error;
    error.check = check;
    error.pad = 0;
    error.value = record->value;
    error.limit = record->limit;
    record->value = 0;
    record->limit = 0;
    record->check = 0;
    TORCH_CHECK_VALUE(false, describe_device_error(error, d));
  }
}

std::string describe_device_error(const DeviceError& error, int device) {
  const auto check = static_cast<DeviceCheck>(error.check);
  const char* op = "";
  const char* name = "";
  const char* what = "";  // follows the range, as in checks.cpp
  const char* skipped = "";
  constexpr const char* kRows = " (the memory's rows)";
  switch (check) {
    case DeviceCheck::kNone:
      return "";
    case DeviceCheck::kScoresIdx:
      op = "memory_scores", name = "idx", what = kRows, skipped = "its scores are NaN";
      break;
    case DeviceCheck::kScoresBackwardIdx:
      op = "memory_scores_backward", name = "idx", what = kRows;
      skipped = "it added nothing to the gradient";
      break;
    case DeviceCheck::kNcePosIdx:
      op = "nce_memory_loss", name = "pos_idx", what = kRows;
      skipped = "the loss of its batch row is NaN";
      break;
    case DeviceCheck::kNceNegIdx:
      op = "nce_memory_loss", name = "neg_idx", what = kRows;
      skipped = "the loss of its batch row is NaN";
      break;
    case DeviceCheck::kUpdateIdx:
      op = "memory_update_", name = "idx", what = kRows, skipped = "no bank row was updated for it";
      break;
    case DeviceCheck::kSamplePos:
      op = "sample_negatives", name = "pos", skipped = "the draws of its row are not uniform";
      break;
    case DeviceCheck::kSampleExcludeRange:
      op = "sample_negatives", name = "exclude", skipped = "the draws of its row are not uniform";
      break;
    case DeviceCheck::kCmaQueries:
      op = "cma_topk", name = "queries", skipped = "its result row holds -inf and -1";
      break;
    case DeviceCheck::kNcePartition:
    case DeviceCheck::kSampleExcludeOrder:
    case DeviceCheck::kSampleStep:
      break;
  }
  std::ostringstream out;
  out << "an earlier call on cuda:" << device << " found ";
  switch (check) {
    case DeviceCheck::kNcePartition: {
      double z = 0;
      std::memcpy(&z, &error.value, sizeof z);
      out << "nce_memory_loss: Z (the partition estimate) must be positive and finite, got " << z
          << " (the losses of that call are not finite)";
      break;
    }
    case DeviceCheck::kSampleExcludeOrder:
      out << "sample_negatives: every row of exclude must be sorted in ascending order (use "
             "torch.sort(exclude, dim=1).values); row "
          << error.value << " is not (its draws are not uniform)";
      break;
    case DeviceCheck::kSampleStep:
      out << "sample_negatives: step must be >= 0, got " << error.value;
      break;
    default:
      out << op << ": " << name << " must lie in [0, " << error.limit << ")" << what
          << ", but holds " << error.value << " (" << skipped << ")";
      break;
  }
  out << ". The CUDA kernels check these values on the device and report at the next avidfast "
         "call or at avidfast.ops.check_errors(); AVIDFAST_SYNC_CHECKS=1 checks them at the "
         "call itself";
  return out.str();
}

void set_value_checks_override(int mode) {
  TORCH_CHECK_VALUE(mode >= -1 && mode <= 2, "value checks mode must be -1, 0, 1 or 2, got ", mode);
  value_checks_override.store(mode);
}

void set_treat_cpu_as_device(bool on) { cpu_as_device.store(on); }

bool treat_cpu_as_device() { return cpu_as_device.load(std::memory_order_relaxed); }

int64_t host_reads() { return host_read_count.load(); }

void count_host_read() { host_read_count.fetch_add(1, std::memory_order_relaxed); }

void inject_device_error(int device, int32_t check, int64_t value, int64_t limit) {
  TORCH_CHECK_VALUE(device >= 0 && device < kMaxDevices, "device must lie in [0, ", kMaxDevices,
                    "), got ", device);
  std::lock_guard<std::mutex> lock(records_mutex);
  volatile DeviceError* record = host_records_locked() + device;
  if (record->check != 0) return;  // the first failure wins
  record->check = kClaimed;
  record->value = value;
  record->limit = limit;
  std::atomic_thread_fence(std::memory_order_release);
  record->check = check;
}

}  // namespace avidfast
