#include "noise.hpp"

#include <cmath>

namespace flexdit_core {
namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

}  // namespace

ImageNoise::ImageNoise(uint64_t seed, uint64_t index) {
  uint64_t x = seed * 0x9E3779B97F4A7C15ULL ^ (index + 1) * 0xD1B54A32D192ED03ULL;
  for (auto& s : s_) s = splitmix64(x);
}

uint64_t ImageNoise::next() {
  const uint64_t result = rotl(s_[1] * 5, 7) * 9;
  const uint64_t t = s_[1] << 17;
  s_[2] ^= s_[0];
  s_[3] ^= s_[1];
  s_[1] ^= s_[2];
  s_[0] ^= s_[3];
  s_[2] ^= t;
  s_[3] = rotl(s_[3], 45);
  return result;
}

void ImageNoise::standard_normal(float* out, size_t count) {
  const double two_pi = 6.283185307179586476925286766559;
  for (size_t i = 0; i < count; ++i) {
    if (has_spare_) {
      out[i] = static_cast<float>(spare_);
      has_spare_ = false;
      continue;
    }
    double u1 = static_cast<double>((next() >> 11) + 1) * 0x1.0p-53;
    double u2 = static_cast<double>(next() >> 11) * 0x1.0p-53;
    double r = std::sqrt(-2.0 * std::log(u1));
    out[i] = static_cast<float>(r * std::cos(two_pi * u2));
    spare_ = r * std::sin(two_pi * u2);
    has_spare_ = true;
  }
}

}  // namespace flexdit_core
