#include "npy.hpp"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>

#include "error.hpp"
#include "files.hpp"

namespace flexdit_core {
namespace {

// numpy's str(dtype) for a header descr: '<i8' -> int64, '|b1' -> bool, '<U3' stays '<U3'
std::string numpy_dtype_name(const std::string& d) {
  if (d.size() < 3) return d;
  char kind = d[1];
  std::string size = d.substr(2);
  auto bits = [&](int mult) { return std::to_string(std::atoi(size.c_str()) * mult); };
  switch (kind) {
    case 'b': return "bool";
    case 'i': return "int" + bits(8);
    case 'u': return "uint" + bits(8);
    case 'f': return "float" + bits(8);
    case 'c': return "complex" + bits(8);
    case 'O': return "object";
    default: return d;
  }
}

double half_to_double(uint16_t h) {
  int exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  double v = exp == 0 ? std::ldexp(mant, -24) : exp == 31 ? (mant ? NAN : INFINITY) : std::ldexp(mant + 1024, exp - 25);
  return (h & 0x8000) ? -v : v;
}

}  // namespace

NpyArray read_npy(const std::filesystem::path& path, const NpyHeaderCheck& check_header) {
  auto bad = [&](const std::string& why) -> void { fail(ErrorKind::Io, "cannot read " + path.string() + ": " + why); };
  std::ifstream f(path, std::ios::binary);
  if (!f) bad("cannot open it");
  // read what the header declares and no more: /dev/zero or a huge file is one error, never a hang
  auto take = [&](size_t n) {
    std::string buf(n, '\0');
    f.read(buf.data(), static_cast<std::streamsize>(n));
    buf.resize(static_cast<size_t>(f.gcount()));
    return buf;
  };
  std::string head = take(10);
  if (head.size() < 10 || head.compare(0, 6, "\x93NUMPY") != 0) bad("not a .npy file");
  int major = static_cast<unsigned char>(head[6]);
  size_t hlen;
  if (major == 1) {
    hlen = static_cast<unsigned char>(head[8]) | (static_cast<unsigned char>(head[9]) << 8);
  } else if (major == 2 || major == 3) {
    std::string more = take(2);
    if (more.size() < 2) bad("truncated header");
    head += more;
    hlen = 0;
    for (int i = 0; i < 4; ++i) hlen |= static_cast<size_t>(static_cast<unsigned char>(head[8 + i])) << (8 * i);
  } else {
    bad("unsupported .npy version");
    return {};
  }
  if (hlen > kNpyMaxHeader) bad("the header is larger than " + std::to_string(kNpyMaxHeader) + " bytes");
  std::string header = take(hlen);
  if (header.size() < hlen) bad("truncated header");
  std::smatch m;
  NpyArray a;
  if (!std::regex_search(header, m, std::regex(R"('descr'\s*:\s*'([^']*)')"))) bad("no dtype in the header");
  a.descr = m[1].str();
  if (!std::regex_search(header, m, std::regex(R"('fortran_order'\s*:\s*(True|False))")) || m[1].str() != "False")
    bad("only C-order arrays are read");
  if (!std::regex_search(header, m, std::regex(R"('shape'\s*:\s*\(([^)]*)\))"))) bad("no shape in the header");
  std::string dims = m[1].str();
  std::regex num(R"(\d+)");
  size_t count = 1;
  for (auto it = std::sregex_iterator(dims.begin(), dims.end(), num); it != std::sregex_iterator(); ++it) {
    if (it->str().size() > 12) bad("dimension too large");
    int64_t d = std::stoll(it->str());
    a.shape.push_back(d);
    count *= static_cast<size_t>(d);
    if (count > (size_t(1) << 34)) bad("array too large");
  }
  size_t item = a.descr == "<f4" ? 4 : a.descr == "<f8" ? 8 : a.descr == "<f2" ? 2 : 0;
  if (!item) fail(ErrorKind::Argument, "initial noise must hold real floating-point values, got dtype " + numpy_dtype_name(a.descr));
  if (check_header) check_header(a.shape);
  std::string bytes = take(count * item);
  if (bytes.size() != count * item || !take(1).empty()) bad("the data size does not match its shape");
  a.values.resize(count);
  for (size_t i = 0; i < count; ++i) {
    if (item == 2) {
      uint16_t h;
      std::memcpy(&h, bytes.data() + 2 * i, 2);
      a.values[i] = half_to_double(h);
    } else if (item == 4) {
      float v;
      std::memcpy(&v, bytes.data() + 4 * i, 4);
      a.values[i] = v;
    } else {
      std::memcpy(&a.values[i], bytes.data() + 8 * i, 8);
    }
  }
  return a;
}

void write_npy_f32(const std::filesystem::path& path, const float* data, const std::vector<int64_t>& shape) {
  std::string dims;
  size_t count = 1;
  for (auto d : shape) dims += std::to_string(d) + ", ", count *= static_cast<size_t>(d);
  if (shape.size() > 1) dims.resize(dims.size() - 1), dims.back() = ' ', dims.pop_back();
  if (shape.size() == 1) dims.pop_back();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  uint16_t hl = static_cast<uint16_t>(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  char le[2] = {static_cast<char>(hl & 0xFF), static_cast<char>(hl >> 8)};
  f.write(le, 2);
  f << header;
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
  errno = 0;
  f.close();  // a full disk may only show when the buffer is flushed
  if (!f) throw std::filesystem::filesystem_error("cannot write", path, std::error_code(errno ? errno : EIO, std::generic_category()));
}

}  // namespace flexdit_core
