// Float32 CPU kernels of the two xLSTM cells, one (batch, head) at a time, and of the paper blocks'
// causal convolution, one sequence at a time.
//
// Used by the onnxruntime custom-op library (cpu_ops.cc), which replaces the decode step of the
// `xlstm::mLSTM` function body, the time loop of the `xlstm::sLSTM` body, the whole 7B-style
// mLSTM layer between its weight products and the paper blocks' convolutions with these (see
// xlstm_export/ort_native.py). The math is
// exactly the references' (kernels/mlstm/naive.py `_step`, kernels/slstm/naive.py), in float32, with
// the same association order where it matters (h = num / den, not num * (1 / den)); the mLSTM gates'
// and the sLSTM cell's exponentials, logarithms and tanh and the soft caps run in 16-lane vectors
// (cpu_vec.h, within ~2 ulps).
//
// Memory layout: every array is dense row-major; the caller hands in pointers to one head's slice.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "cpu_vec.h"

namespace xlstm_cpu {

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// ---- the mLSTM cell --------------------------------------------------------------------------

// Columns [d0, d0 + 16 V) of one mLSTM step (mlstm_update_head), V vectors of 16 (Partial: the last
// one holds only `last` columns): each row's piece of C is decayed, written and read for h while in
// registers, and h's sums stay in registers across the rows (a template, so that they do).
template <int V, bool Partial>
inline void mlstm_columns(const float* q, const float* k, const float* v, float f_act, float i_act, float scale,
                          float den, const float* c0, int dqk, int dv, int d0, int last, float* h, float* c) {
  auto load = [&](const float* p, int u) { return Partial && u == V - 1 ? load16_part(p, last) : load16(p); };
  auto store = [&](float* p, vec16 x, int u) {
    if (Partial && u == V - 1) {
      store16_part(p, x, last);
    } else {
      store16(p, x);
    }
  };
  vec16 v_part[V], sum[V];
  for (int u = 0; u < V; ++u) {
    v_part[u] = load(v + d0 + 16 * u, u);
    sum[u] = splat16(0.0f);
  }
  for (int j = 0; j < dqk; ++j) {
    const float kj = i_act * k[j], qj = q[j] * scale;
    const float* c0_row = c0 + static_cast<std::ptrdiff_t>(j) * dv + d0;
    float* c_row = c + static_cast<std::ptrdiff_t>(j) * dv + d0;
    for (int u = 0; u < V; ++u) {
      const vec16 cv = f_act * load(c0_row + 16 * u, u) + kj * v_part[u];
      store(c_row + 16 * u, cv, u);
      sum[u] += qj * cv;
    }
  }
  for (int u = 0; u < V; ++u) store(h + d0 + 16 * u, sum[u] / den, u);
}

// One mLSTM step of one head, given its gate activations:
//   f_act = exp(log sigmoid(f~) + m_prev - m), i_act = exp(i~ - m), floor = exp(-m)  (m: the new stabilizer)
//   q, k [dqk]  v [dv]  (q unscaled: scaled by 1/sqrt(dqk) here)
//   c0 [dqk, dv]  n0 [dqk]: the state before the step; c0 may be c and n0 may be n (in place)
//   h [dv]  c [dqk, dv]  n [dqk]: outputs
// C_t = f' C_{t-1} + i' k v^T and h = q^T C_t / max(|q . n_t|, floor) in one pass over the matrix
// memory, 64 columns at a time (mlstm_columns). In two parts, so that a caller can run the first
// part of several heads before the second (mlstm_layer_heads): mlstm_normalizer writes n_t and
// returns the denominator, mlstm_memory updates C and writes h.
inline float mlstm_normalizer(const float* q, const float* k, float f_act, float i_act, float floor, const float* n0,
                              int dqk, float eps, float* n) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  float qn = 0.0f;
  for (int j = 0; j < dqk; ++j) {
    const float nj = f_act * n0[j] + i_act * k[j];  // n_t = f' n_{t-1} + i' k
    n[j] = nj;
    qn += q[j] * scale * nj;
  }
  return std::max(std::fabs(qn), floor) + eps;
}

