// Float32 CPU kernels of the two xLSTM cells, one (batch, head) at a time.
//
// Used by the onnxruntime custom-op library (cpu_ops.cc), which replaces the decode step of the
// `xlstm::mLSTM` function body, the time loop of the `xlstm::sLSTM` body and the whole 7B-style
// mLSTM layer between its weight products with these (see xlstm_export/ort_native.py). The math is exactly the references' (kernels/mlstm/naive.py `_step`,
// kernels/slstm/naive.py), in float32, with the same association order where it matters
// (h = num / den, not num * (1 / den)).
//
// Memory layout: every array is dense row-major; the caller hands in pointers to one head's slice.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>

#include "cpu_vec.h"

namespace xlstm_cpu {

// log(sigmoid(x)) without overflow: min(x, 0) - log1p(exp(-|x|)).
inline float log_sigmoid(float x) { return std::min(x, 0.0f) - std::log1p(std::exp(-std::fabs(x))); }

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// ---- the mLSTM cell --------------------------------------------------------------------------

// One row j of the matrix memory: c[d] = f' c_prev[d] + (i' k_j) v[d], and h[d] += q_j c[d].
// (C_t = f' C_{t-1} + i' k v^T, one row at a time; h accumulates q^T C_t.)
inline void mlstm_row(const float* __restrict c_prev, float* __restrict c, const float* __restrict v, float f_act,
                      float kj, float qj, float* __restrict h, int dv) {
  for (int d = 0; d < dv; ++d) {
    const float cv = f_act * c_prev[d] + kj * v[d];
    c[d] = cv;
    h[d] += qj * cv;
  }
}

// The same row updated in place (c_prev == c).
inline void mlstm_row_inplace(float* __restrict c, const float* __restrict v, float f_act, float kj, float qj,
                              float* __restrict h, int dv) {
  for (int d = 0; d < dv; ++d) {
    const float cv = f_act * c[d] + kj * v[d];
    c[d] = cv;
    h[d] += qj * cv;
  }
}

// One mLSTM step of one head.
//   q, k [dqk]  v [dv]  i_pre, f_pre: gate pre-activations  (q unscaled: scaled by 1/sqrt(dqk) here)
//   c0 [dqk, dv]  n0 [dqk]  m0: the state before the step; c0 may be c and n0 may be n (in place)
//   h [dv]  c [dqk, dv]  n [dqk]  m: outputs
// One pass over the matrix memory: each row of C is decayed, written and read for h while in cache.
inline void mlstm_step_head(const float* q, const float* k, const float* v, float i_pre, float f_pre,
                            const float* c0, const float* n0, float m0, int dqk, int dv, float eps,
                            float* h, float* c, float* n, float* m) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(dqk));
  const float lfm = log_sigmoid(f_pre) + m0;  // log f + m_{t-1}
  const float m_new = std::max(lfm, i_pre);
  const float f_act = std::exp(lfm - m_new);
  const float i_act = std::exp(i_pre - m_new);
  for (int d = 0; d < dv; ++d) h[d] = 0.0f;
  float qn = 0.0f;
  for (int j = 0; j < dqk; ++j) {
    const float kj = i_act * k[j];  // i' k_j
    const float qj = q[j] * scale;
    const float nj = f_act * n0[j] + kj;
    n[j] = nj;
    qn += qj * nj;
    const float* c0_row = c0 + static_cast<std::ptrdiff_t>(j) * dv;
    float* c_row = c + static_cast<std::ptrdiff_t>(j) * dv;
    if (c0_row == c_row) {
      mlstm_row_inplace(c_row, v, f_act, kj, qj, h, dv);
    } else {
      mlstm_row(c0_row, c_row, v, f_act, kj, qj, h, dv);
    }
  }
  const float den = std::max(std::fabs(qn), std::exp(-m_new)) + eps;
  for (int d = 0; d < dv; ++d) h[d] = h[d] / den;
  *m = m_new;
}

// cap * tanh(x / cap), or x when cap <= 0 (the 7B gates' soft cap, in the exported graph's order).
inline float soft_cap(float x, float cap) { return cap > 0.0f ? std::tanh(x / cap) * cap : x; }

