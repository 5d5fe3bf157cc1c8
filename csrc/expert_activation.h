// Expert activations: how an expert combines its gate and up projections into h, the input of down.
// This file is the one list of activation names (Python: moerun.native.EXPERT_ACTIVATIONS); every compute
// path (kernels/fused_moe.py, fused_moe_host, the CPU executor) branches on these codes. With g and u the
// gate and up projections of x (plus their biases where the slot has them, slot_layout.h):
//   silu            h = silu(g) * u = g * sigmoid(g) * u                     (Qwen, Mixtral, DeepSeek, ...)
//   swiglu_clamped  g' = min(g, limit), u' = clamp(u, -limit, limit),
//                   h = (u' + 1) * g' * sigmoid(alpha * g')                  (gpt-oss: alpha 1.702, limit
//                                                                             config.swiglu_limit)
// and the expert's output is down(h) (+ the down bias). transformers' GptOssExperts._apply_gate, read from
// its source; moerun computes it in fp32 whatever the model dtype.
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <algorithm>

namespace moerun {

enum class ActivationKind : int32_t { Silu = 0, SwigluClamped = 1 };
inline constexpr const char* kActivationNames[] = {"silu", "swiglu_clamped"};
inline constexpr int kNumActivations = static_cast<int>(sizeof(kActivationNames) / sizeof(kActivationNames[0]));

struct ExpertActivation {
  ActivationKind kind = ActivationKind::Silu;
  float alpha = 1.f;  // swiglu_clamped: the sigmoid's slope
  float limit = 0.f;  // swiglu_clamped: the clamp of g (above) and u (both sides)

  // h of one gate value g and up value u (biases already added), in fp32.
  float operator()(float g, float u) const {
    if (kind == ActivationKind::Silu) return g / (1.f + std::exp(-g)) * u;
    g = std::min(g, limit);
    u = std::min(std::max(u, -limit), limit);
    return (u + 1.f) * (g / (1.f + std::exp(-alpha * g)));
  }
};

inline std::string activation_names() {
  std::string s;
  for (int i = 0; i < kNumActivations; ++i) s += (i ? ", " : "") + std::string(kActivationNames[i]);
  return s;
}

// The activation called `name` with its parameters, checked: swiglu_clamped needs a positive alpha and limit.
inline ExpertActivation make_activation(const std::string& name, double alpha, double limit) {
  for (int i = 0; i < kNumActivations; ++i) {
    if (name != kActivationNames[i]) continue;
    ExpertActivation a{static_cast<ActivationKind>(i), static_cast<float>(alpha), static_cast<float>(limit)};
    if (a.kind == ActivationKind::SwigluClamped && !(alpha > 0 && limit > 0 && std::isfinite(limit)))
      throw std::invalid_argument("swiglu_clamped needs a positive alpha and a positive finite limit (gpt-oss: "
                                  "alpha 1.702, limit config.swiglu_limit), got alpha " + std::to_string(alpha) +
                                  " and limit " + std::to_string(limit));
    return a;
  }
  throw std::invalid_argument("unknown expert activation '" + name + "': the activations are " + activation_names());
}

}  // namespace moerun
