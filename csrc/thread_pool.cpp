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
// Workers spin this long for the next job before sleeping. In a decode step CPU experts come every
// layer or few (0.3-2 ms apart), and a sleeping worker is slow to wake: on the H100 machine (a VM, whose
// idle virtual CPUs the host deschedules) workers spinning only 400 us missed most jobs, the caller ran
// them alone at a tenth of the pool's rate, and the cost model learned that CPU experts cost ~2 ms.
// Spinning yields the core now and then, so it costs nothing another thread wants.
constexpr auto kIdleSpin = std::chrono::milliseconds(5);

// One step of a spin-wait: pause, and after a while give the core away, so that a task holder that
// shares it with this spinner (more runnable threads than cores) gets to finish.
inline void relax(int& spins) {
  if (++spins < 2048)
    MOERUN_PAUSE();
  else
    std::this_thread::yield();
}
}  // namespace

ThreadPool::Job::Job(std::vector<Phase> p)
    : phases(std::move(p)),
      next_task(new std::atomic<int64_t>[phases.size()]),
      finished_tasks(new std::atomic<int64_t>[phases.size()]) {
  for (size_t i = 0; i < phases.size(); ++i) {
    next_task[i].store(0, std::memory_order_relaxed);
    finished_tasks[i].store(0, std::memory_order_relaxed);
  }
}

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = physical_core_count();
  num_threads = std::min(num_threads, 256);
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
  auto job = std::make_shared<Job>(std::move(phases));
  const bool empty = job->phases.empty();
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = std::move(job);
    error_ = nullptr;
    failed_.store(false, std::memory_order_relaxed);
    started_ = finished_ = std::chrono::steady_clock::now();
    if (!empty) {
      done_.store(false, std::memory_order_release);
      generation_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  if (!empty) work_cv_.notify_all();
}

void ThreadPool::run_job(Job& job) {
  const size_t num_phases = job.phases.size();
  for (size_t p = 0; p < num_phases; ++p) {
    const Phase& phase = job.phases[p];
    for (int64_t i; (i = job.next_task[p].fetch_add(1, std::memory_order_relaxed)) < phase.num_tasks;) {
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
      const int64_t finished = job.finished_tasks[p].fetch_add(1, std::memory_order_acq_rel) + 1;
      if (finished == phase.num_tasks && p + 1 == num_phases) {
        std::lock_guard<std::mutex> lock(mu_);
        finished_ = std::chrono::steady_clock::now();
        done_.store(true, std::memory_order_release);
        done_cv_.notify_all();
      }
    }
    // Phase barrier: the next phase reads what this one wrote.
    for (int spins = 0; job.finished_tasks[p].load(std::memory_order_acquire) < phase.num_tasks;) relax(spins);
  }
}

void ThreadPool::wait() {
  if (busy()) {  // the caller would only wait: it takes tasks like a worker
    std::shared_ptr<Job> job;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job = job_;
    }
    if (job) run_job(*job);
  }
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
    for (int spins = 0; generation_.load(std::memory_order_acquire) == seen && !stop_.load(std::memory_order_relaxed) &&
                        std::chrono::steady_clock::now() < spin_until;)
      if (++spins % 256 == 0)
        std::this_thread::yield();
      else
        MOERUN_PAUSE();
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      if (stop_.load()) return;
      seen = generation_.load();
      job = job_;
    }
    run_job(*job);  // a job already done by others costs one pass over its spent counters
  }
}

}  // namespace moerun
