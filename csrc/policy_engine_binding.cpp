// Python binding of the policy engine (moerun._C.PolicyEngine, moerun._C.Plan, moerun._C.replay).
// The hot call is PolicyEngine.step: ids/weights arrive as Python lists/tuples (read in place) or
// arrays, and the same Plan object is returned every call, so a step allocates nothing once warm.
// moerun/policy/engine_setup.py builds the config dict from a compiled policy; every key is required.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <iterator>
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

// Every key of the engine's config, as moerun/policy/engine_setup.py writes it. The config must
// carry each one (and nothing else): a default here would be a second, unseen source of the policy's
// defaults.
constexpr const char* kConfigKeys[] = {
    "num_layers", "num_experts", "top_k", "num_slots", "expert_bytes", "capacity", "eviction",
    "frequency_decay", "freq_threshold", "freq_window", "score_ema_alpha", "pinned_keys", "ttl",
    "high_watermark", "low_watermark", "credit_decay", "memory_budget_gb", "memory_threshold",
    "memory_headroom", "expert_size_gb", "capacity_factor", "prefetch", "prefetch_budget", "lookahead",
    "affinity_threshold", "history_window", "schedule", "offload_threshold_ms", "priority_routing",
    "prefill_staging", "prefill_updates_cache", "per_layer", "allocation", "total_budget", "min_capacity", "max_capacity", "rebalance_interval",
    "entropy_window", "rules", "cost"};
constexpr const char* kRuleKeys[] = {"metric", "op", "threshold", "window", "assignments", "triggers"};
constexpr const char* kCostKeys[] = {"h2d_gbps", "cpu_us_per_expert", "cpu_us_per_expert_token", "copy_latency_us",
                                     "gpu_layer_us", "ema"};

template <size_t N>
void check_keys(const py::dict& d, const char* const (&keys)[N], const char* what) {
  for (const char* k : keys)
    if (!d.contains(k)) throw std::invalid_argument(std::string(what) + " has no '" + k + "'");
  if (py::len(d) != N) {
    for (auto item : d) {
      const std::string k = py::str(item.first);
      if (std::find_if(std::begin(keys), std::end(keys), [&](const char* x) { return k == x; }) == std::end(keys))
        throw std::invalid_argument(std::string(what) + " has an unknown key '" + k + "'");
    }
  }
}

template <typename T>
T get(const py::dict& d, const char* key) {
  return d[key].cast<T>();
}

template <typename E, size_t N>
E enum_value(const py::dict& d, const char* key, const char* const (&)[N]) {
  const int v = get<int>(d, key);
  if (v < 0 || v >= int(N)) throw std::invalid_argument(std::string("engine config: ") + key + " " + std::to_string(v) + " is out of range");
  return E(v);
}

