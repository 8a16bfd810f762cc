// xlstm::mLSTM forward: ONE kernel launch for the whole sequence (TensorRT AOT plugins have no
// workspace and launch exactly one kernel).
//
//   h, (c, n, m) = mLSTM(q, k, v, i, f, (c0, n0, m0))        (math: kernels/mlstm/naive.py)
//   q, k [B, NH, S, DQK] T   v [B, NH, S, DV] T   i, f [B, NH, S] T (gate pre-activations)
//   c0 [B, NH, DQK, DV]  n0 [B, NH, DQK]  m0 [B, NH]  float32;   h [B, NH, S, DV] T;  c, n, m float32
//
// Per step (q scaled by 1/sqrt(DQK) here):
//   m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)
//   C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T      (n alike)
//   h_t = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)
//
// Launch (plugins/launch.py::mlstm_launch computes exactly this):
//   grid  = (ceil(DV / 32), NH, B)     block = 256 threads     dynamic smem = smem_floats(DQK) * 4
//   S == 1  (decode) "step path": block x owns DV columns [32 x, 32 x + 32) and streams its slice
//           of C once from c0 to c (one read, one write per element: bandwidth bound).
//   S >  1  "chunk path": blocks with even x own DV columns [32 x, 32 x + 64) (odd blocks exit);
//           each walks the chunks of L = min(chunk_size, 64) steps sequentially with its
//           C[:, tile] (float32) in shared memory; inside a chunk all L outputs are computed in
//           parallel (QK^T, Q C, S V and the C update as 64 x 64 tiles, a 4 x 4 micro-tile per
//           thread). Blocks of the same (b, head) redo the DV-independent parts (QK^T, q.n).
//   Every block reads the same gates; the block with x == 0 writes n and m.
//
// Kernel parameters, TensorRT AOT order (inputs, int32 scalars, outputs):
//   q, k, v, i, f, c0, n0, m0, B, NH, S, DQK, DV, chunk_size, eps_bits, h, c, n, m
//   eps_bits: the IEEE-754 bit pattern of the float32 eps, as an int32 (TensorRT's extra kernel
//   arguments are integers only), decoded with __int_as_float.
// Inputs are dense row-major (TensorRT LINEAR); outputs must not alias inputs.
#include "common.cuh"
#include "layout.cuh"

namespace xlstm {
namespace mlstm {

// Gate terms of one chunk (warp 0). Steps t = lane and t = lane + 32; b = in-chunk cumsum of
// logsigmoid(f), u_t = i_t - b_t, m_t = b_t + max(m_prev, max_{s<=t} u_s) (the recurrent m_t).
__device__ __forceinline__ void chunk_gate_terms(float b_t, float u_t, float mu_t, float m_prev,
                                                 int t, float* g_p, float* g_u, float* g_inter,
                                                 float* g_minv, float& m_t) {
    m_t = b_t + fmaxf(m_prev, mu_t);
    g_p[t] = b_t - m_t;                      // D[t, s] = exp(g_p[t] + g_u[s]) for s <= t
    g_u[t] = u_t;
    g_inter[t] = expf(b_t + m_prev - m_t);   // weight of the carried state at step t
    g_minv[t] = expf(-m_t);
}

template <typename T>
__device__ void chunk_gates(const T* __restrict__ ig, const T* __restrict__ fg, int t0, int Lc,
                            float* g_p, float* g_u, float* g_inter, float* g_minv, float* g_w,
                            float* sc, int lane) {
    const float m_prev = sc[0];
    float b[2], u[2], mt[2];
    float carry_b = 0.0f, carry_mu = neg_inf();
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int t = lane + 32 * half;
        const bool valid = t < Lc;
        const float lf = valid ? logsigmoid(load_f32(fg + t0 + t)) : 0.0f;
        const float bt = warp_inclusive_sum(lf, lane) + carry_b;
        const float ut = valid ? load_f32(ig + t0 + t) - bt : neg_inf();
        const float mut = fmaxf(warp_inclusive_max(ut, lane), carry_mu);
        carry_b = __shfl_sync(kFullMask, bt, 31);
        carry_mu = __shfl_sync(kFullMask, mut, 31);
        chunk_gate_terms(bt, ut, mut, m_prev, t, g_p, g_u, g_inter, g_minv, mt[half]);
        b[half] = bt;
        u[half] = ut;
    }
    // chunk end (step Lc - 1): g = b_L, m_new = m_L; the carry weights of the state update
    const int last = Lc - 1;
    const float g = __shfl_sync(kFullMask, last < 32 ? b[0] : b[1], last & 31);
    const float m_new = __shfl_sync(kFullMask, last < 32 ? mt[0] : mt[1], last & 31);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int t = lane + 32 * half;
        g_w[t] = t < Lc ? expf(u[half] + g - m_new) : 0.0f;  // exp(b_L - b_t + i_t - m_new)
    }
    if (lane == 0) {
        sc[1] = expf(g + m_prev - m_new);  // decay of the carried C, n
        sc[0] = m_new;
    }
}

