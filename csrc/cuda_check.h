// Error check for CUDA runtime calls in the native core (CUDA builds only).
#pragma once
#ifdef MOERUN_WITH_CUDA
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define MOERUN_CUDA_CHECK(expr)                                                                   \
  do {                                                                                            \
    cudaError_t err__ = (expr);                                                                   \
    if (err__ != cudaSuccess)                                                                     \
      throw std::runtime_error(std::string("CUDA error in ") + #expr + ": " + cudaGetErrorString(err__)); \
  } while (0)
#endif
