#include "thread_pool.h"

#include <sched.h>

#include <chrono>
#include <algorithm>
#include <cstdio>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#define MOERUN_PAUSE() _mm_pause()
#else
#define MOERUN_PAUSE() std::this_thread::yield()
#endif

namespace moerun {
namespace {
bool read_int_file(const std::string& path, int* out) {
  FILE* f = std::fopen(path.c_str(), "r");
  if (!f) return false;
  const bool ok = std::fscanf(f, "%d", out) == 1;
  std::fclose(f);
  return ok;
}
}  // namespace

int physical_core_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  const int logical = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return logical;
  const int allowed = std::max(1, CPU_COUNT(&set));
  std::set<std::pair<int, int>> cores;  // (package, core id)
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &set)) continue;
    const std::string topo = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    int core = -1, pkg = -1;
    if (!read_int_file(topo + "core_id", &core) || !read_int_file(topo + "physical_package_id", &pkg))
      return allowed;  // no topology (some VMs): count the CPUs we may use
    cores.insert({pkg, core});
  }
  return cores.empty() ? allowed : std::min(allowed, static_cast<int>(cores.size()));
}

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = physical_core_count();
  num_threads = std::min(num_threads, 256);
  next_task_.reset(new std::atomic<int64_t>[max_phases_]);
  arrived_.reset(new std::atomic<int>[max_phases_]);
  for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  if (busy()) {
    try {
      wait();
    } catch (...) {
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::submit(std::vector<Phase> phases) {
  if (busy()) throw std::runtime_error("ThreadPool: a job is still running; call wait() before submitting another");
  if (phases.size() > max_phases_) throw std::invalid_argument("ThreadPool: too many phases in one job");
  {
    std::lock_guard<std::mutex> lock(mu_);
    phases_ = std::move(phases);
    for (size_t p = 0; p < max_phases_; ++p) {
      next_task_[p].store(0, std::memory_order_relaxed);
      arrived_[p].store(0, std::memory_order_relaxed);
    }
    error_ = nullptr;
    submitted_ = std::chrono::steady_clock::now();
    done_.store(false, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  work_cv_.notify_all();
}

void ThreadPool::wait() {
  // Spin a little first: a decode-step job finishes within tens of microseconds of the caller's wait.
  for (int i = 0; i < 20000 && busy(); ++i) MOERUN_PAUSE();
  if (busy()) {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return !busy(); });
  }
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void ThreadPool::worker_loop() {
  uint64_t seen = 0;
  while (true) {
    // Wait for a new job: spin ~50 µs, then sleep.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    while (generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed) &&
           std::chrono::steady_clock::now() < spin_until)
      MOERUN_PAUSE();
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
    }
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    const int workers = static_cast<int>(threads_.size());
    const size_t num_phases = phases_.size();
    for (size_t p = 0; p < num_phases; ++p) {
      const Phase& phase = phases_[p];
      for (int64_t i; (i = next_task_[p].fetch_add(1, std::memory_order_relaxed)) < phase.num_tasks;) {
        try {
          phase.run(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!error_) error_ = std::current_exception();
        }
      }
      const int arrived = arrived_[p].fetch_add(1, std::memory_order_acq_rel) + 1;
      if (p + 1 == num_phases) {
        if (arrived == workers) {
          std::lock_guard<std::mutex> lock(mu_);
          finished_ = std::chrono::steady_clock::now();
          done_.store(true, std::memory_order_release);
          done_cv_.notify_all();
        }
      } else {
        // Phase barrier: the next phase reads what this one wrote.
        while (arrived_[p].load(std::memory_order_acquire) < workers) MOERUN_PAUSE();
      }
    }
  }
}

}  // namespace moerun