inline void mlstm_memory(const float* q, const float* k, const float* v, float f_act, float i_act, float den,
                         const float* c0, int dqk, int dv, float* h, float* c) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  int d0 = 0;
  for (; d0 + 64 <= dv; d0 += 64) mlstm_columns<4, false>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, 16, h, c);
  const int rest = dv - d0, full = rest / 16, last = rest % 16;
  switch (full + (last > 0 ? 4 : 0)) {  // what is left: 0-3 full vectors, then maybe a partial one
    case 1: mlstm_columns<1, false>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, 16, h, c); break;
    case 2: mlstm_columns<2, false>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, 16, h, c); break;
    case 3: mlstm_columns<3, false>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, 16, h, c); break;
    case 4: mlstm_columns<1, true>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, last, h, c); break;
    case 5: mlstm_columns<2, true>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, last, h, c); break;
    case 6: mlstm_columns<3, true>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, last, h, c); break;
    case 7: mlstm_columns<4, true>(q, k, v, f_act, i_act, scale, den, c0, dqk, dv, d0, last, h, c); break;
    default: break;  // nothing left
  }
}

inline void mlstm_update_head(const float* q, const float* k, const float* v, float f_act, float i_act, float floor,
                              const float* c0, const float* n0, int dqk, int dv, float eps, float* h, float* c,
                              float* n) {
  const float den = mlstm_normalizer(q, k, f_act, i_act, floor, n0, dqk, eps, n);
  mlstm_memory(q, k, v, f_act, i_act, den, c0, dqk, dv, h, c);
}

