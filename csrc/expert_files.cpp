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
  std::string role;
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
  if (name == "gpt-oss-mxfp4") return SourceEncoding::GptOssMxfp4;
  if (name == "gpt-oss-float") return SourceEncoding::GptOssFloat;
  throw std::invalid_argument("unknown source encoding '" + name +
                              "': float, fp8-block128, gptq, gptq-v2, gpt-oss-mxfp4 or gpt-oss-float");
}

int tensors_per_source(SourceEncoding e) {
  switch (e) {
    case SourceEncoding::Float: return 3;
    case SourceEncoding::Fp8Block: return 6;
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: return 9;
    case SourceEncoding::GptOssMxfp4: return 6;
    case SourceEncoding::GptOssFloat: return 4;
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
    case SourceEncoding::GptOssMxfp4: return "gpt-oss-mxfp4";
    case SourceEncoding::GptOssFloat: return "gpt-oss-float";
  }
  return "?";
}

bool stacked(SourceEncoding e) { return e == SourceEncoding::GptOssMxfp4 || e == SourceEncoding::GptOssFloat; }

const std::vector<std::string> kFloatDtypes = {"F32", "BF16", "F16"};

// The tensors one expert's source names in encoding `e` for a slot of `f`, in order. Stacked encodings'
// shapes lead with the layer's E experts.
std::vector<Expect> expected(SourceEncoding e, const ExpertFormat& f, int64_t H, int64_t I, int64_t E) {
  std::vector<Expect> out;
  switch (e) {
    case SourceEncoding::GptOssMxfp4:
      return {{"gate_up_proj_blocks", {"U8"}, {E, 2 * I, H / 32, 16}},
              {"gate_up_proj_scales", {"U8"}, {E, 2 * I, H / 32}},
              {"gate_up_proj_bias", kFloatDtypes, {E, 2 * I}},
              {"down_proj_blocks", {"U8"}, {E, H, I / 32, 16}},
              {"down_proj_scales", {"U8"}, {E, H, I / 32}},
              {"down_proj_bias", kFloatDtypes, {E, H}}};
    case SourceEncoding::GptOssFloat:
      return {{"gate_up_proj", kFloatDtypes, {E, H, 2 * I}},
              {"gate_up_proj_bias", kFloatDtypes, {E, 2 * I}},
              {"down_proj", kFloatDtypes, {E, I, H}},
              {"down_proj_bias", kFloatDtypes, {E, H}}};
    default: break;
  }
  for (int proj = 0; proj < 3; ++proj) {
    const int64_t rows = proj < 2 ? I : H, cols = proj < 2 ? H : I;
    const std::string p = std::string(kProjNames[proj]) + " ";
    switch (e) {
      case SourceEncoding::Float: out.push_back({p + "weight", kFloatDtypes, {rows, cols}}); break;
      case SourceEncoding::Fp8Block:
        out.push_back({p + "weight", {"F8_E4M3"}, {rows, cols}});
        out.push_back({p + "weight_scale_inv", {"F32", "BF16"}, {ceil_div(rows, f.group), ceil_div(cols, f.group)}});
        break;
      case SourceEncoding::Gptq:
      case SourceEncoding::GptqV2:
        out.push_back({p + "qweight", {"I32"}, {cols / 8, rows}});
        out.push_back({p + "qzeros", {"I32"}, {cols / f.group, rows / 8}});
        out.push_back({p + "scales", {"F16"}, {cols / f.group, rows}});
        break;
      default: break;
    }
  }
  return out;
}

// The packed format a source encoding holds its experts in (float sources: none, the float format). GPTQ's
// group is the checkpoint's: `group` (the pool's own when its slots are int4, else read from the headers).
ExpertFormat packed_format(SourceEncoding e, int32_t group) {
  switch (e) {
    case SourceEncoding::Fp8Block: return parse_expert_format("fp8-block128");
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: return ExpertFormat{FormatKind::Int4Group, group};
    case SourceEncoding::GptOssMxfp4: return parse_expert_format("mxfp4");
    default: return ExpertFormat{};
  }
}

