// exp() for float32 exactly as numpy evaluates it on float32 arrays (numpy's SIMD kernel for
// x86-64 AVX2+FMA3 / AVX512F, and the same algorithm in its universal-intrinsics kernel):
// Cody-Waite range reduction x - k ln2 with k = rint(x log2e), a [5/2] minimax rational
// polynomial evaluated with fused multiply-adds, scaled by 2^k. It differs from a correctly
// rounded expf in about 40% of inputs (by an ulp or two); the DDPM step takes exp of the learned
// log variance, and bit-identical noise scales keep the C++ and Python trajectories identical
// also where a later int8 dynamic quantisation would amplify one ulp. Algorithm and constants:
// numpy (BSD-3-Clause), numpy/_core/src/umath/loops_exponent_log.dispatch.c.src, npy_math.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace flexdit_core {

inline float numpy_expf(float x) {
  constexpr float kXmax = 88.72283935546875f, kXmin = -103.97208404541015625f;
  constexpr float kLog2e = 1.442695040888963407359924681001892137f;
  constexpr float kMagic = 0x1.800000p+23f;  // adding and subtracting it rounds to nearest
  constexpr float kC1 = -6.93145752e-1f, kC2 = -1.42860677e-6f;  // -ln 2, high and low parts
  constexpr float p0 = 9.999999999980870924916e-01f, p1 = 7.257664613233124478488e-01f,
                  p2 = 2.473615434895520810817e-01f, p3 = 5.114512081637298353406e-02f,
                  p4 = 6.757896990527504603057e-03f, p5 = 5.082762527590693718096e-04f;
  constexpr float q0 = 1.0f, q1 = -2.742335390411667452936e-01f, q2 = 2.159509375685829852307e-02f;
  if (std::isnan(x)) return x;
  if (x >= kXmax) return INFINITY;
  if (x <= kXmin) return 0.0f;
  volatile float magic = kMagic;  // keep the rounding trick from being folded away
  float k = x * kLog2e;
  k = (k + magic) - magic;
  float y = std::fma(k, kC1, x);
  y = std::fma(k, kC2, y);
  float num = std::fma(p5, y, p4);
  num = std::fma(num, y, p3);
  num = std::fma(num, y, p2);
  num = std::fma(num, y, p1);
  num = std::fma(num, y, p0);
  float den = std::fma(q2, y, q1);
  den = std::fma(den, y, q0);
  return std::ldexp(num / den, static_cast<int>(k));  // exact for normal results
}

}  // namespace flexdit_core