// The gate activations of mLSTM heads for E = rows * S * NH (row, step, head) triples at once, in
// [rows, S, NH] order, in 16-lane vectors (in scalar code they were most of a decode step's time
// per head); only the stabilizer's running max goes step by step.
//   i, f: in: the pre-activations i~, f~; out: i_act = exp(i~ - m_t), f_act = exp(log sigmoid(f~) + m_{t-1} - m_t)
//   floor: out: exp(-m_t);  m0 [rows, NH]: the stabilizer before step 0;  m [rows, NH]: out, after the
//   last step (may be m0: each element is read before it is written)
//   cap > 0: the 7B gates' soft cap cap * tanh(x / cap) on i~ and f~ first
inline void mlstm_gates(float* i, float* f, float* floor, const float* m0, float* m, int64_t rows, int64_t S,
                        int64_t NH, float cap) {
  const int64_t E = rows * S * NH;
  for (int64_t e = 0; e < E; e += 16) {  // i~ and log f (in f), capped first where the model caps them
    const int64_t len = std::min<int64_t>(16, E - e);
    vec16 ip = len == 16 ? load16(i + e) : load16_part(i + e, len);
    vec16 fp = len == 16 ? load16(f + e) : load16_part(f + e, len);
    if (cap > 0.0f) {
      ip = soft_cap16(ip, cap);
      fp = soft_cap16(fp, cap);
    }
    const vec16 log_f = log_sigmoid16(fp);
    if (len == 16) {
      store16(i + e, ip);
      store16(f + e, log_f);
    } else {
      store16_part(i + e, ip, len);
      store16_part(f + e, log_f, len);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // m_t = max(log f + m_{t-1}, i~): f becomes log f + m_{t-1}
    for (int64_t h = 0; h < NH; ++h) {
      float m_prev = m0[r * NH + h];
      for (int64_t t = 0; t < S; ++t) {
        const int64_t e = (r * S + t) * NH + h;
        f[e] += m_prev;
        m_prev = std::max(f[e], i[e]);
        floor[e] = m_prev;
      }
      m[r * NH + h] = m_prev;
    }
  }
  for (int64_t e = 0; e < E; e += 16) {
    const int64_t len = std::min<int64_t>(16, E - e);
    const vec16 lfm = len == 16 ? load16(f + e) : load16_part(f + e, len);
    const vec16 ip = len == 16 ? load16(i + e) : load16_part(i + e, len);
    const vec16 m_t = len == 16 ? load16(floor + e) : load16_part(floor + e, len);
    const vec16 out[3] = {exp16(ip - m_t), exp16(lfm - m_t), exp16(-m_t)};
    float* to[3] = {i + e, f + e, floor + e};
    for (int j = 0; j < 3; ++j) {
      if (len == 16) {
        store16(to[j], out[j]);
      } else {
        store16_part(to[j], out[j], len);
      }
    }
  }
}

// The 7B-style mLSTM layer between its two weight products, for one (batch row, head) and S steps,
// after mlstm_gates: the cell -> per-head LayerNorm -> output-gate product (or the paper block's
// skip and gate, below). Per step t, each input
// is read from row t of its array (its own row stride), starting at this head's columns:
//   q, k: dqk values;  v, o: dv values (o: output-gate pre-activations)
//   i_act, f_act, floor: this head's gate activations (mlstm_gates'), act_stride apart
//   ln_scale, ln_bias [dv]: the LayerNorm's affine part; weight [dv]: the per-head slice of the
//   norm weight multiplied after it
//   c0, n0: the state before; c, n: after (c0 may be c, n0 may be n)
//   y: dv values per step, ((LN(h) * ln_scale + ln_bias) * weight) * sigmoid(o), the product before the
//      gate rounded to bfloat16 where bf16 (a bf16 export's Cast there)
//   h: scratch [dv]
// The paper block's mLSTM layer (skip != nullptr) ends otherwise: o holds its z (the up-projection's
// second half), xc the convolution's output (dv values per step, xc_stride apart), skip [dv] the
// per-head slice of its learnable skip, and
//   y = ((LN(h) * ln_scale + ln_bias) * weight + skip * xc) * (z * sigmoid(z))
// (the first product rounded to bfloat16 where bf16, as there too).
struct MlstmLayerHead {
  const float *q, *k, *v, *o, *i_act, *f_act, *floor;
  std::ptrdiff_t q_stride, k_stride, v_stride, o_stride, act_stride, y_stride;
  float eps, norm_eps;
  const float *ln_scale, *ln_bias, *weight;
  const float *skip, *xc;  // the paper block's, or nullptr
  std::ptrdiff_t xc_stride;
  const float *c0, *n0;
  float *c, *n, *y, *h;
  bool bf16;  // a bf16 export's layer: round LN(h) * weight to bfloat16 (before the gate, or the skip)
};

// Step t's output of one head of the layer, from its h (a.h): the LayerNorm, the weight and the gate.
inline void mlstm_layer_output(const MlstmLayerHead& a, int t, int dv) {
  const float mean = lane_sum(a.h, dv) / static_cast<float>(dv);
  const float var = lane_sum_squared_deviation(a.h, dv, mean);
  const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(dv) + a.norm_eps);
  const float* o = a.o + t * a.o_stride;
  const float* xc = a.skip ? a.xc + t * a.xc_stride : nullptr;
  float* y = a.y + t * a.y_stride;
  int d = 0;
  for (; d + 16 <= dv; d += 16) {  // the output gate's sigmoid in 16 lanes
    const vec16 normed = (load16(a.h + d) - mean) * inv_std * load16(a.ln_scale + d) + load16(a.ln_bias + d);
    const vec16 gate = load16(o + d);
    vec16 weighted = normed * load16(a.weight + d);
    if (a.bf16) weighted = round_bf16_16(weighted);
    if (a.skip) {
      store16(y + d, (weighted + load16(a.skip + d) * load16(xc + d)) * (gate * sigmoid16(gate)));
    } else {
      store16(y + d, weighted * sigmoid16(gate));
    }
  }
  for (; d < dv; ++d) {
    const float normed = (a.h[d] - mean) * inv_std * a.ln_scale[d] + a.ln_bias[d];
    const float weighted = a.bf16 ? round_bf16(normed * a.weight[d]) : normed * a.weight[d];
    if (a.skip) {
      y[d] = (weighted + a.skip[d] * xc[d]) * (o[d] * sigmoid(o[d]));
    } else {
      y[d] = weighted * sigmoid(o[d]);
    }
  }
}

