// Small helpers shared by the CPU kernels (decode_cpu.cpp, train_cpu.cpp): float32 math written so that GCC
// vectorises the loops that call it (no libm call, no branch), and index splitting without integer division.
#pragma once

#include <cstdint>

namespace ders_kernels {

// e^x for float in a form the compiler vectorises (no libm call, no branch): x = n ln2 + r with |r| <= ln2 / 2,
// 2^n from the exponent bits, e^r from Cephes' polynomial (relative error about 2e-7); x is clamped to [-87, 88].
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline float sigmoid(float g) { return 1.0f / (1.0f + exp_approx(-g)); }

inline float dot(const float* __restrict x, const float* __restrict y, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * y[i];
  return sum;
}

inline void axpy(float* __restrict y, float alpha, const float* __restrict x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// q = f / d and r = f % d for 0 <= f < 2^31 and d > 0 from a double multiplication by inv = 1.0 / d, corrected by one
// step (the product is off by at most one): a 64-bit integer division costs tens of cycles, and the sparse kernels
// split every stored flat index into its row and column.
struct DivMod {
  int64_t d;
  double inv;
  explicit DivMod(int64_t divisor) : d(divisor), inv(1.0 / static_cast<double>(divisor)) {}
  inline void operator()(int64_t f, int64_t& q, int64_t& r) const {
    q = static_cast<int64_t>(static_cast<double>(f) * inv);
    r = f - q * d;
    if (r < 0) {
      --q;
      r += d;
    } else if (r >= d) {
      ++q;
      r -= d;
    }
  }
};

// SiLU(g) = g * sigmoid(g)
inline float silu(float g) { return g * sigmoid(g); }

}  // namespace ders_kernels
