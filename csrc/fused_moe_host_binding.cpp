// Python binding of fused_moe_host: checks tensors (as kernels/fused_moe.py does for its launch), then
// hands raw pointers to the core, with torch's intra-op thread pool as its parallel_for.
#include <ATen/Parallel.h>

#include "binding_util.h"
#include "bindings.h"
#include "fused_moe_host.h"
#include "slot_layout.h"

namespace moerun {
namespace {

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("fused_moe_host: " + what);
}

at::Tensor run(const at::Tensor& x, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
               const at::Tensor& slot_table, const at::Tensor& arena, const SlotLayout& layout,
               std::optional<at::Tensor> out, const py::object& activation) {
  const ExpertActivation act = activation_arg(activation);
  for (const auto* t : {&x, &topk_ids, &topk_weights, &slot_table, &arena})
    check(t->device().is_cpu(), "every tensor must be in host memory (this is the CPU device's kernel)");
  check(x.dim() == 2, "x must be [T, H], got " + shape_str(x.sizes()));
  const int64_t T = x.size(0), H = layout.hidden_size;
  check(x.size(1) == H, "x is " + shape_str(x.sizes()) + " but the layout's hidden_size is " + std::to_string(H) +
                            " (pass the slot layout of this model's experts)");
  check(topk_ids.dim() == 2 && topk_ids.size(0) == T && topk_weights.sizes() == topk_ids.sizes(),
        "topk_ids " + shape_str(topk_ids.sizes()) + " and topk_weights " + shape_str(topk_weights.sizes()) +
            " must both be [T, K] with T = " + std::to_string(T));
  check(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt, "topk_ids must be int32 or int64");
  check(topk_weights.scalar_type() == at::kFloat, "topk_weights must be float32");
  check(slot_table.dim() == 1 && slot_table.scalar_type() == at::kInt, "slot_table must be a 1-D int32 tensor");
  const at::ScalarType model = to_torch(layout.dtype);
  check(x.scalar_type() == model && arena.scalar_type() == model,
        "x (" + std::string(c10::toString(x.scalar_type())) + ") and the arena (" + c10::toString(arena.scalar_type()) +
            ") must both be the layout's dtype " + c10::toString(model));
  check(arena.dim() == 2 && arena.size(1) == layout.slot_elems && arena.is_contiguous(),
        "arena must be a contiguous [num_slots, slot_elems] tensor with slot_elems = " +
            std::to_string(layout.slot_elems) + " (a " + expert_format_name(layout.format) + " slot of (H=" +
            std::to_string(H) + ", I=" + std::to_string(layout.inter_size) + ")), got " + shape_str(arena.sizes()));
  at::Tensor y = out.has_value() ? *out : at::empty_like(x);
  check(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.is_contiguous() && y.device().is_cpu(),
        "out must be a contiguous host tensor like x");
  const at::Tensor xc = x.contiguous(), ids = topk_ids.to(at::kLong).contiguous(), w = topk_weights.contiguous();
  const at::Tensor table = slot_table.contiguous();
  FusedMoeHostArgs a{xc.data_ptr(), layout, T, ids.size(1), table.size(0), arena.size(0),
                     ids.data_ptr<int64_t>(), w.data_ptr<float>(), table.data_ptr<int32_t>(), arena.data_ptr(),
                     y.data_ptr(), act};
  py::gil_scoped_release release;
  fused_moe_host(a, [](int64_t n, const std::function<void(int64_t)>& task) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) task(i);
    });
  });
  return y;
}

}  // namespace

void bind_fused_moe_host(py::module& m) {
  m.def("fused_moe_host", &run, py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("slot_table"),
        py::arg("arena"), py::arg("layout"), py::arg("out") = py::none(), py::arg("activation") = py::none(),
        "Fused MoE over a host-memory arena (the CPU device's kernel; kernels/fused_moe.py's twin): [T, H] in "
        "x's dtype, the sum over each token's resident experts of w * down(act(gate(x), up(x))), each projection "
        "plus its bias when the layout holds biases; pairs not resident contribute zero. The arena's slots are in "
        "`layout` (any expert format: quantized weights are read packed). activation: None (silu) or an "
        "ExpertActivation (name, alpha, limit). Writes every element of `out` when given.");
}

}  // namespace moerun