// mlstm_layer_head for g heads at once (a[0..g), each with its own h scratch), step by step: each
// part of a step (the normalizer, the matrix memory, the output) runs for all g heads before the
// next part. A small head's step is a short chain of dependent operations, and the heads' chains
// are independent: run side by side, the core overlaps them and the loads of their states
// (tiny-large, dqk = 16, dv = 32, 4 heads: its decode step at B = 25 / 32 took 202 / 244 us with a
// head at a time, 197 / 240 us with a row's 4 heads together). Each head's arithmetic is exactly
// mlstm_layer_head's, whatever g.
inline void mlstm_layer_heads(const MlstmLayerHead* a, int g, int s, int dqk, int dv) {
  constexpr int kMaxGroup = 16;
  for (int t = 0; t < s; ++t) {
    for (int j0 = 0; j0 < g; j0 += kMaxGroup) {
      const int j1 = std::min(g, j0 + kMaxGroup);
      float den[kMaxGroup];
      for (int j = j0; j < j1; ++j) {  // later steps update the state in place
        const MlstmLayerHead& h = a[j];
        den[j - j0] = mlstm_normalizer(h.q + t * h.q_stride, h.k + t * h.k_stride, h.f_act[t * h.act_stride],
                                       h.i_act[t * h.act_stride], h.floor[t * h.act_stride], t == 0 ? h.n0 : h.n,
                                       dqk, h.eps, h.n);
      }
      for (int j = j0; j < j1; ++j) {
        const MlstmLayerHead& h = a[j];
        mlstm_memory(h.q + t * h.q_stride, h.k + t * h.k_stride, h.v + t * h.v_stride, h.f_act[t * h.act_stride],
                     h.i_act[t * h.act_stride], den[j - j0], t == 0 ? h.c0 : h.c, dqk, dv, h.h, h.c);
      }
      for (int j = j0; j < j1; ++j) mlstm_layer_output(a[j], t, dv);
    }
  }
}

inline void mlstm_layer_head(const MlstmLayerHead& a, int s, int dqk, int dv) { mlstm_layer_heads(&a, 1, s, dqk, dv); }

// Columns [j0, j0 + 16 V) of R rows of out = x @ w (x [R, k] rows ldx apart, w [k, n] row-major,
// out rows ldo apart), V vectors of 16 (Partial: the last one holds only `last` columns). The R x V
// sums stay in registers across w's rows (a template, so that they do) and are added in the rows'
// order; each vector of w loaded is used by all R rows.
template <int R, int V, bool Partial>
inline void rows_matrix_columns(const float* x, std::ptrdiff_t ldx, const float* w, int k, int n, int j0, int last,
                                float* out, std::ptrdiff_t ldo) {
  vec16 sum[R][V];
  for (int q = 0; q < R; ++q)
    for (int u = 0; u < V; ++u) sum[q][u] = splat16(0.0f);
  for (int i = 0; i < k; ++i) {
    const float* row = w + static_cast<std::ptrdiff_t>(i) * n + j0;
    vec16 wv[V];
    for (int u = 0; u < V; ++u) wv[u] = Partial && u == V - 1 ? load16_part(row + 16 * u, last) : load16(row + 16 * u);
    for (int q = 0; q < R; ++q) {
      const vec16 xi = splat16(x[q * ldx + i]);
      for (int u = 0; u < V; ++u) sum[q][u] += xi * wv[u];
    }
  }
  for (int q = 0; q < R; ++q) {
    for (int u = 0; u < V; ++u) {
      if (Partial && u == V - 1) {
        store16_part(out + q * ldo + j0 + 16 * u, sum[q][u], last);
      } else {
        store16(out + q * ldo + j0 + 16 * u, sum[q][u]);
      }
    }
  }
}