// ---- S > 1: chunkwise ---------------------------------------------------------------------------

// acc[r][c] += a[r] * b[c]: a rank-1 update of one thread's 4 x 4 micro-tile.
__device__ __forceinline__ void fma_4x4(const float (&a)[4], const float (&b)[4], float (&acc)[4][4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], b[c], acc[r][c]);
}

// Row j of a [kChunk][kTileV] tile at this thread's columns tx + 16 c.
__device__ __forceinline__ void tile_row_cols(const float* tile, int j, int tx, float (&out)[4]) {
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = tile[j * kTileV + tx + 16 * c];
}

template <typename T>
__device__ void chunk_path(const T* __restrict__ qb,   // [S, DQK] of this (b, head)
                           const T* __restrict__ kb,   // [S, DQK]
                           const T* __restrict__ vb,   // [S, DV]
                           const T* __restrict__ ib,   // [S]
                           const T* __restrict__ fb,   // [S]
                           const float* __restrict__ c0b,  // [DQK, DV]
                           const float* __restrict__ n0b,  // [DQK]
                           float m0v, int S, int DQK, int DV, int L, float eps, int dv0, bool write_nm,
                           T* __restrict__ hb,          // [S, DV]
                           float* __restrict__ cb,      // [DQK, DV]
                           float* __restrict__ nb,      // [DQK]
                           float* __restrict__ mb,      // [1]
                           float* smem) {
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4, lane = tid & 31, warp = tid >> 5;
    const int dqkp = round_up(DQK, kSlab);
    float* Cs = smem;                       // [dqkp][kTileV]  C[:, dv0:dv0+64]
    float* ns = Cs + dqkp * kTileV;         // [dqkp]          n
    float* Qs = ns + dqkp;                  // [kChunk][kRowQK] q slab, scaled
    float* Ks = Qs + kChunk * kRowQK;       // [kChunk][kRowQK] k slab
    float* Ss = Ks + kChunk * kRowQK;       // [kChunk][kRowS]  (q_t . k_s) D[t, s]
    float* Vs = Ss + kChunk * kRowS;        // [kChunk][kTileV] v tile
    float* g_p = Vs + kChunk * kTileV;      // [kChunk] b_t - m_t
    float* g_u = g_p + kChunk;              // [kChunk] i_t - b_t
    float* g_inter = g_u + kChunk;          // [kChunk] exp(b_t + m_prev - m_t)
    float* g_minv = g_inter + kChunk;       // [kChunk] exp(-m_t)
    float* g_w = g_minv + kChunk;           // [kChunk] exp(b_L - b_t + i_t - m_new)
    float* g_qn = g_w + kChunk;             // [kChunk] q_t . n_prev
    float* sc = g_qn + kChunk;              // [0] m carried, [1] decay of C, n over the chunk
    const float scale = 1.0f / sqrtf(static_cast<float>(DQK));

    for (int idx = tid; idx < dqkp * kTileV; idx += kThreads) {
        const int row = idx / kTileV, col = idx % kTileV;
        Cs[idx] = (row < DQK && dv0 + col < DV) ? __ldg(c0b + static_cast<long long>(row) * DV + dv0 + col)
                                                 : 0.0f;
    }
    for (int idx = tid; idx < dqkp; idx += kThreads) ns[idx] = idx < DQK ? __ldg(n0b + idx) : 0.0f;
    if (tid == 0) sc[0] = m0v;

    for (int t0 = 0; t0 < S; t0 += L) {
        const int Lc = min(L, S - t0);
        __syncthreads();  // state loaded / previous chunk done with every tile
        if (warp == 0) chunk_gates(ib, fb, t0, Lc, g_p, g_u, g_inter, g_minv, g_w, sc, lane);
        for (int idx = tid; idx < kChunk * kTileV; idx += kThreads) {
            const int j = idx / kTileV, col = idx % kTileV;
            Vs[idx] = (j < Lc && dv0 + col < DV)
                          ? load_f32(vb + static_cast<long long>(t0 + j) * DV + dv0 + col)
                          : 0.0f;
        }

        float accS[4][4] = {};  // rows t = ty + 16 r, cols s = tx + 16 c:  q_t . k_s
        float accH[4][4] = {};  // rows t, cols dv0 + tx + 16 c:            q_t . C_prev[:, col]
        float qn = 0.0f;        // threads tid < 64: q_tid . n_prev
        for (int s0 = 0; s0 < DQK; s0 += kSlab) {
            __syncthreads();  // previous slab done with Qs, Ks
            for (int idx = tid; idx < kChunk * kSlab; idx += kThreads) {
                const int j = idx / kSlab, d = idx % kSlab, dk = s0 + d;
                const bool ok = j < Lc && dk < DQK;
                const long long off = static_cast<long long>(t0 + j) * DQK + dk;
                Qs[j * kRowQK + d] = ok ? load_f32(qb + off) * scale : 0.0f;
                Ks[j * kRowQK + d] = ok ? load_f32(kb + off) : 0.0f;
            }
            __syncthreads();
#pragma unroll 4
            for (int d = 0; d < kSlab; ++d) {
                float qv[4], kv[4], cv[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) qv[r] = Qs[(ty + 16 * r) * kRowQK + d];
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    kv[c] = Ks[(tx + 16 * c) * kRowQK + d];
                    cv[c] = Cs[(s0 + d) * kTileV + tx + 16 * c];
                }
#pragma unroll
                for (int r = 0; r < 4; ++r)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        accS[r][c] = fmaf(qv[r], kv[c], accS[r][c]);
                        accH[r][c] = fmaf(qv[r], cv[c], accH[r][c]);
                    }
            }
            if (tid < kChunk)
                for (int d = 0; d < kSlab; ++d) qn = fmaf(Qs[tid * kRowQK + d], ns[s0 + d], qn);
            __syncthreads();  // everyone has read C_prev / n_prev of this slab

            // C[slab] <- a C[slab] + K^T diag(w) V;  n[slab] <- a n[slab] + K^T w
            const float a = sc[1];
            float accC[4][4] = {};  // rows dk = s0 + ty + 16 r, cols tx + 16 c
            for (int j = 0; j < Lc; ++j) {
                const float wj = g_w[j];
                float kw[4], vv[4];
#pragma unroll
                for (int r = 0; r < 4; ++r) kw[r] = Ks[j * kRowQK + ty + 16 * r] * wj;
                tile_row_cols(Vs, j, tx, vv);
                fma_4x4(kw, vv, accC);
            }
#pragma unroll
            for (int r = 0; r < 4; ++r)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int idx = (s0 + ty + 16 * r) * kTileV + tx + 16 * c;
                    Cs[idx] = fmaf(a, Cs[idx], accC[r][c]);
                }
            if (tid < kSlab) {
                float acc = 0.0f;
                for (int j = 0; j < Lc; ++j) acc = fmaf(Ks[j * kRowQK + tid], g_w[j], acc);
                ns[s0 + tid] = fmaf(a, ns[s0 + tid], acc);
            }
        }

        // intra-chunk: S~[t, s] = (q_t . k_s) exp(b_t - b_s + i_s - m_t) for s <= t
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int t = ty + 16 * r, s = tx + 16 * c;
                Ss[t * kRowS + s] = (s <= t && t < Lc) ? accS[r][c] * expf(g_p[t] + g_u[s]) : 0.0f;
            }
        if (tid < kChunk) g_qn[tid] = qn;
        __syncthreads();

        float accI[4][4] = {}, rowsum[4] = {};
        for (int s = 0; s < Lc; ++s) {
            float sv[4], vv[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                sv[r] = Ss[(ty + 16 * r) * kRowS + s];
                rowsum[r] += sv[r];
            }
            tile_row_cols(Vs, s, tx, vv);
            fma_4x4(sv, vv, accI);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int t = ty + 16 * r;
            if (t >= Lc) continue;
            const float inter = g_inter[t];
            const float den = fmaxf(fabsf(inter * g_qn[t] + rowsum[r]), g_minv[t]) + eps;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int col = dv0 + tx + 16 * c;
                if (col < DV)
                    hb[static_cast<long long>(t0 + t) * DV + col] =
                        from_f32<T>((inter * accH[r][c] + accI[r][c]) / den);
            }
        }
    }
    __syncthreads();

    for (int idx = tid; idx < DQK * kTileV; idx += kThreads) {
        const int row = idx / kTileV, col = idx % kTileV;
        if (dv0 + col < DV) cb[static_cast<long long>(row) * DV + dv0 + col] = Cs[idx];
    }
    if (write_nm) {
        for (int idx = tid; idx < DQK; idx += kThreads) nb[idx] = ns[idx];
        if (tid == 0) mb[0] = sc[0];
    }
}

