#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace moerun {
namespace {

// A minimal JSON reader for the safetensors header: objects, arrays, strings, numbers, literals.
// Only tensor entries are interpreted; "__metadata__" and unknown keys are skipped.
class HeaderParser {
 public:
  HeaderParser(const std::string& text, const std::string& path) : s_(text), path_(path) {}

  void parse(SafetensorsHeader& out, int64_t data_start) {
    expect('{');
    if (peek() == '}') {
      ++i_;
      return;
    }
    while (true) {
      std::string key = parse_string();
      expect(':');
      if (key == "__metadata__") {
        skip_value();
      } else {
        out.tensors[key] = parse_entry(key, data_start);
      }
      const char c = next();
      if (c == '}') break;
      if (c != ',') fail("expected ',' or '}'");
    }
  }

 private:
  SafetensorsEntry parse_entry(const std::string& name, int64_t data_start) {
    SafetensorsEntry e;
    bool have_offsets = false;
    expect('{');
    while (true) {
      std::string field = parse_string();
      expect(':');
      if (field == "dtype") {
        e.dtype = parse_string();
      } else if (field == "shape") {
        e.shape = parse_int_array();
      } else if (field == "data_offsets") {
        auto offs = parse_int_array();
        if (offs.size() != 2 || offs[1] < offs[0]) fail("bad data_offsets for tensor '" + name + "'");
        e.offset_bytes = data_start + offs[0];
        e.size_bytes = offs[1] - offs[0];
        have_offsets = true;
      } else {
        skip_value();
      }
      const char c = next();
      if (c == '}') break;
      if (c != ',') fail("expected ',' or '}' in tensor '" + name + "'");
    }
    if (!have_offsets || e.dtype.empty()) fail("tensor '" + name + "' lacks dtype or data_offsets");
    return e;
  }

  std::vector<int64_t> parse_int_array() {
    std::vector<int64_t> v;
    expect('[');
    if (peek() == ']') {
      ++i_;
      return v;
    }
    while (true) {
      ws();
      size_t start = i_;
      while (i_ < s_.size() && (s_[i_] == '-' || (s_[i_] >= '0' && s_[i_] <= '9'))) ++i_;
      if (start == i_) fail("expected an integer");
      v.push_back(std::stoll(s_.substr(start, i_ - start)));
      const char c = next();
      if (c == ']') break;
      if (c != ',') fail("expected ',' or ']'");
    }
    return v;
  }

  std::string parse_string() {
    expect('"');
    std::string out;
    while (i_ < s_.size() && s_[i_] != '"') {
      if (s_[i_] == '\\') {
        ++i_;
        if (i_ >= s_.size()) break;
        const char esc = s_[i_];
        if (esc == 'u') {
          // Tensor names are ASCII in practice; keep the escape verbatim so names stay unique.
          out += "\\u";
        } else if (esc == 'n') {
          out += '\n';
        } else if (esc == 't') {
          out += '\t';
        } else {
          out += esc;
        }
        ++i_;
      } else {
        out += s_[i_++];
      }
    }
    if (i_ >= s_.size()) fail("unterminated string");
    ++i_;
    return out;
  }

  void skip_value() {
    const char c = peek();
    if (c == '"') {
      parse_string();
    } else if (c == '{' || c == '[') {
      const char close = c == '{' ? '}' : ']';
      ++i_;
      if (peek() == close) {
        ++i_;
        return;
      }
      while (true) {
        if (c == '{') {
          parse_string();
          expect(':');
        }
        skip_value();
        const char d = next();
        if (d == close) break;
        if (d != ',') fail("expected ',' in nested value");
      }
    } else {
      while (i_ < s_.size() && s_[i_] != ',' && s_[i_] != '}' && s_[i_] != ']') ++i_;
    }
  }

  void ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  char peek() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end of header");
    return s_[i_];
  }
  char next() {
    const char c = peek();
    ++i_;
    return c;
  }
  void expect(char c) {
    if (next() != c) fail(std::string("expected '") + c + "'");
  }
  [[noreturn]] void fail(const std::string& what) {
    throw std::runtime_error("safetensors file " + path_ + ": malformed header at byte " +
                             std::to_string(i_) + ": " + what);
  }

  const std::string& s_;
  const std::string& path_;
  size_t i_ = 0;
};

}  // namespace

SafetensorsHeader SafetensorsHeader::read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open safetensors file " + path + ": " + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  uint64_t header_len = 0;
  std::string text;
  bool ok = ::pread(fd, &header_len, 8, 0) == 8;  // little-endian u64 (x86 and arm64 hosts)
  if (ok && (header_len == 0 || static_cast<int64_t>(header_len + 8) > st.st_size)) ok = false;
  if (ok) {
    text.resize(header_len);
    ok = ::pread(fd, &text[0], header_len, 8) == static_cast<ssize_t>(header_len);
  }
  ::close(fd);
  if (!ok) throw std::runtime_error("safetensors file " + path + " is truncated or not a safetensors file");
  SafetensorsHeader h;
  h.path = path;
  HeaderParser(text, path).parse(h, static_cast<int64_t>(8 + header_len));
  for (const auto& kv : h.tensors) {
    if (kv.second.offset_bytes + kv.second.size_bytes > st.st_size)
      throw std::runtime_error("safetensors file " + path + ": tensor '" + kv.first + "' extends past the end of the file");
  }
  return h;
}

const SafetensorsEntry* SafetensorsHeader::find(const std::string& name) const {
  auto it = tensors.find(name);
  return it == tensors.end() ? nullptr : &it->second;
}

}  // namespace moerun