// R rows of out = x @ w, 64 columns at a time (rows_matrix_columns).
template <int R>
inline void rows_matrix(const float* x, std::ptrdiff_t ldx, const float* w, int k, int n, float* out,
                        std::ptrdiff_t ldo) {
  int j0 = 0;
  for (; j0 + 64 <= n; j0 += 64) rows_matrix_columns<R, 4, false>(x, ldx, w, k, n, j0, 16, out, ldo);
  const int rest = n - j0, full = rest / 16, last = rest % 16;
  switch (full + (last > 0 ? 4 : 0)) {  // what is left: 0-3 full vectors, then maybe a partial one
    case 1: rows_matrix_columns<R, 1, false>(x, ldx, w, k, n, j0, 16, out, ldo); break;
    case 2: rows_matrix_columns<R, 2, false>(x, ldx, w, k, n, j0, 16, out, ldo); break;
    case 3: rows_matrix_columns<R, 3, false>(x, ldx, w, k, n, j0, 16, out, ldo); break;
    case 4: rows_matrix_columns<R, 1, true>(x, ldx, w, k, n, j0, last, out, ldo); break;
    case 5: rows_matrix_columns<R, 2, true>(x, ldx, w, k, n, j0, last, out, ldo); break;
    case 6: rows_matrix_columns<R, 3, true>(x, ldx, w, k, n, j0, last, out, ldo); break;
    case 7: rows_matrix_columns<R, 4, true>(x, ldx, w, k, n, j0, last, out, ldo); break;
    default: break;  // nothing left
  }
}

// out [rows, n] = x [rows, k] @ w [k, n] (x's rows ldx apart, out's ldo apart), 4 rows at a time: the
// sLSTM's recurrent product h_{t-1} @ r and the paper block's head-wise gate products, too small for
// the packed products' panels. Each row's sums run in w's row order whatever the rows around it.
inline void rows_times_matrix(const float* x, std::ptrdiff_t ldx, int rows, const float* w, int k, int n, float* out,
                              std::ptrdiff_t ldo) {
  int q = 0;
  for (; q + 4 <= rows; q += 4) rows_matrix<4>(x + q * ldx, ldx, w, k, n, out + q * ldo, ldo);
  switch (rows - q) {
    case 1: rows_matrix<1>(x + q * ldx, ldx, w, k, n, out + q * ldo, ldo); break;
    case 2: rows_matrix<2>(x + q * ldx, ldx, w, k, n, out + q * ldo, ldo); break;
    case 3: rows_matrix<3>(x + q * ldx, ldx, w, k, n, out + q * ldo, ldo); break;
    default: break;
  }
}

// One sLSTM cell update of one sequence and head (gate order i, f, z, o), 16 lanes at a time (scalar
// exp, log and tanh were most of a step):
//   xt [4*dh]: W x_t with the bias added;  pre [4*dh]: h_{t-1} @ r
//   c, n, m [dh]: the state, updated in place;  y [dh]: h_t
inline void slstm_cell_update(const float* xt, const float* pre, int dh, float* c, float* n, float* m, float* y) {
  for (int e = 0; e < dh; e += 16) {
    const int len = std::min(16, dh - e);
    const auto load = [&](const float* p) { return len == 16 ? load16(p + e) : load16_part(p + e, len); };
    // x_t + h_{t-1} @ r, summed in the Scan body's order (x first)
    const vec16 ip = load(xt) + load(pre);
    const vec16 fp = load(xt + dh) + load(pre + dh);
    const vec16 zp = load(xt + 2 * dh) + load(pre + 2 * dh);
    const vec16 op = load(xt + 3 * dh) + load(pre + 3 * dh);
    const vec16 n_old = load(n);
    const vec16 lfm = log_sigmoid16(fp) + load(m);
    // n == 0 (a fresh sequence): m starts at i~ as in the official cell, so n_1 = 1 for any i~
    const vec16 m_new = n_old == 0.0f ? ip : (ip > lfm ? ip : lfm);
    const vec16 i_act = exp16(ip - m_new);
    const vec16 d = lfm - m_new;
    const vec16 f_act = exp16(d < 0.0f ? d : splat16(0.0f));
    const vec16 c_new = f_act * load(c) + i_act * tanh16(zp);
    const vec16 n_new = f_act * n_old + i_act;
    const vec16 h_new = sigmoid16(op) * c_new / n_new;
    const auto store = [&](float* p, vec16 v) {
      if (len == 16) {
        store16(p + e, v);
      } else {
        store16_part(p + e, v, len);
      }
    };
    store(c, c_new);
    store(n, n_new);
    store(m, m_new);
    store(y, h_new);
  }
}