// The 7B-style mLSTM layer between its two weight products, for one (batch row, head) and S steps:
// gate soft cap -> the cell -> per-head LayerNorm -> output-gate product. Per step t, each input is
// read from row t of its array (its own row stride), starting at this head's columns:
//   q, k: dqk values;  v, o: dv values (o: output-gate pre-activations)
//   i_pre, f_pre: one gate pre-activation each, soft-capped here after adding i_bias / f_bias
//   ln_scale, ln_bias [dv]: the LayerNorm's affine part; weight [dv]: the per-head slice of the
//   norm weight multiplied after it
//   c0, n0, m0: the state before; c, n, m: after (c0 may be c, n0 may be n)
//   y: dv values per step, ((LN(h) * ln_scale + ln_bias) * weight) * sigmoid(o)
//   h: scratch [dv]
struct MlstmLayerHead {
  const float *q, *k, *v, *o, *i_pre, *f_pre;
  std::ptrdiff_t q_stride, k_stride, v_stride, o_stride, g_stride, y_stride;
  float i_bias, f_bias, cap, eps, norm_eps;
  const float *ln_scale, *ln_bias, *weight;
  const float *c0, *n0;
  float m0;
  float *c, *n, *m, *y, *h;
};

inline void mlstm_layer_head(const MlstmLayerHead& a, int s, int dqk, int dv) {
  const float* c_prev = a.c0;
  const float* n_prev = a.n0;
  float m_prev = a.m0;
  for (int t = 0; t < s; ++t) {
    const float ip = soft_cap(a.i_pre[t * a.g_stride] + a.i_bias, a.cap);
    const float fp = soft_cap(a.f_pre[t * a.g_stride] + a.f_bias, a.cap);
    mlstm_step_head(a.q + t * a.q_stride, a.k + t * a.k_stride, a.v + t * a.v_stride, ip, fp, c_prev, n_prev,
                    m_prev, dqk, dv, a.eps, a.h, a.c, a.n, a.m);
    c_prev = a.c;  // later steps update the state in place
    n_prev = a.n;
    m_prev = *a.m;
    const float mean = lane_sum(a.h, dv) / static_cast<float>(dv);
    const float var = lane_sum_squared_deviation(a.h, dv, mean);
    const float inv_std = 1.0f / std::sqrt(var / static_cast<float>(dv) + a.norm_eps);
    const float* o = a.o + t * a.o_stride;
    float* y = a.y + t * a.y_stride;
    int d = 0;
    for (; d + 16 <= dv; d += 16) {  // the output gate's sigmoid in 16 lanes
      const vec16 normed = (load16(a.h + d) - mean) * inv_std * load16(a.ln_scale + d) + load16(a.ln_bias + d);
      store16(y + d, normed * load16(a.weight + d) * sigmoid16(load16(o + d)));
    }
    for (; d < dv; ++d) {
      const float normed = (a.h[d] - mean) * inv_std * a.ln_scale[d] + a.ln_bias[d];
      y[d] = normed * a.weight[d] * sigmoid(o[d]);
    }
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
    for (int g = 0; g < g4; ++g) pre[g] = 0.0f;
    for (int j = 0; j < dh; ++j) {  // h_{t-1} @ r
      const float hj = h[j];
      const float* r_row = r + static_cast<std::ptrdiff_t>(j) * g4;
      for (int g = 0; g < g4; ++g) pre[g] += hj * r_row[g];
    }
    float* yt = y + t * y_stride;
    for (int e = 0; e < dh; ++e) {
      // x_t + h_{t-1} @ r, summed in the Scan body's order (x first)
      const float ip = xt[e] + pre[e];
      const float fp = xt[dh + e] + pre[dh + e];
      const float zp = xt[2 * dh + e] + pre[2 * dh + e];
      const float op = xt[3 * dh + e] + pre[3 * dh + e];
      const float lfm = log_sigmoid(fp) + m[e];
      // n == 0 (a fresh sequence): m starts at i~ as in the official cell, so n_1 = 1 for any i~
      const float m_new = n[e] == 0.0f ? ip : std::max(ip, lfm);
      const float i_act = std::exp(ip - m_new);
      const float f_act = std::exp(std::min(lfm - m_new, 0.0f));
      const float c_new = f_act * c[e] + i_act * std::tanh(zp);
      const float n_new = f_act * n[e] + i_act;
      const float h_new = sigmoid(op) * c_new / n_new;
      c[e] = c_new;
      n[e] = n_new;
      m[e] = m_new;
      yt[e] = h_new;
    }
    for (int e = 0; e < dh; ++e) h[e] = yt[e];
  }
}

}  // namespace xlstm_cpu
