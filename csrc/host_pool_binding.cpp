// Python binding of HostPool.
#include "binding_util.h"
#include "bindings.h"
#include "host_pool.h"

namespace moerun {
namespace {

using PartSpec = std::pair<std::string, std::string>;  // (file, tensor name)
using SourceSpec = std::tuple<int64_t, int64_t, PartSpec, PartSpec, PartSpec>;

at::Tensor expert_view(const std::shared_ptr<HostPool>& pool, int64_t layer, int64_t expert) {
  void* p = pool->expert_ptr(layer, expert);
  // The view keeps the pool alive: a tensor never outlives the memory it points into.
  return torch::from_blob(p, {pool->slot_elems()}, [pool](void*) {}, at::TensorOptions().dtype(to_torch(pool->dtype())));
}

at::Tensor checked_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols)
    throw std::invalid_argument(std::string("write_expert: ") + name + " must have shape [" + std::to_string(rows) +
                                ", " + std::to_string(cols) + "], got " + c10::str(t.sizes()));
  return t.detach().to(at::kCPU).contiguous();
}

}  // namespace

void bind_host_pool(py::module& m) {
  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool",
                                                  "Every routed expert in (pinned) host memory, in the slot layout.")
      .def(py::init([](int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size,
                       at::ScalarType dtype, int64_t chunk_bytes, bool pinned) {
             return std::make_shared<HostPool>(num_layers, num_experts, hidden_size, inter_size,
                                               to_dtype(dtype, "HostPool dtype"), chunk_bytes, pinned);
           }),
           py::arg("num_layers"), py::arg("num_experts"), py::arg("hidden_size"), py::arg("inter_size"),
           py::arg("dtype"), py::arg("chunk_bytes") = int64_t(1) << 30, py::arg("pinned") = true)
      .def(
          "fill",
          [](HostPool& pool, const std::vector<SourceSpec>& specs, int num_threads) {
            std::vector<ExpertSource> sources;
            sources.reserve(specs.size());
            for (const auto& s : specs) {
              ExpertSource src;
              src.layer = std::get<0>(s);
              src.expert = std::get<1>(s);
              const PartSpec* parts[3] = {&std::get<2>(s), &std::get<3>(s), &std::get<4>(s)};
              for (int p = 0; p < 3; ++p) {
                src.file[p] = parts[p]->first;
                src.tensor[p] = parts[p]->second;
              }
              sources.push_back(std::move(src));
            }
            py::gil_scoped_release release;
            pool.fill(sources, num_threads);
          },
          py::arg("sources"), py::arg("num_threads") = 0,
          "Read experts from safetensors files. sources: [(layer, expert, (gate_file, gate_tensor), "
          "(up_file, up_tensor), (down_file, down_tensor))]; gate/up [I, H], down [H, I]; F32/BF16/F16 "
          "converted to the pool dtype. num_threads 0 = all hardware threads (at most 16).")
      .def(
          "write_expert",
          [](HostPool& pool, int64_t layer, int64_t expert, const at::Tensor& gate, const at::Tensor& up,
             const at::Tensor& down) {
            const int64_t H = pool.hidden_size(), I = pool.inter_size();
            const at::Tensor g = checked_matrix(gate, I, H, "gate"), u = checked_matrix(up, I, H, "up");
            const at::Tensor d = checked_matrix(down, H, I, "down");
            if (g.scalar_type() != u.scalar_type() || g.scalar_type() != d.scalar_type())
              throw std::invalid_argument("write_expert: gate, up and down must share one dtype");
            pool.write_expert(layer, expert, g.data_ptr(), u.data_ptr(), d.data_ptr(),
                              to_dtype(g.scalar_type(), "write_expert weights"));
          },
          py::arg("layer"), py::arg("expert"), py::arg("gate"), py::arg("up"), py::arg("down"),
          "Copy one expert from tensors (gate, up [I, H]; down [H, I]), converting to the pool dtype.")
      .def("view", &expert_view, py::arg("layer"), py::arg("expert"),
           "1-D tensor [slot_elems] aliasing the expert's pool memory (gate_up rows, then down).")
      .def("filled", &HostPool::filled, py::arg("layer"), py::arg("expert"))
      .def_property_readonly("filled_count", &HostPool::filled_count)
      .def_property_readonly("num_layers", &HostPool::num_layers)
      .def_property_readonly("num_experts", &HostPool::num_experts)
      .def_property_readonly("hidden_size", &HostPool::hidden_size)
      .def_property_readonly("inter_size", &HostPool::inter_size)
      .def_property_readonly("slot_elems", &HostPool::slot_elems)
      .def_property_readonly("slot_bytes", &HostPool::slot_bytes)
      .def_property_readonly("total_bytes", &HostPool::total_bytes)
      .def_property_readonly("num_chunks", &HostPool::num_chunks)
      .def_property_readonly("pinned", &HostPool::pinned)
      .def_property_readonly("dtype", [](const HostPool& p) { return to_torch(p.dtype()); });
}

}  // namespace moerun
