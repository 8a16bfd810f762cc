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

// The first n < 16 lanes (a row's last, partial vector): loaded with zeros after them, stored alone.
inline vec16 load16_part(const float* p, int64_t n) {
  float buf[16] = {};
  std::memcpy(buf, p, sizeof(float) * n);
  return load16(buf);
}

inline void store16_part(float* p, vec16 v, int64_t n) {
  float buf[16];
  store16(buf, v);
  std::memcpy(p, buf, sizeof(float) * n);
}

// x rounded to the nearest bfloat16 value (ties to even), as a float32: what a bf16 export's Cast to
// bfloat16 and onnxruntime's Cast back give. A NaN stays a NaN (its payload's high half, quieted).
inline float round_bf16(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  b = x != x ? (b | 0x00400000u) & 0xFFFF0000u : (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&x, &b, sizeof b);
  return x;
}

inline vec16 round_bf16_16(vec16 x) {
  using bits32 = uint32_t __attribute__((vector_size(64)));
  bits32 b;
  std::memcpy(&b, &x, sizeof b);
  const bits32 nan = (b | 0x00400000u) & 0xFFFF0000u;
  const bits32 near = (b + 0x7FFFu + ((b >> 16) & 1u)) & 0xFFFF0000u;
  b = x != x ? nan : near;
  vec16 r;
  std::memcpy(&r, &b, sizeof r);
  return r;
}

// exp(x) and e^x - 1 share one range reduction: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two
// parts, so n ln2 is exact), 2^n by building the float's exponent, and q = (e^r - 1) / r by its
// Taylor polynomial 1 + r/2 + ... + r^6/7! (so that e^r = q r + 1 to a relative 2e-7, e^r - 1 = q r
// to 2e-8). x is clamped to [-87, 88]: e^-87 ~ 1.6e-38 (the smallest normal float is 1.2e-38),
// e^88 ~ 1.7e38; callers only need the functions' limits there.
struct ExpParts {
  vec16 scale, r, q;  // 2^n, r, (e^r - 1) / r
};