// The sLSTM time loop of `rows` sequences of one head, whose recurrent products share each load of
// the head's weights (rows_times_matrix).
//   x: row q's W x_t (bias added, 4*dh values) at x + q * x_row + t * x_step;  r [dh, 4*dh]: the head's
//   state: row q's h, c, n, m (dh values each) at + q * state_row, updated in place (initialise
//   them with the initial state);  y: row q's h_t at y + q * y_row + t * y_step
//   pre [rows, 4*dh]: scratch
struct SlstmRows {
  const float *x, *r;
  std::ptrdiff_t x_row, x_step;
  float *h, *c, *n, *m;
  std::ptrdiff_t state_row;
  float* y;
  std::ptrdiff_t y_row, y_step;
  float* pre;
};

inline void slstm_scan_rows(const SlstmRows& a, int rows, int s, int dh) {
  const int g4 = 4 * dh;
  for (int t = 0; t < s; ++t) {
    rows_times_matrix(a.h, a.state_row, rows, a.r, dh, g4, a.pre, g4);  // h_{t-1} @ r, every row
    for (int q = 0; q < rows; ++q) {
      const std::ptrdiff_t st = q * a.state_row;
      float* yt = a.y + q * a.y_row + t * a.y_step;
      slstm_cell_update(a.x + q * a.x_row + t * a.x_step, a.pre + q * g4, dh, a.c + st, a.n + st, a.m + st, yt);
      std::copy(yt, yt + dh, a.h + st);
    }
  }
}

// The paper sLSTM block's layer between its convolution and its residual, for `rows` sequences of
// one head and S steps (models/blocks.py sLSTMBlock): per step t
//   gates = [xc_t @ w_if | x_t @ w_zo] + bias        (i, f from the convolution's branch; z, o from x)
//   h_t = the cell's step (slstm_scan_rows) from gates and the state
//   y_t = ((h_t - mean) / sqrt(var + norm_eps) * ln_scale + ln_bias) * weight   (the head's LayerNorm;
//         rounded to bfloat16 where bf16: a bf16 export's Cast before the residual)
//   xc, x: this head's dh inputs of row q, step t at + (q * s + t) * x_stride (rows and steps of
//   [B, S, E] inputs);  w_if, w_zo [dh, 2 dh]  bias [4 dh]  r [dh, 4 dh]: this head's;
//   ln_scale, ln_bias [dh];  weight [dh]: this head's slice;  h, c, n, m: row q's dh values at
//   + q * state_row, updated in place;  y: dh values at + (q * s + t) * y_stride
//   scratch [rows * s * 4 dh + rows * 4 dh + rows * s * dh]
struct SlstmLayerHead {
  const float *xc, *x, *w_if, *w_zo, *bias, *r, *ln_scale, *ln_bias, *weight;
  std::ptrdiff_t x_stride, y_stride, state_row;
  float norm_eps;
  float *h, *c, *n, *m, *y, *scratch;
  bool bf16;
};

