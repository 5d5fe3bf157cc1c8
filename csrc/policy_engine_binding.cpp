// Python binding of the policy engine (moerun._C.PolicyEngine, moerun._C.Plan, moerun._C.replay).
// The hot call is PolicyEngine.step: ids/weights arrive as Python lists/tuples (read in place) or
// arrays, and the same Plan object is returned every call, so a step allocates nothing once warm.
// moerun/policy_engine.py builds the config dict from a CompiledPolicy.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "bindings.h"
#include "host_pool.h"
#include "policy_engine.h"

namespace py = pybind11;

namespace moerun {
namespace {

using policy::Engine;
using policy::EngineConfig;
using policy::Plan;

template <typename T>
T get(const py::dict& d, const char* key, T fallback) {
  return d.contains(key) ? d[key].cast<T>() : fallback;
}

EngineConfig config_from_dict(const py::dict& d) {
  EngineConfig c;
  c.num_layers = get<int>(d, "num_layers", 0);
  c.num_experts = get<int>(d, "num_experts", 0);
  c.top_k = get<int>(d, "top_k", 0);
  c.num_slots = get<int>(d, "num_slots", 0);
  c.expert_bytes = get<int64_t>(d, "expert_bytes", 0);
  c.capacity = get<int>(d, "capacity", c.num_slots);
  c.eviction = policy::Eviction(get<int>(d, "eviction", 0));
  c.frequency_decay = get<double>(d, "frequency_decay", 1.0);
  c.freq_threshold = get<double>(d, "freq_threshold", 2.0);
  c.freq_window = get<int>(d, "freq_window", 100);
  c.score_ema_alpha = get<double>(d, "score_ema_alpha", 0.3);
  c.pinned_keys = get<std::vector<int>>(d, "pinned_keys", {});
  c.ttl = get<int64_t>(d, "ttl", 0);
  c.high_watermark = get<double>(d, "high_watermark", 0.9);
  c.low_watermark = get<double>(d, "low_watermark", 0.7);
  c.credit_decay = get<double>(d, "credit_decay", 0.95);
  c.memory_budget_gb = get<double>(d, "memory_budget_gb", 0.0);
  c.memory_threshold = get<double>(d, "memory_threshold", 0.9);
  c.memory_headroom = get<double>(d, "memory_headroom", 0.1);
  c.expert_size_gb = get<double>(d, "expert_size_gb", 0.0);
  c.prefetch = policy::Prefetch(get<int>(d, "prefetch", 0));
  c.prefetch_budget = get<int>(d, "prefetch_budget", 0);
  c.lookahead = get<int>(d, "lookahead", 1);
  c.affinity_threshold = get<double>(d, "affinity_threshold", 0.1);
  c.history_window = get<int>(d, "history_window", 64);
  c.schedule = policy::Schedule(get<int>(d, "schedule", 0));
  c.offload_threshold_ms = get<double>(d, "offload_threshold_ms", 0.0);
  c.priority_routing = get<bool>(d, "priority_routing", true);
  c.per_layer = get<bool>(d, "per_layer", false);
  c.allocation = policy::Allocation(get<int>(d, "allocation", 0));
  c.total_budget = get<int>(d, "total_budget", c.capacity);
  c.min_capacity = get<int>(d, "min_capacity", 1);
  c.max_capacity = get<int>(d, "max_capacity", 0);
  c.rebalance_interval = get<int64_t>(d, "rebalance_interval", 0);
  c.entropy_window = get<int>(d, "entropy_window", 1000);
  if (d.contains("rules")) {
    for (py::handle h : d["rules"]) {
      py::dict r = py::reinterpret_borrow<py::dict>(h);
      policy::AdaptRule rule;
      rule.metric = policy::Metric(r["metric"].cast<int>());
      rule.op = policy::Op(r["op"].cast<int>());
      rule.threshold = r["threshold"].cast<double>();
      rule.window = r["window"].cast<int64_t>();
      for (auto a : r["assignments"].cast<std::vector<std::pair<int, double>>>())
        rule.assignments.push_back({policy::Param(a.first), a.second});
      for (int t : r["triggers"].cast<std::vector<int>>()) rule.triggers.push_back(policy::Trigger(t));
      c.rules.push_back(rule);
    }
  }
  if (d.contains("cost")) {
    py::dict k = d["cost"].cast<py::dict>();
    c.cost.h2d_bytes_per_us = get<double>(k, "h2d_gbps", 25.0) * 1e3;
    c.cost.cpu_us_per_expert_token = get<double>(k, "cpu_us_per_expert_token", 400.0);
    c.cost.copy_latency_us = get<double>(k, "copy_latency_us", 10.0);
    c.cost.gpu_layer_us = get<double>(k, "gpu_layer_us", 50.0);
    c.cost.ema = get<double>(k, "ema", 0.2);
  }
  return c;
}

// A contiguous 1-D or N-D buffer (numpy array, array.array) of a common numeric type, read
// without building an array object; false when the object has no such buffer.
template <typename T>
bool read_buffer(py::handle obj, std::vector<T>& out) {
  if (!PyObject_CheckBuffer(obj.ptr())) return false;
  Py_buffer view;
  if (PyObject_GetBuffer(obj.ptr(), &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
    PyErr_Clear();
    return false;
  }
  const std::string fmt = view.format != nullptr ? view.format : "B";
  const char f = fmt.empty() ? 'B' : fmt.back();
  const Py_ssize_t n = view.itemsize > 0 ? view.len / view.itemsize : 0;
  bool ok = true;
  out.resize(size_t(n));
  auto copy = [&](auto* p) { for (Py_ssize_t i = 0; i < n; ++i) out[size_t(i)] = T(p[i]); };
  if ((f == 'l' || f == 'q') && view.itemsize == 8) copy(static_cast<const int64_t*>(view.buf));
  else if ((f == 'i' || f == 'l') && view.itemsize == 4) copy(static_cast<const int32_t*>(view.buf));
  else if (f == 'h' && view.itemsize == 2) copy(static_cast<const int16_t*>(view.buf));
  else if (f == 'f' && view.itemsize == 4 && std::is_floating_point<T>::value) copy(static_cast<const float*>(view.buf));
  else if (f == 'd' && view.itemsize == 8 && std::is_floating_point<T>::value) copy(static_cast<const double*>(view.buf));
  else ok = false;
  PyBuffer_Release(&view);
  return ok;
}

// Read a Python list/tuple of ints (fast path) or anything numpy can view as ints.
void read_ints(py::handle obj, std::vector<int32_t>& out) {
  out.clear();
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj.ptr());
    PyObject** items = PySequence_Fast_ITEMS(obj.ptr());
    out.resize(size_t(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      const long v = PyLong_AsLong(items[i]);
      if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
      out[size_t(i)] = int32_t(v);
    }
    return;
  }
  if (read_buffer(obj, out)) return;
  py::array any = py::array::ensure(obj);
  if (!any || (any.dtype().kind() != 'i' && any.dtype().kind() != 'u'))
    throw std::invalid_argument("expert ids must be a sequence of ints or an integer array");
  auto arr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(any);
  const int64_t* p = arr.data();
  out.assign(p, p + arr.size());
}

bool read_floats(py::handle obj, std::vector<float>& out) {
  out.clear();
  if (obj.is_none()) return false;
  if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj.ptr());
    PyObject** items = PySequence_Fast_ITEMS(obj.ptr());
    out.resize(size_t(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      const double v = PyFloat_AsDouble(items[i]);
      if (v == -1.0 && PyErr_Occurred()) throw py::error_already_set();
      out[size_t(i)] = float(v);
    }
    return true;
  }
  if (read_buffer(obj, out)) return true;
  auto arr = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!arr) throw std::invalid_argument("gate weights must be a sequence of floats or a float array");
  out.assign(arr.data(), arr.data() + arr.size());
  return true;
}

