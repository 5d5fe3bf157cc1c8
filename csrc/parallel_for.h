// ParallelFor: how a native function that splits its work into independent tasks is given threads by its
// caller, so the core needs no thread pool of its own (a binding passes torch's intra-op pool, the host
// pool's loader threads pass none and run each expert's tasks in turn).
#pragma once
#include <cstdint>
#include <functional>

namespace moerun {

// Runs task(i) for every i in [0, n), on as many threads as the caller provides, returning when all are
// done; tasks of one call never write the same memory.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& task)>;

// Runs `n` tasks through `parallel_for`, or in order on this thread when it is empty.
inline void run_tasks(const ParallelFor& parallel_for, int64_t n, const std::function<void(int64_t)>& task) {
  if (parallel_for) {
    parallel_for(n, task);
    return;
  }
  for (int64_t i = 0; i < n; ++i) task(i);
}

}  // namespace moerun
