// ExpertFiles: where each routed expert's three matrices lie in the safetensors files, validated once
// (presence, shape, dtype, byte size), and the one reader that copies an expert from disk into the
// slot layout (pread, dtype converted on the fly through a small bounce buffer). The host pool uses it
// both to fill every expert at load time and, as a cache, to read a missing expert on demand.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dtype.h"
#include "safetensors.h"

namespace moerun {

// Where one expert's three matrices live on disk. Shapes expected: gate, up [I, H]; down [H, I].
struct ExpertSource {
  int64_t layer = 0;
  int64_t expert = 0;
  std::string file[3];    // gate, up, down
  std::string tensor[3];  // tensor names inside those files
};

class ExpertFiles {
 public:
  ExpertFiles(int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size, DType dtype);
  ~ExpertFiles();
  ExpertFiles(const ExpertFiles&) = delete;
  ExpertFiles& operator=(const ExpertFiles&) = delete;

  // Validates every source (file headers read once) before recording any: a bad checkpoint fails
  // fast, naming file and tensor. A later source for the same expert replaces the earlier one.
  void add(const std::vector<ExpertSource>& sources);
  bool has(int64_t layer, int64_t expert) const;
  // Reads the expert's gate, up, down into dst (slot layout, the pool dtype); returns bytes read from
  // disk. Thread-safe: file descriptors are shared (pread), bounce buffers are per thread.
  int64_t read(int64_t layer, int64_t expert, void* dst);

 private:
  struct Part {
    std::string file;
    int64_t offset = 0, bytes = 0;
    DType dtype = DType::F32;
  };
  int fd(const std::string& path);

  int64_t num_layers_, num_experts_, hidden_, inter_;
  DType dtype_;
  std::vector<Part> parts_;  // [L * E * 3], allocated by the first add(); bytes == 0 until added
  std::unordered_map<std::string, SafetensorsHeader> headers_;
  std::mutex fd_mu_;
  std::unordered_map<std::string, int> fds_;
};

}  // namespace moerun