// A packed source decodes into float slots exactly where every weight its format decodes to (one fp32
// multiply, expert_format.h) is the checkpoint's value and the slot's dtype holds it:
//   mxfp4:        an e2m1 value (2 significant bits) times 2^k: fp32 and bf16 (fp32's exponent range), not fp16;
//   gptq:         (q - zero) (5 bits) times an fp16 scale (11): up to 16 significant bits, fp32 only;
//   fp8-block128: e4m3 (4 bits) times a BF16 scale (8): up to 12, fp32 only; an F32 scale (24) needs up to 28,
//                 which fp32 rounds (checked per source in add(), where the scale's dtype is known).
// Returns why not ("" where exact).
std::string float_decode_refusal(SourceEncoding e, DType dtype) {
  switch (e) {
    case SourceEncoding::GptOssMxfp4:
      return dtype == DType::F16 ? "an e2m1 value times an e8m0 scale (2^-127..2^127) can fall outside fp16's range" : "";
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2:
      return dtype == DType::F32 ? "" : "(q - zero) times an fp16 scale needs up to 16 significant bits; only fp32 holds them";
    case SourceEncoding::Fp8Block:
      return dtype == DType::F32 ? "" : "e4m3 times a BF16 scale needs up to 12 significant bits; only fp32 holds them";
    default: return "";
  }
}

// Which slot layouts a source encoding can fill exactly.
void check_encoding_fits(SourceEncoding e, const SlotLayout& layout) {
  const ExpertFormat& f = layout.format;
  const int64_t hidden = layout.hidden_size, inter = layout.inter_size;
  bool ok = false;
  switch (e) {
    case SourceEncoding::Float:
    case SourceEncoding::GptOssFloat: ok = true; break;  // the float format, or quantized at load
    case SourceEncoding::Fp8Block: ok = f.kind == FormatKind::Fp8Block; break;
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: ok = f.kind == FormatKind::Int4Group; break;
    case SourceEncoding::GptOssMxfp4: ok = f.kind == FormatKind::Mxfp4; break;
  }
  if (!ok && !f.quantized()) {
    const std::string why = float_decode_refusal(e, layout.dtype);
    if (!why.empty())
      throw std::invalid_argument(std::string("experts stored as ") + encoding_name(e) + " cannot be decoded into " +
                                  dtype_name(layout.dtype) + " slots exactly (" + why +
                                  "); load them in their own format (expert_format='auto')");
    ok = true;
  }
  if (!ok)
    throw std::invalid_argument(std::string("experts stored as ") + encoding_name(e) + " cannot fill slots of format " +
                                expert_format_name(f) + " exactly; load them in their own format (expert_format='auto')");
  if ((e == SourceEncoding::Gptq || e == SourceEncoding::GptqV2) && (hidden % 8 != 0 || inter % 8 != 0))
    throw std::invalid_argument("GPTQ experts pack 8 values per int32: hidden_size (" + std::to_string(hidden) +
                                ") and the expert intermediate size (" + std::to_string(inter) +
                                ") must be multiples of 8");
  if (e == SourceEncoding::GptOssMxfp4 && (hidden % 32 != 0 || inter % 32 != 0))
    throw std::invalid_argument("MXFP4 experts hold blocks of 32 inputs: hidden_size (" + std::to_string(hidden) +
                                ") and the expert intermediate size (" + std::to_string(inter) +
                                ") must be multiples of 32");
  if (stacked(e) != layout.has_bias)
    throw std::invalid_argument(stacked(e) ? std::string(encoding_name(e)) + " experts carry biases, which this "
                                                 "pool's slots do not hold: make the pool with bias=True"
                                           : std::string("this pool's slots hold expert biases, which ") +
                                                 encoding_name(e) + " sources do not carry");
}

// dst[r * cols + c] = src[c * src_cols + first + stride * r] for r < rows, c < cols: dst's rows are every
// stride-th column of src from `first` (gpt-oss's [H, 2I] gate_up: gate columns 0, 2, ..., up columns 1, 3,
// ...), in tiles so both sides stay in cache.
template <typename T>
void gather_columns(const T* src, int64_t src_cols, int64_t first, int64_t stride, int64_t rows, int64_t cols,
                    T* dst) {
  constexpr int64_t kTile = 32;
  for (int64_t c0 = 0; c0 < cols; c0 += kTile)
    for (int64_t r0 = 0; r0 < rows; r0 += kTile) {
      const int64_t c1 = std::min(cols, c0 + kTile), r1 = std::min(rows, r0 + kTile);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) dst[r * cols + c] = src[c * src_cols + first + stride * r];
    }
}

