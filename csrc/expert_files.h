// ExpertFiles: where each routed expert's tensors lie in the safetensors files, validated once (presence,
// shape, dtype, byte size), and the one reader that turns an expert on disk into its slot (slot_layout.h).
// The host pool uses it both to fill every expert at load time and, as a cache, to read a missing expert
// on demand. What the files hold (the source encoding) and what the slot holds (the pool's expert format)
// meet here:
//   float source  -> float slot:  pread, dtype converted on the fly through a small bounce buffer;
//   float source  -> quantized:   the expert read in its dtype, then encoded (expert_codec.h): quantize at load;
//   fp8-block128  -> fp8-block128: weights and scales pread straight into place (DeepSeek-V3 / Qwen3 FP8);
//   gptq          -> int4-gG:     qweight / qzeros / scales repacked into the slot's int4 layout (GPTQ with
//                                 desc_act false; v1 checkpoints store zero points minus one).
// A pre-quantized source is never expanded to floats in host memory.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "dtype.h"
#include "safetensors.h"
#include "slot_layout.h"

namespace moerun {

// How an expert's tensors are encoded on disk, and the tensors each encoding names per projection (gate, up,
// down, in that order): float: weight; fp8-block128: weight (F8_E4M3), weight_scale_inv (F32 or BF16);
// gptq / gptq-v2: qweight (I32 [in / 8, out]), qzeros (I32 [in / G, out / 8]), scales (F16 [in / G, out]).
enum class SourceEncoding : int32_t { Float = 0, Fp8Block = 1, Gptq = 2, GptqV2 = 3 };
SourceEncoding parse_source_encoding(const std::string& name);  // "float", "fp8-block128", "gptq", "gptq-v2"
int tensors_per_projection(SourceEncoding e);

struct TensorRef {
  std::string file, tensor;  // a safetensors file and a tensor name inside it
};

// Where one expert's tensors live on disk: tensors_per_projection(encoding) refs for gate, then up, then down.
// Shapes (out x in): gate, up [I, H]; down [H, I].
struct ExpertSource {
  int64_t layer = 0;
  int64_t expert = 0;
  SourceEncoding encoding = SourceEncoding::Float;
  std::vector<TensorRef> tensors;
};

class ExpertFiles {
 public:
  // layout: the slot every expert is read into (the pool's format and dtype).
  ExpertFiles(int64_t num_layers, int64_t num_experts, const SlotLayout& layout);
  ~ExpertFiles();
  ExpertFiles(const ExpertFiles&) = delete;
  ExpertFiles& operator=(const ExpertFiles&) = delete;

  // Validates every source (file headers read once) before recording any: a bad checkpoint fails
  // fast, naming file and tensor. A later source for the same expert replaces the earlier one. A source
  // encoding the slot's format cannot take (fp8 into int4, say) is refused here, naming both.
  void add(const std::vector<ExpertSource>& sources);
  bool has(int64_t layer, int64_t expert) const;
  // Reads the expert into dst (one slot of the layout, every byte written); returns bytes read from disk.
  // Thread-safe: file descriptors are shared (pread), bounce buffers are per thread.
  int64_t read(int64_t layer, int64_t expert, void* dst);

 private:
  struct Part {
    std::string file;
    int64_t offset = 0, bytes = 0;
    std::string dtype;  // as the file writes it ("BF16", "F8_E4M3", "I32", ...)
  };
  struct Expert {
    SourceEncoding encoding = SourceEncoding::Float;
    std::vector<Part> parts;  // empty until added
  };
  int fd(const std::string& path);
  void read_part(const Part& part, void* dst);
  int64_t read_float(const Expert& e, char* dst);
  int64_t read_fp8_block(const Expert& e, char* dst);
  int64_t read_gptq(const Expert& e, char* dst);

  int64_t num_layers_, num_experts_;
  SlotLayout layout_;
  std::vector<Expert> experts_;  // [L * E], allocated by the first add()
  std::unordered_map<std::string, SafetensorsHeader> headers_;
  std::mutex fd_mu_;
  std::unordered_map<std::string, int> fds_;
};

}  // namespace moerun
