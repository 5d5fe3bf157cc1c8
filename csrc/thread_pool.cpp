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

namespace {
// Workers spin this long for the next job before sleeping: between the layers of a decode step the CPU
// experts come every few hundred microseconds, and a sleeping worker takes long to wake (longest on a VM,
// where its idle virtual CPU was descheduled).
constexpr auto kIdleSpin = std::chrono::microseconds(400);

// One step of a spin-wait: pause, and after a while give the core away, so that a task holder that
// shares it with this spinner (more runnable threads than cores) gets to finish.
inline void relax(int& spins) {
  if (++spins < 2048)
    MOERUN_PAUSE();
  else
    std::this_thread::yield();
}
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = physical_core_count();
  num_threads = std::min(num_threads, 256);
  next_task_.reset(new std::atomic<int64_t>[max_phases_]);
  finished_tasks_.reset(new std::atomic<int64_t>[max_phases_]);
  for (size_t p = 0; p < max_phases_; ++p) {
    next_task_[p].store(0, std::memory_order_relaxed);
    finished_tasks_[p].store(0, std::memory_order_relaxed);
  }
  for (int i = 1; i < num_threads; ++i) threads_.emplace_back([this] { worker_loop(); });
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
  phases.erase(std::remove_if(phases.begin(), phases.end(), [](const Phase& p) { return p.num_tasks <= 0; }),
               phases.end());
  if (phases.size() > max_phases_) throw std::invalid_argument("ThreadPool: too many phases in one job");
  // Workers still walking through the last job's (finished) phases read phases_: let them leave first.
  open_.store(false);
  for (int spins = 0; active_.load() != 0;) relax(spins);
  {
    std::lock_guard<std::mutex> lock(mu_);
    phases_ = std::move(phases);
    for (size_t p = 0; p < max_phases_; ++p) {
      next_task_[p].store(0, std::memory_order_relaxed);
      finished_tasks_[p].store(0, std::memory_order_relaxed);
    }
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    started_ = finished_ = std::chrono::steady_clock::now();
    if (!phases_.empty()) {
      done_.store(false, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  open_.store(true);
  if (!phases_.empty()) work_cv_.notify_all();
}

void ThreadPool::run_job() {
  const size_t num_phases = phases_.size();
  for (size_t p = 0; p < num_phases; ++p) {
    const Phase& phase = phases_[p];
    for (int64_t i; (i = next_task_[p].fetch_add(1, std::memory_order_relaxed)) < phase.num_tasks;) {
      if (p == 0 && i == 0) started_ = std::chrono::steady_clock::now();  // read after done_ (acquire)
      if (!failed_.load(std::memory_order_relaxed)) {  // after a failure the job only runs out its count
        try {
          phase.run(i);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!error_) error_ = std::current_exception();
          failed_.store(true, std::memory_order_relaxed);
        }
      }
      const int64_t finished = finished_tasks_[p].fetch_add(1, std::memory_order_acq_rel) + 1;
      if (finished == phase.num_tasks && p + 1 == num_phases) {
        std::lock_guard<std::mutex> lock(mu_);
        finished_ = std::chrono::steady_clock::now();
        done_.store(true, std::memory_order_release);
        done_cv_.notify_all();
      }
    }
    // Phase barrier: the next phase reads what this one wrote.
    for (int spins = 0; finished_tasks_[p].load(std::memory_order_acquire) < phase.num_tasks;) relax(spins);
  }
}

void ThreadPool::wait() {
  if (busy()) run_job();  // the caller would only wait: it takes tasks like a worker
  for (int i = 0; i < 20000 && busy(); ++i) MOERUN_PAUSE();  // the last tasks are in other threads' hands
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
    const auto spin_until = std::chrono::steady_clock::now() + kIdleSpin;
    while (generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed) &&
           std::chrono::steady_clock::now() < spin_until)
      MOERUN_PAUSE();
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
    }
    if (stop_.load()) return;
    // Enter before looking at the job (submit() clears open_, then waits for active_ to drain: one of
    // the two sees the other's store, so no worker reads phases_ while submit() replaces them).
    active_.fetch_add(1);
    if (!open_.load()) {  // a job is being submitted: look again once it is
      active_.fetch_sub(1);
      MOERUN_PAUSE();
      continue;
    }
    const uint64_t generation = generation_.load(std::memory_order_acquire);
    if (generation != seen) {
      seen = generation;
      run_job();
    }
    active_.fetch_sub(1);
  }
}

}  // namespace moerun
