// Python binding of TransferEngine; every call orders against torch's current stream on the arena's device.
// A layer step's plan (moerun._C.Plan) is read here, in place, into the plain lists the engine takes.
#include "binding_util.h"
#include "bindings.h"
#include "policy_engine.h"
#include "transfer.h"

namespace moerun {
namespace {

// The copies and slots of `plan`, MoE layer `layer`'s step (policy_engine.h gives the Plan's layout).
void step_copies(int64_t layer, const policy::Plan& plan, StepCopies& out) {
  out.clear();
  for (size_t i = 0; i < plan.hits.size(); i += 2) out.read_slots.push_back(plan.hits[i + 1]);
  for (size_t i = 0; i < plan.fetches.size(); i += 4) {
    out.demand.push_back({layer, plan.fetches[i], plan.fetches[i + 1]});
    out.read_slots.push_back(plan.fetches[i + 1]);
  }
  for (size_t i = 0; i < plan.prefetches.size(); i += 5)
    out.prefetches.push_back({plan.prefetches[i], plan.prefetches[i + 1], plan.prefetches[i + 2]});
  for (size_t i = 0; i < plan.releases.size(); i += 3)
    out.releases.push_back({plan.releases[i + 1], plan.releases[i + 2], plan.releases[i]});
  out.prefetch_now = plan.stream_ahead;
}

}  // namespace

void bind_transfer(py::module& m) {
  py::class_<TransferEngine, std::shared_ptr<TransferEngine>>(
      m, "TransferEngine", "Copies experts pool -> arena slots on copy streams, ordered by per-slot events.")
      .def(py::init([](std::shared_ptr<ExpertArena> arena, std::shared_ptr<HostPool> pool, int num_streams,
                       int max_inflight_prefetches) {
             return std::make_shared<TransferEngine>(std::move(arena), std::move(pool), num_streams,
                                                     max_inflight_prefetches);
           }),
           py::arg("arena"), py::arg("pool"), py::arg("num_streams") = 2, py::arg("max_inflight_prefetches") = 2)
      .def(
          "fetch",
          [](TransferEngine& t, int64_t layer, int64_t expert, int64_t slot, bool demand) {
            void* stream = current_stream(t.device_index());
            py::gil_scoped_release release;  // a host-cache miss reads from disk
            t.fetch(layer, expert, slot, demand, stream);
          },
          py::arg("layer"), py::arg("expert"), py::arg("slot"), py::arg("demand") = true,
          "Copy (layer, expert) into slot and mark it resident in the arena. demand=False queues a prefetch.")
      .def(
          "begin_step",
          [](TransferEngine& t, int64_t layer, const policy::Plan& plan) {
            StepCopies step;
            step_copies(layer, plan, step);
            void* stream = current_stream(t.device_index());
            py::gil_scoped_release release;  // a host-cache miss reads from disk
            t.begin_step(step, stream);
          },
          py::arg("layer"), py::arg("plan"),
          "MoE layer `layer`'s step as `plan` (PolicyEngine.step's) lists it, up to its kernel: the demand copies "
          "(the slot table written once), then the current stream waits for the slots the kernel reads (hits and "
          "fetches). The step stays open until end_step(); the plan is read now (the engine may reuse it).")
      .def(
          "end_step",
          [](TransferEngine& t) {
            void* stream = current_stream(t.device_index());
            py::gil_scoped_release release;
            t.end_step(stream);
          },
          "After the open step's kernel launch: its slots released, its prefetches queued, its released experts "
          "emptied from their slots (the slot table written once). Nothing when no step is open.")
      .def(
          "prefetch",
          [](TransferEngine& t, const policy::Plan& plan) {
            std::vector<SlotCopy> copies;
            copies.reserve(plan.prefetches.size() / 5);
            for (size_t i = 0; i < plan.prefetches.size(); i += 5)
              copies.push_back({plan.prefetches[i], plan.prefetches[i + 1], plan.prefetches[i + 2]});
            void* stream = current_stream(t.device_index());
            py::gil_scoped_release release;
            t.fetch_all(copies, false, stream);
          },
          py::arg("plan"),
          "Queue the prefetches `plan` lists (PolicyEngine.prefetch_ahead's plan); the slot table written once.")
      .def_property_readonly("step_open", &TransferEngine::step_open,
                             "begin_step() ran and end_step() has not closed the step yet.")
      .def_property_readonly("settled", &TransferEngine::settled,
                             "No copy handed over since the last synchronize(): every expert in the table has landed.")
      .def("take_copy_timing", &TransferEngine::take_copy_timing,
           "(copy_time_us, timed_bytes) of the copies timed since the last call (see stats()).")
      .def(
          "wait_slots",
          [](TransferEngine& t, const std::vector<int64_t>& slots) {
            t.wait_slots(slots, current_stream(t.device_index()));
          },
          py::arg("slots"), "Make the current stream wait until these slots' copies are done (no host sync).")
      .def(
          "release_slots",
          [](TransferEngine& t, const std::vector<int64_t>& slots) {
            t.release_slots(slots, current_stream(t.device_index()));
          },
          py::arg("slots"), "Mark these slots free to overwrite once the current stream's queued kernels finish.")
      .def(
          "cancel_prefetches",
          [](TransferEngine& t) { return t.cancel_prefetches(current_stream(t.device_index())); },
          "Drop queued prefetches (their slots are emptied); returns [(layer, expert, slot)].")
      .def("poll", &TransferEngine::poll, "Issue queued prefetches the in-flight limit allows; read back timings.")
      .def(
          "synchronize",
          [](TransferEngine& t) {
            py::gil_scoped_release release;
            t.synchronize();
          },
          "Block until every fetch has landed (tests, shutdown).")
      .def_property_readonly("queued_prefetches", &TransferEngine::queued_prefetches)
      .def_property_readonly("num_streams", &TransferEngine::num_streams)
      .def("stats",
           [](TransferEngine& t) {
             const TransferStats s = t.stats();
             py::dict d;
             d["demand_fetches"] = s.demand_fetches;
             d["prefetches"] = s.prefetches;
             d["cancelled_prefetches"] = s.cancelled_prefetches;
             d["demand_bytes"] = s.demand_bytes;
             d["prefetch_bytes"] = s.prefetch_bytes;
             d["timed_copies"] = s.timed_copies;
             d["timed_bytes"] = s.timed_bytes;
             d["copy_time_us"] = s.copy_time_us;
             return d;
           },
           "Counters: demand_fetches, prefetches, cancelled_prefetches, demand_bytes, prefetch_bytes, "
           "timed_copies, timed_bytes, copy_time_us (GPU-clock duration of the timed copies; not every copy is "
           "timed, so their bandwidth is timed_bytes / copy_time_us).")
      .def("reset_stats", &TransferEngine::reset_stats);
}

}  // namespace moerun