void gather_columns_bytes(const char* src, int64_t elem_bytes, int64_t src_cols, int64_t first, int64_t stride,
                          int64_t rows, int64_t cols, char* dst) {
  if (elem_bytes == 4)
    gather_columns(reinterpret_cast<const uint32_t*>(src), src_cols, first, stride, rows, cols,
                   reinterpret_cast<uint32_t*>(dst));
  else
    gather_columns(reinterpret_cast<const uint16_t*>(src), src_cols, first, stride, rows, cols,
                   reinterpret_cast<uint16_t*>(dst));
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
    check_encoding_fits(s.encoding, layout_);
    if (static_cast<int>(s.tensors.size()) != tensors_per_source(s.encoding))
      throw std::invalid_argument(std::string("a ") + encoding_name(s.encoding) + " expert source names " +
                                  std::to_string(tensors_per_source(s.encoding)) + " tensors, got " +
                                  std::to_string(s.tensors.size()));
    Expert ex;
    ex.encoding = s.encoding;
    ex.format = layout_.format.quantized() ? layout_.format : packed_format(s.encoding, gptq_group(s));
    const std::vector<Expect> want = expected(s.encoding, ex.format, H, I, num_experts_);
    for (size_t t = 0; t < want.size(); ++t) {
      const TensorRef& ref = s.tensors[t];
      const Expect& w = want[t];
      const SafetensorsEntry* e = header(ref.file).find(ref.tensor);
      const std::string where = "tensor '" + ref.tensor + "' in " + ref.file + " (layer " + std::to_string(s.layer) +
                                ", expert " + std::to_string(s.expert) + ", " + w.role + ")";
      if (!e) throw std::runtime_error("missing " + where + "; check the checkpoint's key names");
      if (std::find(w.dtypes.begin(), w.dtypes.end(), e->dtype) == w.dtypes.end())
        throw std::runtime_error(where + " has dtype " + e->dtype + "; " + encoding_name(s.encoding) +
                                 " experts need " + join(w.dtypes));
      if (e->shape != w.shape)
        throw std::runtime_error(where + " has shape " + shape_str(e->shape) + ", expected " + shape_str(w.shape) +
                                 " (" + (stacked(s.encoding) ? std::to_string(num_experts_) + " experts, " : "") +
                                 "hidden_size " + std::to_string(H) + ", intermediate size " + std::to_string(I) +
                                 (layout_.format.group ? ", group " + std::to_string(layout_.format.group) : "") + ")");
      int64_t elems = 1;
      for (int64_t d : w.shape) elems *= d;
      if (e->size_bytes != elems * safetensors_bytes(e->dtype))
        throw std::runtime_error(where + " holds " + std::to_string(e->size_bytes) + " bytes, not " +
                                 std::to_string(elems * safetensors_bytes(e->dtype)) + " as its shape and dtype say");
      // A stacked tensor's part is this expert's slice of it.
      const int64_t slice = stacked(s.encoding) ? e->size_bytes / num_experts_ : e->size_bytes;
      const int64_t at = stacked(s.encoding) ? s.expert * slice : 0;
      ex.parts.push_back(Part{ref.file, e->offset_bytes + at, slice, e->dtype});
    }
    if (s.encoding == SourceEncoding::Fp8Block && !layout_.format.quantized())
      for (size_t t = 1; t < want.size(); t += 2)
        if (ex.parts[t].dtype != "BF16")
          throw std::invalid_argument("tensor '" + s.tensors[t].tensor + "' in " + s.tensors[t].file + " is " +
                                      ex.parts[t].dtype + ": e4m3 times an F32 scale needs up to 28 significant "
                                      "bits, which fp32 rounds, so fp8-block128 experts decode into float slots "
                                      "exactly only with BF16 scales; load them in their own format "
                                      "(expert_format='auto')");
    if (s.encoding == SourceEncoding::GptOssFloat && ex.parts[0].dtype != ex.parts[2].dtype)
      throw std::runtime_error("gate_up_proj ('" + s.tensors[0].tensor + "') is " + ex.parts[0].dtype +
                               " but down_proj ('" + s.tensors[2].tensor + "') is " + ex.parts[2].dtype +
                               "; gpt-oss experts are read with one weight dtype");
    staged.emplace_back(static_cast<size_t>(s.layer * num_experts_ + s.expert), std::move(ex));
  }
  if (experts_.empty()) experts_.resize(static_cast<size_t>(num_layers_ * num_experts_));  // on first use
  for (auto& kv : staged) experts_[kv.first] = std::move(kv.second);
}

