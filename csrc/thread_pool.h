// A persistent pool of worker threads that runs a job of sequential phases, each phase a set of
// independent tasks spread over all workers, asynchronously from the caller (submit, then wait).
// Workers spin briefly between jobs (low wake-up latency on the decode path), then sleep.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moerun {

// Cores of distinct (package, core id) among the CPUs this process may run on; hyperthreads share a core's
// load/store units, so the memory-bound expert kernels gain nothing from them.
int physical_core_count();

class ThreadPool {
 public:
  struct Phase {
    int64_t num_tasks;
    std::function<void(int64_t)> run;  // called once per task index, from any worker
  };

  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Starts the job; phases run in order, a phase starting when every task of the previous one is done.
  // Throws if a job is still running (call wait first).
  void submit(std::vector<Phase> phases);
  // Blocks until the job is done; rethrows the first exception a task raised.
  void wait();
  bool busy() const { return !done_.load(std::memory_order_acquire); }
  // Wall time of the last finished job, submit to its last task (valid after wait()); unlike the
  // caller's view it excludes whatever the caller did before waiting.
  double last_job_us() const { return std::chrono::duration<double, std::micro>(finished_ - submitted_).count(); }
  int num_threads() const { return static_cast<int>(threads_.size()); }

 private:
  void worker_loop();

  std::vector<std::thread> threads_;
  std::vector<Phase> phases_;
  std::unique_ptr<std::atomic<int64_t>[]> next_task_;  // per phase
  std::unique_ptr<std::atomic<int>[]> arrived_;        // per phase: workers that finished it
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> done_{true};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::exception_ptr error_;
  size_t max_phases_ = 8;
  std::chrono::steady_clock::time_point submitted_, finished_;  // finished_ written under mu_ by the last worker
};

}  // namespace moerun
