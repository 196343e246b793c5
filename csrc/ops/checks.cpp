#include "ops/checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "ops/device_errors.h"

namespace avidfast {

namespace {

// A device tensor, or a CPU tensor under the test hook set_treat_cpu_as_device.
bool on_device(const at::Tensor& t) { return !t.is_cpu() || treat_cpu_as_device(); }

// Whether the value checks of t run here, on the host (ops/device_errors.h: CPU tensors always;
// CUDA tensors with AVIDFAST_SYNC_CHECKS=1). Otherwise the kernel checks them (or nobody).
bool value_checks_apply(const at::Tensor& t) {
  return !on_device(t) || cuda_value_checks() == ValueChecks::kHost;
}

// A call on device tensors first raises what an earlier call's kernels recorded (no sync).
void raise_earlier_errors(const at::Tensor& t) {
  if (on_device(t)) raise_device_errors(/*synchronize=*/false);
}

// t on the host: a device-to-host copy and a stream sync for a device tensor (counted).
at::Tensor read_on_host(const at::Tensor& t) {
  if (on_device(t)) count_host_read();
  return t.cpu();
}

template <typename T>
T read_scalar(const at::Tensor& t) {
  return read_on_host(t).item<T>();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Every value of the int64 tensor t lies in [0, num_items) (when value checks apply to t).
// `what` follows the range in the message.
void check_range(const at::Tensor& t, const char* name, int64_t num_items, const char* what) {
  if (t.numel() == 0 || !value_checks_apply(t)) return;
  auto [lo, hi] = at::aminmax(t);
  const at::Tensor both = read_on_host(at::stack({lo, hi}));  // one read for both
  const int64_t low = both[0].item<int64_t>(), high = both[1].item<int64_t>();
  TORCH_CHECK_VALUE(low >= 0 && high < num_items, name, " must lie in [0, ", num_items, ")", what,
                    ", but holds values in [", low, ", ", high, "]");
}

}  // namespace

at::ScalarType accumulate_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_memory(const at::Tensor& memory) {
  TORCH_CHECK_VALUE(memory.dim() == 2, "memory must be a 2-D (num_items, dim) tensor, got shape ",
                    memory.sizes());
  TORCH_CHECK_VALUE(is_supported_float(memory.scalar_type()),
                    "memory must be float32, bfloat16, float16 or float64, got ",
                    memory.scalar_type());
  TORCH_CHECK_VALUE(memory.is_contiguous(),
                    "memory must be contiguous (call .contiguous() once when creating the bank)");
  TORCH_CHECK_VALUE(memory.size(0) > 0 && memory.size(1) > 0,
                    "memory must have at least one row and one column, got shape ", memory.sizes());
}

void check_embeddings(const at::Tensor& x, const char* name, const at::Tensor& memory) {
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D (batch, dim) tensor, got shape ", x.sizes());
  TORCH_CHECK_VALUE(is_supported_float(x.scalar_type()), name,
                    " must be a floating tensor (float32, float64, float16 or bfloat16), got ",
                    x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == memory.device(), name, " is on ", x.device(),
                    " but memory is on ", memory.device(), "; move them to the same device");
  TORCH_CHECK_VALUE(x.size(1) == memory.size(1), name, " has dim ", x.size(1),
                    " but memory rows have dim ", memory.size(1));
}

void check_indices(const at::Tensor& idx, const char* name, int64_t dims, int64_t rows,
                   const at::Tensor& memory) {
  TORCH_CHECK_VALUE(idx.scalar_type() == at::kLong, name, " must be int64, got ",
                    idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == dims, name, " must be ", dims, "-D, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.size(0) == rows, name, " has ", idx.size(0), " rows but the batch has ",
                    rows);
  TORCH_CHECK_VALUE(idx.device() == memory.device(), name, " is on ", idx.device(),
                    " but memory is on ", memory.device(), "; move them to the same device");
  check_range(idx, name, memory.size(0), " (the memory's rows)");
}

void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "temperature must be a positive finite number, got ", temperature);
}

