// Float32 matrix product y = x W against a weight packed into column panels.
//
// Used by the onnxruntime custom op xlstm.cpu::PackedMatMul (cpu_ops.cc); xlstm_export/ort_native.py
// packs the weights of an exported model's MatMuls when it loads the model.
//
// Why a packed layout: a decode step is a chain of matrix-vector products whose cost is reading
// every weight once from DRAM. In an ONNX MatMul's [K, N] row-major weight, a thread that owns a
// range of output columns reads K short pieces strided N floats apart. Packed as [P, K, 32]
// (panel p holds columns 32p .. 32p+31, one 32-float row after another, the last panel zero-padded),
// a thread that owns a range of panels reads one contiguous range of memory front to back, which
// is what the hardware prefetchers stream best. The same layout feeds a register-blocked kernel
// (6 rows x 64 columns, two adjacent panels, of accumulators: each weight vector loaded once per 6
// rows, each x value once per 4 vectors; a last odd panel 8 rows x 32 columns), so the prefill
// products with many rows are compute-bound rather than load-bound.
//
// The weight may also be held as bfloat16 (its 16 high bits per value, the same panels, each
// 32-column row interleaved: load_weight_row): each row is widened to float32 as it is loaded,
// which is exact, so the products are the same to the bit as over the float32 weight, from half
// the bytes (a decode step streams them all).
//
// The vectors are cpu_vec.h's (16 floats).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_vec.h"