inline void slstm_layer_head(const SlstmLayerHead& a, int rows, int s, int dh) {
  const int g4 = 4 * dh, steps = rows * s;
  float* gates = a.scratch;  // [rows * s, 4 dh]
  float* pre = gates + static_cast<std::ptrdiff_t>(steps) * g4;  // [rows, 4 dh]: slstm_scan_rows'
  float* h_all = pre + static_cast<std::ptrdiff_t>(rows) * g4;  // [rows * s, dh]: the cell's h
  // every row's and step's gates at once: the head's weights are read once per 4 rows
  rows_times_matrix(a.xc, a.x_stride, steps, a.w_if, dh, 2 * dh, gates, g4);
  rows_times_matrix(a.x, a.x_stride, steps, a.w_zo, dh, 2 * dh, gates + 2 * dh, g4);
  for (int j = 0; j < steps; ++j)
    for (int g = 0; g < g4; ++g) gates[j * g4 + g] += a.bias[g];  // W x + b, as the cell's body adds it
  slstm_scan_rows({gates, a.r, static_cast<std::ptrdiff_t>(s) * g4, g4, a.h, a.c, a.n, a.m, a.state_row, h_all,
                   static_cast<std::ptrdiff_t>(s) * dh, dh, pre},
                  rows, s, dh);
  for (int j = 0; j < steps; ++j) {
    const float* h_t = h_all + static_cast<std::ptrdiff_t>(j) * dh;
    const float mean = lane_sum(h_t, dh) / static_cast<float>(dh);
    const float var = lane_sum_squared_deviation(h_t, dh, mean);
    const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(dh) + a.norm_eps);
    float* y = a.y + j * a.y_stride;
    for (int d = 0; d < dh; ++d) y[d] = ((h_t[d] - mean) * inv_std * a.ln_scale[d] + a.ln_bias[d]) * a.weight[d];
    if (a.bf16)
      for (int d = 0; d < dh; ++d) y[d] = round_bf16(y[d]);
  }
}

// ---- the paper blocks' causal convolution ------------------------------------------------------

// One sequence of a depthwise causal convolution over time that carries its last K - 1 inputs
// (models/layers.py CausalConv1d, as exported): with cat = [past; x] ([K - 1 + s, d] rows),
//   y[t] = ((cat[t] w[0] + cat[t + 1] w[1]) + ... + cat[t + K - 1] w[K - 1]) + bias   (the graph's order)
//   and then, when `silu`, y[t] * sigmoid(y[t]);  present = the last K - 1 rows of cat.
//   x [s, d]  past, present [K - 1, d] (not the same memory)  w [K, d]  bias [d]  y [s, d]
//   bf16: past's values rounded to bfloat16 as they are read (a bf16 export's conv state; the
//   rounded values go on into present)
inline void causal_conv_sequence(const float* x, const float* past, const float* w, const float* bias, int K, int s,
                                 int64_t d, bool silu, bool bf16, float* y, float* present) {
  std::vector<float> rounded(bf16 ? static_cast<size_t>((K - 1) * d) : 0);
  if (bf16) {
    for (size_t j = 0; j < rounded.size(); ++j) rounded[j] = round_bf16(past[j]);
    past = rounded.data();
  }
  const auto row = [&](int r) { return r < K - 1 ? past + r * d : x + (r - (K - 1)) * d; };  // cat's row r
  for (int t = 0; t < s; ++t) {
    for (int64_t c = 0; c < d; c += 16) {
      const int64_t len = std::min<int64_t>(16, d - c);
      const auto load = [&](const float* p) { return len == 16 ? load16(p + c) : load16_part(p + c, len); };
      vec16 acc = load(row(t)) * load(w);
      for (int j = 1; j < K; ++j) acc = acc + load(row(t + j)) * load(w + j * d);
      acc = acc + load(bias);
      if (silu) acc = acc * (1.0f / (1.0f + exp16(-acc)));
      if (len == 16) {
        store16(y + t * d + c, acc);
      } else {
        store16_part(y + t * d + c, acc, len);
      }
    }
  }
  for (int r = 0; r < K - 1; ++r) std::copy(row(s + r), row(s + r) + d, present + r * d);
}

}  // namespace xlstm_cpu