inline ExpParts exp_parts(vec16 x) {
  x = x < -87.0f ? splat16(-87.0f) : x;
  x = x > 88.0f ? splat16(88.0f) : x;
  const vec16 shifter = splat16(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec16 n = (x * 1.44269504f + shifter) - shifter;
  const vec16 r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 = 0.693145752 + 1.42860677e-6
  vec16 q = splat16(1.0f / 5040);
  q = q * r + 1.0f / 720;
  q = q * r + 1.0f / 120;
  q = q * r + 1.0f / 24;
  q = q * r + 1.0f / 6;
  q = q * r + 0.5f;
  q = q * r + 1.0f;
  const vec16i bits = (__builtin_convertvector(n, vec16i) + 127) << 23;  // 2^n as a float's bits
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return {scale, r, q};
}

// e^x, 16 lanes: 2^n e^r.
inline vec16 exp16(vec16 x) {
  const ExpParts e = exp_parts(x);
  return (e.q * e.r + 1.0f) * e.scale;
}

// 1 / (1 + e^-x), 16 lanes (the sigmoid in the scalar kernels' order of operations).
inline vec16 sigmoid16(vec16 x) { return 1.0f / (1.0f + exp16(-x)); }

// e^x - 1, 16 lanes, accurate near 0 too: 2^n (e^r - 1) + (2^n - 1).
inline vec16 expm1_16(vec16 x) {
  const ExpParts e = exp_parts(x);
  return e.scale * (e.q * e.r) + (e.scale - 1.0f);
}

// tanh(x), 16 lanes: tanh(|x|) = -t / (t + 2) with t = e^(-2|x|) - 1 in (-1, 0] (no cancellation
// near 0, where tanh(x) ~ x), then x's sign.
inline vec16 tanh16(vec16 x) {
  const vec16 a = x < 0.0f ? -x : x;
  const vec16 t = expm1_16(-2.0f * a);
  const vec16 th = -t / (t + 2.0f);
  return x < 0.0f ? -th : th;
}

// cap * tanh(x / cap), 16 lanes (the 7B models' soft cap of gates and logits; cap > 0).
inline vec16 soft_cap16(vec16 x, float cap) { return tanh16(x / cap) * cap; }

// log(1 + u) for u in [0, 1], 16 lanes: 2 atanh(s) with s = u / (2 + u) in [0, 1/3], by its series
// 2 (s + s^3/3 + ... + s^15/15) (relative error < 2e-9; accurate for tiny u, where it is ~u).
inline vec16 log1p_unit16(vec16 u) {
  const vec16 s = u / (u + 2.0f);
  const vec16 s2 = s * s;
  vec16 p = splat16(2.0f / 15);
  p = p * s2 + 2.0f / 13;
  p = p * s2 + 2.0f / 11;
  p = p * s2 + 2.0f / 9;
  p = p * s2 + 2.0f / 7;
  p = p * s2 + 2.0f / 5;
  p = p * s2 + 2.0f / 3;
  p = p * s2 + 2.0f;
  return s * p;
}

// log(sigmoid(x)) = min(x, 0) - log(1 + e^-|x|), 16 lanes, without overflow.
inline vec16 log_sigmoid16(vec16 x) {
  const vec16 a = x < 0.0f ? -x : x;
  return (x < 0.0f ? x : splat16(0.0f)) - log1p_unit16(exp16(-a));
}

// erf(x), 16 lanes, within ~3 ulps: for |x| < 1, x P(x^2), P a least-squares fit of erf(x) / x
// of degree 6 in x^2 (relative error < 5e-9); for 1 <= |x| < 4, 1 - e^(-x^2) Q(t) with
// t = 1 / (1 + |x| / 2), Q a fit of erfc(x) e^(x^2) of degree 7 in t (relative error < 2e-9); beyond,
// 1 (erfc(4) ~ 1.5e-8 is under half an ulp of 1); then x's sign. Both fits were made in float64 by
// numpy.polynomial.polynomial.polyfit on 40,001 evenly spaced points against scipy.special.erf(c).
inline vec16 erf16(vec16 x) {
  const vec16 a = x < 0.0f ? -x : x;
  const vec16 a2 = a * a;
  vec16 p = splat16(8.00695026e-05f);
  p = p * a2 - 0.000805377102f;
  p = p * a2 + 0.00519295979f;
  p = p * a2 - 0.0268560704f;
  p = p * a2 + 0.112836347f;
  p = p * a2 - 0.376126298f;
  p = p * a2 + 1.12837917f;
  const vec16 t = 1.0f / (1.0f + 0.5f * a);
  vec16 q = splat16(0.120152601f);
  q = q * t - 0.474125895f;
  q = q * t + 0.567775354f;
  q = q * t - 0.107417842f;
  q = q * t + 0.349705932f;
  q = q * t + 0.259124384f;
  q = q * t + 0.285003902f;
  q = q * t - 0.000160451788f;
  const vec16 e = a < 1.0f ? a * p : (a < 4.0f ? 1.0f - exp16(-a2) * q : splat16(1.0f));
  return x < 0.0f ? -e : e;
}

// The sum of the 16 lanes, pairwise: the halves added until one lane is left.
inline float hsum16(vec16 v) {
  using vec8 = float __attribute__((vector_size(32)));
  using vec4 = float __attribute__((vector_size(16)));
  const vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The sums of the norms: of x[i], and of (x[i] - shift)^2, for i < n. 16 lanes at a time (a
// sequential float sum cannot be vectorised), the lanes added pairwise at the end, then the tail.
inline float lane_sum(const float* x, int64_t n) {
  vec16 lanes = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) lanes += load16(x + i);
  float sum = hsum16(lanes);
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
  float sum = hsum16(lanes);
  for (; i < n; ++i) sum += (x[i] - shift) * (x[i] - shift);
  return sum;
}

}  // namespace xlstm_cpu