void check_sample_negatives(const at::Tensor& pos, int64_t num_items, int64_t num_negatives,
                            const at::Tensor& step, int64_t row_offset,
                            const c10::optional<at::Tensor>& exclude) {
  raise_earlier_errors(pos);
  TORCH_CHECK_VALUE(pos.scalar_type() == at::kLong && pos.dim() == 1,
                    "pos must be a 1-D int64 tensor of the rows' own indices, got ",
                    pos.scalar_type(), " of shape ", pos.sizes());
  TORCH_CHECK_VALUE(num_items >= 2, "num_items must be at least 2, got ", num_items);
  TORCH_CHECK_VALUE(num_negatives >= 1, "num_negatives must be at least 1, got ", num_negatives);
  TORCH_CHECK_VALUE(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
  TORCH_CHECK_VALUE(step.numel() == 1 && step.scalar_type() == at::kLong,
                    "step must be an int64 scalar (a Python int or a one-element int64 tensor)");
  TORCH_CHECK_VALUE(step.is_cpu() || step.device() == pos.device(), "step is on ", step.device(),
                    " but pos is on ", pos.device());
  if (value_checks_apply(step)) {
    const int64_t value = read_scalar<int64_t>(step);
    TORCH_CHECK_VALUE(value >= 0, "step must be >= 0, got ", value);
  }
  int64_t excluded = 0;
  if (exclude.has_value()) {
    const at::Tensor& ex = *exclude;
    TORCH_CHECK_VALUE(ex.scalar_type() == at::kLong && ex.dim() == 2,
                      "exclude must be a 2-D (batch, P) int64 tensor, got ", ex.scalar_type(),
                      " of shape ", ex.sizes());
    TORCH_CHECK_VALUE(ex.size(0) == pos.size(0), "exclude has ", ex.size(0),
                      " rows but pos has ", pos.size(0));
    TORCH_CHECK_VALUE(ex.device() == pos.device(), "exclude is on ", ex.device(),
                      " but pos is on ", pos.device());
    excluded = ex.size(1);
    check_range(ex, "exclude", num_items, "");
    if (ex.numel() > 0 && ex.size(1) > 1 && value_checks_apply(ex)) {
      const bool sorted = read_scalar<bool>(
          ex.narrow(1, 1, ex.size(1) - 1).ge(ex.narrow(1, 0, ex.size(1) - 1)).all());
      TORCH_CHECK_VALUE(sorted, "every row of exclude must be sorted in ascending order "
                                "(use torch.sort(exclude, dim=1).values)");
    }
  }
  TORCH_CHECK_VALUE(num_negatives < num_items - excluded - 1, "num_negatives (", num_negatives,
                    ") must be smaller than num_items - P - 1 = ", num_items - excluded - 1,
                    " (num_items ", num_items, ", P = ", excluded,
                    " excluded per row, and the row itself)");
  check_range(pos, "pos", num_items, "");
}

void check_memory_scores(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& idx,
                         double temperature) {
  raise_earlier_errors(memory);
  check_memory(memory);
  check_embeddings(x, "x", memory);
  check_indices(idx, "idx", 2, x.size(0), memory);
  check_temperature(temperature);
}

void check_memory_scores_backward(const at::Tensor& grad_scores, const at::Tensor& memory,
                                  const at::Tensor& idx, double temperature) {
  raise_earlier_errors(memory);
  check_memory(memory);
  TORCH_CHECK_VALUE(grad_scores.dim() == 2 && is_supported_float(grad_scores.scalar_type()),
                    "grad_scores must be a 2-D floating tensor, got ", grad_scores.scalar_type(),
                    " of shape ", grad_scores.sizes());
  TORCH_CHECK_VALUE(grad_scores.device() == memory.device(), "grad_scores is on ",
                    grad_scores.device(), " but memory is on ", memory.device());
  check_indices(idx, "idx", 2, grad_scores.size(0), memory);
  TORCH_CHECK_VALUE(idx.sizes() == grad_scores.sizes(), "grad_scores has shape ",
                    grad_scores.sizes(), " but idx has shape ", idx.sizes());
  check_temperature(temperature);
}

void check_nce_memory_loss(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& pos_idx,
                           const at::Tensor& neg_idx, double temperature,
                           const at::Tensor& partition) {
  raise_earlier_errors(memory);
  check_memory(memory);
  check_embeddings(x, "x", memory);
  check_indices(pos_idx, "pos_idx", 2, x.size(0), memory);
  check_indices(neg_idx, "neg_idx", 2, x.size(0), memory);
  TORCH_CHECK_VALUE(pos_idx.size(1) >= 1, "pos_idx must hold at least one positive per row");
  TORCH_CHECK_VALUE(neg_idx.size(1) >= 1, "neg_idx must hold at least one negative per row");
  check_temperature(temperature);
  TORCH_CHECK_VALUE(partition.numel() == 1 && is_supported_float(partition.scalar_type()),
                    "Z (the partition estimate) must be a float or a one-element floating tensor");
  TORCH_CHECK_VALUE(partition.is_cpu() || partition.device() == memory.device(), "Z is on ",
                    partition.device(), " but memory is on ", memory.device());
  if (value_checks_apply(partition)) {
    const double z = read_scalar<double>(partition);
    TORCH_CHECK_VALUE(std::isfinite(z) && z > 0, "Z (the partition estimate) must be positive "
                      "and finite, got ", z);
  }
}

void check_memory_update(const at::Tensor& memory, const at::Tensor& idx, const at::Tensor& x,
                         double momentum) {
  raise_earlier_errors(memory);
  check_memory(memory);
  check_embeddings(x, "x", memory);
  check_indices(idx, "idx", 1, x.size(0), memory);
  TORCH_CHECK_VALUE(std::isfinite(momentum) && momentum >= 0 && momentum <= 1,
                    "momentum must lie in [0, 1], got ", momentum);
}

Agreement check_cma_topk(const at::Tensor& video_memory, const at::Tensor& audio_memory, int64_t k,
                         c10::string_view mode, const c10::optional<at::Tensor>& queries,
                         c10::string_view precision) {
  raise_earlier_errors(video_memory);
  check_memory(video_memory);
  TORCH_CHECK_VALUE(audio_memory.sizes() == video_memory.sizes(), "audio_memory has shape ",
                    audio_memory.sizes(), " but video_memory has shape ", video_memory.sizes());
  TORCH_CHECK_VALUE(audio_memory.scalar_type() == video_memory.scalar_type(), "audio_memory is ",
                    audio_memory.scalar_type(), " but video_memory is ", video_memory.scalar_type());
  TORCH_CHECK_VALUE(audio_memory.device() == video_memory.device(), "audio_memory is on ",
                    audio_memory.device(), " but video_memory is on ", video_memory.device());
  TORCH_CHECK_VALUE(audio_memory.is_contiguous(), "audio_memory must be contiguous");
  const int64_t num_items = video_memory.size(0);
  TORCH_CHECK_VALUE(k >= 1 && k < num_items - 1, "k must lie in [1, num_items - 2] = [1, ",
                    num_items - 2, "], got ", k);
  Agreement parsed;
  if (mode == "consensus") {
    parsed = Agreement::kConsensus;
  } else if (mode == "union") {
    parsed = Agreement::kUnion;
  } else if (mode == "video") {
    parsed = Agreement::kVideo;
  } else if (mode == "audio") {
    parsed = Agreement::kAudio;
  } else {
    TORCH_CHECK_VALUE(false, "mode must be 'consensus', 'union', 'video' or 'audio', got '",
                      std::string(mode), "'");
  }
  TORCH_CHECK_VALUE(precision == "highest" || precision == "high",
                    "precision must be 'highest' or 'high', got '", std::string(precision), "'");
  if (queries.has_value()) {
    const at::Tensor& q = *queries;
    TORCH_CHECK_VALUE(q.scalar_type() == at::kLong && q.dim() == 1,
                      "queries must be a 1-D int64 tensor of row indices, got ", q.scalar_type(),
                      " of shape ", q.sizes());
    TORCH_CHECK_VALUE(q.device() == video_memory.device(), "queries is on ", q.device(),
                      " but the banks are on ", video_memory.device());
    check_range(q, "queries", num_items, "");
  }
  return parsed;
}

}  // namespace avidfast
