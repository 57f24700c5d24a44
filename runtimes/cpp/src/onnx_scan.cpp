#include "onnx_scan.hpp"

#include <stdexcept>

#include "error.hpp"
#include "files.hpp"

namespace flexdit_core {
namespace {

struct Field {
  uint32_t num = 0, wire = 0;
  uint64_t value = 0;               // varint value
  const uint8_t* data = nullptr;    // length-delimited payload
  size_t size = 0;
};

uint64_t varint(const uint8_t* buf, size_t n, size_t& i) {
  uint64_t result = 0;
  for (int shift = 0;; shift += 7) {
    if (i >= n || shift > 63) throw std::invalid_argument("truncated or malformed varint");
    uint8_t b = buf[i++];
    result |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return result;
  }
}

template <typename F>
void fields(const uint8_t* buf, size_t n, F&& visit) {
  size_t i = 0;
  while (i < n) {
    uint64_t key = varint(buf, n, i);
    Field f;
    f.num = static_cast<uint32_t>(key >> 3);
    f.wire = key & 7;
    if (f.wire == 0) {
      f.value = varint(buf, n, i);
    } else if (f.wire == 1 || f.wire == 5) {
      size_t w = f.wire == 1 ? 8 : 4;
      if (n - i < w) throw std::invalid_argument("fixed-size field runs past the end");
      i += w;
    } else if (f.wire == 2) {
      uint64_t len = varint(buf, n, i);
      if (len > n - i) throw std::invalid_argument("length-delimited field runs past the end");
      f.data = buf + i;
      f.size = static_cast<size_t>(len);
      i += f.size;
    } else {
      throw std::invalid_argument("unsupported wire type " + std::to_string(f.wire));
    }
    visit(f);
  }
}

OnnxInitializer tensor(const uint8_t* buf, size_t n) {
  OnnxInitializer t;
  fields(buf, n, [&](const Field& f) {
    if (f.num == 1 && f.wire == 0) {
      t.dims.push_back(static_cast<int64_t>(f.value));
    } else if (f.num == 1 && f.wire == 2) {  // packed dims
      size_t j = 0;
      while (j < f.size) t.dims.push_back(static_cast<int64_t>(varint(f.data, f.size, j)));
    } else if (f.num == 2 && f.wire == 0) {
      t.data_type = static_cast<int>(f.value);
    } else if (f.num == 8 && f.wire == 2) {
      t.name.assign(reinterpret_cast<const char*>(f.data), f.size);
    } else if (f.num == 13 && f.wire == 2) {
      std::string key, value;
      fields(f.data, f.size, [&](const Field& kv) {
        if (kv.wire != 2) return;
        if (kv.num == 1) key.assign(reinterpret_cast<const char*>(kv.data), kv.size);
        if (kv.num == 2) value.assign(reinterpret_cast<const char*>(kv.data), kv.size);
      });
      t.external[key] = value;
    }
  });
  return t;
}

}  // namespace

std::string OnnxInitializer::dtype() const {
  switch (data_type) {
    case 1: return "float32";
    case 2: return "uint8";
    case 3: return "int8";
    case 6: return "int32";
    case 7: return "int64";
    case 9: return "bool";
    case 10: return "float16";
    case 16: return "bfloat16";
    default: return "";
  }
}

std::map<std::string, OnnxInitializer> onnx_initializers(const uint8_t* data, size_t size) {
  std::map<std::string, OnnxInitializer> out;
  fields(data, size, [&](const Field& f) {
    if (f.num != 7 || f.wire != 2) return;
    fields(f.data, f.size, [&](const Field& g) {
      if (g.num != 5 || g.wire != 2) return;
      OnnxInitializer t = tensor(g.data, g.size);
      out[t.name] = std::move(t);
    });
  });
  return out;
}

std::map<std::string, OnnxInitializer> onnx_initializers(const std::filesystem::path& path) {
  std::string bytes = read_text_file(path);
  return onnx_initializers(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

}  // namespace flexdit_core
