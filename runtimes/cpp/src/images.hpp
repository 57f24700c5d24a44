// Model output -> uint8 images, a grid, PNG files (runtimes/python/flexdit_runtime/images.py).
#pragma once
#include <cstdint>
#include <filesystem>
#include <vector>

namespace flexdit_core {

struct Images {
  size_t n = 0, h = 0, w = 0, c = 0;  // (n, h, w, c) uint8
  std::vector<uint8_t> pixels;
};

// (n, C, H, W) float in [lo, hi] -> (n, H, W, C') uint8; C in {1, 3} kept, else the first three
// channels min-max scaled per image (a preview of latents).
Images to_uint8(const float* x, size_t n, size_t C, size_t H, size_t W, double lo, double hi);

// The default integer upscaling of the grid: small models' images (e.g. 32x32: 4) become
// viewable, images of kGridTile pixels or more keep their size (flexdit_runtime/images.py).
constexpr size_t kGridTile = 128, kGridScaleMax = 16;
size_t grid_scale(size_t h, size_t w);

// The images in rows of `cols` on white, `pad` pixels apart, each pixel then a scale x scale
// block (nearest neighbour: the same bytes as the Python runtime; 0: grid_scale).
Images make_grid(const Images& imgs, size_t cols = 0, size_t pad = 2, size_t scale = 0);

// std::filesystem::filesystem_error with the system's reason (e.g. no space left on device)
void write_png(const std::filesystem::path& path, const uint8_t* pixels, size_t h, size_t w, size_t c);

}  // namespace flexdit_core