namespace xlstm_cpu {

constexpr int kPanel = 32;  // columns per packed panel

// One row of a panel, its 32 weights as float32 (columns 0-15 in lo, 16-31 in hi): loaded, or
// widened from bfloat16 bits (a bfloat16 is a float32's high half). A bfloat16 row is stored
// interleaved, columns j and 16 + j in the low and high half of 32-bit word j
// (ort_native.interleave_bf16_rows), so one load and two bit operations widen all 32.
inline void load_weight_row(const float* p, vec16& lo, vec16& hi) {
  lo = load16(p);
  hi = load16(p + 16);
}

inline void load_weight_row(const uint16_t* p, vec16& lo, vec16& hi) {
  using bits32 = uint32_t __attribute__((vector_size(64)));
  bits32 w;
  std::memcpy(&w, p, sizeof w);
  const bits32 low = w << 16, high = w & 0xFFFF0000u;
  std::memcpy(&lo, &low, sizeof lo);
  std::memcpy(&hi, &high, sizeof hi);
}

// ---- the products' prologues and epilogues -----------------------------------------------------

// One row of the gated unit between an FFN's two products: out[f] = act(z[f]) * z[F + f] for f < F,
// act the SwiGLU's silu(a) = a * sigmoid(a) = a / (1 + e^-a) (the 7B blocks') or, where `gelu`,
// the exact GELU a * (0.5 * (erf(a / div) + 1)) in the exported graph's order (the paper blocks'
// GeGLU; div is sqrt 2 as the graph holds it: its float32 value, or its bfloat16 one, 1.4140625). Whole vectors are read in place; only a last partial vector goes through a
// zero-padded buffer.
inline vec16 glu16(vec16 a, vec16 b, bool gelu, float div) {
  if (gelu) return a * (0.5f * (erf16(a / div) + 1.0f)) * b;
  return a / (1.0f + exp16(-a)) * b;
}

inline void glu_row(const float* z, int64_t F, bool gelu, float div, float* out) {
  int64_t f = 0;
  for (; f + 16 <= F; f += 16) store16(out + f, glu16(load16(z + f), load16(z + F + f), gelu, div));
  if (f < F) {
    const int64_t len = F - f;
    float a_buf[16] = {}, b_buf[16] = {}, o_buf[16];
    std::memcpy(a_buf, z + f, sizeof(float) * len);
    std::memcpy(b_buf, z + F + f, sizeof(float) * len);
    store16(o_buf, glu16(load16(a_buf), load16(b_buf), gelu, div));
    std::memcpy(out + f, o_buf, sizeof(float) * len);
  }
}

// y[j] = cap * tanh(y[j] / cap) for j < n (the logits' soft cap; cpu_vec.h's soft_cap16).
inline void soft_cap_row(float* y, int n, float cap) {
  int j = 0;
  for (; j + 16 <= n; j += 16) store16(y + j, soft_cap16(load16(y + j), cap));
  if (j < n) {
    float buf[16] = {};
    std::memcpy(buf, y + j, sizeof(float) * (n - j));
    store16(buf, soft_cap16(load16(buf), cap));
    std::memcpy(y + j, buf, sizeof(float) * (n - j));
  }
}

// out[k] = x[k] / sqrt(mean(x^2) + eps) * g[k]  for k < K: one row of an RMS norm (the 7B blocks'
// norm before their products; the exported graph's order of operations; the sum of squares in lanes),
// each value rounded to bfloat16 where `bf16` (a bf16 export's norm, whose output the graph rounds).
inline void rms_norm_row(const float* x, const float* g, int64_t K, float eps, bool bf16, float* out) {
  const float rms = std::sqrt(lane_sum_squared_deviation(x, K, 0.0f) / static_cast<float>(K) + eps);
  for (int64_t k = 0; k < K; ++k) out[k] = x[k] / rms * g[k];
  if (bf16)
    for (int64_t k = 0; k < K; ++k) out[k] = round_bf16(out[k]);
}

// out[k] = (x[k] - mean) / sqrt(var + eps) * g[k] + beta[k]  for k < K, mean and var over the row:
// one row of a LayerNorm (the paper blocks' norm before their products; the sums in lanes).
inline void layer_norm_row(const float* x, const float* g, const float* beta, int64_t K, float eps, float* out) {
  const float mean = lane_sum(x, K) / static_cast<float>(K);
  const float inv_std = 1.0f / std::sqrt(lane_sum_squared_deviation(x, K, mean) / static_cast<float>(K) + eps);
  for (int64_t k = 0; k < K; ++k) out[k] = (x[k] - mean) * inv_std * g[k] + beta[k];
}

// out[r * kPanel + j] = sum_k x[r * ldx + k] * panel[k * kPanel + j]   for r < R, j < kPanel.
// Summed in k order in blocks of kBlockK products (fused multiply-adds where the CPU has them), the
// blocks' sums added up in turn: a running sum over all K products would round against an ever
// larger total (K = 2048: ~3x the rms error of onnxruntime's GEMM against float64; blocked, on par).
constexpr int64_t kBlockK = 128;

// out[r * P * kPanel + j] = sum_k x[r * ldx + k] * panel_{j / kPanel}[k * kPanel + j % kPanel]
//   for r < R, j < P * kPanel: R rows against P adjacent panels (panel + i * K * kPanel), the
//   R x 2P vectors of sums in registers.
template <int R, int P, class W>
inline void panel_block(const float* x, int64_t ldx, const W* panel, int64_t K, float* out) {
  constexpr int V = 2 * P;  // vectors of 16 columns
  vec16 total[R][V] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    vec16 acc[R][V] = {};
    for (int64_t k = k0; k < k1; ++k) {
      vec16 w[V];
      for (int i = 0; i < P; ++i) {
        load_weight_row(panel + i * K * kPanel + k * kPanel, w[2 * i], w[2 * i + 1]);
      }
      for (int r = 0; r < R; ++r) {
        const float xr = x[r * ldx + k];
        for (int v = 0; v < V; ++v) acc[r][v] += xr * w[v];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) total[r][v] += acc[r][v];
  }
  for (int r = 0; r < R; ++r) std::memcpy(out + r * V * 16, total[r], sizeof total[r]);
}

// panel_block for `rows` <= R rows (a row block's remainder: the template for exactly that many).
template <int R, int P, class W>
inline void panel_rows(int rows, const float* x, int64_t ldx, const W* panel, int64_t K, float* out) {
  if (rows == R) {
    panel_block<R, P>(x, ldx, panel, K, out);
  } else if constexpr (R > 1) {
    panel_rows<R - 1, P>(rows, x, ldx, panel, K, out);
  }
}

// y[r, 0:P * kPanel] (+)= the products of x's columns [k0, k1) with P adjacent panels, for r < R:
// one k-block of panel_block's sums, summed from zero in k order and then added to what y holds
// (`first`: nothing yet; the sum is added to zero, as panel_block's total starts), and, after the
// last k-block, `add` (nullptr, or a residual / bias: row stride ldr) added to the total. So y ends
// bit for bit as panel_block's total (+ add). The k loop is panel_block's, written out again: with
// the sums handed between the two through an array reference GCC 12 kept them in memory, and both
// products ran at under half the speed (67 against 124-162 GFLOP/s).
template <int R, int P, class W>
inline void panel_kblock(const float* x, int64_t ldx, const W* panel, int64_t K, int64_t k0, int64_t k1, float* y,
                         int64_t ldy, bool first, const float* add, int64_t ldr) {
  constexpr int V = 2 * P;
  vec16 acc[R][V] = {};
  for (int64_t k = k0; k < k1; ++k) {
    vec16 w[V];
    for (int i = 0; i < P; ++i) {
      load_weight_row(panel + i * K * kPanel + k * kPanel, w[2 * i], w[2 * i + 1]);
    }
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * ldx + k];
      for (int v = 0; v < V; ++v) acc[r][v] += xr * w[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      float* p = y + r * ldy + v * 16;
      vec16 total = (first ? splat16(0.0f) : load16(p)) + acc[r][v];
      if (add != nullptr) total = total + load16(add + r * ldr + v * 16);
      store16(p, total);
    }
  }
}