py::list tuples(const std::vector<int32_t>& flat, size_t width) {
  py::list out(flat.size() / width);
  for (size_t i = 0; i < flat.size() / width; ++i) {
    py::tuple t(width);
    for (size_t j = 0; j < width; ++j) t[j] = py::int_(flat[i * width + j]);
    out[i] = t;
  }
  return out;
}

struct PyEngine {
  Engine engine;
  std::shared_ptr<Plan> plan = std::make_shared<Plan>();
  py::object plan_obj;
  std::vector<int32_t> ids;
  std::vector<float> weights;
  explicit PyEngine(const EngineConfig& c) : engine(c) { plan_obj = py::cast(plan); }

  py::object step(int layer, py::handle ids_obj, py::handle weights_obj) {
    read_ints(ids_obj, ids);
    const bool has_w = read_floats(weights_obj, weights);
    if (has_w && weights.size() != ids.size())
      throw std::invalid_argument("got " + std::to_string(ids.size()) + " expert ids but " +
                                  std::to_string(weights.size()) + " gate weights");
    engine.step(layer, ids.data(), has_w ? weights.data() : nullptr, int(ids.size()), *plan);
    return plan_obj;
  }

  py::object prefetch_ahead(int layer, py::handle ids_obj, py::handle scores_obj) {
    read_ints(ids_obj, ids);
    const bool has = read_floats(scores_obj, weights);
    if (has && weights.size() != ids.size())
      throw std::invalid_argument("prediction ids and scores differ in length");
    engine.prefetch_ahead(layer, ids.data(), has ? weights.data() : nullptr, int(ids.size()), *plan);
    return plan_obj;
  }
};