// ---- S == 1: one recurrent step -------------------------------------------------------------
template <typename T>
__device__ void step_path(const T* __restrict__ qb,   // [DQK] of this (b, head)
                          const T* __restrict__ kb,   // [DQK]
                          const T* __restrict__ vb,   // [DV]
                          float i_pre, float f_pre, const float* __restrict__ c0b,  // [DQK, DV]
                          const float* __restrict__ n0b,  // [DQK]
                          float m_prev, int DQK, int DV, float eps, int dv0, bool write_nm,
                          T* __restrict__ hb,         // [DV]
                          float* __restrict__ cb,     // [DQK, DV]
                          float* __restrict__ nb,     // [DQK]
                          float* __restrict__ mb,     // [1]
                          float* smem) {
    const int tid = threadIdx.x, lane = tid & 31, grp = tid >> 5;
    float* red = smem;                         // [kStepGroups][kStepV] partial C^T q
    float* qn_part = red + kStepGroups * kStepV;  // [kStepGroups] partial n^T q
    const float scale = 1.0f / sqrtf(static_cast<float>(DQK));

    const float lf = logsigmoid(f_pre);
    const float m_new = fmaxf(lf + m_prev, i_pre);
    const float fa = expf(lf + m_prev - m_new);
    const float ia = expf(i_pre - m_new);

    // this thread: column dv0 + lane, rows grp, grp + 8, ...; each C element read once, written once
    const int col = dv0 + lane;
    float acc = 0.0f;
    if (col < DV) {
        const float vv = load_f32(vb + col);
#pragma unroll 4
        for (int dk = grp; dk < DQK; dk += kStepGroups) {
            const long long off = static_cast<long long>(dk) * DV + col;
            const float cv = fmaf(fa, __ldg(c0b + off), ia * load_f32(kb + dk) * vv);
            cb[off] = cv;
            acc = fmaf(cv, load_f32(qb + dk) * scale, acc);
        }
    }
    red[grp * kStepV + lane] = acc;

    float qn = 0.0f;
    for (int dk = tid; dk < DQK; dk += kThreads) {
        const float nv = fmaf(fa, __ldg(n0b + dk), ia * load_f32(kb + dk));
        if (write_nm) nb[dk] = nv;
        qn = fmaf(nv, load_f32(qb + dk) * scale, qn);
    }
    qn = warp_sum(qn);
    if (lane == 0) qn_part[grp] = qn;
    __syncthreads();

    if (grp == 0) {
        float num = 0.0f, qn_all = 0.0f;
#pragma unroll
        for (int g = 0; g < kStepGroups; ++g) {
            num += red[g * kStepV + lane];
            qn_all += qn_part[g];
        }
        if (col < DV) hb[col] = from_f32<T>(num / (fmaxf(fabsf(qn_all), expf(-m_new)) + eps));
        if (write_nm && lane == 0) mb[0] = m_new;
    }
}