EngineConfig config_from_dict(const py::dict& d) {
  check_keys(d, kConfigKeys, "engine config");
  EngineConfig c;
  c.num_layers = get<int>(d, "num_layers");
  c.num_experts = get<int>(d, "num_experts");
  c.top_k = get<int>(d, "top_k");
  c.num_slots = get<int>(d, "num_slots");
  c.expert_bytes = get<int64_t>(d, "expert_bytes");
  c.capacity = get<int>(d, "capacity");
  c.eviction = enum_value<policy::Eviction>(d, "eviction", policy::kEvictionNames);
  c.frequency_decay = get<double>(d, "frequency_decay");
  c.freq_threshold = get<double>(d, "freq_threshold");
  c.freq_window = get<int>(d, "freq_window");
  c.score_ema_alpha = get<double>(d, "score_ema_alpha");
  c.pinned_keys = get<std::vector<int>>(d, "pinned_keys");
  c.ttl = get<int64_t>(d, "ttl");
  c.high_watermark = get<double>(d, "high_watermark");
  c.low_watermark = get<double>(d, "low_watermark");
  c.credit_decay = get<double>(d, "credit_decay");
  c.memory_budget_gb = get<double>(d, "memory_budget_gb");
  c.memory_threshold = get<double>(d, "memory_threshold");
  c.memory_headroom = get<double>(d, "memory_headroom");
  c.expert_size_gb = get<double>(d, "expert_size_gb");
  c.capacity_factor = get<double>(d, "capacity_factor");
  c.prefetch = enum_value<policy::Prefetch>(d, "prefetch", policy::kPrefetchNames);
  c.prefetch_budget = get<int>(d, "prefetch_budget");
  c.lookahead = get<int>(d, "lookahead");
  c.affinity_threshold = get<double>(d, "affinity_threshold");
  c.history_window = get<int>(d, "history_window");
  c.schedule = enum_value<policy::Schedule>(d, "schedule", policy::kScheduleNames);
  c.offload_threshold_ms = get<double>(d, "offload_threshold_ms");
  c.priority_routing = get<bool>(d, "priority_routing");
  c.prefill_staging = get<double>(d, "prefill_staging");
  if (!(c.prefill_staging >= 0.0 && c.prefill_staging <= 1.0))
    throw std::invalid_argument("engine config: prefill_staging " + std::to_string(c.prefill_staging) +
                                " must be in [0, 1]");
  c.prefill_updates_cache = get<bool>(d, "prefill_updates_cache");
  c.per_layer = get<bool>(d, "per_layer");
  c.allocation = enum_value<policy::Allocation>(d, "allocation", policy::kAllocationNames);
  c.total_budget = get<int>(d, "total_budget");
  c.min_capacity = get<int>(d, "min_capacity");
  c.max_capacity = get<int>(d, "max_capacity");
  c.rebalance_interval = get<int64_t>(d, "rebalance_interval");
  c.entropy_window = get<int>(d, "entropy_window");
  for (py::handle h : d["rules"]) {
    py::dict r = py::reinterpret_borrow<py::dict>(h);
    check_keys(r, kRuleKeys, "adapt rule");
    policy::AdaptRule rule;
    rule.metric = enum_value<policy::Metric>(r, "metric", policy::kMetricNames);
    rule.op = enum_value<policy::Op>(r, "op", policy::kOpNames);
    rule.threshold = r["threshold"].cast<double>();
    rule.window = r["window"].cast<int64_t>();
    for (auto a : r["assignments"].cast<std::vector<std::pair<int, double>>>()) {
      if (a.first < 0 || a.first >= int(std::size(policy::kParamNames)))
        throw std::invalid_argument("adapt rule: parameter " + std::to_string(a.first) + " is out of range");
      rule.assignments.push_back({policy::Param(a.first), a.second});
    }
    for (int t : r["triggers"].cast<std::vector<int>>()) {
      if (t < 0 || t >= int(std::size(policy::kTriggerNames)))
        throw std::invalid_argument("adapt rule: trigger " + std::to_string(t) + " is out of range");
      rule.triggers.push_back(policy::Trigger(t));
    }
    c.rules.push_back(rule);
  }
  py::dict k = d["cost"].cast<py::dict>();
  check_keys(k, kCostKeys, "engine cost model");
  c.cost.h2d_bytes_per_us = get<double>(k, "h2d_gbps") * 1e3;
  c.cost.cpu_us_per_expert = get<double>(k, "cpu_us_per_expert");
  c.cost.cpu_us_per_expert_token = get<double>(k, "cpu_us_per_expert_token");
  c.cost.copy_latency_us = get<double>(k, "copy_latency_us");
  c.cost.gpu_layer_us = get<double>(k, "gpu_layer_us");
  c.cost.ema = get<double>(k, "ema");
  return c;
}

