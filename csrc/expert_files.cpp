#include "expert_files.h"
#include "expert_codec.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace moerun {
namespace {

const char* kProjNames[3] = {"gate_proj", "up_proj", "down_proj"};

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

// What one tensor of a projection must be: its dtypes (safetensors names) and shape.
struct Expect {
  const char* role;
  std::vector<std::string> dtypes;
  std::vector<int64_t> shape;
};

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? " or " : "") + v[i];
  return s;
}

int64_t safetensors_bytes(const std::string& dtype) {
  if (dtype == "F32" || dtype == "I32") return 4;
  if (dtype == "BF16" || dtype == "F16") return 2;
  return 1;  // F8_E4M3, U8, I8
}

}  // namespace

SourceEncoding parse_source_encoding(const std::string& name) {
  if (name == "float") return SourceEncoding::Float;
  if (name == "fp8-block128") return SourceEncoding::Fp8Block;
  if (name == "gptq") return SourceEncoding::Gptq;
  if (name == "gptq-v2") return SourceEncoding::GptqV2;
  throw std::invalid_argument("unknown source encoding '" + name + "': float, fp8-block128, gptq or gptq-v2");
}

int tensors_per_projection(SourceEncoding e) {
  switch (e) {
    case SourceEncoding::Float: return 1;
    case SourceEncoding::Fp8Block: return 2;
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: return 3;
  }
  return 0;
}

namespace {

const char* encoding_name(SourceEncoding e) {
  switch (e) {
    case SourceEncoding::Float: return "float";
    case SourceEncoding::Fp8Block: return "fp8-block128";
    case SourceEncoding::Gptq: return "gptq";
    case SourceEncoding::GptqV2: return "gptq-v2";
  }
  return "?";
}

// The tensors one projection of `rows` outputs x `cols` inputs must have in encoding `e` for a slot of `f`.
std::vector<Expect> expected(SourceEncoding e, const ExpertFormat& f, int64_t rows, int64_t cols) {
  switch (e) {
    case SourceEncoding::Float: return {{"weight", {"F32", "BF16", "F16"}, {rows, cols}}};
    case SourceEncoding::Fp8Block:
      return {{"weight", {"F8_E4M3"}, {rows, cols}},
              {"weight_scale_inv", {"F32", "BF16"}, {ceil_div(rows, f.group), ceil_div(cols, f.group)}}};
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2:
      return {{"qweight", {"I32"}, {cols / 8, rows}},
              {"qzeros", {"I32"}, {cols / f.group, rows / 8}},
              {"scales", {"F16"}, {cols / f.group, rows}}};
  }
  return {};
}

// Which slot formats a source encoding can fill exactly.
void check_encoding_fits(SourceEncoding e, const ExpertFormat& f, int64_t hidden, int64_t inter) {
  bool ok = false;
  switch (e) {
    case SourceEncoding::Float: ok = true; break;  // the float format, or quantized at load
    case SourceEncoding::Fp8Block: ok = f.kind == FormatKind::Fp8Block; break;
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: ok = f.kind == FormatKind::Int4Group; break;
  }
  if (!ok)
    throw std::invalid_argument(std::string("experts stored as ") + encoding_name(e) + " cannot fill slots of format " +
                                expert_format_name(f) + " exactly; load them in their own format (expert_format='auto')");
  if ((e == SourceEncoding::Gptq || e == SourceEncoding::GptqV2) && (hidden % 8 != 0 || inter % 8 != 0))
    throw std::invalid_argument("GPTQ experts pack 8 values per int32: hidden_size (" + std::to_string(hidden) +
                                ") and the expert intermediate size (" + std::to_string(inter) +
                                ") must be multiples of 8");
}

}  // namespace

ExpertFiles::ExpertFiles(int64_t num_layers, int64_t num_experts, const SlotLayout& layout)
    : num_layers_(num_layers), num_experts_(num_experts), layout_(layout) {}

ExpertFiles::~ExpertFiles() {
  for (auto& kv : fds_) ::close(kv.second);
}