// panel_kblock for `rows` <= R rows.
template <int R, int P, class W>
inline void panel_kblock_rows(int rows, const float* x, int64_t ldx, const W* panel, int64_t K, int64_t k0,
                              int64_t k1, float* y, int64_t ldy, bool first, const float* add, int64_t ldr) {
  if (rows == R) {
    panel_kblock<R, P>(x, ldx, panel, K, k0, k1, y, ldy, first, add, ldr);
  } else if constexpr (R > 1) {
    panel_kblock_rows<R - 1, P>(rows, x, ldx, panel, K, k0, k1, y, ldy, first, add, ldr);
  }
}

// y[m, 0:cols] = x[m, :] . (P adjacent panels) (+ r[m, 0:cols])  for every m < M.
//   x [M, K] row-major;  panel: the first panel [K, kPanel], the next K * kPanel floats on;
//   y: the first panel's first output column, row stride ldy;  cols <= P * kPanel: the real
//   columns (the rest is padding and is not written);  r: nullptr, or what to add (a residual,
//   row stride ldr; a bias, ldr = 0), at the first panel's first column.
// Panels whose columns are all real go k-block by k-block, every row block against one k-block
// before the next: that block of the weights (kBlockK x P * kPanel floats, 16-32 KiB) stays in L1
// while all the rows use it, and the sums go straight to y. A 768-deep weight's panels (96-192 KiB)
// were otherwise read from L2 by each row block in turn: the 160M model's B = 32 products 10-12%
// faster, tiny-large's 4-13% (bench/cpu_products.py, bench/RESULTS.md); the sums are the same to the
// bit. A last panel with padding goes row block by row block through a buffer (below).
template <int P, class W = float>
inline void packed_matmul_panels(const float* x, int64_t M, int64_t K, const W* panel, float* y, int64_t ldy,
                                 int cols, const float* r = nullptr, int64_t ldr = 0) {
  constexpr int kRows = P == 1 ? 8 : 6;  // rows per block: 2 * P * kRows sums in registers
  constexpr int kWidth = P * kPanel;
  if (cols == kWidth && K > 0) {
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t k1 = std::min(K, k0 + kBlockK);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m0));
        const float* add = k1 == K && r != nullptr ? r + m0 * ldr : nullptr;
        panel_kblock_rows<kRows, P>(rows, x + m0 * K, K, panel, K, k0, k1, y + m0 * ldy, ldy, k0 == 0, add, ldr);
      }
    }
    return;
  }
  float out[kRows * kWidth];
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, M - m0));
    panel_rows<kRows, P>(rows, x + m0 * K, K, panel, K, out);
    for (int row = 0; row < rows; ++row) {
      float* y_row = y + (m0 + row) * ldy;
      const float* o_row = out + row * kWidth;
      if (r == nullptr) {
        std::memcpy(y_row, o_row, sizeof(float) * cols);
      } else {
        const float* r_row = r + (m0 + row) * ldr;
        for (int j = 0; j < cols; ++j) y_row[j] = o_row[j] + r_row[j];
      }
    }
  }
}

