#include "host_pool.h"
#include "expert_codec.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <stdexcept>

#include "cuda_check.h"
#include "policy_engine.h"

namespace moerun {
namespace {

constexpr int64_t kPinThreads = 8;  // threads that allocate, fault in and page-lock the pool's chunks
constexpr uint8_t kChunkMapped = 0, kChunkCudaHostAlloc = 1;  // how a pool chunk was allocated
constexpr int kIoThreads = 2;  // background readers: a couple of reads in flight keep an NVMe queue busy

// snprintf, not an ostringstream: on the GPU machine (extension built by /opt/gcc's g++, torch by another
// compiler) the first ostringstream the extension built, in an error message, crashed the process.
std::string gib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.3g GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

int64_t available_host_bytes() {
  const long pages = sysconf(_SC_AVPHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : -1;
}

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

policy::EngineConfig host_tier_config(int64_t num_layers, int64_t num_experts, int64_t expert_bytes,
                                      const HostTierConfig& tier) {
  if (tier.capacity <= 0)
    throw std::invalid_argument("host tier capacity must be positive, got " + std::to_string(tier.capacity));
  if (tier.eviction < 0 || tier.eviction > static_cast<int>(policy::Eviction::Watermark))
    throw std::invalid_argument("host tier eviction code " + std::to_string(tier.eviction) +
                                " is not one of lru, lfu, score, freq_threshold, watermark (belady needs the "
                                "future and runs in trace replay only)");
  policy::EngineConfig c;
  c.num_layers = static_cast<int>(num_layers);
  c.num_experts = static_cast<int>(num_experts);
  c.top_k = 1;
  c.num_slots = c.capacity = static_cast<int>(std::min(tier.capacity, num_layers * num_experts));
  c.expert_bytes = expert_bytes;
  c.eviction = static_cast<policy::Eviction>(tier.eviction);
  c.high_watermark = tier.high_watermark;
  c.low_watermark = tier.low_watermark;
  c.credit_decay = tier.credit_decay;
  return c;
}

HostPool::HostPool(int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size, DType dtype,
                   int64_t chunk_bytes, bool pinned, const HostTierConfig& tier, ExpertFormat format, bool bias)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      hidden_(hidden_size),
      inter_(inter_size),
      dtype_(dtype),
      layout_(slot_layout(dtype, std::max<int64_t>(hidden_size, 1), std::max<int64_t>(inter_size, 1), format, bias)),
      pinned_(pinned),
      files_(std::max<int64_t>(num_layers, 1), std::max<int64_t>(num_experts, 1), layout_),
      wait_timeout_s_(tier.wait_timeout_s) {
  if (num_layers <= 0 || num_experts <= 0 || hidden_size <= 0 || inter_size <= 0)
    throw std::invalid_argument("HostPool needs positive num_layers, num_experts, hidden_size, inter_size (got " +
                                std::to_string(num_layers) + ", " + std::to_string(num_experts) + ", " +
                                std::to_string(hidden_size) + ", " + std::to_string(inter_size) + ")");
  if (chunk_bytes <= 0) throw std::invalid_argument("HostPool chunk_bytes must be positive");
  const int64_t n = num_layers * num_experts;
  if (tier.capacity < 0)
    throw std::invalid_argument("HostPool capacity must be >= 0 (0 = every expert), got " +
                                std::to_string(tier.capacity));
  cached_ = tier.capacity > 0 && tier.capacity < n;
  num_slots_ = cached_ ? tier.capacity : n;
  // Before anything large is allocated (pool chunks, per-expert tables).
  const int64_t avail = available_host_bytes();
  if (avail > 0 && total_bytes() > avail)
    throw std::runtime_error("the expert pool needs " + gib(total_bytes()) + " of host memory (" +
                             std::to_string(num_slots_) + " experts x " + std::to_string(slot_bytes()) +
                             " bytes) but only " + gib(avail) + " is available; set a host budget (host_budget) below " +
                             gib(avail) + " (the pool then caches experts in front of the files) or free host memory");
  if (cached_) {
    if (!(tier.wait_timeout_s > 0)) throw std::invalid_argument("HostPool wait_timeout_s must be positive");
    tier_ = std::make_unique<policy::Engine>(host_tier_config(num_layers, num_experts, slot_bytes(), tier));
    plan_ = std::make_unique<policy::Plan>();
    loading_.assign(static_cast<size_t>(n), 0);
    queued_.assign(static_cast<size_t>(n), 0);
  }
  filled_.assign(static_cast<size_t>(n), 0);
#ifndef MOERUN_WITH_CUDA
  pinned_ = false;  // no CUDA runtime to page-lock with; plain host memory serves the CPU-only build
#endif
  experts_per_chunk_ = std::max<int64_t>(1, std::min<int64_t>(num_slots_, chunk_bytes / slot_bytes()));
  const int64_t total = total_bytes();
  const int64_t num_chunks = (num_slots_ + experts_per_chunk_ - 1) / experts_per_chunk_;
  std::vector<char*> chunks(static_cast<size_t>(num_chunks), nullptr);
  std::vector<uint8_t> chunk_alloc(static_cast<size_t>(num_chunks), kChunkMapped);
  // Chunks are anonymous mappings backed by huge pages where the kernel offers them, touched here (the
  // kernel zero-fills them as they fault in) and then page-locked with cudaHostRegister. Pinning was most
  // of a large pool's load time (the H100 machine: cudaHostAlloc took 10.7-11.0 s of a 14.4-14.7 s load for
  // 25 GB, on one thread or eight alike): cudaHostAlloc zero-fills and locks 4 KB pages one call at a
  // time, whereas faulting-in runs on every thread at once and a registered huge page is one lock.
  auto allocate = [&](int64_t c) {
    const size_t bytes = static_cast<size_t>(chunk_size(c));
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: without transparent huge pages the pool still works
#endif
    volatile char* bytes_ptr = static_cast<char*>(p);
    for (size_t off = 0; off < bytes; off += 4096) bytes_ptr[off] = 0;
#ifdef MOERUN_WITH_CUDA
    if (pinned_ && cudaHostRegister(p, bytes, cudaHostRegisterPortable) != cudaSuccess) {
      cudaGetLastError();  // clear the error state of this failed call
      munmap(p, bytes);
      // Some systems refuse to register what they would allocate pinned themselves: try that.
      void* q = nullptr;
      if (cudaHostAlloc(&q, bytes, cudaHostAllocPortable) != cudaSuccess) {
        cudaGetLastError();
        return;
      }
      chunk_alloc[static_cast<size_t>(c)] = kChunkCudaHostAlloc;
      chunks[static_cast<size_t>(c)] = static_cast<char*>(q);
      return;
    }
#endif
    chunks[static_cast<size_t>(c)] = static_cast<char*>(p);
  };
  const int64_t num_threads = std::min<int64_t>(num_chunks, kPinThreads);
  std::atomic<int64_t> next{0};
  auto worker = [&] {
    for (int64_t c; (c = next.fetch_add(1)) < num_chunks;) allocate(c);
  };
  {
    std::vector<std::thread> threads;
    for (int64_t t = 1; t < num_threads; ++t) threads.emplace_back(worker);
    worker();
    for (auto& t : threads) t.join();
  }
  int64_t done_bytes = 0, failed = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (chunks[static_cast<size_t>(c)] != nullptr) {
      done_bytes += chunk_size(c);
    } else {
      ++failed;
    }
    chunks_.push_back(chunks[static_cast<size_t>(c)]);  // in order: slot_ptr() indexes them
  }
  chunk_alloc_ = std::move(chunk_alloc);
  if (failed > 0) {
    free_chunks();
    throw std::runtime_error(std::string("could not ") + (pinned_ ? "pin " : "allocate ") + std::to_string(failed) +
                             " of " + std::to_string(num_chunks) + " chunks of host memory for the expert pool (" +
                             gib(done_bytes) + " of " + gib(total) +
                             " succeeded). Set a host budget (host_budget) of at most " + gib(done_bytes) +
                             " (the pool then caches experts in front of the files), use smaller chunks, or "
                             "free host memory / raise the locked-memory limit (ulimit -l)");
  }
  // Zero the padding tail of every slot so kernels reading whole slots see zeros (slot_layout.h).
  const int64_t pad_bytes = layout_.slot_bytes - slot_used_bytes(layout_);
  if (pad_bytes > 0)
    for (int64_t s = 0; s < num_slots_; ++s)
      std::memset(slot_ptr(s) + slot_bytes() - pad_bytes, 0, static_cast<size_t>(pad_bytes));
}

HostPool::~HostPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    io_stop_ = true;
  }
  io_cv_.notify_all();
  cv_.notify_all();  // a background read waiting for a slot gives up
  for (auto& t : io_threads_) t.join();
  free_chunks();
}

