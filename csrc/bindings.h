// Declarations of the per-concept binding functions assembled by bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace moerun {
void bind_arena(pybind11::module& m);
void bind_host_pool(pybind11::module& m);
void bind_transfer(pybind11::module& m);
void bind_cpu_executor(pybind11::module& m);
void bind_fused_moe_host(pybind11::module& m);  // fused_moe_host_binding.cpp
void bind_expert_codec(pybind11::module& m);  // expert_codec_binding.cpp
void bind_policy_engine(pybind11::module& m);  // policy_engine_binding.cpp
}  // namespace moerun
