#include "expert_files.h"
#include "slot_layout.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace moerun {
namespace {

const char* kPartNames[3] = {"gate_proj", "up_proj", "down_proj"};

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

}  // namespace

ExpertFiles::ExpertFiles(int64_t num_layers, int64_t num_experts, int64_t hidden_size, int64_t inter_size,
                         DType dtype)
    : num_layers_(num_layers), num_experts_(num_experts), hidden_(hidden_size), inter_(inter_size), dtype_(dtype) {}

ExpertFiles::~ExpertFiles() {
  for (auto& kv : fds_) ::close(kv.second);
}

void ExpertFiles::add(const std::vector<ExpertSource>& sources) {
  std::vector<std::pair<size_t, Part>> staged;
  staged.reserve(sources.size() * 3);
  for (const auto& s : sources) {
    if (s.layer < 0 || s.layer >= num_layers_ || s.expert < 0 || s.expert >= num_experts_)
      throw std::out_of_range("(layer " + std::to_string(s.layer) + ", expert " + std::to_string(s.expert) +
                              ") is outside the pool's [0, " + std::to_string(num_layers_) + ") x [0, " +
                              std::to_string(num_experts_) + ")");
    for (int p = 0; p < 3; ++p) {
      auto it = headers_.find(s.file[p]);
      if (it == headers_.end()) it = headers_.emplace(s.file[p], SafetensorsHeader::read(s.file[p])).first;
      const SafetensorsEntry* e = it->second.find(s.tensor[p]);
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
      staged.emplace_back(static_cast<size_t>((s.layer * num_experts_ + s.expert) * 3 + p),
                          Part{s.file[p], e->offset_bytes, e->size_bytes, dt});
    }
  }
  if (parts_.empty()) parts_.resize(static_cast<size_t>(num_layers_ * num_experts_ * 3));  // on first use
  for (auto& kv : staged) parts_[kv.first] = std::move(kv.second);
}

bool ExpertFiles::has(int64_t layer, int64_t expert) const {
  return !parts_.empty() && parts_[static_cast<size_t>((layer * num_experts_ + expert) * 3)].bytes > 0;
}

int ExpertFiles::fd(const std::string& path) {
  std::lock_guard<std::mutex> lock(fd_mu_);
  auto it = fds_.find(path);
  if (it != fds_.end()) return it->second;
  const int f = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  fds_.emplace(path, f);
  return f;
}

int64_t ExpertFiles::read(int64_t layer, int64_t expert, void* dst) {
  if (!has(layer, expert))
    throw std::runtime_error("no safetensors source was given for (layer " + std::to_string(layer) + ", expert " +
                             std::to_string(expert) + "); pass it to HostPool.fill first");
  const int64_t part_elems = hidden_ * inter_;  // gate, up, down: [I, H], [I, H], [H, I]
  const int64_t b = dtype_bytes(dtype_);
  const SlotLayout layout = slot_layout(dtype_, hidden_, inter_);
  const int64_t part_offset[3] = {layout.gate_up_offset, layout.gate_up_offset + layout.gate_up_bytes / 2,
                                  layout.down_offset};
  int64_t total = 0;
  thread_local std::vector<char> bounce;
  for (int p = 0; p < 3; ++p) {
    const Part& part = parts_[static_cast<size_t>((layer * num_experts_ + expert) * 3 + p)];
    const int f = fd(part.file);
    char* out = static_cast<char*>(dst) + part_offset[p];
    if (part.dtype == dtype_) {
      pread_all(f, out, part.bytes, part.offset, part.file);
    } else {
      // Convert through a small bounce buffer so no whole tensor is ever held twice.
      const int64_t src_b = dtype_bytes(part.dtype);
      const int64_t block_elems = (8 << 20) / src_b;
      bounce.resize(static_cast<size_t>(block_elems * src_b));
      for (int64_t e0 = 0; e0 < part_elems; e0 += block_elems) {
        const int64_t n = std::min(block_elems, part_elems - e0);
        pread_all(f, bounce.data(), n * src_b, part.offset + e0 * src_b, part.file);
        convert_elems(bounce.data(), part.dtype, out + e0 * b, dtype_, n);
      }
    }
    total += part.bytes;
  }
  return total;
}

}  // namespace moerun