int64_t HostPool::chunk_size(int64_t c) const {
  return std::min(experts_per_chunk_, num_slots_ - c * experts_per_chunk_) * slot_bytes();
}

void HostPool::free_chunks() {
  for (size_t c = 0; c < chunks_.size(); ++c) {
    char* p = chunks_[c];
    if (p == nullptr) continue;  // a chunk whose allocation failed
#ifdef MOERUN_WITH_CUDA
    if (chunk_alloc_[c] == kChunkCudaHostAlloc) {
      cudaFreeHost(p);
      continue;
    }
    if (pinned_) cudaHostUnregister(p);
#endif
    munmap(p, static_cast<size_t>(chunk_size(static_cast<int64_t>(c))));
  }
  chunks_.clear();
}

void HostPool::check_expert(int64_t layer, int64_t expert) const {
  if (layer < 0 || layer >= num_layers_ || expert < 0 || expert >= num_experts_)
    throw std::out_of_range("(layer " + std::to_string(layer) + ", expert " + std::to_string(expert) +
                            ") is outside the pool's [0, " + std::to_string(num_layers_) + ") x [0, " +
                            std::to_string(num_experts_) + ")");
}

char* HostPool::slot_ptr(int64_t slot) const {
  return chunks_[static_cast<size_t>(slot / experts_per_chunk_)] + (slot % experts_per_chunk_) * slot_bytes();
}

