// The one Python binding module of moerun: `moerun._C`.
// Each native concept keeps its binding beside its own code (bind_<concept>, declared in
// bindings.h); this file only assembles them, so the boundary is listed in one place.
#include <torch/extension.h>

#include "bindings.h"

namespace moerun {

static pybind11::dict build_info() {
  pybind11::dict info;
#ifdef MOERUN_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace moerun

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moerun native runtime (see moerun/native.py for the typed Python surface)";
  moerun::bind_arena(m);
  moerun::bind_host_pool(m);
  moerun::bind_transfer(m);
  moerun::bind_cpu_executor(m);
  moerun::bind_fused_moe_host(m);
  moerun::bind_expert_codec(m);
  m.def("build_info", &moerun::build_info, "How this extension was built: {'cuda': bool, 'torch_version': str}");
  moerun::bind_policy_engine(m);
}
