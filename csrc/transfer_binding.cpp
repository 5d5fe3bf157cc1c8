// Python binding of TransferEngine; every call orders against torch's current stream on the arena's device.
#include "binding_util.h"
#include "bindings.h"
#include "transfer.h"

namespace moerun {

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
