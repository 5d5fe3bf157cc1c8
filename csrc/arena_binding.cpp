// Python binding of ExpertArena: allocates the slot memory and the table mirror through torch (so they
// show in torch's allocator statistics) and hands raw pointers to the core.
#include "arena.h"
#include "expert_activation.h"
#include "slot_layout.h"
#include "binding_util.h"
#include "bindings.h"

namespace moerun {
namespace {

struct ArenaTensors {
  at::Tensor weights;     // [N, S] model dtype
  at::Tensor slot_table;  // [L, E] int32
};

const ArenaTensors& tensors_of(const ExpertArena& a) { return *std::static_pointer_cast<ArenaTensors>(a.owner()); }

std::shared_ptr<ExpertArena> make_arena(int64_t num_slots, int64_t slot_elems, at::ScalarType st, py::object device_like,
                                        int64_t num_layers, int64_t num_experts) {
  // Accept "cuda:0", torch.device(...) or an index, as torch does.
  const at::Device device = py::cast<at::Device>(py::module::import("torch").attr("device")(device_like));
  const DType dt = to_dtype(st, "ExpertArena dtype");
  if (num_slots <= 0 || slot_elems <= 0 || num_layers <= 0 || num_experts <= 0)
    throw std::invalid_argument("ExpertArena needs positive num_slots, slot_elems, num_layers, num_experts (got " +
                                std::to_string(num_slots) + ", " + std::to_string(slot_elems) + ", " +
                                std::to_string(num_layers) + ", " + std::to_string(num_experts) + ")");
  if (slot_elems % kSlotAlignElems != 0)
    throw std::invalid_argument("slot_elems must be a multiple of " + std::to_string(kSlotAlignElems) +
                                " (use moerun.native.slot_layout(dtype, hidden, inter).slot_elems); got " +
                                std::to_string(slot_elems));
  int device_index = -1;
  if (device.is_cuda()) {
#ifdef MOERUN_WITH_CUDA
    device_index = device.has_index() ? device.index() : c10::cuda::current_device();
#else
    throw std::invalid_argument("this moerun build has no CUDA support; put the arena on device 'cpu'");
#endif
  } else if (!device.is_cpu()) {
    throw std::invalid_argument("ExpertArena device must be cpu or cuda, not " + device.str());
  }
  const at::Device where = device_index >= 0 ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index))
                                             : at::Device(at::kCPU);
  auto t = std::make_shared<ArenaTensors>();
  // Zeros: padding and never-filled slots read as zeros, never as stale memory.
  t->weights = torch::zeros({num_slots, slot_elems}, at::TensorOptions().dtype(st).device(where));
  t->slot_table = torch::full({num_layers, num_experts}, -1, at::TensorOptions().dtype(at::kInt).device(where));
  return std::make_shared<ExpertArena>(t->weights.data_ptr(), t->slot_table.data_ptr<int32_t>(), num_slots,
                                       slot_elems, dt, device_index, num_layers, num_experts, t);
}

}  // namespace

