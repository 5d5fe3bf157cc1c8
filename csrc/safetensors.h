// Reader of safetensors file headers: where each tensor's bytes lie in the file, its dtype and shape.
// It reads only the JSON header; tensor bytes are read by the caller (pread into pinned memory).
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace moerun {

struct SafetensorsEntry {
  std::string dtype;           // as written in the file: "BF16", "F16", "F32", ...
  std::vector<int64_t> shape;
  int64_t offset_bytes = 0;    // absolute offset of the first byte in the file
  int64_t size_bytes = 0;
};

struct SafetensorsHeader {
  std::string path;
  std::unordered_map<std::string, SafetensorsEntry> tensors;

  // Parses the header of `path`; throws std::runtime_error naming the file on any malformed input.
  static SafetensorsHeader read(const std::string& path);
  const SafetensorsEntry* find(const std::string& name) const;
};

}  // namespace moerun
