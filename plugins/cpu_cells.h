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
// memory, 64 columns at a time (mlstm_columns).
inline void mlstm_update_head(const float* q, const float* k, const float* v, float f_act, float i_act, float floor,
                              const float* c0, const float* n0, int dqk, int dv, float eps, float* h, float* c,
                              float* n) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  float qn = 0.0f;
  for (int j = 0; j < dqk; ++j) {
    const float nj = f_act * n0[j] + i_act * k[j];  // n_t = f' n_{t-1} + i' k
    n[j] = nj;
    qn += q[j] * scale * nj;
  }
  const float den = std::max(std::fabs(qn), floor) + eps;
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
//   y: dv values per step, ((LN(h) * ln_scale + ln_bias) * weight) * sigmoid(o)
//   h: scratch [dv]
// The paper block's mLSTM layer (skip != nullptr) ends otherwise: o holds its z (the up-projection's
// second half), xc the convolution's output (dv values per step, xc_stride apart), skip [dv] the
// per-head slice of its learnable skip, and
//   y = ((LN(h) * ln_scale + ln_bias) * weight + skip * xc) * (z * sigmoid(z))
struct MlstmLayerHead {
  const float *q, *k, *v, *o, *i_act, *f_act, *floor;
  std::ptrdiff_t q_stride, k_stride, v_stride, o_stride, act_stride, y_stride;
  float eps, norm_eps;
  const float *ln_scale, *ln_bias, *weight;
  const float *skip, *xc;  // the paper block's, or nullptr
  std::ptrdiff_t xc_stride;
  const float *c0, *n0;
  float *c, *n, *y, *h;
};

inline void mlstm_layer_head(const MlstmLayerHead& a, int s, int dqk, int dv) {
  const float* c_prev = a.c0;
  const float* n_prev = a.n0;
  for (int t = 0; t < s; ++t) {
    mlstm_update_head(a.q + t * a.q_stride, a.k + t * a.k_stride, a.v + t * a.v_stride, a.f_act[t * a.act_stride],
                      a.i_act[t * a.act_stride], a.floor[t * a.act_stride], c_prev, n_prev, dqk, dv, a.eps, a.h,
                      a.c, a.n);
    c_prev = a.c;  // later steps update the state in place
    n_prev = a.n;
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
      if (a.skip) {
        const vec16 skipped = normed * load16(a.weight + d) + load16(a.skip + d) * load16(xc + d);
        store16(y + d, skipped * (gate * sigmoid16(gate)));
      } else {
        store16(y + d, normed * load16(a.weight + d) * sigmoid16(gate));
      }
    }
    for (; d < dv; ++d) {
      const float normed = (a.h[d] - mean) * inv_std * a.ln_scale[d] + a.ln_bias[d];
      if (a.skip) {
        y[d] = (normed * a.weight[d] + a.skip[d] * xc[d]) * (o[d] * sigmoid(o[d]));
      } else {
        y[d] = normed * a.weight[d] * sigmoid(o[d]);
      }
    }
  }
}

// Columns [j0, j0 + 16 V) of out = x @ w (x [k], w [k, n] row-major), V vectors of 16 (Partial:
// the last one holds only `last` columns), the sums in registers across w's rows and added in the
// rows' order (a template, so that they stay in registers).
template <int V, bool Partial>
inline void row_matrix_columns(const float* x, const float* w, int k, int n, int j0, int last, float* out) {
  vec16 sum[V];
  for (int u = 0; u < V; ++u) sum[u] = splat16(0.0f);
  for (int i = 0; i < k; ++i) {
    const vec16 xi = splat16(x[i]);
    const float* row = w + static_cast<std::ptrdiff_t>(i) * n + j0;
    for (int u = 0; u < V; ++u) {
      sum[u] += xi * (Partial && u == V - 1 ? load16_part(row + 16 * u, last) : load16(row + 16 * u));
    }
  }
  for (int u = 0; u < V; ++u) {
    if (Partial && u == V - 1) {
      store16_part(out + j0 + 16 * u, sum[u], last);
    } else {
      store16(out + j0 + 16 * u, sum[u]);
    }
  }
}

// out [n] = x [k] @ w [k, n], 64 columns at a time (row_matrix_columns): the sLSTM's recurrent
// product h_{t-1} @ r and the paper block's head-wise gate products, which are too small for the
// packed products' panels.
inline void row_times_matrix(const float* x, const float* w, int k, int n, float* out) {
  int j0 = 0;
  for (; j0 + 64 <= n; j0 += 64) row_matrix_columns<4, false>(x, w, k, n, j0, 16, out);
  const int rest = n - j0, full = rest / 16, last = rest % 16;
  switch (full + (last > 0 ? 4 : 0)) {  // what is left: 0-3 full vectors, then maybe a partial one
    case 1: row_matrix_columns<1, false>(x, w, k, n, j0, 16, out); break;
    case 2: row_matrix_columns<2, false>(x, w, k, n, j0, 16, out); break;
    case 3: row_matrix_columns<3, false>(x, w, k, n, j0, 16, out); break;
    case 4: row_matrix_columns<1, true>(x, w, k, n, j0, last, out); break;
    case 5: row_matrix_columns<2, true>(x, w, k, n, j0, last, out); break;
    case 6: row_matrix_columns<3, true>(x, w, k, n, j0, last, out); break;
    case 7: row_matrix_columns<4, true>(x, w, k, n, j0, last, out); break;
    default: break;  // nothing left
  }
}