void ExpertFiles::add(const std::vector<ExpertSource>& sources) {
  const int64_t H = layout_.hidden_size, I = layout_.inter_size;
  std::vector<std::pair<size_t, Expert>> staged;
  staged.reserve(sources.size());
  for (const auto& s : sources) {
    if (s.layer < 0 || s.layer >= num_layers_ || s.expert < 0 || s.expert >= num_experts_)
      throw std::out_of_range("(layer " + std::to_string(s.layer) + ", expert " + std::to_string(s.expert) +
                              ") is outside the pool's [0, " + std::to_string(num_layers_) + ") x [0, " +
                              std::to_string(num_experts_) + ")");
    check_encoding_fits(s.encoding, layout_.format, H, I);
    const int per = tensors_per_projection(s.encoding);
    if (static_cast<int>(s.tensors.size()) != 3 * per)
      throw std::invalid_argument(std::string("a ") + encoding_name(s.encoding) + " expert source names " +
                                  std::to_string(3 * per) + " tensors (" + std::to_string(per) +
                                  " per projection), got " + std::to_string(s.tensors.size()));
    Expert ex;
    ex.encoding = s.encoding;
    for (int proj = 0; proj < 3; ++proj) {
      const int64_t rows = proj < 2 ? I : H, cols = proj < 2 ? H : I;
      const std::vector<Expect> want = expected(s.encoding, layout_.format, rows, cols);
      for (int t = 0; t < per; ++t) {
        const TensorRef& ref = s.tensors[static_cast<size_t>(proj * per + t)];
        auto it = headers_.find(ref.file);
        if (it == headers_.end()) it = headers_.emplace(ref.file, SafetensorsHeader::read(ref.file)).first;
        const SafetensorsEntry* e = it->second.find(ref.tensor);
        const Expect& w = want[static_cast<size_t>(t)];
        const std::string where = "tensor '" + ref.tensor + "' in " + ref.file + " (layer " + std::to_string(s.layer) +
                                  ", expert " + std::to_string(s.expert) + ", " + kProjNames[proj] + " " + w.role + ")";
        if (!e) throw std::runtime_error("missing " + where + "; check the checkpoint's key names");
        if (std::find(w.dtypes.begin(), w.dtypes.end(), e->dtype) == w.dtypes.end())
          throw std::runtime_error(where + " has dtype " + e->dtype + "; " + encoding_name(s.encoding) +
                                   " experts need " + join(w.dtypes));
        if (e->shape != w.shape)
          throw std::runtime_error(where + " has shape " + shape_str(e->shape) + ", expected " + shape_str(w.shape) +
                                   " (hidden_size " + std::to_string(H) + ", intermediate size " + std::to_string(I) +
                                   (layout_.format.group ? ", group " + std::to_string(layout_.format.group) : "") + ")");
        int64_t elems = 1;
        for (int64_t d : w.shape) elems *= d;
        if (e->size_bytes != elems * safetensors_bytes(e->dtype))
          throw std::runtime_error(where + " holds " + std::to_string(e->size_bytes) + " bytes, not " +
                                   std::to_string(elems * safetensors_bytes(e->dtype)) + " as its shape and dtype say");
        ex.parts.push_back(Part{ref.file, e->offset_bytes, e->size_bytes, e->dtype});
      }
    }
    staged.emplace_back(static_cast<size_t>(s.layer * num_experts_ + s.expert), std::move(ex));
  }
  if (experts_.empty()) experts_.resize(static_cast<size_t>(num_layers_ * num_experts_));  // on first use
  for (auto& kv : staged) experts_[kv.first] = std::move(kv.second);
}

