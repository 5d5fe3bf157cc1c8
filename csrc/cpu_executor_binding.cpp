// Python binding of CpuExecutor: checks tensors, then hands raw pointers to the core.
#include "binding_util.h"
#include "bindings.h"
#include "cpu_executor.h"

namespace moerun {
namespace {

struct SubmitHold {
  at::Tensor out;
  std::shared_ptr<HostPool> pool;
};

void submit(CpuExecutor& ex, const std::shared_ptr<HostPool>& pool, int64_t layer, const at::Tensor& x,
            const at::Tensor& topk_ids, const at::Tensor& topk_weights, const std::vector<int64_t>& experts,
            const at::Tensor& out, const py::object& activation) {
  const ExpertActivation act = activation_arg(activation);
  const int64_t H = pool->hidden_size();
  auto host2d = [](const at::Tensor& t, const char* name) {
    if (!t.device().is_cpu() || t.dim() != 2)
      throw std::invalid_argument(std::string("CpuExecutor.submit: ") + name + " must be a 2-D host tensor, got " +
                                  shape_str(t.sizes()) + " on " + t.device().str());
  };
  host2d(x, "x");
  host2d(topk_ids, "topk_ids");
  host2d(topk_weights, "topk_weights");
  host2d(out, "out");
  const int64_t T = x.size(0), K = topk_ids.size(1);
  if (x.size(1) != H)
    throw std::invalid_argument("CpuExecutor.submit: x is " + shape_str(x.sizes()) + " but the pool's hidden size is " +
                                std::to_string(H));
  if (topk_ids.size(0) != T || topk_weights.sizes() != topk_ids.sizes())
    throw std::invalid_argument("CpuExecutor.submit: topk_ids " + shape_str(topk_ids.sizes()) + " and topk_weights " +
                                shape_str(topk_weights.sizes()) + " must both be [T, K] with T = " + std::to_string(T));
  if (topk_ids.scalar_type() != at::kInt && topk_ids.scalar_type() != at::kLong)
    throw std::invalid_argument("CpuExecutor.submit: topk_ids must be int32 or int64");
  if (topk_weights.scalar_type() != at::kFloat)
    throw std::invalid_argument("CpuExecutor.submit: topk_weights must be float32");
  if (out.scalar_type() != at::kFloat || out.size(0) != T || out.size(1) != H || !out.is_contiguous())
    throw std::invalid_argument("CpuExecutor.submit: out must be a contiguous float32 [" + std::to_string(T) + ", " +
                                std::to_string(H) + "] host tensor, got " + shape_str(out.sizes()) + " " +
                                c10::toString(out.scalar_type()));
  const at::Tensor xc = x.contiguous();
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor w = topk_weights.contiguous();
  auto hold = std::make_shared<SubmitHold>(SubmitHold{out, pool});
  py::gil_scoped_release release;  // a host-cache miss reads from disk
  ex.submit(*pool, layer, xc.data_ptr(), to_dtype(xc.scalar_type(), "x"), T, ids.data_ptr<int64_t>(),
            w.data_ptr<float>(), K, experts, out.data_ptr<float>(), hold, act);
}

}  // namespace

void bind_cpu_executor(py::module& m) {
  m.def("physical_cores", &physical_core_count, "Physical cores this process may run on.");
  py::class_<CpuExecutor, std::shared_ptr<CpuExecutor>>(
      m, "CpuExecutor", "Runs gated experts (expert_activation.h) on host threads straight from a HostPool (fp32 accumulation).")
      .def(py::init<int>(), py::arg("num_threads") = 0, "num_threads: threads that run the experts, the caller included (it works inside wait()); 0 = one per physical core but one.")
      .def("submit", &submit, py::arg("pool"), py::arg("layer"), py::arg("x"), py::arg("topk_ids"),
           py::arg("topk_weights"), py::arg("experts"), py::arg("out"), py::arg("activation") = py::none(),
           "Start the listed experts of `layer` for the tokens routed to them; returns at once. "
           "x [T, H] host (f32/bf16/f16), topk_ids [T, K] int, topk_weights [T, K] f32, out [T, H] f32 host "
           "(overwritten; valid after wait()). activation: None (silu) or an ExpertActivation (name, alpha, "
           "limit); the biases come with the pool's slots (layout.has_bias).")
      .def(
          "wait",
          [](CpuExecutor& ex) {
            py::gil_scoped_release release;
            ex.wait();
          },
          "Block until the submitted experts are done.")
      .def_property_readonly("busy", &CpuExecutor::busy)
      .def_property_readonly("last_job_us", &CpuExecutor::last_job_us,
                             "Wall time of the last job (first task started to last task done, rounds summed), after wait().")
      .def_property_readonly("isa", [](const CpuExecutor& ex) { return std::string(cpu_isa_name(ex.isa())); },
                             "Kernel instruction set chosen at run time: scalar, avx2, avx512, avx512_bf16 or amx_bf16 (tiles from 4 tokens on).")
      .def_property_readonly("num_threads", &CpuExecutor::num_threads);
}

}  // namespace moerun
