#include "host_pool.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unordered_map>

#include "cuda_check.h"
#include "safetensors.h"

namespace moerun {
namespace {

std::string gib(int64_t bytes) {
  std::ostringstream os;
  os.precision(3);
  os << static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0) << " GiB";
  return os.str();
}

int64_t available_host_bytes() {
  const long pages = sysconf(_SC_AVPHYS_PAGES);
  const long page = sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : -1;
}

bool dtype_from_safetensors(const std::string& s, DType* out) {
  if (s == "F32") *out = DType::F32;
  else if (s == "BF16") *out = DType::BF16;
  else if (s == "F16") *out = DType::F16;
  else return false;
  return true;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// Reads exactly n bytes at offset, retrying short reads.
void pread_all(int fd, void* dst, int64_t n, int64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)), offset);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      throw std::runtime_error("reading " + path + " failed at byte " + std::to_string(offset) + ": " +
                               (got == 0 ? std::string("unexpected end of file") : std::strerror(errno)));
    p += got;
    n -= got;
    offset += got;
  }
}

const char* kPartNames[3] = {"gate_proj", "up_proj", "down_proj"};

}  // namespace

HostPool::HostPool(int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size, DType dtype,
                   int64_t chunk_bytes, bool pinned)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      hidden_(hidden_size),
      inter_(inter_size),
      slot_elems_(slot_elems_for(hidden_size, inter_size)),
      dtype_(dtype),
      pinned_(pinned),
      filled_(static_cast<size_t>(std::max<int64_t>(num_layers * num_experts, 0)), 0) {
  if (num_layers <= 0 || num_experts <= 0 || hidden_size <= 0 || inter_size <= 0)
    throw std::invalid_argument("HostPool needs positive num_layers, num_experts, hidden_size, inter_size (got " +
                                std::to_string(num_layers) + ", " + std::to_string(num_experts) + ", " +
                                std::to_string(hidden_size) + ", " + std::to_string(inter_size) + ")");
  if (chunk_bytes <= 0) throw std::invalid_argument("HostPool chunk_bytes must be positive");
#ifndef MOERUN_WITH_CUDA
  pinned_ = false;  // no CUDA runtime to page-lock with; plain host memory serves the CPU-only build
#endif
  const int64_t n = num_layers * num_experts;
  experts_per_chunk_ = std::max<int64_t>(1, std::min<int64_t>(n, chunk_bytes / slot_bytes()));
  const int64_t total = total_bytes();
  const int64_t avail = available_host_bytes();
  if (avail > 0 && total > avail)
    throw std::runtime_error("the expert pool needs " + gib(total) + " of host memory (" + std::to_string(n) +
                             " experts x " + std::to_string(slot_bytes()) + " bytes) but only " + gib(avail) +
                             " is available; set a host budget (host_budget) below " + gib(avail) +
                             " or free host memory");
  const int64_t num_chunks = (n + experts_per_chunk_ - 1) / experts_per_chunk_;
  int64_t done_bytes = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t experts = std::min(experts_per_chunk_, n - c * experts_per_chunk_);
    const int64_t bytes = experts * slot_bytes();
    void* p = nullptr;
    bool ok;
#ifdef MOERUN_WITH_CUDA
    if (pinned_) {
      ok = cudaHostAlloc(&p, static_cast<size_t>(bytes), cudaHostAllocPortable) == cudaSuccess;
      if (!ok) cudaGetLastError();  // clear the sticky-free error state of this failed call
    } else {
      ok = posix_memalign(&p, 4096, static_cast<size_t>(bytes)) == 0;
    }
#else
    ok = posix_memalign(&p, 4096, static_cast<size_t>(bytes)) == 0;
#endif
    if (!ok) {
      free_chunks();
      throw std::runtime_error(std::string("could not ") + (pinned_ ? "pin " : "allocate ") + gib(bytes) +
                               " of host memory for the expert pool (chunk " + std::to_string(c + 1) + " of " +
                               std::to_string(num_chunks) + "; " + gib(done_bytes) + " of " + gib(total) +
                               " succeeded). Set a host budget (host_budget) of at most " + gib(done_bytes) +
                               ", use smaller chunks, or free host memory / raise the locked-memory limit (ulimit -l)");
    }
    chunks_.push_back(static_cast<char*>(p));
    done_bytes += bytes;
  }
  // Zero the padding tail of every slot so kernels reading whole slots see zeros (slot layout contract).
  const int64_t pad_bytes = (slot_elems_ - 3 * hidden_ * inter_) * dtype_bytes(dtype_);
  if (pad_bytes > 0)
    for (int64_t l = 0; l < num_layers_; ++l)
      for (int64_t e = 0; e < num_experts_; ++e)
        std::memset(static_cast<char*>(expert_ptr(l, e)) + slot_bytes() - pad_bytes, 0, static_cast<size_t>(pad_bytes));
}

HostPool::~HostPool() { free_chunks(); }

void HostPool::free_chunks() {
  for (char* p : chunks_) {
#ifdef MOERUN_WITH_CUDA
    if (pinned_) {
      cudaFreeHost(p);
      continue;
    }
#endif
    std::free(p);
  }
  chunks_.clear();
}

void HostPool::check_expert(int64_t layer, int64_t expert) const {
  if (layer < 0 || layer >= num_layers_ || expert < 0 || expert >= num_experts_)
    throw std::out_of_range("(layer " + std::to_string(layer) + ", expert " + std::to_string(expert) +
                            ") is outside the pool's [0, " + std::to_string(num_layers_) + ") x [0, " +
                            std::to_string(num_experts_) + ")");
}

void* HostPool::expert_ptr(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  const int64_t i = layer * num_experts_ + expert;
  return chunks_[static_cast<size_t>(i / experts_per_chunk_)] + (i % experts_per_chunk_) * slot_bytes();
}