const SafetensorsHeader& ExpertFiles::header(const std::string& file) {
  auto it = headers_.find(file);
  if (it == headers_.end()) it = headers_.emplace(file, SafetensorsHeader::read(file)).first;
  return it->second;
}

int32_t ExpertFiles::gptq_group(const ExpertSource& s) {
  // scales [in / G, out] of the gate projection (in = hidden_size). A tensor that is missing or of another
  // rank is left to add()'s checks, which then name it (with the largest group, 128).
  if (s.encoding != SourceEncoding::Gptq && s.encoding != SourceEncoding::GptqV2) return 0;
  const SafetensorsEntry* scales = header(s.tensors[2].file).find(s.tensors[2].tensor);
  const int64_t H = layout_.hidden_size;
  if (!scales || scales->shape.size() != 2 || scales->shape[0] <= 0) return 128;
  const int64_t groups = scales->shape[0];
  const std::string name = "int4-g" + std::to_string(H / groups);
  if (H % groups != 0 || std::none_of(std::begin(kExpertFormats), std::end(kExpertFormats),
                                      [&](const NamedFormat& f) { return name == f.name; }))
    throw std::invalid_argument("tensor '" + s.tensors[2].tensor + "' in " + s.tensors[2].file + " has " +
                                std::to_string(groups) + " groups over hidden_size " + std::to_string(H) +
                                "; moerun reads GPTQ groups of 32, 64 or 128 inputs");
  const ExpertFormat f = parse_expert_format(name);
  check_format_shape(f, H, layout_.inter_size);
  return f.group;
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
    case SourceEncoding::GptOssFloat: return read_gpt_oss_float(e, out);
    default: return layout_.format.quantized() ? read_packed(e, layout_, out) : read_decoded(e, out);
  }
}

int64_t ExpertFiles::read_packed(const Expert& e, const SlotLayout& l, char* dst) {
  switch (e.encoding) {
    case SourceEncoding::Fp8Block: return read_fp8_block(e, l, dst);
    case SourceEncoding::Gptq:
    case SourceEncoding::GptqV2: return read_gptq(e, l, dst);
    case SourceEncoding::GptOssMxfp4: return read_gpt_oss_mxfp4(e, l, dst);
    default: throw std::logic_error("read_packed: a float source");
  }
}

