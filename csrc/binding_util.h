// Helpers shared by the *_binding.cpp files: torch dtype <-> moerun::DType and the current stream.
#pragma once
#include <torch/extension.h>

#include <string>

#include "dtype.h"
#ifdef MOERUN_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace moerun {

inline DType to_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kBFloat16: return DType::BF16;
    case at::kHalf: return DType::F16;
    default:
      throw std::invalid_argument(std::string(what) + " must be float32, bfloat16 or float16, not " +
                                  c10::toString(t));
  }
}

// "[2, 65]": tensor sizes for error messages, from std::to_string alone. On the GPU machine (extension
// built by /opt/gcc's g++, torch by another compiler) the first CpuExecutor error message built with
// c10::str(sizes), which hands an ostringstream to libc10, was where the test process crashed.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

inline at::ScalarType to_torch(DType d) {
  switch (d) {
    case DType::F32: return at::kFloat;
    case DType::BF16: return at::kBFloat16;
    case DType::F16: return at::kHalf;
  }
  return at::kFloat;
}

// torch's current stream on `device_index` as a cudaStream_t (nullptr for host memory), so native copies
// and waits are ordered with the torch kernels the caller launched.
inline void* current_stream(int device_index) {
#ifdef MOERUN_WITH_CUDA
  if (device_index >= 0) return c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device_index)).stream();
#endif
  (void)device_index;
  return nullptr;
}

}  // namespace moerun
