// The C++ runtime's own noise generator (documented; it does not reproduce numpy's stream):
// image i of a request with seed S owns a xoshiro256** generator whose 256-bit state is four
// successive SplitMix64 outputs seeded with S * 0x9E3779B97F4A7C15 ^ (i + 1) * 0xD1B54A32D192ED03
// (wrapping 64-bit arithmetic). Standard normals come from the Box-Muller transform on two
// uniforms u1 = ((a >> 11) + 1) * 2^-53 (in (0, 1]) and u2 = (b >> 11) * 2^-53, computed in double
// and rounded to float32, both values of a pair used (cos first, then sin). The image draws x_T
// first (C*H*W values, C order), then one such block per noise-taking step, k = K-1 .. 1 -
// the same order as the Python runtime, so an image depends only on the seed and its index.
// Callers that need numpy's values pass the initial and per-step noise explicitly.
#pragma once
#include <cstddef>
#include <cstdint>

namespace flexdit_core {

class ImageNoise {
 public:
  ImageNoise(uint64_t seed, uint64_t index);
  void standard_normal(float* out, size_t count);

 private:
  uint64_t next();
  uint64_t s_[4];
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace flexdit_core