bool ExpertFiles::has(int64_t layer, int64_t expert) const {
  return !experts_.empty() && !experts_[static_cast<size_t>(layer * num_experts_ + expert)].parts.empty();
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

void ExpertFiles::read_part(const Part& part, void* dst) { pread_all(fd(part.file), dst, part.bytes, part.offset, part.file); }

int64_t ExpertFiles::read(int64_t layer, int64_t expert, void* dst) {
  if (!has(layer, expert))
    throw std::runtime_error("no safetensors source was given for (layer " + std::to_string(layer) + ", expert " +
                             std::to_string(expert) + "); pass it to HostPool.fill first");
  const Expert& e = experts_[static_cast<size_t>(layer * num_experts_ + expert)];
  char* out = static_cast<char*>(dst);
  switch (e.encoding) {
    case SourceEncoding::Float: return read_float(e, out);
    case SourceEncoding::Fp8Block: return read_fp8_block(e, out);
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: return read_gptq(e, out);
  }
  return 0;
}

int64_t ExpertFiles::read_float(const Expert& e, char* dst) {
  const int64_t H = layout_.hidden_size, I = layout_.inter_size, part_elems = H * I;
  int64_t total = 0;
  if (layout_.format.quantized()) {
    // Quantize at load: the expert in its file dtype (converted to fp32 where its parts disagree), then encoded.
    thread_local std::vector<char> src;
    DType dt;
    bool same = true;
    dtype_from_safetensors(e.parts[0].dtype, &dt);
    for (const Part& p : e.parts) same = same && p.dtype == e.parts[0].dtype;
    if (!same) dt = DType::F32;
    const int64_t b = dtype_bytes(dt);
    src.resize(static_cast<size_t>(3 * part_elems * b));
    thread_local std::vector<char> raw;
    for (int p = 0; p < 3; ++p) {
      const Part& part = e.parts[static_cast<size_t>(p)];
      char* at = src.data() + p * part_elems * b;
      DType pdt;
      dtype_from_safetensors(part.dtype, &pdt);
      if (pdt == dt) {
        read_part(part, at);
      } else {
        raw.resize(static_cast<size_t>(part.bytes));
        read_part(part, raw.data());
        convert_elems(raw.data(), pdt, at, dt, part_elems);
      }
      total += part.bytes;
    }
    encode_expert(layout_, src.data(), src.data() + part_elems * b, src.data() + 2 * part_elems * b, dt, dst);
    return total;
  }
  const int64_t b = dtype_bytes(layout_.dtype);
  const int64_t part_offset[3] = {layout_.gate_up_offset, layout_.gate_up_offset + layout_.gate_up_bytes / 2,
                                  layout_.down_offset};
  thread_local std::vector<char> bounce;
  for (int p = 0; p < 3; ++p) {
    const Part& part = e.parts[static_cast<size_t>(p)];
    char* out = dst + part_offset[p];
    DType pdt;
    dtype_from_safetensors(part.dtype, &pdt);
    if (pdt == layout_.dtype) {
      read_part(part, out);
    } else {
      // Convert through a small bounce buffer so no whole tensor is ever held twice.
      const int f = fd(part.file);
      const int64_t src_b = dtype_bytes(pdt);
      const int64_t block_elems = (8 << 20) / src_b;
      bounce.resize(static_cast<size_t>(block_elems * src_b));
      for (int64_t e0 = 0; e0 < part_elems; e0 += block_elems) {
        const int64_t n = std::min(block_elems, part_elems - e0);
        pread_all(f, bounce.data(), n * src_b, part.offset + e0 * src_b, part.file);
        convert_elems(bounce.data(), pdt, out + e0 * b, layout_.dtype, n);
      }
    }
    total += part.bytes;
  }
  return total;
}

int64_t ExpertFiles::read_fp8_block(const Expert& e, char* dst) {
  // The slot's fp8-block128 layout is the checkpoint's, part by part: gate rows then up rows, gate's scale
  // grid then up's, then down's weights and grid (expert_format.h).
  const int64_t H = layout_.hidden_size, I = layout_.inter_size;
  char* weights[3] = {dst + layout_.gate_up_offset, dst + layout_.gate_up_offset + I * H, dst + layout_.down_offset};
  const int64_t gate_grid = layout_.gate_up_scales_bytes / 2;
  char* scales[3] = {dst + layout_.gate_up_scales_offset, dst + layout_.gate_up_scales_offset + gate_grid,
                     dst + layout_.down_scales_offset};
  int64_t total = 0;
  thread_local std::vector<char> raw;
  for (int p = 0; p < 3; ++p) {
    const Part& w = e.parts[static_cast<size_t>(2 * p)];
    const Part& s = e.parts[static_cast<size_t>(2 * p + 1)];
    read_part(w, weights[p]);
    if (s.dtype == "F32") {
      read_part(s, scales[p]);
    } else {  // BF16 scales widen to fp32 exactly
      raw.resize(static_cast<size_t>(s.bytes));
      read_part(s, raw.data());
      convert_elems(raw.data(), DType::BF16, scales[p], DType::F32, s.bytes / 2);
    }
    total += w.bytes + s.bytes;
  }
  return total;
}

int64_t ExpertFiles::read_gptq(const Expert& e, char* dst) {
  // GPTQ stores W^T packed along the input dimension: qweight[c / 8, o] holds inputs c..c+7 of output o in
  // 4-bit fields (lowest first); qzeros[g, o / 8] the zero points of outputs o..o+7 (v1: minus one); scales
  // [g, o] fp16. The slot wants rows = outputs, two inputs per byte (even input in the low nibble).
  const int64_t H = layout_.hidden_size, I = layout_.inter_size, G = layout_.format.group;
  const int zero_offset = e.encoding == SourceEncoding::Gptq ? 1 : 0;
  int64_t total = 0;
  thread_local std::vector<char> qw, qz, sc;
  for (int p = 0; p < 3; ++p) {
    const int64_t rows = p < 2 ? I : H, cols = p < 2 ? H : I, groups = cols / G;
    const bool down = p == 2;
    const int64_t row0 = p == 1 ? I : 0;  // up rows follow gate rows in gate_up
    uint8_t* wq = reinterpret_cast<uint8_t*>(dst + (down ? layout_.down_offset : layout_.gate_up_offset)) + row0 * cols / 2;
    float* ws = reinterpret_cast<float*>(dst + (down ? layout_.down_scales_offset : layout_.gate_up_scales_offset)) + row0 * groups;
    uint8_t* wz = reinterpret_cast<uint8_t*>(dst + (down ? layout_.down_zeros_offset : layout_.gate_up_zeros_offset)) + row0 * groups;
    const Part& pw = e.parts[static_cast<size_t>(3 * p)];
    const Part& pz = e.parts[static_cast<size_t>(3 * p + 1)];
    const Part& ps = e.parts[static_cast<size_t>(3 * p + 2)];
    qw.resize(static_cast<size_t>(pw.bytes));
    qz.resize(static_cast<size_t>(pz.bytes));
    sc.resize(static_cast<size_t>(ps.bytes));
    read_part(pw, qw.data());
    read_part(pz, qz.data());
    read_part(ps, sc.data());
    const uint32_t* q = reinterpret_cast<const uint32_t*>(qw.data());   // [cols / 8, rows]
    const uint32_t* z = reinterpret_cast<const uint32_t*>(qz.data());   // [groups, rows / 8]
    const uint16_t* s = reinterpret_cast<const uint16_t*>(sc.data());   // [groups, rows]
    for (int64_t o = 0; o < rows; ++o) {
      uint8_t* row = wq + o * cols / 2;
      for (int64_t c8 = 0; c8 < cols / 8; ++c8) {
        const uint32_t word = q[c8 * rows + o];
        // Eight 4-bit inputs, lowest first: bytes of the slot row take them in pairs, already in order.
        row[4 * c8 + 0] = static_cast<uint8_t>(word & 0xff);
        row[4 * c8 + 1] = static_cast<uint8_t>((word >> 8) & 0xff);
        row[4 * c8 + 2] = static_cast<uint8_t>((word >> 16) & 0xff);
        row[4 * c8 + 3] = static_cast<uint8_t>((word >> 24) & 0xff);
      }
      for (int64_t g = 0; g < groups; ++g) {
        ws[o * groups + g] = f16_to_f32(s[g * rows + o]);
        wz[o * groups + g] = static_cast<uint8_t>(((z[g * (rows / 8) + o / 8] >> (4 * (o % 8))) & 0xf) + zero_offset);
      }
    }
    total += pw.bytes + pz.bytes + ps.bytes;
  }
  return total;
}

}  // namespace moerun
