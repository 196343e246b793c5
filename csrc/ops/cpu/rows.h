// Row primitives of the CPU kernels: a memory row is read once, converted to the accumulation
// type on the fly, and used for a dot product and/or an axpy while it is in cache.
#pragma once

#include <cstdint>

// Compiles the marked function for AVX-512, AVX2+FMA and baseline x86-64 and picks one at load
// time, so that a portable build still uses the wide vector units (GCC on x86-64 only).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define AVF_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define AVF_HAVE_CPU_CLONES 1
#else
#define AVF_CPU_CLONES
#endif

namespace avidfast {
namespace cpu {

// How many rows ahead of use the kernels prefetch memory rows (random rows miss every cache).
constexpr int64_t kPrefetchRows = 4;

// Batch rows per parallel task when each row reads `rows` memory rows of `dim` elements: enough
// that a task is worth a thread (ATen's grain of 32768 elements), so small calls stay serial.
inline int64_t rows_per_task(int64_t rows, int64_t dim) {
  const int64_t work = rows * dim;
  return work >= 32768 ? 1 : (32768 + work - 1) / work;
}

inline void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 0);
}

// <x, row> with acc_t accumulation in 16 independent lanes (vectorisable without -ffast-math).
template <typename acc_t, typename mem_t>
inline acc_t dot_row(const acc_t* x, const mem_t* row, int64_t dim) {
  constexpr int64_t kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += x[d + l] * static_cast<acc_t>(row[d + l]);
  }
  acc_t total = 0;
  for (; d < dim; ++d) total += x[d] * static_cast<acc_t>(row[d]);
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// dst[0..dim) = src[0..dim) converted to the accumulation type.
template <typename acc_t, typename src_t>
inline void convert_row(const src_t* src, acc_t* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<acc_t>(src[d]);
}

// y += a * row
template <typename acc_t, typename mem_t>
inline void axpy_row(acc_t a, const mem_t* row, acc_t* y, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) y[d] += a * static_cast<acc_t>(row[d]);
}

// The clone of the AVF_CPU_CLONES functions that the loader picks on this processor, by the same
// tests as GCC's resolver: "x86-64-v4 (AVX-512)", "x86-64-v3 (AVX2+FMA)" or "baseline".
inline const char* row_loop_variant() {
#if defined(AVF_HAVE_CPU_CLONES)
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2+FMA)";
  return "baseline x86-64";
#else
  return "baseline (one portable build)";
#endif
}

}  // namespace cpu
}  // namespace avidfast
