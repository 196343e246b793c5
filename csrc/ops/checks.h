// Argument checks shared by the CPU and CUDA kernels (host code). Each raises ValueError naming
// the offending argument, so that bad input never reaches a kernel as an illegal access.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "ops/agreement.h"

namespace avidfast {

// The value checks (index ranges, the order of `exclude`, step >= 0, Z > 0) run on the host for
// CPU tensors. For CUDA tensors they run in the kernels by default (reported at a later call,
// no host sync), on the host with AVIDFAST_SYNC_CHECKS=1, not at all with
// AVIDFAST_CHECK_INDICES=0: ops/device_errors.h. The CUDA kernels bound-check every row they read
// either way.

void check_memory(const at::Tensor& memory);
void check_embeddings(const at::Tensor& x, const char* name, const at::Tensor& memory);
// idx: int64, `dims`-dimensional, rows == x rows, on memory's device, values in [0, num_items).
void check_indices(const at::Tensor& idx, const char* name, int64_t dims, int64_t rows,
                   const at::Tensor& memory);
void check_temperature(double temperature);

void check_sample_negatives(const at::Tensor& pos, int64_t num_items, int64_t num_negatives,
                            const at::Tensor& step, int64_t row_offset,
                            const c10::optional<at::Tensor>& exclude);
void check_memory_scores(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& idx,
                         double temperature);
void check_memory_scores_backward(const at::Tensor& grad_scores, const at::Tensor& memory,
                                  const at::Tensor& idx, double temperature);
void check_nce_memory_loss(const at::Tensor& x, const at::Tensor& memory, const at::Tensor& pos_idx,
                           const at::Tensor& neg_idx, double temperature,
                           const at::Tensor& partition);
void check_memory_update(const at::Tensor& memory, const at::Tensor& idx, const at::Tensor& x,
                         double momentum);

// Returns the parsed agreement mode.
Agreement check_cma_topk(const at::Tensor& video_memory, const at::Tensor& audio_memory, int64_t k,
                         c10::string_view mode, const c10::optional<at::Tensor>& queries,
                         c10::string_view precision);

// Dtype of scores, losses and x-gradients: float64 when x is float64, float32 otherwise.
at::ScalarType accumulate_dtype(at::ScalarType x_dtype);

}  // namespace avidfast
