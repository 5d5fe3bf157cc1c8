// Error check for CUDA runtime calls in the native core, and the device scope of a call (CUDA builds only).
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

namespace moerun {

// Switches to `device` for the scope of one call, and back (CUDA objects belong to the device current
// when they are made or used).
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(int device) : device_(device) {
    MOERUN_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) MOERUN_CUDA_CHECK(cudaSetDevice(device));
  }
  ~CudaDeviceScope() {
    if (previous_ != device_) cudaSetDevice(previous_);
  }
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = 0, device_ = 0;
};

}  // namespace moerun
#endif