// y = x W (+ r) for W's panels [first, last) of `panels` (W [panels, K, kPanel], n real columns;
// float, or uint16_t: bfloat16 bits): two panels at a time, a last odd one alone. y, r: row stride
// n (r: ldr, 0 for a bias).
template <class W>
inline void packed_matmul_range(const float* x, int64_t M, int64_t K, const W* w, int64_t first, int64_t last,
                                int64_t n, float* y, const float* r = nullptr, int64_t ldr = 0) {
  for (int64_t p = first; p < last;) {
    const int64_t take = last - p >= 2 ? 2 : 1;
    const int cols = static_cast<int>(std::min<int64_t>(take * kPanel, n - p * kPanel));
    const W* panel = w + p * K * kPanel;
    float* y_p = y + p * kPanel;
    const float* r_p = r ? r + p * kPanel : nullptr;
    if (take == 2) {
      packed_matmul_panels<2>(x, M, K, panel, y_p, n, cols, r_p, ldr);
    } else {
      packed_matmul_panels<1>(x, M, K, panel, y_p, n, cols, r_p, ldr);
    }
    p += take;
  }
}

// --- block-diagonal products ------------------------------------------------------------------
//
// y = x blockdiag(W_0, ..., W_{nb-1}) for square blocks of BLK (1, 2, 4, 8 or 16) rows: y[j*BLK + a]
// = sum over b of x[j*BLK + b] W_j[b, a], b in order. The paper architecture's q / k / v
// projections (models/layers.py HeadwiseLinear, blocks of 4): onnxruntime runs them as nb tiny
// batched products, ~50 us for nb = 384 whatever the rows. Here one 16-float vector holds 16 / BLK
// blocks: for each b, the x values x[j*BLK + b] are spread over their block's BLK lanes (a
// shuffle) and multiply-added with the packed weights, so a row costs n / 16 * BLK vector
// multiply-adds.
//
// Packed weights [ceil(n / 16), BLK, 16]: vector c, row b, lane l = W_j[b, l % BLK] for block
// j = c * (16 / BLK) + l / BLK (zero past the last block); ort_native.pack_block_diagonal.

template <int BLK, int B, int... L>
inline vec16 spread_lanes(vec16 v, std::integer_sequence<int, L...>) {  // lane l <- lane (l / BLK) * BLK + B
  return __builtin_shufflevector(v, v, ((L / BLK) * BLK + B)...);
}

template <int BLK, int... B>
inline vec16 block_diag_vector(vec16 x, const float* w, std::integer_sequence<int, B...>) {
  vec16 acc{};
  ((acc += spread_lanes<BLK, B>(x, std::make_integer_sequence<int, 16>{}) * load16(w + B * 16)), ...);
  return acc;
}

// One row: x [n], y [n], w packed as above.
template <int BLK>
inline void block_diag_row(const float* x, const float* w, int64_t n, float* y) {
  static_assert(16 % BLK == 0, "blocks of 1, 2, 4, 8 or 16");
  for (int64_t c = 0; c < n; c += 16) {
    const int64_t lanes = std::min<int64_t>(16, n - c);
    const vec16 xv = lanes == 16 ? load16(x + c) : load16_part(x + c, lanes);
    const vec16 yv = block_diag_vector<BLK>(xv, w + c * BLK, std::make_integer_sequence<int, BLK>{});
    if (lanes == 16) {
      store16(y + c, yv);
    } else {
      store16_part(y + c, yv, lanes);
    }
  }
}

}  // namespace xlstm_cpu
