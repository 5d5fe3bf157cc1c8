// A persistent pool of worker threads that runs a job of sequential phases, each phase a set of
// independent tasks spread over the workers and the caller, asynchronously from the caller (submit,
// then wait, which works on the job's remaining tasks until it is done).
// A phase starts when every task of the previous one has finished, whichever threads ran them: a
// worker that wakes late (or not at all: its core was busy) delays nothing, it finds no tasks left.
// Workers spin a while between jobs (low wake-up latency between the layers of a decode step), then sleep.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
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
    std::function<void(int64_t)> run;  // called once per task index, from any worker or the caller
  };

  // num_threads: threads that run a job's tasks, the caller's included (it works inside wait()), so
  // num_threads - 1 workers are started; <= 0 = one per physical core.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Starts the job; phases run in order, a phase starting when every task of the previous one is done.
  // Throws if a job is still running (call wait first).
  void submit(std::vector<Phase> phases);
  // Runs the job's remaining tasks on the calling thread too, then blocks until the job is done;
  // rethrows the first exception a task raised (the tasks after it are skipped).
  void wait();
  bool busy() const { return !done_.load(std::memory_order_acquire); }
  // Wall time of the last finished job, its first task's start to its last task's end (valid after
  // wait()); unlike the caller's view it excludes whatever the caller did before waiting.
  double last_job_us() const { return std::chrono::duration<double, std::micro>(finished_ - started_).count(); }
  int num_threads() const { return static_cast<int>(threads_.size()) + 1; }

 private:
  // One submitted job. Workers hold it by shared_ptr: one that wakes after its job is done still walks
  // through that job's (spent) counters, never the next job's, so submit() need not wait for it.
  struct Job {
    explicit Job(std::vector<Phase> p);
    std::vector<Phase> phases;
    std::unique_ptr<std::atomic<int64_t>[]> next_task;       // per phase: next task index to take
    std::unique_ptr<std::atomic<int64_t>[]> finished_tasks;  // per phase: tasks done (the barrier)
  };
  void worker_loop();
  void run_job(Job& job);  // work on the job's phases until none has tasks left to take

  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_;  // the current job; read and replaced under mu_
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> done_{true};
  std::atomic<bool> failed_{false};
  std::atomic<bool> stop_{false};
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::exception_ptr error_;
  std::chrono::steady_clock::time_point started_, finished_;  // written under mu_ or before done_ (release)
};

}  // namespace moerun
