// 16-float vectors and the vector math the CPU kernels share (cpu_gemm.h, cpu_cells.h).
//
// The vectors are GCC/Clang vector extensions: 16 floats, one AVX-512 register where the CPU has
// it, two AVX2 registers (or four SSE registers) where it does not; the library is built with
// -march=native. Loads and stores go through memcpy: onnxruntime's buffers need not be aligned.
#pragma once

#include <cstdint>
#include <cstring>

namespace xlstm_cpu {

using vec16 = float __attribute__((vector_size(64)));

inline vec16 load16(const float* p) {  // unaligned load (onnxruntime's buffers need not be 64-aligned)
  vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

using vec16i = int32_t __attribute__((vector_size(64)));

inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof v); }
inline vec16 splat16(float a) { return vec16{} + a; }

// exp(x), 16 lanes: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is exact), e^r
// by its degree-7 Taylor polynomial (relative error < 2e-7 on that interval), 2^n by building the
// float's exponent. x is clamped to [-87, 88]: e^-87 ~ 1.6e-38 (the smallest normal float is 1.2e-38),
// e^88 ~ 1.7e38; callers only need the function's limits there.
inline vec16 exp16(vec16 x) {
  x = x < -87.0f ? splat16(-87.0f) : x;
  x = x > 88.0f ? splat16(88.0f) : x;
  const vec16 shifter = splat16(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec16 n = (x * 1.44269504f + shifter) - shifter;
  const vec16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 = 0.693145752 + 1.42860677e-6
  vec16 p = splat16(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vec16i bits = (__builtin_convertvector(n, vec16i) + 127) << 23;  // 2^n as a float's bits
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 1 / (1 + e^-x), 16 lanes (the sigmoid in the scalar kernels' order of operations).
inline vec16 sigmoid16(vec16 x) { return 1.0f / (1.0f + exp16(-x)); }

// The sums of the norms: of x[i], and of (x[i] - shift)^2, for i < n. 16 lanes at a time (a
// sequential float sum cannot be vectorised), the lanes added at the end, then the tail.
inline float lane_sum(const float* x, int64_t n) {
  vec16 lanes = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) lanes += load16(x + i);
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  for (; i < n; ++i) sum += x[i];
  return sum;
}

inline float lane_sum_squared_deviation(const float* x, int64_t n, float shift) {
  vec16 lanes = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec16 v = load16(x + i) - shift;
    lanes += v * v;
  }
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += lanes[j];
  for (; i < n; ++i) sum += (x[i] - shift) * (x[i] - shift);
  return sum;
}

}  // namespace xlstm_cpu
