// Python binding of HostPool.
#include "binding_util.h"
#include "bindings.h"
#include "host_pool.h"

namespace moerun {
namespace {

using PartSpec = std::pair<std::string, std::string>;  // (file, tensor name)
using SourceSpec = std::tuple<int64_t, int64_t, std::vector<PartSpec>>;  // (layer, expert, tensors)

at::Tensor expert_view(const std::shared_ptr<HostPool>& pool, int64_t layer, int64_t expert) {
  void* p = pool->expert_ptr(layer, expert);
  // The view keeps the pool alive: a tensor never outlives the memory it points into.
  return torch::from_blob(p, {pool->slot_elems()}, [pool](void*) {}, at::TensorOptions().dtype(to_torch(pool->dtype())));
}

at::Tensor checked_matrix(const at::Tensor& t, int64_t rows, int64_t cols, const char* name) {
  if (t.dim() != 2 || t.size(0) != rows || t.size(1) != cols)
    throw std::invalid_argument(std::string("write_expert: ") + name + " must have shape [" + std::to_string(rows) +
                                ", " + std::to_string(cols) + "], got " + shape_str(t.sizes()));
  return t.detach().to(at::kCPU).contiguous();
}

}  // namespace

void bind_host_pool(py::module& m) {
  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool",
                                                  "Routed experts in (pinned) host memory, in the slot layout; with a capacity below the model's experts, a cache in front of the safetensors files.")
      .def(py::init([](int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size,
                       at::ScalarType dtype, int64_t chunk_bytes, bool pinned, int64_t capacity, int eviction,
                       double high_watermark, double low_watermark, double credit_decay, double wait_timeout_s,
                       const std::string& format, bool bias) {
             HostTierConfig tier;
             tier.capacity = capacity;
             tier.eviction = eviction;
             tier.high_watermark = high_watermark;
             tier.low_watermark = low_watermark;
             tier.credit_decay = credit_decay;
             tier.wait_timeout_s = wait_timeout_s;
             return std::make_shared<HostPool>(num_layers, num_experts, hidden_size, inter_size,
                                               to_dtype(dtype, "HostPool dtype"), chunk_bytes, pinned, tier,
                                               parse_expert_format(format), bias);
           }),
           py::arg("num_layers"), py::arg("num_experts"), py::arg("hidden_size"), py::arg("inter_size"),
           py::arg("dtype"), py::arg("chunk_bytes") = int64_t(1) << 30, py::arg("pinned") = true,
           py::arg("capacity") = 0, py::arg("eviction") = 0, py::arg("high_watermark") = 0.9,
           py::arg("low_watermark") = 0.7, py::arg("credit_decay") = 0.95, py::arg("wait_timeout_s") = 60.0,
           py::arg("format") = "float", py::arg("bias") = false,
           "capacity: experts held in host memory (0 = all; fewer makes the pool a cache in front of the files). "
           "format: the expert format of its slots (moerun.native.EXPERT_FORMATS); bias: the slots hold the "
           "experts' gate_up and down biases (slot_layout(..., bias=True)). "
           "eviction: the host tier's policy code (0 lru, 1 lfu, 2 score, 3 freq_threshold, 4 watermark).")
      .def(
          "fill",
          [](HostPool& pool, const std::vector<SourceSpec>& specs, int num_threads, const std::string& encoding) {
            const SourceEncoding enc = parse_source_encoding(encoding);
            std::vector<ExpertSource> sources;
            sources.reserve(specs.size());
            for (const auto& s : specs) {
              ExpertSource src;
              src.layer = std::get<0>(s);
              src.expert = std::get<1>(s);
              src.encoding = enc;
              for (const auto& part : std::get<2>(s)) src.tensors.push_back(TensorRef{part.first, part.second});
              sources.push_back(std::move(src));
            }
            py::gil_scoped_release release;
            pool.fill(sources, num_threads);
          },
          py::arg("sources"), py::arg("num_threads") = 0, py::arg("encoding") = "float",
          "Record and validate the experts' safetensors sources; a pool holding every expert reads them now, a "
          "cache reads them on demand. sources: [(layer, expert, [(file, tensor), ...])], the tensors of gate, "
          "then up, then down (gate/up [I, H], down [H, I]) as `encoding` names them (csrc/expert_files.h): "
          "'float' (weight; F32/BF16/F16, converted to the pool dtype or quantized to its format), "
          "'fp8-block128' (weight, weight_scale_inv), 'gptq' / 'gptq-v2' (qweight, qzeros, scales); stacked over "
          "the layer's experts (the source's expert picks the slice): 'gpt-oss-mxfp4' (gate_up_proj_blocks, "
          "gate_up_proj_scales, gate_up_proj_bias, down_proj_blocks, down_proj_scales, down_proj_bias), "
          "'gpt-oss-float' (gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias). "
          "num_threads 0 = all hardware threads (at most 16).")
      .def(
          "write_expert",
          [](HostPool& pool, int64_t layer, int64_t expert, const at::Tensor& gate, const at::Tensor& up,
             const at::Tensor& down, std::optional<at::Tensor> gate_up_bias, std::optional<at::Tensor> down_bias) {
            const int64_t H = pool.hidden_size(), I = pool.inter_size();
            const at::Tensor g = checked_matrix(gate, I, H, "gate"), u = checked_matrix(up, I, H, "up");
            const at::Tensor d = checked_matrix(down, H, I, "down");
            if (g.scalar_type() != u.scalar_type() || g.scalar_type() != d.scalar_type())
              throw std::invalid_argument("write_expert: gate, up and down must share one dtype");
            const BiasArgs bias = bias_args(gate_up_bias, down_bias, I, H, "write_expert");
            pool.write_expert(layer, expert, g.data_ptr(), u.data_ptr(), d.data_ptr(),
                              to_dtype(g.scalar_type(), "write_expert weights"), bias.biases);
          },
          py::arg("layer"), py::arg("expert"), py::arg("gate"), py::arg("up"), py::arg("down"),
          py::arg("gate_up_bias") = py::none(), py::arg("down_bias") = py::none(),
          "Copy one expert from tensors (gate, up [I, H]; down [H, I]; with a bias layout also gate_up_bias [2I], "
          "gate then up, and down_bias [H]), encoded into the pool's format.")
      .def_property_readonly("layout", &HostPool::layout, "the SlotLayout of every slot (format, dtype, offsets)")
      .def("view", &expert_view, py::arg("layer"), py::arg("expert"),
           "1-D tensor [slot_elems] aliasing the expert's pool memory (gate_up rows, then down).")
      .def(
          "acquire",
          [](const std::shared_ptr<HostPool>& pool, int64_t layer, int64_t expert) {
            {
              py::gil_scoped_release release;
              pool->acquire(layer, expert);
            }
            return expert_view(pool, layer, expert);
          },
          py::arg("layer"), py::arg("expert"),
          "Hold the expert in host memory (a cache reads it from its files on a miss) and return its view; "
          "pair with release().")
      .def("release", &HostPool::release, py::arg("layer"), py::arg("expert"), "End one acquire() hold.")
      .def("prefetch", &HostPool::prefetch, py::arg("layer"), py::arg("expert"),
           "Start reading the expert into host memory on an I/O thread.")
      .def("host_slot", &HostPool::host_slot, py::arg("layer"), py::arg("expert"),
           "Host slot of the expert, -1 when it is not in host memory.")
      .def("filled", &HostPool::filled, py::arg("layer"), py::arg("expert"))
      .def_property_readonly("cached", &HostPool::cached)
      .def_property_readonly("capacity", &HostPool::capacity)
      .def("stats",
           [](const HostPool& p) {
             const HostStats s = p.stats();
             py::dict d;
             d["hits"] = s.hits;
             d["misses"] = s.misses;
             d["disk_bytes"] = s.disk_bytes;
             d["disk_time_us"] = s.disk_time_us;
             d["evictions"] = s.evictions;
             d["slot_waits"] = s.slot_waits;
             d["prefetch_reads"] = s.prefetch_reads;
             return d;
           },
           "Host tier counters: hits, misses (acquires that read from disk), disk_bytes, disk_time_us, "
           "evictions, slot_waits (misses that waited for a held slot), prefetch_reads.")
      .def("reset_stats", &HostPool::reset_stats)
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