py::dict stats(const Engine& e) {
  const auto& c = e.counters();
  py::dict d;
  d["steps"] = c.steps; d["tokens"] = c.tokens; d["accesses"] = c.accesses; d["hits"] = c.hits;
  d["misses"] = c.accesses - c.hits;
  d["hit_rate"] = c.accesses > 0 ? double(c.hits) / double(c.accesses) : 0.0;
  d["demand_fetches"] = c.demand_fetches; d["prefetches"] = c.prefetches;
  d["prefetch_used"] = c.prefetch_used;
  d["prefetch_accuracy"] = c.prefetches > 0 ? double(c.prefetch_used) / double(c.prefetches) : 0.0;
  d["evictions"] = c.evictions; d["releases"] = c.releases;
  d["cpu_accesses"] = c.cpu_accesses; d["cpu_experts"] = c.cpu_experts;
  d["cpu_share"] = c.accesses > 0 ? double(c.cpu_accesses) / double(c.accesses) : 0.0;
  d["admissions"] = c.admissions; d["overflow"] = c.overflow; d["bytes_fetched"] = c.bytes_fetched;
  d["resident"] = e.resident();
  d["capacities"] = e.layer_capacities();
  d["layer_hits"] = e.layer_hits(); d["layer_accesses"] = e.layer_accesses();
  d["simulated_us"] = e.simulated_us();
  d["observed_us"] = c.observed_us; d["observed_steps"] = c.observed_steps;
  const double err = e.prediction_error(), acc = e.prediction_accuracy();
  d["cost_prediction_error"] = std::isnan(err) ? py::object(py::none()) : py::object(py::float_(err));
  d["routing_prediction_accuracy"] =
      std::isnan(acc) ? py::object(py::none()) : py::object(py::float_(acc));
  py::dict cost;
  cost["h2d_gbps"] = e.cost().h2d_bytes_per_us / 1e3;
  cost["cpu_us_per_expert_token"] = e.cost().cpu_us_per_expert_token;
  cost["copy_latency_us"] = e.cost().copy_latency_us;
  cost["gpu_layer_us"] = e.cost().gpu_layer_us;
  d["cost_model"] = cost;
  py::list firings;
  for (const auto& f : e.firings()) {
    py::dict x;
    x["access"] = f.access; x["rule"] = f.rule; x["value"] = f.value;
    firings.append(x);
  }
  d["adapt_firings"] = firings;
  d["adapt_firing_count"] = e.firing_count();
  return d;
}

}  // namespace

