// Value checks on the device, reported without a host sync.
//
// The value checks of checks.cpp (index ranges, the order of `exclude`, step >= 0, Z > 0) need the
// values of their tensors. For CPU tensors they run on the host as before. For CUDA tensors a
// host check costs a device-to-host copy and a stream sync per check (3-5 per nce_memory_loss
// call, up to 6 per sample_negatives call), which throttles the training step and forbids CUDA
// graph capture; so by default the kernels check the values themselves: a kernel that meets a bad
// value skips what it would have read (the row's score or loss is NaN, the bank row is not
// updated) and writes a DeviceError into a small record in host memory mapped into the device
// (one per device, allocated on first use, never freed). The host reads that record, without any
// sync, at the start of every later avidfast call on a CUDA tensor, and raises ValueError naming
// the earlier call's operator and argument; avidfast.ops.check_errors() waits for the devices
// first and raises then. AVIDFAST_SYNC_CHECKS=1 restores the synchronous host checks (ValueError
// at the call itself, for debugging); AVIDFAST_CHECK_INDICES=0 turns the value checks on CUDA off
// (the kernels still never read out of bounds).
#pragma once

#include <cstdint>
#include <string>

namespace avidfast {

// Which check failed: the operator, the argument and the rule.
enum class DeviceCheck : int32_t {
  kNone = 0,
  kScoresIdx = 1,           // memory_scores: idx in [0, num_items)
  kScoresBackwardIdx = 2,   // memory_scores_backward: idx in [0, num_items)
  kNcePosIdx = 3,           // nce_memory_loss: pos_idx in [0, num_items)
  kNceNegIdx = 4,           // nce_memory_loss: neg_idx in [0, num_items)
  kNcePartition = 5,        // nce_memory_loss: Z positive and finite (value: the double's bits)
  kUpdateIdx = 6,           // memory_update_: idx in [0, num_items)
  kSamplePos = 7,           // sample_negatives: pos in [0, num_items)
  kSampleExcludeRange = 8,  // sample_negatives: exclude in [0, num_items)
  kSampleExcludeOrder = 9,  // sample_negatives: each row of exclude ascending (value: the row)
  kSampleStep = 10,         // sample_negatives: step >= 0
  kCmaQueries = 11,         // cma_topk: queries in [0, num_items)
};

// What a kernel writes (the first failure wins: `check` is claimed with an atomic
// compare-and-swap, the other fields follow). Lives in mapped, pinned host memory.
struct DeviceError {
  int32_t check;  // DeviceCheck, 0 when none
  int32_t pad;
  int64_t value;  // the offending value (see DeviceCheck)
  int64_t limit;  // num_items for a range check
};

// How the value checks of a tensor run.
enum class ValueChecks : int {
  kHost = 0,    // on the host, before the kernel (CPU tensors; CUDA with AVIDFAST_SYNC_CHECKS=1)
  kDevice = 1,  // in the kernel, reported at a later call (CUDA, the default)
  kOff = 2,     // not at all (CUDA with AVIDFAST_CHECK_INDICES=0)
};

// The mode of CUDA tensors: AVIDFAST_SYNC_CHECKS=1 -> kHost, else AVIDFAST_CHECK_INDICES=0 ->
// kOff, else kDevice; a test hook may override it (set_value_checks_override).
ValueChecks cuda_value_checks();

// The record the kernels on `device` write to (a device-visible pointer), allocated on first use;
// null where the mode is not kDevice. CUDA builds only.
DeviceError* device_error_record(int device);

// Raises ValueError for the first recorded failure (and clears it). Without `synchronize` it reads
// only what the devices have written so far (no sync: the check at the start of each call); with
// it, it first waits for every device that has a record (avidfast.ops.check_errors()).
void raise_device_errors(bool synchronize);

// The message of a failure found on `device`, "" for none.
std::string describe_device_error(const DeviceError& error, int device);

// ---- test hooks (avidfast._C._value_checks etc.; CPU-only tests of the check path) -----------

// -1: use the environment; else a ValueChecks value for CUDA tensors.
void set_value_checks_override(int mode);
// CPU tensors take the CUDA tensors' path (kHost checks are then counted as host reads, kDevice
// checks are skipped on the host): a CUDA-free mock of the check path.
void set_treat_cpu_as_device(bool on);
bool treat_cpu_as_device();
// Device-to-host reads the checks have made of device tensors (or of CPU tensors treated as
// device tensors): each is a sync of the stream.
int64_t host_reads();
void count_host_read();
// Writes a failure into device `device`'s record as a kernel would (host memory in a CPU build).
void inject_device_error(int device, int32_t check, int64_t value, int64_t limit);

}  // namespace avidfast
