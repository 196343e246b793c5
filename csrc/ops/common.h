// Portability macros and scalar math shared by the CPU and CUDA kernels.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define AVF_HD __host__ __device__ __forceinline__
#else
#define AVF_HD inline
#endif

namespace avidfast {

// Overloads that pick the float or double device/host intrinsic explicitly.
AVF_HD float exp_(float x) { return expf(x); }
AVF_HD double exp_(double x) { return exp(x); }
AVF_HD float log_(float x) { return logf(x); }
AVF_HD double log_(double x) { return log(x); }
AVF_HD float log1p_(float x) { return log1pf(x); }
AVF_HD double log1p_(double x) { return log1p(x); }
AVF_HD float sqrt_(float x) { return sqrtf(x); }
AVF_HD double sqrt_(double x) { return sqrt(x); }

}  // namespace avidfast
