// Declarations of the per-concept binding functions assembled by bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace moerun {
void bind_policy_engine(pybind11::module& m);  // policy_engine_binding.cpp
}  // namespace moerun