int64_t ExpertFiles::read_decoded(const Expert& e, char* dst) {
  // The packed slot the pool would hold in the source's own format, then its weights decoded (the kernels'
  // decode, one fp32 multiply) in bands of rows and stored in the slot's dtype; check_encoding_fits and add()
  // admitted only sources for which that store is exact. Biases are in the model dtype in both slots.
  const SlotLayout packed = slot_layout(layout_.dtype, layout_.hidden_size, layout_.inter_size, e.format,
                                        layout_.has_bias);
  thread_local std::vector<char> scratch;
  thread_local std::vector<float> band;
  scratch.resize(static_cast<size_t>(packed.slot_bytes));
  const int64_t total = read_packed(e, packed, scratch.data());
  constexpr int64_t kBandRows = 64;
  const int64_t b = dtype_bytes(layout_.dtype);
  const SlotMatrix mats[2] = {slot_gate_up(packed, scratch.data()), slot_down(packed, scratch.data())};
  const int64_t offsets[2] = {layout_.gate_up_offset, layout_.down_offset};
  for (int mi = 0; mi < 2; ++mi) {
    const SlotMatrix& m = mats[mi];
    band.resize(static_cast<size_t>(kBandRows * m.cols));
    for (int64_t r0 = 0; r0 < m.rows; r0 += kBandRows) {
      const int64_t r1 = std::min(m.rows, r0 + kBandRows);
      decode_rows(m, r0, r1, band.data());
      convert_elems(band.data(), DType::F32, dst + offsets[mi] + r0 * m.cols * b, layout_.dtype, (r1 - r0) * m.cols);
    }
  }
  if (layout_.has_bias) {
    std::memcpy(dst + layout_.gate_up_bias_offset, scratch.data() + packed.gate_up_bias_offset,
                static_cast<size_t>(layout_.gate_up_bias_bytes));
    std::memcpy(dst + layout_.down_bias_offset, scratch.data() + packed.down_bias_offset,
                static_cast<size_t>(layout_.down_bias_bytes));
  }
  zero_slot_gaps(layout_, dst);
  return total;
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

int64_t ExpertFiles::read_fp8_block(const Expert& e, const SlotLayout& l, char* dst) {
  // The slot's fp8-block128 layout is the checkpoint's, part by part: gate rows then up rows, gate's scale
  // grid then up's, then down's weights and grid (expert_format.h).
  const int64_t H = l.hidden_size, I = l.inter_size;
  char* weights[3] = {dst + l.gate_up_offset, dst + l.gate_up_offset + I * H, dst + l.down_offset};
  const int64_t gate_grid = l.gate_up_scales_bytes / 2;
  char* scales[3] = {dst + l.gate_up_scales_offset, dst + l.gate_up_scales_offset + gate_grid,
                     dst + l.down_scales_offset};
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

int64_t ExpertFiles::read_gptq(const Expert& e, const SlotLayout& l, char* dst) {
  // GPTQ stores W^T packed along the input dimension: qweight[c / 8, o] holds inputs c..c+7 of output o in
  // 4-bit fields (lowest first); qzeros[g, o / 8] the zero points of outputs o..o+7 (v1: minus one); scales
  // [g, o] fp16. The slot wants rows = outputs, two inputs per byte (even input in the low nibble).
  const int64_t H = l.hidden_size, I = l.inter_size, G = l.format.group;
  const int zero_offset = e.encoding == SourceEncoding::Gptq ? 1 : 0;
  int64_t total = 0;
  thread_local std::vector<char> qw, qz, sc;
  for (int p = 0; p < 3; ++p) {
    const int64_t rows = p < 2 ? I : H, cols = p < 2 ? H : I, groups = cols / G;
    const bool down = p == 2;
    const int64_t row0 = p == 1 ? I : 0;  // up rows follow gate rows in gate_up
    uint8_t* wq = reinterpret_cast<uint8_t*>(dst + (down ? l.down_offset : l.gate_up_offset)) + row0 * cols / 2;
    float* ws = reinterpret_cast<float*>(dst + (down ? l.down_scales_offset : l.gate_up_scales_offset)) + row0 * groups;
    uint8_t* wz = reinterpret_cast<uint8_t*>(dst + (down ? l.down_zeros_offset : l.gate_up_zeros_offset)) + row0 * groups;
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

namespace moerun {

int64_t ExpertFiles::read_biases(const Part& gate_up, const Part& down, const SlotLayout& l, std::vector<float>& out) {
  // fp32 (exact from any float dtype): [gate I | up I | down H], gate_up's [2I] de-interleaved (gpt-oss: gate i
  // at 2i, up i at 2i + 1).
  const int64_t H = l.hidden_size, I = l.inter_size;
  thread_local std::vector<char> raw;
  out.resize(static_cast<size_t>(2 * I + H));
  DType src;
  dtype_from_safetensors(gate_up.dtype, &src);
  raw.resize(static_cast<size_t>(gate_up.bytes));
  read_part(gate_up, raw.data());
  for (int64_t i = 0; i < I; ++i) {
    out[static_cast<size_t>(i)] = load_as_f32(raw.data(), 2 * i, src);
    out[static_cast<size_t>(I + i)] = load_as_f32(raw.data(), 2 * i + 1, src);
  }
  dtype_from_safetensors(down.dtype, &src);
  raw.resize(static_cast<size_t>(down.bytes));
  read_part(down, raw.data());
  convert_elems(raw.data(), src, out.data() + 2 * I, DType::F32, H);
  return gate_up.bytes + down.bytes;
}

int64_t ExpertFiles::read_gpt_oss_mxfp4(const Expert& e, const SlotLayout& l, char* dst) {
  // The checkpoint's MXFP4 codes and e8m0 scales are the slot's (expert_format.h: the same nibble order, value
  // table and exponent bias), row for row except gate_up's interleaving: its row 2i is gate row i, 2i + 1 up row i.
  const int64_t H = l.hidden_size, I = l.inter_size;
  const Part &gu_blocks = e.parts[0], &gu_scales = e.parts[1], &gu_bias = e.parts[2];
  const Part &dn_blocks = e.parts[3], &dn_scales = e.parts[4], &dn_bias = e.parts[5];
  thread_local std::vector<char> raw;
  auto deinterleave_rows = [&](const Part& part, int64_t row_bytes, char* out) {
    raw.resize(static_cast<size_t>(part.bytes));
    read_part(part, raw.data());
    for (int64_t i = 0; i < I; ++i) {
      std::memcpy(out + i * row_bytes, raw.data() + 2 * i * row_bytes, static_cast<size_t>(row_bytes));
      std::memcpy(out + (I + i) * row_bytes, raw.data() + (2 * i + 1) * row_bytes, static_cast<size_t>(row_bytes));
    }
  };
  deinterleave_rows(gu_blocks, H / 2, dst + l.gate_up_offset);
  deinterleave_rows(gu_scales, H / 32, dst + l.gate_up_scales_offset);
  read_part(dn_blocks, dst + l.down_offset);
  read_part(dn_scales, dst + l.down_scales_offset);
  thread_local std::vector<float> bias;
  const int64_t total = gu_blocks.bytes + gu_scales.bytes + dn_blocks.bytes + dn_scales.bytes +
                        read_biases(gu_bias, dn_bias, l, bias);
  write_biases(l, ExpertBiases{bias.data(), bias.data() + I, bias.data() + 2 * I, DType::F32}, dst);
  zero_slot_gaps(l, dst);
  return total;
}

int64_t ExpertFiles::read_gpt_oss_float(const Expert& e, char* dst) {
  // gate_up_proj [H, 2I] and down_proj [I, H] as x @ W: transposed to rows of outputs, gate_up's interleaved
  // columns split into gate rows and up rows, then converted or encoded as any float source (exact reordering).
  const int64_t H = layout_.hidden_size, I = layout_.inter_size;
  const Part &gu = e.parts[0], &gu_bias = e.parts[1], &dn = e.parts[2], &dn_bias = e.parts[3];
  DType src;
  dtype_from_safetensors(gu.dtype, &src);
  const int64_t b = dtype_bytes(src);
  thread_local std::vector<char> raw, rows;
  rows.resize(static_cast<size_t>(3 * I * H * b));  // gate [I, H], up [I, H], down [H, I]
  raw.resize(static_cast<size_t>(std::max(gu.bytes, dn.bytes)));
  read_part(gu, raw.data());
  gather_columns_bytes(raw.data(), b, 2 * I, 0, 2, I, H, rows.data());
  gather_columns_bytes(raw.data(), b, 2 * I, 1, 2, I, H, rows.data() + I * H * b);
  read_part(dn, raw.data());
  gather_columns_bytes(raw.data(), b, H, 0, 1, H, I, rows.data() + 2 * I * H * b);
  thread_local std::vector<float> bias;
  const int64_t bias_bytes = read_biases(gu_bias, dn_bias, layout_, bias);
  const ExpertBiases biases{bias.data(), bias.data() + I, bias.data() + 2 * I, DType::F32};
  encode_expert(layout_, rows.data(), rows.data() + I * H * b, rows.data() + 2 * I * H * b, src, dst, {}, biases);
  return gu.bytes + dn.bytes + bias_bytes;
}

}  // namespace moerun