template <typename T>
__device__ __forceinline__ void mlstm_fwd(const T* __restrict__ q, const T* __restrict__ k,
                                          const T* __restrict__ v, const T* __restrict__ ig,
                                          const T* __restrict__ fg, const float* __restrict__ c0,
                                          const float* __restrict__ n0, const float* __restrict__ m0,
                                          int B, int NH, int S, int DQK, int DV, int chunk_size,
                                          int eps_bits, T* __restrict__ h, float* __restrict__ c,
                                          float* __restrict__ n, float* __restrict__ m) {
    extern __shared__ float smem[];
    const int bx = blockIdx.x, hd = blockIdx.y, bb = blockIdx.z;
    const int dv0 = bx * kStepV;
    if (bb >= B || hd >= NH || dv0 >= DV) return;  // block-uniform
    const long long bh = static_cast<long long>(bb) * NH + hd;
    const float eps = __int_as_float(eps_bits);
    const long long qk_off = bh * S * DQK, v_off = bh * S * DV, c_off = bh * DQK * DV;
    const bool write_nm = bx == 0;

    if (S == 1) {
        step_path<T>(q + qk_off, k + qk_off, v + v_off, load_f32(ig + bh), load_f32(fg + bh), c0 + c_off,
                     n0 + bh * DQK, m0[bh], DQK, DV, eps, dv0, write_nm, h + v_off, c + c_off,
                     n + bh * DQK, m + bh, smem);
        return;
    }
    if (bx % (kTileV / kStepV) != 0) return;  // the even neighbour owns these 32 columns
    const int L = min(max(chunk_size, 1), kChunk);
    chunk_path<T>(q + qk_off, k + qk_off, v + v_off, ig + bh * S, fg + bh * S, c0 + c_off, n0 + bh * DQK,
                  m0[bh], S, DQK, DV, L, eps, dv0, write_nm, h + v_off, c + c_off, n + bh * DQK, m + bh,
                  smem);
}

}  // namespace mlstm
}  // namespace xlstm

// ---- extern "C" entry points: one explicit instantiation per element type ----------------------
#define XLSTM_MLSTM_ENTRY(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(xlstm::mlstm::kThreads)                             \
        NAME(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,              \
             const T* __restrict__ i, const T* __restrict__ f, const float* __restrict__ c0,         \
             const float* __restrict__ n0, const float* __restrict__ m0, int B, int NH, int S,       \
             int DQK, int DV, int chunk_size, int eps_bits, T* __restrict__ h,                       \
             float* __restrict__ c, float* __restrict__ n, float* __restrict__ m) {                  \
        xlstm::mlstm::mlstm_fwd<T>(q, k, v, i, f, c0, n0, m0, B, NH, S, DQK, DV, chunk_size,         \
                                   eps_bits, h, c, n, m);                                            \
    }

XLSTM_MLSTM_ENTRY(mlstm_fwd_kernel_f32, float)
XLSTM_MLSTM_ENTRY(mlstm_fwd_kernel_f16, __half)
XLSTM_MLSTM_ENTRY(mlstm_fwd_kernel_bf16, __nv_bfloat16)