int64_t HostPool::host_slot(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  if (!cached_) return layer * num_experts_ + expert;
  std::lock_guard<std::mutex> lock(mu_);
  return tier_->lookup(static_cast<int>(layer), static_cast<int>(expert));
}

void* HostPool::expert_ptr(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  const int64_t key = layer * num_experts_ + expert;
  if (!cached_) return slot_ptr(key);
  std::lock_guard<std::mutex> lock(mu_);
  const int slot = tier_->lookup(static_cast<int>(layer), static_cast<int>(expert));
  if (slot < 0 || !filled_[static_cast<size_t>(key)])
    throw std::runtime_error("(layer " + std::to_string(layer) + ", expert " + std::to_string(expert) +
                             ") is not in the host cache (capacity " + std::to_string(num_slots_) +
                             " experts); acquire() reads it from its files");
  return slot_ptr(slot);
}

bool HostPool::filled(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t key = layer * num_experts_ + expert;
  if (cached_ && tier_->lookup(static_cast<int>(layer), static_cast<int>(expert)) < 0) return false;
  return filled_[static_cast<size_t>(key)] != 0;
}

int64_t HostPool::filled_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(std::count(filled_.begin(), filled_.end(), 1));
}

void HostPool::write_expert(int64_t layer, int64_t expert, const void* gate, const void* up, const void* down,
                            DType src_dtype, const ExpertBiases& biases) {
  check_expert(layer, expert);
  if (cached_)
    throw std::runtime_error("write_expert fills a pool that holds every expert; this pool caches " +
                             std::to_string(num_slots_) + " experts and reads them from the files given to fill()");
  char* dst = slot_ptr(layer * num_experts_ + expert);
  encode_expert(layout_, gate, up, down, src_dtype, dst, {}, biases);
  filled_[static_cast<size_t>(layer * num_experts_ + expert)] = 1;
}

int64_t HostPool::read_into(int64_t layer, int64_t expert, int64_t slot) {
  const double t0 = now_us();
  const int64_t bytes = files_.read(layer, expert, slot_ptr(slot));
  const double dt = now_us() - t0;
  std::lock_guard<std::mutex> lock(mu_);
  stats_.disk_bytes += bytes;
  stats_.disk_time_us += dt;
  return bytes;
}

void HostPool::fill(const std::vector<ExpertSource>& sources, int num_threads) {
  files_.add(sources);  // validates every tensor before reading weight bytes
  if (cached_) return;  // a cache reads on demand
  if (num_threads <= 0) num_threads = static_cast<int>(std::min<unsigned>(16, std::max(1u, std::thread::hardware_concurrency())));
  num_threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(num_threads), std::max<size_t>(1, sources.size())));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::string first_error;
  auto worker = [&]() {
    try {
      while (!failed.load(std::memory_order_relaxed)) {
        const size_t i = next.fetch_add(1);
        if (i >= sources.size()) break;
        const auto& s = sources[i];
        const int64_t key = s.layer * num_experts_ + s.expert;
        read_into(s.layer, s.expert, key);
        std::lock_guard<std::mutex> lock(mu_);
        filled_[static_cast<size_t>(key)] = 1;
      }
    } catch (const std::exception& ex) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (!failed.exchange(true)) first_error = ex.what();
    }
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < num_threads; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
  if (failed) throw std::runtime_error(first_error);
}

