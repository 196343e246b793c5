// Dtype dispatch shared by the CPU and CUDA launchers: x in any float dtype, memory in any float
// dtype, float32 accumulation (float64 when x is float64).
#pragma once

#include <ATen/Dispatch.h>

#include <type_traits>

namespace avidfast {

template <typename T>
using accumulate_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace avidfast

// Runs __VA_ARGS__ (a lambda body) with x_t, mem_t and acc_t defined.
#define AVF_DISPATCH_X_AND_MEMORY(X_TYPE, MEM_TYPE, NAME, ...)                              \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X_TYPE, NAME, [&] {           \
    using x_t = scalar_t;                                                                   \
    using acc_t [[maybe_unused]] = ::avidfast::accumulate_t<x_t>;                           \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, MEM_TYPE, NAME, [&] {       \
      using mem_t = scalar_t;                                                               \
      __VA_ARGS__();                                                                        \
    });                                                                                     \
  })

// Runs __VA_ARGS__ with mem_t (memory dtype) and acc_t (float, or double for float64 memory).
#define AVF_DISPATCH_MEMORY(MEM_TYPE, NAME, ...)                                            \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, MEM_TYPE, NAME, [&] {         \
    using mem_t = scalar_t;                                                                 \
    using acc_t [[maybe_unused]] = ::avidfast::accumulate_t<mem_t>;                         \
    __VA_ARGS__();                                                                          \
  })