// The sLSTM time loop of one head (gate order i, f, z, o).
//   x [s, 4*dh]: W x per step with the bias already added;  r [dh, 4*dh]: this head's recurrent weights
//   h, c, n, m [dh]: the state, updated in place (initialise them with the initial state)
//   y [s, dh] with row stride y_stride: h of every step;  pre [4*dh]: scratch
inline void slstm_scan_head(const float* x, const float* r, int s, int dh, float* h, float* c, float* n,
                            float* m, float* y, std::ptrdiff_t y_stride, float* pre) {
  const int g4 = 4 * dh;
  for (int t = 0; t < s; ++t) {
    const float* xt = x + static_cast<std::ptrdiff_t>(t) * g4;
    row_times_matrix(h, r, dh, g4, pre);  // h_{t-1} @ r
    float* yt = y + t * y_stride;
    for (int e = 0; e < dh; e += 16) {  // 16 lanes at a time (scalar exp, log and tanh were most of a step)
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
      store(yt, h_new);
    }
    for (int e = 0; e < dh; ++e) h[e] = yt[e];
  }
}

// The paper sLSTM block's layer between its convolution and its residual, for one (batch row,
// head) and S steps (models/blocks.py sLSTMBlock): per step t
//   gates = [xc_t @ w_if | x_t @ w_zo] + bias        (i, f from the convolution's branch; z, o from x)
//   h_t = the cell's step (slstm_scan_head) from gates and the state
//   y_t = ((h_t - mean) / sqrt(var + norm_eps) * ln_scale + ln_bias) * weight   (the head's LayerNorm)
//   xc, x: this head's dh inputs of step t at xc + t * x_stride, x + t * x_stride
//   w_if, w_zo [dh, 2 dh]  bias [4 dh]  r [dh, 4 dh]: this head's;  ln_scale, ln_bias [dh]
//   weight [dh]: this head's slice;  h, c, n, m [dh]: the state, updated in place
//   y: dh values per step, y_stride apart;  scratch [9 dh]
struct SlstmLayerHead {
  const float *xc, *x, *w_if, *w_zo, *bias, *r, *ln_scale, *ln_bias, *weight;
  std::ptrdiff_t x_stride, y_stride;
  float norm_eps;
  float *h, *c, *n, *m, *y, *scratch;
};

inline void slstm_layer_head(const SlstmLayerHead& a, int s, int dh) {
  float* gates = a.scratch;  // [4 dh]
  float* pre = gates + 4 * dh;  // [4 dh]: slstm_scan_head's
  float* h_t = pre + 4 * dh;  // [dh]
  for (int t = 0; t < s; ++t) {
    row_times_matrix(a.xc + t * a.x_stride, a.w_if, dh, 2 * dh, gates);
    row_times_matrix(a.x + t * a.x_stride, a.w_zo, dh, 2 * dh, gates + 2 * dh);
    for (int g = 0; g < 4 * dh; ++g) gates[g] += a.bias[g];  // W x + b, as the cell's body adds it
    slstm_scan_head(gates, a.r, 1, dh, a.h, a.c, a.n, a.m, h_t, dh, pre);
    const float mean = lane_sum(h_t, dh) / static_cast<float>(dh);
    const float var = lane_sum_squared_deviation(h_t, dh, mean);
    const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(dh) + a.norm_eps);
    float* y = a.y + t * a.y_stride;
    for (int d = 0; d < dh; ++d) y[d] = ((h_t[d] - mean) * inv_std * a.ln_scale[d] + a.ln_bias[d]) * a.weight[d];
  }
}

// ---- the paper blocks' causal convolution ------------------------------------------------------

// One sequence of a depthwise causal convolution over time that carries its last K - 1 inputs
// (models/layers.py CausalConv1d, as exported): with cat = [past; x] ([K - 1 + s, d] rows),
//   y[t] = ((cat[t] w[0] + cat[t + 1] w[1]) + ... + cat[t + K - 1] w[K - 1]) + bias   (the graph's order)
//   and then, when `silu`, y[t] * sigmoid(y[t]);  present = the last K - 1 rows of cat.
//   x [s, d]  past, present [K - 1, d] (not the same memory)  w [K, d]  bias [d]  y [s, d]
inline void causal_conv_sequence(const float* x, const float* past, const float* w, const float* bias, int K, int s,
                                 int64_t d, bool silu, float* y, float* present) {
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