template <size_t N>
py::list names(const char* const (&list)[N]) {
  py::list out;
  for (const char* n : list) out.append(n);
  return out;
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

// Plan.counts: what the runtime's counters take from a carried-out plan.
py::tuple counts(const Plan& p) {
  int64_t fetch_evictions = 0, prefetch_evictions = 0;
  for (size_t i = 2; i < p.fetches.size(); i += 4) fetch_evictions += p.fetches[i] >= 0;
  for (size_t i = 3; i < p.prefetches.size(); i += 5) prefetch_evictions += p.prefetches[i] >= 0;
  return py::make_tuple(p.hits.size() / 2, p.fetches.size() / 4, fetch_evictions, p.cpu.size(), p.cpu_pairs,
                        p.prefetches.size() / 5, prefetch_evictions);
}

struct PyEngine {
  Engine engine;
  std::shared_ptr<Plan> plan = std::make_shared<Plan>();
  py::object plan_obj;
  std::vector<int32_t> ids;
  std::vector<float> weights;
  explicit PyEngine(const EngineConfig& c) : engine(c) { plan_obj = py::cast(plan); }

  py::object step(int layer, py::handle ids_obj, py::handle weights_obj, bool prefill) {
    read_ints(ids_obj, ids);
    const bool has_w = read_floats(weights_obj, weights);
    if (has_w && weights.size() != ids.size())
      throw std::invalid_argument("got " + std::to_string(ids.size()) + " expert ids but " +
                                  std::to_string(weights.size()) + " gate weights");
    engine.step(layer, ids.data(), has_w ? weights.data() : nullptr, int(ids.size()), *plan, nullptr, prefill);
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
  d["dropped"] = c.dropped;
  py::dict prefill;
  prefill["steps"] = c.prefill_steps; prefill["accesses"] = c.prefill_accesses; prefill["hits"] = c.prefill_hits;
  prefill["staged"] = c.staged; prefill["streamed"] = c.streamed; prefill["streamed_used"] = c.streamed_used;
  prefill["borrowed"] = c.borrowed; prefill["restored"] = c.restored; prefill["staged_peak"] = c.staged_peak;
  prefill["staging_limit"] = e.staging_limit();
  d["prefill"] = prefill;
  const int64_t decode_accesses = c.accesses - c.prefill_accesses;
  d["decode_hit_rate"] = decode_accesses > 0 ? double(c.hits - c.prefill_hits) / double(decode_accesses) : 0.0;
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
  cost["cpu_us_per_expert"] = e.cost().cpu_us_per_expert;
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
  m.def("policy_vocabulary", [] {
        py::dict v;
        v["eviction"] = names(policy::kEvictionNames);
        v["prefetch"] = names(policy::kPrefetchNames);
        v["schedule"] = names(policy::kScheduleNames);
        v["allocation"] = names(policy::kAllocationNames);
        v["metric"] = names(policy::kMetricNames);
        v["op"] = names(policy::kOpNames);
        v["param"] = names(policy::kParamNames);
        v["trigger"] = names(policy::kTriggerNames);
        v["config_keys"] = names(kConfigKeys);
        v["rule_keys"] = names(kRuleKeys);
        v["cost_keys"] = names(kCostKeys);
        return v;
      },
      "The engine's name lists, each in its enum's order (the value a config dict gives is the position).");
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
      .def_property_readonly("cpu_experts",
                             [](const Plan& p) { return std::vector<int64_t>(p.cpu.begin(), p.cpu.end()); },
                             "[expert] run on the CPU (cpu's experts, as the CPU executor takes them)")
      .def_readonly("cpu_pairs", &Plan::cpu_pairs, "routed (token, expert) pairs of the CPU experts")
      .def_property_readonly("counts", &counts,
                             "(hits, fetches, fetch_evictions, cpu, cpu_pairs, prefetches, prefetch_evictions): "
                             "the plan's sizes in one call (evictions: copies into a slot that held an expert)")
      .def_readonly("predicted_us", &Plan::predicted_us)
      .def_readonly("stream_ahead", &Plan::stream_ahead,
                    "the prefetches are a prefill's next-layer stream: issued at once after the kernel launch");

  py::class_<PyEngine>(m, "PolicyEngine", "Native policy engine; see moerun.policy_engine.")
      .def(py::init([](const py::dict& d) { return new PyEngine(config_from_dict(d)); }))
      .def("step", &PyEngine::step, py::arg("layer"), py::arg("expert_ids"), py::arg("gate_weights"),
           py::arg("prefill") = false)
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
              double cpu_us, int64_t cpu_expert_tokens, int64_t cpu_experts) {
             self.engine.observe_timing(layer, layer_us, copy_us, copy_bytes, cpu_us, cpu_expert_tokens,
                                        cpu_experts);
           },
           py::arg("layer"), py::arg("layer_us"), py::arg("copy_us"), py::arg("copy_bytes"),
           py::arg("cpu_us"), py::arg("cpu_expert_tokens"), py::arg("cpu_experts") = 0)
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
             if (metric < 0 || metric >= int(std::size(policy::kMetricNames)))
               throw std::invalid_argument("metric " + std::to_string(metric) + " is out of range");
             return self.engine.metric(policy::Metric(metric), window);
           }, py::arg("metric"), py::arg("window"))
      .def("keep_access_log", [](PyEngine& self, int64_t window) { self.engine.keep_access_log(window); },
           py::arg("window"),
           "Keep the last `window` routed pairs so drift and utilization_gini can be taken over that window "
           "(adapt rules that use them size it themselves).")
      .def("stats", [](const PyEngine& self) { return stats(self.engine); })
      .def("replay",
           [](PyEngine& self, py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids,
              py::object weights, py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
              bool oracle_predictions, py::object predicted_ids, py::object predicted_scores,
              int64_t host_capacity, int host_eviction, double host_high_watermark, double host_low_watermark,
              py::object prefill_steps) {
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
             py::array_t<uint8_t, py::array::c_style | py::array::forcecast> prefill;
             if (!prefill_steps.is_none()) {
               prefill = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(prefill_steps);
               if (!prefill || prefill.ndim() != 1 || prefill.size() != starts.size() - 1)
                 throw std::invalid_argument("prefill steps must be [steps], one flag per step");
             }
             {
               py::gil_scoped_release nogil;
               policy::replay_trace(self.engine, ip, weights.is_none() ? nullptr : w.data(), ids.shape(0),
                                    starts.data(), starts.size() - 1, oracle_predictions, pred, host.get(),
                                    prefill_steps.is_none() ? nullptr : prefill.data());
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
           py::arg("host_low_watermark") = 0.7, py::arg("prefill_steps") = py::none(),
           "Replay a trace (prefill_steps: [steps] flags, the steps run as a prefill's); predicted_ids/scores feed lookahead/learned prefetch a predictor's output; with "
           "host_capacity > 0 a host tier behind the GPU tier reports its hit rate under 'host'.");
}

}  // namespace moerun