void bind_arena(py::module& m) {
  py::class_<SlotLayout>(m, "SlotLayout",
                         "Where one expert's tensors sit in its slot (csrc/slot_layout.h); offsets and sizes in bytes.")
      .def_property_readonly("dtype", [](const SlotLayout& s) { return to_torch(s.dtype); })
      .def_readonly("hidden_size", &SlotLayout::hidden_size)
      .def_readonly("inter_size", &SlotLayout::inter_size)
      .def_readonly("gate_up_offset", &SlotLayout::gate_up_offset, "gate_up [2I, H] (gate rows, then up rows)")
      .def_readonly("gate_up_bytes", &SlotLayout::gate_up_bytes)
      .def_readonly("gate_up_scales_offset", &SlotLayout::gate_up_scales_offset)
      .def_readonly("gate_up_scales_bytes", &SlotLayout::gate_up_scales_bytes, "0: float formats have no scales")
      .def_readonly("down_offset", &SlotLayout::down_offset, "down [H, I]")
      .def_readonly("down_bytes", &SlotLayout::down_bytes)
      .def_readonly("down_scales_offset", &SlotLayout::down_scales_offset)
      .def_readonly("down_scales_bytes", &SlotLayout::down_scales_bytes, "0: float formats have no scales")
      .def_readonly("gate_up_zeros_offset", &SlotLayout::gate_up_zeros_offset)
      .def_readonly("gate_up_zeros_bytes", &SlotLayout::gate_up_zeros_bytes, "int4 zero points (uint8); else 0")
      .def_readonly("down_zeros_offset", &SlotLayout::down_zeros_offset)
      .def_readonly("down_zeros_bytes", &SlotLayout::down_zeros_bytes, "int4 zero points (uint8); else 0")
      .def_readonly("has_bias", &SlotLayout::has_bias, "the slot holds the expert's gate_up and down biases")
      .def_readonly("gate_up_bias_offset", &SlotLayout::gate_up_bias_offset)
      .def_readonly("gate_up_bias_bytes", &SlotLayout::gate_up_bias_bytes,
                    "[2I] of dtype (gate biases, then up biases); 0 without biases")
      .def_readonly("down_bias_offset", &SlotLayout::down_bias_offset)
      .def_readonly("down_bias_bytes", &SlotLayout::down_bias_bytes, "[H] of dtype; 0 without biases")
      .def_property_readonly("format", [](const SlotLayout& s) { return std::string(expert_format_name(s.format)); },
                             "the expert format's name (moerun.native.expert_formats())")
      .def_property_readonly("group_size", [](const SlotLayout& s) { return s.format.group; },
                             "inputs per scale group (fp8-block128: the block edge); 0 for per-channel and float")
      .def_property_readonly("quantized", [](const SlotLayout& s) { return s.format.quantized(); })
      .def_property_readonly("kind", [](const SlotLayout& s) { return static_cast<int>(s.format.kind); },
                             "the decode kernels run (an index of format_kinds(); int4 groups share one)")
      .def_property_readonly("weight_bits",
                             [](const SlotLayout& s) { return weight_bits(s.format, static_cast<int>(dtype_bytes(s.dtype))); },
                             "bits of one stored weight, scales not counted")
      .def_readonly("slot_elems", &SlotLayout::slot_elems, "elements of dtype in one slot, padding included")
      .def_readonly("slot_bytes", &SlotLayout::slot_bytes)
      .def("__repr__", [](const SlotLayout& s) {
        return "SlotLayout(" + std::string(dtype_name(s.dtype)) + ", format=" + expert_format_name(s.format) + ", hidden_size=" + std::to_string(s.hidden_size) +
               ", inter_size=" + std::to_string(s.inter_size) + (s.has_bias ? ", bias=True" : "") +
               ", down_offset=" + std::to_string(s.down_offset) +
               ", slot_bytes=" + std::to_string(s.slot_bytes) + ")";
      });
  m.def("slot_layout",
        [](at::ScalarType dtype, int64_t hidden_size, int64_t inter_size, const std::string& format, bool bias) {
          if (hidden_size <= 0 || inter_size <= 0)
            throw std::invalid_argument("slot_layout needs positive hidden_size and inter_size, got " +
                                        std::to_string(hidden_size) + " and " + std::to_string(inter_size));
          return slot_layout(to_dtype(dtype, "slot_layout dtype"), hidden_size, inter_size, parse_expert_format(format),
                             bias);
        },
        py::arg("dtype"), py::arg("hidden_size"), py::arg("inter_size"), py::arg("format") = "float",
        py::arg("bias") = false,
        "The slot layout of one expert of this model dtype, shape and expert format, with the expert's biases "
        "when `bias` (the one definition: csrc/slot_layout.h).");
  m.def("expert_activations",
        [] {
          py::list out;
          for (int k = 0; k < kNumActivations; ++k) out.append(kActivationNames[k]);
          return out;
        },
        "The expert activations in code order (the one list: csrc/expert_activation.h).");
  m.def("expert_formats",
        [] {
          py::list out;
          for (const auto& nf : kExpertFormats) out.append(py::make_tuple(nf.name, nf.what));
          return out;
        },
        "The expert formats as (name, description), in order (the one list: csrc/expert_format.h).");
  m.def("format_kinds",
        [] {
          py::list out;
          for (int k = 0; k < kNumFormatKinds; ++k) out.append(kFormatKindNames[k]);
          return out;
        },
        "The formats' kinds in code order: SlotLayout.kind indexes this list (csrc/expert_format.h).");
  m.def("slot_elems", &slot_elems_for, py::arg("hidden_size"), py::arg("inter_size"),
        "Elements of one expert slot, padding included: slot_layout(dtype, hidden_size, inter_size).slot_elems.");
  py::class_<ExpertArena, std::shared_ptr<ExpertArena>>(m, "ExpertArena",
                                                        "Fixed GPU (or host) expert slots and the (layer, expert) -> slot table.")
      .def(py::init(&make_arena), py::arg("num_slots"), py::arg("slot_elems"), py::arg("dtype"), py::arg("device"),
           py::arg("num_layers"), py::arg("num_experts"))
      .def_property_readonly("weights", [](const ExpertArena& a) { return tensors_of(a).weights; },
                             "[num_slots, slot_elems] tensor of the model dtype: the slots.")
      .def_property_readonly("slot_table", [](const ExpertArena& a) { return tensors_of(a).slot_table; },
                             "[num_layers, num_experts] int32 on the arena's device; -1 = not resident.")
      .def("assign",
           [](ExpertArena& a, int64_t slot, int64_t layer, int64_t expert) {
             a.assign(slot, layer, expert, current_stream(a.device_index()));
           },
           py::arg("slot"), py::arg("layer"), py::arg("expert"),
           "Record that `slot` holds (layer, expert); clears the slot's previous occupant. Copies nothing.")
      .def("evict", [](ExpertArena& a, int64_t slot) { a.evict(slot, current_stream(a.device_index())); },
           py::arg("slot"))
      .def("clear", [](ExpertArena& a) { a.clear(current_stream(a.device_index())); })
      .def("lookup", &ExpertArena::lookup, py::arg("layer"), py::arg("expert"), "Slot of (layer, expert) or -1.")
      .def("occupant", &ExpertArena::occupant, py::arg("slot"), "(layer, expert) held by slot, or (-1, -1).")
      .def_property_readonly("resident_count", &ExpertArena::resident_count)
      .def_property_readonly("num_slots", &ExpertArena::num_slots)
      .def_property_readonly("slot_elems", &ExpertArena::slot_elems)
      .def_property_readonly("slot_bytes", &ExpertArena::slot_bytes)
      .def_property_readonly("num_layers", &ExpertArena::num_layers)
      .def_property_readonly("num_experts", &ExpertArena::num_experts)
      .def_property_readonly("dtype", [](const ExpertArena& a) { return tensors_of(a).weights.scalar_type(); })
      .def_property_readonly("device", [](const ExpertArena& a) { return tensors_of(a).weights.device(); });
}

}  // namespace moerun
