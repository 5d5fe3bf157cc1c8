// Python binding of the expert codec: checks tensors against the layout, then hands raw pointers to the
// core, with torch's intra-op thread pool as its parallel_for.
#include <ATen/Parallel.h>

#include "binding_util.h"
#include "bindings.h"
#include "expert_codec.h"

namespace moerun {
namespace {

void check(bool ok, const char* fn, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(fn) + ": " + what);
}

std::string layout_str(const SlotLayout& l) {
  return std::string("the layout's ") + expert_format_name(l.format) + " expert of hidden_size " +
         std::to_string(l.hidden_size) + " and inter_size " + std::to_string(l.inter_size);
}

// A host tensor holding exactly one slot of `layout` (any dtype, e.g. a pool or arena row, or uint8).
void check_slot(const at::Tensor& t, const SlotLayout& layout, const char* fn, const char* name) {
  check(t.device().is_cpu() && t.dim() == 1 && t.is_contiguous(), fn,
        std::string(name) + " must be a contiguous 1-D host tensor viewing one slot, got " + shape_str(t.sizes()) +
            " on " + t.device().str());
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  check(bytes == layout.slot_bytes, fn,
        std::string(name) + " holds " + std::to_string(bytes) + " bytes but a slot of " + layout_str(layout) +
            " holds " + std::to_string(layout.slot_bytes) + " (pass a slot of this layout, or the layout its pool uses)");
}

const ParallelFor kTorchThreads = [](int64_t n, const std::function<void(int64_t)>& task) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) task(i);
  });
};

at::Tensor encode(const SlotLayout& layout, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                  std::optional<at::Tensor> out, std::optional<at::Tensor> gate_up_bias,
                  std::optional<at::Tensor> down_bias) {
  const char* fn = "encode_expert";
  const int64_t H = layout.hidden_size, I = layout.inter_size;
  for (const auto* t : {&gate, &up, &down}) {
    check(t->device().is_cpu(), fn, "gate, up and down must be host tensors");
    check(t->scalar_type() == gate.scalar_type(), fn,
          "gate, up and down must share one dtype, got " + std::string(c10::toString(gate.scalar_type())) + ", " +
              c10::toString(up.scalar_type()) + ", " + c10::toString(down.scalar_type()));
  }
  const DType src = to_dtype(gate.scalar_type(), "encode_expert's weights");
  const bool shapes = gate.dim() == 2 && gate.size(0) == I && gate.size(1) == H && up.sizes() == gate.sizes() &&
                      down.dim() == 2 && down.size(0) == H && down.size(1) == I;
  check(shapes, fn,
        "gate " + shape_str(gate.sizes()) + ", up " + shape_str(up.sizes()) + " and down " + shape_str(down.sizes()) +
            " must be [I, H], [I, H] and [H, I] = [" + std::to_string(I) + ", " + std::to_string(H) + "], [" +
            std::to_string(I) + ", " + std::to_string(H) + "] and [" + std::to_string(H) + ", " + std::to_string(I) +
            "] for " + layout_str(layout));
  const BiasArgs bias = bias_args(gate_up_bias, down_bias, I, H, fn);
  check(bias.biases.given() == layout.has_bias, fn,
        layout.has_bias ? "this layout holds the expert's biases: pass gate_up_bias and down_bias"
                        : "this layout holds no biases (slot_layout(..., bias=True) makes one that does)");
  at::Tensor slot = out.has_value() ? *out : at::empty({layout.slot_bytes}, at::kByte);
  check_slot(slot, layout, fn, "out");
  const at::Tensor g = gate.contiguous(), u = up.contiguous(), d = down.contiguous();
  {
    py::gil_scoped_release release;
    encode_expert(layout, g.data_ptr(), u.data_ptr(), d.data_ptr(), src, slot.data_ptr(), kTorchThreads, bias.biases);
  }
  return slot.view(at::kByte);
}

std::pair<at::Tensor, at::Tensor> decode(const SlotLayout& layout, const at::Tensor& slot) {
  check_slot(slot, layout, "decode_expert", "slot");
  const int64_t H = layout.hidden_size, I = layout.inter_size;
  at::Tensor gate_up = at::empty({2 * I, H}, at::kFloat), down = at::empty({H, I}, at::kFloat);
  const SlotMatrix gu = slot_gate_up(layout, slot.data_ptr()), dn = slot_down(layout, slot.data_ptr());
  float* gu_out = gate_up.data_ptr<float>();
  float* dn_out = down.data_ptr<float>();
  py::gil_scoped_release release;
  constexpr int64_t kRows = 64;  // rows per task
  const int64_t gu_tasks = ceil_div(gu.rows, kRows), tasks = gu_tasks + ceil_div(dn.rows, kRows);
  kTorchThreads(tasks, [&](int64_t t) {
    const SlotMatrix& m = t < gu_tasks ? gu : dn;
    const int64_t r0 = (t < gu_tasks ? t : t - gu_tasks) * kRows, r1 = std::min(m.rows, r0 + kRows);
    decode_rows(m, r0, r1, (t < gu_tasks ? gu_out : dn_out) + r0 * m.cols);
  });
  return {gate_up, down};
}

}  // namespace

void bind_expert_codec(py::module& m) {
  m.def("encode_expert", &encode, py::arg("layout"), py::arg("gate"), py::arg("up"), py::arg("down"),
        py::arg("out") = py::none(), py::arg("gate_up_bias") = py::none(), py::arg("down_bias") = py::none(),
        "One expert -> its slot in layout.format: gate, up [I, H] and down [H, I] host tensors (f32/bf16/f16) "
        "quantized (or, for the float format, converted to layout.dtype) into `out` (a 1-D host tensor viewing "
        "one slot, written in place) or a new one; a layout with biases takes gate_up_bias [2I] (gate, then up) "
        "and down_bias [H], stored in layout.dtype. Returns the slot's bytes (uint8 [slot_bytes]).");
  m.def("decode_expert", &decode, py::arg("layout"), py::arg("slot"),
        "One slot (a 1-D host tensor of layout.slot_bytes bytes) -> (gate_up [2I, H], down [H, I]) in fp32, the "
        "format's exact decode.");
}

}  // namespace moerun