bool HostPool::filled(int64_t layer, int64_t expert) const {
  check_expert(layer, expert);
  return filled_[static_cast<size_t>(layer * num_experts_ + expert)] != 0;
}

int64_t HostPool::filled_count() const {
  return static_cast<int64_t>(std::count(filled_.begin(), filled_.end(), 1));
}

void HostPool::write_expert(int64_t layer, int64_t expert, const void* gate, const void* up, const void* down,
                            DType src_dtype) {
  char* dst = static_cast<char*>(expert_ptr(layer, expert));
  const int64_t n = hidden_ * inter_;
  const int64_t b = dtype_bytes(dtype_);
  convert_elems(gate, src_dtype, dst, dtype_, n);
  convert_elems(up, src_dtype, dst + n * b, dtype_, n);
  convert_elems(down, src_dtype, dst + 2 * n * b, dtype_, n);
  filled_[static_cast<size_t>(layer * num_experts_ + expert)] = 1;
}

void HostPool::fill(const std::vector<ExpertSource>& sources, int num_threads) {
  // 1. Headers of every file, once.
  std::map<std::string, SafetensorsHeader> headers;
  for (const auto& s : sources) {
    check_expert(s.layer, s.expert);
    for (const auto& f : s.file)
      if (!headers.count(f)) headers.emplace(f, SafetensorsHeader::read(f));
  }
  // 2. Validate every tensor before reading weight bytes: a bad checkpoint fails fast, naming file + tensor.
  struct Part {
    const SafetensorsEntry* entry;
    DType dtype;
  };
  std::vector<Part> parts(sources.size() * 3);
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    for (int p = 0; p < 3; ++p) {
      const auto& h = headers.at(s.file[p]);
      const SafetensorsEntry* e = h.find(s.tensor[p]);
      const std::string where = "tensor '" + s.tensor[p] + "' in " + s.file[p] + " (layer " +
                                std::to_string(s.layer) + ", expert " + std::to_string(s.expert) + ", " +
                                kPartNames[p] + ")";
      if (!e) throw std::runtime_error("missing " + where + "; check the checkpoint's key names");
      DType dt;
      if (!dtype_from_safetensors(e->dtype, &dt))
        throw std::runtime_error(where + " has dtype " + e->dtype + "; expert weights must be F32, BF16 or F16");
      const std::vector<int64_t> want = p < 2 ? std::vector<int64_t>{inter_, hidden_}
                                              : std::vector<int64_t>{hidden_, inter_};
      if (e->shape != want)
        throw std::runtime_error(where + " has shape " + shape_str(e->shape) + ", expected " + shape_str(want) +
                                 " (hidden_size " + std::to_string(hidden_) + ", intermediate size " +
                                 std::to_string(inter_) + ")");
      if (e->size_bytes != hidden_ * inter_ * dtype_bytes(dt))
        throw std::runtime_error(where + " holds " + std::to_string(e->size_bytes) + " bytes, not " +
                                 std::to_string(hidden_ * inter_ * dtype_bytes(dt)) + " as its shape and dtype say");
      parts[i * 3 + p] = {e, dt};
    }
  }
  // 3. Read in parallel: each thread takes whole experts and keeps its own file descriptors.
  if (num_threads <= 0) num_threads = static_cast<int>(std::min<unsigned>(16, std::max(1u, std::thread::hardware_concurrency())));
  num_threads = static_cast<int>(std::min<size_t>(static_cast<size_t>(num_threads), std::max<size_t>(1, sources.size())));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mu;
  std::string first_error;
  const int64_t part_elems = hidden_ * inter_;
  const int64_t b = dtype_bytes(dtype_);
  auto worker = [&]() {
    std::unordered_map<std::string, int> fds;
    std::vector<char> bounce;
    try {
      while (!failed.load(std::memory_order_relaxed)) {
        const size_t i = next.fetch_add(1);
        if (i >= sources.size()) break;
        const auto& s = sources[i];
        char* dst = static_cast<char*>(expert_ptr(s.layer, s.expert));
        for (int p = 0; p < 3; ++p) {
          int& fd = fds[s.file[p]];
          if (fd == 0) {
            fd = ::open(s.file[p].c_str(), O_RDONLY | O_CLOEXEC);
            if (fd < 0) throw std::runtime_error("cannot open " + s.file[p] + ": " + std::strerror(errno));
          }
          const Part& part = parts[i * 3 + p];
          char* out = dst + p * part_elems * b;
          if (part.dtype == dtype_) {
            pread_all(fd, out, part.entry->size_bytes, part.entry->offset_bytes, s.file[p]);
          } else {
            // Convert through a small bounce buffer so no whole tensor is ever held twice.
            const int64_t src_b = dtype_bytes(part.dtype);
            const int64_t block_elems = (8 << 20) / src_b;
            bounce.resize(static_cast<size_t>(block_elems * src_b));
            for (int64_t e0 = 0; e0 < part_elems; e0 += block_elems) {
              const int64_t n = std::min(block_elems, part_elems - e0);
              pread_all(fd, bounce.data(), n * src_b, part.entry->offset_bytes + e0 * src_b, s.file[p]);
              convert_elems(bounce.data(), part.dtype, out + e0 * b, dtype_, n);
            }
          }
        }
        filled_[static_cast<size_t>(s.layer * num_experts_ + s.expert)] = 1;
      }
    } catch (const std::exception& ex) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (!failed.exchange(true)) first_error = ex.what();
    }
    for (auto& kv : fds)
      if (kv.second > 0) ::close(kv.second);
  };
  std::vector<std::thread> threads;
  for (int t = 1; t < num_threads; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
  if (failed) throw std::runtime_error(first_error);
}

}  // namespace moerun
