// ExpertFiles: where each routed expert's tensors lie in the safetensors files, validated once (presence,
// shape, dtype, byte size), and the one reader that turns an expert on disk into its slot (slot_layout.h).
// The host pool uses it both to fill every expert at load time and, as a cache, to read a missing expert
// on demand. What the files hold (the source encoding) and what the slot holds (the pool's expert format)
// meet here:
//   float source  -> float slot:  pread, dtype converted on the fly through a small bounce buffer;
//   float source  -> quantized:   the expert read in its dtype, then encoded (expert_codec.h): quantize at load;
//   fp8-block128  -> fp8-block128: weights and scales pread straight into place (DeepSeek-V3 / Qwen3 FP8);
//   gptq          -> int4-gG:     qweight / qzeros / scales repacked into the slot's int4 layout (GPTQ with
//                                 desc_act false; v1 checkpoints store zero points minus one);
//   gpt-oss-mxfp4 -> mxfp4:       expert e's slice of the stacked `*_blocks` / `*_scales` tensors copied into
//                                 place, gate_up's interleaved rows (gate 2i, up 2i + 1) split into gate rows
//                                 then up rows, the biases converted to the model dtype;
//   gpt-oss-float -> any format:  expert e's slice of the stacked gate_up_proj [H, 2I] (x @ W, gate and up
//                                 interleaved along 2I) and down_proj [I, H] transposed to rows of outputs and
//                                 de-interleaved, then converted or encoded as a float source is;
//   packed        -> float:       read into a slot of its own format as above, then decoded (expert_codec.h's
//                                 decode_rows) and stored in the slot's dtype, only where that is exact:
//                                 gpt-oss-mxfp4 into fp32 or bf16, gptq / gptq-v2 into fp32, fp8-block128 with
//                                 BF16 scales into fp32 (check_encoding_fits, add() say why not elsewhere).
// Both gpt-oss encodings are row permutations and a transpose of what the checkpoint holds: exact in every
// format. A pre-quantized source is expanded to floats in host memory only when the pool's format is float.
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

// How an expert's tensors are encoded on disk, and the tensors each encoding names, in order:
//   per projection (gate, up, down in that order), out x in:
//     float: weight; fp8-block128: weight (F8_E4M3), weight_scale_inv (F32 or BF16);
//     gptq / gptq-v2: qweight (I32 [in / 8, out]), qzeros (I32 [in / G, out / 8]), scales (F16 [in / G, out]);
//   stacked over the layer's E experts (gpt-oss; the source's expert index picks the slice):
//     gpt-oss-mxfp4: gate_up_proj_blocks (U8 [E, 2I, H / 32, 16]), gate_up_proj_scales (U8 [E, 2I, H / 32]),
//                    gate_up_proj_bias [E, 2I], down_proj_blocks (U8 [E, H, I / 32, 16]),
//                    down_proj_scales (U8 [E, H, I / 32]), down_proj_bias [E, H]  (biases F32/BF16/F16);
//     gpt-oss-float: gate_up_proj [E, H, 2I], gate_up_proj_bias [E, 2I], down_proj [E, I, H],
//                    down_proj_bias [E, H]  (F32/BF16/F16).
enum class SourceEncoding : int32_t { Float = 0, Fp8Block = 1, Gptq = 2, GptqV2 = 3, GptOssMxfp4 = 4, GptOssFloat = 5 };
// "float", "fp8-block128", "gptq", "gptq-v2", "gpt-oss-mxfp4", "gpt-oss-float"
SourceEncoding parse_source_encoding(const std::string& name);
int tensors_per_source(SourceEncoding e);  // tensors one expert's source names

struct TensorRef {
  std::string file, tensor;  // a safetensors file and a tensor name inside it
};

// Where one expert's tensors live on disk: tensors_per_source(encoding) refs in the encoding's order.
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
  // encoding the slot's format cannot take (fp8 into int4, say), or biases the slot layout does not hold (or
  // lacks), is refused here, naming both.
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
    ExpertFormat format;      // the packed format the source holds (float sources: the float format)
    std::vector<Part> parts;  // empty until added
  };
  int fd(const std::string& path);
  void read_part(const Part& part, void* dst);
  const SafetensorsHeader& header(const std::string& file);  // read once, then cached
  int32_t gptq_group(const ExpertSource& s);  // GPTQ's group size, read from the gate scales' header
  int64_t read_float(const Expert& e, char* dst);
  // A packed source into a slot of its own format `l` (the pool's, or a scratch one that read_decoded decodes).
  int64_t read_packed(const Expert& e, const SlotLayout& l, char* dst);
  int64_t read_decoded(const Expert& e, char* dst);
  int64_t read_fp8_block(const Expert& e, const SlotLayout& l, char* dst);
  int64_t read_gptq(const Expert& e, const SlotLayout& l, char* dst);
  int64_t read_gpt_oss_mxfp4(const Expert& e, const SlotLayout& l, char* dst);
  int64_t read_gpt_oss_float(const Expert& e, char* dst);
  int64_t read_biases(const Part& gate_up, const Part& down, const SlotLayout& l, std::vector<float>& out);

  int64_t num_layers_, num_experts_;
  SlotLayout layout_;
  std::vector<Expert> experts_;  // [L * E], allocated by the first add()
  std::unordered_map<std::string, SafetensorsHeader> headers_;
  std::mutex fd_mu_;
  std::unordered_map<std::string, int> fds_;
};

}  // namespace moerun
