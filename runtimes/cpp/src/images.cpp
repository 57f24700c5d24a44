#include "images.hpp"

#include <png.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <system_error>


namespace flexdit_core {

Images to_uint8(const float* x, size_t n, size_t C, size_t H, size_t W, double lo_d, double hi_d) {
  const size_t hw = H * W, c_out = (C == 1 || C == 3) ? C : 3;
  const float lo = static_cast<float>(lo_d), hi = static_cast<float>(hi_d);
  Images im{n, H, W, c_out, std::vector<uint8_t>(n * hw * c_out)};
  std::vector<float> v(c_out * hw);
  for (size_t b = 0; b < n; ++b) {
    const float* src = x + b * C * hw;
    std::copy(src, src + c_out * hw, v.begin());
    if (c_out != C) {  // numpy float32: (x - mn) / maximum(mx - mn, 1e-8) * (hi - lo) + lo
      auto [mn_it, mx_it] = std::minmax_element(v.begin(), v.end());
      float mn = *mn_it, mx = *mx_it, range = std::max(mx - mn, 1e-8f);
      for (auto& f : v) f = (f - mn) / range * (hi - lo) + lo;
    }
    for (size_t ch = 0; ch < c_out; ++ch)
      for (size_t p = 0; p < hw; ++p) {
        float f = (v[ch * hw + p] - lo) / (hi - lo) * 255.0f + 0.5f;
        f = std::isnan(f) ? 0.0f : std::min(255.0f, std::max(0.0f, f));
        im.pixels[(b * hw + p) * c_out + ch] = static_cast<uint8_t>(f);
      }
  }
  return im;
}

size_t grid_scale(size_t h, size_t w) { return std::max<size_t>(1, (kGridTile + std::max(h, w) - 1) / std::max<size_t>(1, std::max(h, w))); }

Images make_grid(const Images& imgs, size_t cols, size_t pad, size_t scale) {
  size_t n = imgs.n, h = imgs.h, w = imgs.w, c = imgs.c;
  if (!cols) cols = std::min(n, std::max<size_t>(1, static_cast<size_t>(std::ceil(std::sqrt(static_cast<double>(n))))));
  if (!scale) scale = grid_scale(h, w);
  size_t rows = (n + cols - 1) / cols;
  Images g{1, rows * (h + pad) + pad, cols * (w + pad) + pad, c, {}};
  g.pixels.assign(g.h * g.w * c, 255);
  for (size_t i = 0; i < n; ++i) {
    size_t r = i / cols, q = i % cols;
    for (size_t y = 0; y < h; ++y) {
      const uint8_t* src = imgs.pixels.data() + ((i * h + y) * w) * c;
      uint8_t* dst = g.pixels.data() + ((pad + r * (h + pad) + y) * g.w + pad + q * (w + pad)) * c;
      std::copy(src, src + w * c, dst);
    }
  }
  if (scale == 1) return g;
  Images big{1, g.h * scale, g.w * scale, c, std::vector<uint8_t>(g.h * scale * g.w * scale * c)};
  for (size_t y = 0; y < big.h; ++y) {
    uint8_t* dst = big.pixels.data() + y * big.w * c;
    const uint8_t* src = g.pixels.data() + (y / scale) * g.w * c;
    for (size_t x = 0; x < big.w; ++x) std::copy(src + (x / scale) * c, src + (x / scale + 1) * c, dst + x * c);
  }
  return big;
}

namespace {

[[noreturn]] void write_failed(const std::filesystem::path& path, int err) {
  throw std::filesystem::filesystem_error("cannot write", path, std::error_code(err ? err : EIO, std::generic_category()));
}

}  // namespace

void write_png(const std::filesystem::path& path, const uint8_t* pixels, size_t h, size_t w, size_t c) {
  errno = 0;
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) write_failed(path, errno);
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!png || !info) {
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    write_failed(path, ENOMEM);
  }
  std::vector<png_bytep> rows(h);
  for (size_t y = 0; y < h; ++y) rows[y] = const_cast<png_bytep>(pixels + y * w * c);
  if (setjmp(png_jmpbuf(png))) {  // libpng's write error: errno is fwrite's
    int err = errno;
    png_destroy_write_struct(&png, &info);
    std::fclose(f);
    write_failed(path, err);
  }
  png_init_io(png, f);
  png_set_IHDR(png, info, static_cast<png_uint_32>(w), static_cast<png_uint_32>(h), 8,
               c == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  bool flushed = std::fflush(f) == 0;
  int err = errno;
  if (std::fclose(f) != 0 && flushed) flushed = false, err = errno;
  if (!flushed) write_failed(path, err);
}

}  // namespace flexdit_core
