// Per-element math of avidfast::memory_update_, shared by the CPU and CUDA kernels.
#pragma once

#include "ops/common.h"

namespace avidfast {

// m * old + (1 - m) * x
template <typename T>
AVF_HD T momentum_mix(T old, T x, T m) {
  return m * old + (T(1) - m) * x;
}

// 1 / max(||row||, 1e-12) from the row's sum of squares (torch.nn.functional.normalize's eps).
template <typename T>
AVF_HD T inverse_norm(T sum_of_squares) {
  const T norm = sqrt_(sum_of_squares);
  return T(1) / (norm > T(1e-12) ? norm : T(1e-12));
}

}  // namespace avidfast
