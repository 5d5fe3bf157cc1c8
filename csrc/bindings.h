// Declarations of the per-concept binding functions assembled by bindings.cpp.
#pragma once
#include <torch/extension.h>

namespace moerun {
}  // namespace moerun