const void* HostPool::acquire(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  const int64_t key = layer * num_experts_ + expert;
  if (!cached_) {
    full_hits_.fetch_add(1, std::memory_order_relaxed);
    return slot_ptr(key);
  }
  const size_t k = static_cast<size_t>(key);
  const int32_t id = static_cast<int32_t>(expert);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(wait_timeout_s_);
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    // One tier step: a hit refreshes the expert's place in the eviction order; a miss gets a slot
    // (free, or the policy's victim among the experts nobody holds), or none when every slot is held.
    // Held first, so the step's own watermark evictions cannot pick the expert it just placed.
    tier_->hold(static_cast<int>(key));
    tier_->step(static_cast<int>(layer), &id, nullptr, 1, *plan_);
    for (size_t i = 0; i < plan_->releases.size(); i += 3) {  // watermark evictions ahead of need
      filled_[static_cast<size_t>(plan_->releases[i + 1] * num_experts_ + plan_->releases[i + 2])] = 0;
      ++stats_.evictions;
    }
    int64_t slot = -1;
    if (!plan_->hits.empty()) {
      slot = plan_->hits[1];
    } else if (!plan_->fetches.empty()) {
      slot = plan_->fetches[1];
      if (plan_->fetches[2] >= 0) {
        filled_[static_cast<size_t>(plan_->fetches[2] * num_experts_ + plan_->fetches[3])] = 0;
        ++stats_.evictions;
      }
    }
    if (slot >= 0) {
      while (loading_[k]) cv_.wait(lock);  // another thread is reading it: its bytes come with that read
      if (filled_[k]) {
        ++stats_.hits;
        return slot_ptr(slot);
      }
      ++stats_.misses;
      loading_[k] = 1;
      lock.unlock();
      try {
        read_into(layer, expert, slot);
      } catch (...) {
        lock.lock();
        loading_[k] = 0;
        tier_->unhold(static_cast<int>(key));
        cv_.notify_all();
        throw;
      }
      lock.lock();
      loading_[k] = 0;
      filled_[k] = 1;
      cv_.notify_all();
      return slot_ptr(slot);
    }
    // Every slot holds an expert in use (copies in flight, a CPU job): wait for a release.
    tier_->unhold(static_cast<int>(key));
    ++stats_.slot_waits;
    if (io_stop_) throw std::runtime_error("host pool is shutting down");
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout)
      throw std::runtime_error("host cache: no slot for (layer " + std::to_string(layer) + ", expert " +
                               std::to_string(expert) + ") after " + std::to_string(wait_timeout_s_) +
                               " s: all " + std::to_string(num_slots_) +
                               " host slots hold experts in use by copies or CPU jobs. Raise host_budget "
                               "(or the policy's host capacity) above the experts one layer step uses at once");
  }
}

void HostPool::release(int64_t layer, int64_t expert) {
  if (!cached_) return;
  check_expert(layer, expert);
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int key = static_cast<int>(layer * num_experts_ + expert);
    if (tier_->held(key) <= 0)
      throw std::logic_error("HostPool.release of (layer " + std::to_string(layer) + ", expert " +
                             std::to_string(expert) + ") without a matching acquire");
    tier_->unhold(key);
  }
  cv_.notify_all();
}

const void* HostPool::try_acquire(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  const int64_t key = layer * num_experts_ + expert;
  if (!cached_) return acquire(layer, expert);
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int slot = tier_->lookup(static_cast<int>(layer), static_cast<int>(expert));
    if (slot >= 0 && filled_[static_cast<size_t>(key)] && !loading_[static_cast<size_t>(key)]) {
      tier_->hold(static_cast<int>(key));
      return slot_ptr(slot);
    }
    if (slot >= 0 && loading_[static_cast<size_t>(key)]) return nullptr;  // its read is under way
  }
  prefetch(layer, expert);
  return nullptr;
}

void HostPool::prefetch(int64_t layer, int64_t expert) {
  check_expert(layer, expert);
  if (!cached_) return;
  const size_t k = static_cast<size_t>(layer * num_experts_ + expert);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (queued_[k] || loading_[k]) return;
    if (filled_[k] && tier_->lookup(static_cast<int>(layer), static_cast<int>(expert)) >= 0) return;
    queued_[k] = 1;
    io_queue_.push_back(static_cast<int64_t>(k));
    if (io_threads_.empty())
      for (int t = 0; t < kIoThreads; ++t) io_threads_.emplace_back([this] { io_loop(); });
  }
  io_cv_.notify_one();
}

void HostPool::io_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    io_cv_.wait(lock, [&] { return io_stop_ || !io_queue_.empty(); });
    if (io_stop_) return;
    const int64_t key = io_queue_.front();
    io_queue_.pop_front();
    queued_[static_cast<size_t>(key)] = 0;
    ++stats_.prefetch_reads;
    lock.unlock();
    try {
      // Read and let go: the expert stays in host memory until the policy evicts it; a copy that
      // wants it later acquires it again (and reads again if it was evicted meanwhile).
      acquire(key / num_experts_, key % num_experts_);
      release(key / num_experts_, key % num_experts_);
    } catch (const std::exception&) {
      // A failed background read is retried, and reported, by the demand acquire that needs it.
    }
    lock.lock();
  }
}

HostStats HostPool::stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  HostStats s = stats_;
  s.hits += full_hits_.load(std::memory_order_relaxed);
  return s;
}

void HostPool::reset_stats() {
  std::lock_guard<std::mutex> lock(mu_);
  stats_ = HostStats{};
  full_hits_.store(0);
}

}  // namespace moerun
