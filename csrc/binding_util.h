// Helpers shared by the *_binding.cpp files: torch dtype <-> moerun::DType and the current stream.
#pragma once
#include <torch/extension.h>

#include <string>

#include "dtype.h"
#include "expert_activation.h"
#include "expert_codec.h"
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

// The expert activation a Python caller passes: None (silu), or an object with `name`, `alpha` and `limit`
// (moerun.models.base.ExpertActivation), checked against the native list (expert_activation.h).
inline ExpertActivation activation_arg(const py::handle& a) {
  if (a.is_none()) return ExpertActivation{};
  if (!py::hasattr(a, "name") || !py::hasattr(a, "alpha") || !py::hasattr(a, "limit"))
    throw std::invalid_argument("activation must be None (silu) or an ExpertActivation (moerun.models.base) with "
                                "name, alpha and limit, got " + std::string(py::str(py::type::of(a).attr("__name__"))));
  return make_activation(a.attr("name").cast<std::string>(), a.attr("alpha").cast<double>(),
                         a.attr("limit").cast<double>());
}

// An expert's biases from optional tensors gate_up_bias [2I] (gate, then up) and down_bias [H] (both or
// neither): fp32 host copies, and the ExpertBiases pointing into them (valid while this object lives).
struct BiasArgs {
  at::Tensor gate_up, down;
  ExpertBiases biases;
};
inline BiasArgs bias_args(const std::optional<at::Tensor>& gate_up_bias, const std::optional<at::Tensor>& down_bias,
                          int64_t I, int64_t H, const char* fn) {
  if (gate_up_bias.has_value() != down_bias.has_value())
    throw std::invalid_argument(std::string(fn) + ": pass both gate_up_bias and down_bias, or neither");
  BiasArgs out;
  if (!gate_up_bias.has_value()) return out;
  const bool ok = gate_up_bias->dim() == 1 && gate_up_bias->size(0) == 2 * I && down_bias->dim() == 1 &&
                  down_bias->size(0) == H;
  if (!ok)
    throw std::invalid_argument(std::string(fn) + ": gate_up_bias " + shape_str(gate_up_bias->sizes()) +
                                " and down_bias " + shape_str(down_bias->sizes()) + " must be [" +
                                std::to_string(2 * I) + "] and [" + std::to_string(H) + "]");
  out.gate_up = gate_up_bias->detach().to(at::kCPU, at::kFloat).contiguous();
  out.down = down_bias->detach().to(at::kCPU, at::kFloat).contiguous();
  const float* gu = out.gate_up.data_ptr<float>();
  out.biases = ExpertBiases{gu, gu + I, out.down.data_ptr<float>(), DType::F32};
  return out;
}

}  // namespace moerun
