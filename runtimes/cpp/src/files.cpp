#include "files.hpp"

#include <openssl/evp.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "error.hpp"

namespace fs = std::filesystem;

namespace flexdit_core {
namespace {

struct Digest {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  Digest() {
    if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr) != 1) fail(ErrorKind::Runtime, "cannot initialise sha256 (libcrypto)");
  }
  ~Digest() { EVP_MD_CTX_free(ctx); }
  void update(const void* p, size_t n) { EVP_DigestUpdate(ctx, p, n); }
  std::string hex() {
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx, md, &len);
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < len; ++i) {
      out += digits[md[i] >> 4];
      out += digits[md[i] & 15];
    }
    return out;
  }
};

}  // namespace

std::string sha256_hex(const void* data, size_t size) {
  Digest d;
  d.update(data, size);
  return d.hex();
}

std::string sha256_file(const fs::path& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) fail(ErrorKind::Io, "cannot read " + path.string());
  Digest d;
  std::vector<char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), f.get())) > 0) d.update(buf.data(), n);
  if (std::ferror(f.get())) fail(ErrorKind::Io, "cannot read " + path.string());
  return d.hex();
}

fs::path resolve_inside(const fs::path& root, const std::string& rel) {
  std::error_code ec;
  fs::path base = fs::weakly_canonical(root, ec);
  if (ec) fail(ErrorKind::Bundle, "cannot resolve the bundle directory " + root.string());
  fs::path relp(rel);
  fs::path p = fs::weakly_canonical(base / relp, ec);
  bool inside = !ec && !relp.is_absolute();
  if (inside) {
    auto b = base.begin(), q = p.begin();
    for (; b != base.end(); ++b, ++q) {
      if (q == p.end() || *b != *q) {
        inside = false;
        break;
      }
    }
  }
  if (!inside) fail(ErrorKind::Bundle, rel + " points outside the bundle directory; refusing to read it");
  return p;
}

std::string read_text_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(ErrorKind::Io, "cannot read " + path.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail(ErrorKind::Io, "cannot read " + path.string());
  return ss.str();
}

}  // namespace flexdit_core