void bind_policy_engine(py::module& m) {
  py::class_<Plan, std::shared_ptr<Plan>>(m, "Plan", "Decisions of one layer step (reused across steps).")
      .def_property_readonly("hits", [](const Plan& p) { return tuples(p.hits, 2); },
                             "[(expert, slot)]")
      .def_property_readonly("fetches", [](const Plan& p) { return tuples(p.fetches, 4); },
                             "[(expert, slot, victim_layer, victim_expert)]; victim -1,-1 if the slot was free")
      .def_property_readonly("cpu", [](const Plan& p) { return tuples(p.cpu, 1); }, "[(expert,)]")
      .def_property_readonly("prefetches", [](const Plan& p) { return tuples(p.prefetches, 5); },
                             "[(layer, expert, slot, victim_layer, victim_expert)]")
      .def_property_readonly("releases", [](const Plan& p) { return tuples(p.releases, 3); },
                             "[(slot, layer, expert)] leaving the arena after this step's kernel")
      .def_property_readonly("num_hits", [](const Plan& p) { return p.hits.size() / 2; })
      .def_property_readonly("num_fetches", [](const Plan& p) { return p.fetches.size() / 4; })
      .def_property_readonly("num_cpu", [](const Plan& p) { return p.cpu.size(); })
      .def_property_readonly("num_prefetches", [](const Plan& p) { return p.prefetches.size() / 5; })
      .def_property_readonly("num_releases", [](const Plan& p) { return p.releases.size() / 3; })
      .def_readonly("predicted_us", &Plan::predicted_us);

  py::class_<PyEngine>(m, "PolicyEngine", "Native policy engine; see moerun.policy_engine.")
      .def(py::init([](const py::dict& d) { return new PyEngine(config_from_dict(d)); }))
      .def("step", &PyEngine::step, py::arg("layer"), py::arg("expert_ids"), py::arg("gate_weights"))
      .def("observe_prediction",
           [](PyEngine& self, int layer, py::handle ids, py::handle scores) {
             read_ints(ids, self.ids);
             const bool has = read_floats(scores, self.weights);
             if (has && self.weights.size() != self.ids.size())
               throw std::invalid_argument("prediction ids and scores differ in length");
             self.engine.observe_prediction(layer, self.ids.data(), has ? self.weights.data() : nullptr,
                                            int(self.ids.size()));
           },
           py::arg("layer"), py::arg("expert_ids"), py::arg("scores") = py::none())
      .def("prefetch_ahead", &PyEngine::prefetch_ahead, py::arg("layer"), py::arg("expert_ids"),
           py::arg("scores") = py::none(),
           "Lookahead between steps: ids predicted for `layer` once the step before it is done; the plan "
           "(reused, like step's) lists the prefetches issued, nothing else.")
      .def("observe_timing",
           [](PyEngine& self, int layer, double layer_us, double copy_us, int64_t copy_bytes,
              double cpu_us, int64_t cpu_expert_tokens) {
             self.engine.observe_timing(layer, layer_us, copy_us, copy_bytes, cpu_us, cpu_expert_tokens);
           },
           py::arg("layer"), py::arg("layer_us"), py::arg("copy_us"), py::arg("copy_bytes"),
           py::arg("cpu_us"), py::arg("cpu_expert_tokens"))
      .def("set_config", [](PyEngine& self, const py::dict& d) { self.engine.set_config(config_from_dict(d)); })
      .def("reset", [](PyEngine& self) { self.engine.reset(); })
      .def("warm", [](PyEngine& self, int layer, int expert) {
             const auto& c = self.engine.config();
             if (layer < 0 || layer >= c.num_layers || expert < 0 || expert >= c.num_experts)
               throw std::out_of_range("warm: (layer, expert) out of range");
             return self.engine.warm(layer * c.num_experts + expert);
           }, py::arg("layer"), py::arg("expert"),
           "Place (layer, expert) in a free slot without counting an access; its slot, or -1 (resident or no room).")
      .def("lookup", [](const PyEngine& self, int layer, int expert) { return self.engine.lookup(layer, expert); })
      .def("metric", [](const PyEngine& self, int metric, int64_t window) {
             return self.engine.metric(policy::Metric(metric), window);
           })
      .def("stats", [](const PyEngine& self) { return stats(self.engine); })
      .def("replay",
           [](PyEngine& self, py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids,
              py::object weights, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
              bool oracle_predictions, py::object predicted_ids, py::object predicted_scores,
              int64_t host_capacity, int host_eviction, double host_high_watermark, double host_low_watermark) {
             const auto& cfg = self.engine.config();
             std::unique_ptr<policy::Engine> host;
             if (host_capacity > 0) {
               HostTierConfig tier;
               tier.capacity = host_capacity;
               tier.eviction = host_eviction;
               tier.high_watermark = host_high_watermark;
               tier.low_watermark = host_low_watermark;
               host = std::make_unique<policy::Engine>(
                   host_tier_config(cfg.num_layers, cfg.num_experts, cfg.expert_bytes, tier));
             }
             if (ids.ndim() != 3 || ids.shape(1) != cfg.num_layers || ids.shape(2) != cfg.top_k)
               throw std::invalid_argument("replay ids must be [tokens, num_layers, top_k]");
             py::array_t<float, py::array::c_style | py::array::forcecast> w;
             if (!weights.is_none()) {
               w = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(weights);
               if (!w || w.size() != ids.size())
                 throw std::invalid_argument("replay gate weights must match the ids' shape");
             }
             const int32_t* ip = ids.data();
             for (ssize_t i = 0; i < ids.size(); ++i)
               if (ip[i] < 0 || ip[i] >= cfg.num_experts)
                 throw std::invalid_argument("expert id " + std::to_string(ip[i]) + " out of range (model has " +
                                             std::to_string(cfg.num_experts) + " experts)");
             // A predictor's output: ids [steps, layers, depth, width] (-1 = none), scores alike.
             policy::ReplayPredictions pred;
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> pid;
             py::array_t<float, py::array::c_style | py::array::forcecast> psc;
             if (!predicted_ids.is_none()) {
               pid = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(predicted_ids);
               if (!pid || pid.ndim() != 4 || pid.shape(0) != starts.size() - 1 || pid.shape(1) != cfg.num_layers)
                 throw std::invalid_argument("predicted ids must be [steps, num_layers, depth, width]");
               pred.ids = pid.data();
               pred.depth = int(pid.shape(2));
               pred.width = int(pid.shape(3));
               if (!predicted_scores.is_none()) {
                 psc = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(predicted_scores);
                 if (!psc || psc.ndim() != 4 || psc.size() != pid.size())
                   throw std::invalid_argument("predicted scores must match the predicted ids' shape");
                 pred.scores = psc.data();
               }
             }
             {
               py::gil_scoped_release nogil;
               policy::replay_trace(self.engine, ip, weights.is_none() ? nullptr : w.data(), ids.shape(0),
                                    starts.data(), starts.size() - 1, oracle_predictions, pred, host.get());
             }
             py::dict d = stats(self.engine);
             if (host) {
               const policy::Counters& h = host->counters();
               py::dict hd;
               hd["capacity"] = host->config().capacity;
               hd["accesses"] = h.accesses;
               hd["hits"] = h.hits;
               hd["misses"] = h.accesses - h.hits;
               hd["hit_rate"] = h.accesses > 0 ? double(h.hits) / double(h.accesses) : 0.0;
               hd["disk_bytes"] = (h.accesses - h.hits) * cfg.expert_bytes;
               d["host"] = hd;
             }
             return d;
           },
           py::arg("ids"), py::arg("weights"), py::arg("step_starts"), py::arg("oracle_predictions") = true,
           py::arg("predicted_ids") = py::none(), py::arg("predicted_scores") = py::none(),
           py::arg("host_capacity") = 0, py::arg("host_eviction") = 0, py::arg("host_high_watermark") = 0.9,
           py::arg("host_low_watermark") = 0.7,
           "Replay a trace; predicted_ids/scores feed lookahead/learned prefetch a predictor's output; with "
           "host_capacity > 0 a host tier behind the GPU tier reports its hit rate under 'host'.");
}

}  // namespace moerun
