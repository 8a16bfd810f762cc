// xlstm::sLSTM forward: the whole time loop in ONE kernel launch, R kept on chip.
//
//   y, (h, c, n, m) = sLSTM(x, r, b, (h0, c0, n0, m0))       (math: kernels/slstm/naive.py)
//   x [B, NH, S, 4*DH] T (W x per head, gate-major [i | f | z | o])   r [NH, DH, 4*DH] T
//   b [NH, 4*DH] T    h0, c0, n0, m0 [B, NH, DH] float32;   y [B, NH, S, DH] T;  h, c, n, m float32
//
// Per step, pre = x_t + b + h_{t-1} @ r[head], split into (i~, f~, z~, o~):
//   a = logsigmoid(f~) + m_{t-1};  m_t = n_{t-1} == 0 ? i~ : max(i~, a)  (the official first step)
//   i = exp(i~ - m_t);  f = exp(min(a - m_t, 0));  c_t = f c + i tanh(z~);  n_t = f n + i
//   h_t = sigmoid(o~) c_t / n_t
//
// Launch (plugins/launch.py::slstm_launch computes exactly this):
//   grid = (NH, B)   block = min(round_up(4*DH, 32), 1024) threads
//   dynamic smem = 4 * 5*DH (pre-activations, h) + r_rows * 4*DH * sizeof(T)
// One block per (b, head). The first r_rows rows of r[head] are copied to shared memory once (in
// T, the dtype the weights come in); rows r_rows..DH-1, which only exist when the whole of
// r[head] does not fit (float32 at DH >= ~100), are read from global memory (L1/L2-resident) in
// every step. Each thread owns up to 4 gate columns (col = tid + k * blockDim) for the mat-vec and,
// for tid < DH, the state of unit tid in registers. Two barriers per step.
//
// Kernel parameters, TensorRT AOT order (inputs, int32 scalars, outputs):
//   x, r, b, h0, c0, n0, m0, B, NH, S, DH, r_rows, y, h, c, n, m
// Inputs are dense row-major (TensorRT LINEAR); outputs must not alias inputs.
#include "common.cuh"
#include "layout.cuh"

namespace xlstm {
namespace slstm {

template <typename T>
__device__ __forceinline__ void slstm_fwd(const T* __restrict__ x, const T* __restrict__ r,
                                          const T* __restrict__ b, const float* __restrict__ h0,
                                          const float* __restrict__ c0, const float* __restrict__ n0,
                                          const float* __restrict__ m0, int B, int NH, int S, int DH,
                                          int r_rows, T* __restrict__ y, float* __restrict__ h,
                                          float* __restrict__ c, float* __restrict__ n,
                                          float* __restrict__ m) {
    extern __shared__ float smem[];
    const int hd = blockIdx.x, bb = blockIdx.y;
    if (hd >= NH || bb >= B) return;  // block-uniform
    const int G = 4 * DH, tid = threadIdx.x, nthr = blockDim.x;
    const int rs = min(max(r_rows, 0), DH);
    float* pre = smem;                           // [4*DH] pre-activations of this step
    float* hs = pre + G;                         // [DH] h_{t-1}
    T* Rs = reinterpret_cast<T*>(hs + DH);       // [rs][4*DH] first rows of r[head]
    const long long bh = static_cast<long long>(bb) * NH + hd;
    const T* rh = r + static_cast<long long>(hd) * DH * G;  // [DH, 4*DH]
    const T* xb = x + bh * S * G;                            // [S, 4*DH]
    T* yb = y + bh * S * DH;                                 // [S, DH]

    for (int idx = tid; idx < rs * G; idx += nthr) Rs[idx] = rh[idx];

    float bias[kMaxColsPerThread], xv[kMaxColsPerThread];
#pragma unroll
    for (int cc = 0; cc < kMaxColsPerThread; ++cc) {
        const int col = tid + cc * nthr;
        bias[cc] = col < G ? load_f32(b + static_cast<long long>(hd) * G + col) : 0.0f;
        xv[cc] = (col < G && S > 0) ? load_f32(xb + col) : 0.0f;
    }
    float cst = 0.0f, nst = 0.0f, mst = 0.0f, hst = 0.0f;  // state of unit tid (tid < DH)
    if (tid < DH) {
        hst = h0[bh * DH + tid];
        cst = c0[bh * DH + tid];
        nst = n0[bh * DH + tid];
        mst = m0[bh * DH + tid];
        hs[tid] = hst;
    }
    __syncthreads();

    for (int t = 0; t < S; ++t) {
        // pre[col] = x_t[col] + b[col] + sum_k h_{t-1}[k] r[k, col]
#pragma unroll
        for (int cc = 0; cc < kMaxColsPerThread; ++cc) {
            const int col = tid + cc * nthr;
            if (col >= G) break;
            float acc = xv[cc] + bias[cc];
            int kk = 0;
#pragma unroll 8
            for (; kk < rs; ++kk) acc = fmaf(hs[kk], to_f32(Rs[kk * G + col]), acc);
            for (; kk < DH; ++kk) acc = fmaf(hs[kk], load_f32(rh + static_cast<long long>(kk) * G + col), acc);
            pre[col] = acc;
            if (t + 1 < S) xv[cc] = load_f32(xb + static_cast<long long>(t + 1) * G + col);  // prefetch
        }
        __syncthreads();  // pre complete; everyone done reading hs

        if (tid < DH) {
            const float i_pre = pre[tid], f_pre = pre[DH + tid], z_pre = pre[2 * DH + tid],
                        o_pre = pre[3 * DH + tid];
            const float a = logsigmoid(f_pre) + mst;
            // n == 0 (a fresh sequence): m starts at i~, so n_1 = 1 for any i~ (no 0/0)
            const float m_new = nst == 0.0f ? i_pre : fmaxf(i_pre, a);
            const float ia = expf(i_pre - m_new);
            const float fa = expf(fminf(a - m_new, 0.0f));
            cst = fa * cst + ia * tanhf(z_pre);
            nst = fa * nst + ia;
            mst = m_new;
            hst = sigmoid(o_pre) * cst / nst;
            hs[tid] = hst;
            yb[static_cast<long long>(t) * DH + tid] = from_f32<T>(hst);
        }
        __syncthreads();  // h_t visible before the next mat-vec
    }

    if (tid < DH) {
        h[bh * DH + tid] = hst;
        c[bh * DH + tid] = cst;
        n[bh * DH + tid] = nst;
        m[bh * DH + tid] = mst;
    }
}

}  // namespace slstm
}  // namespace xlstm

// ---- extern "C" entry points: one explicit instantiation per element type ----------------------
#define XLSTM_SLSTM_ENTRY(NAME, T)                                                                   \
    extern "C" __global__ void __launch_bounds__(xlstm::slstm::kMaxThreads)                          \
        NAME(const T* __restrict__ x, const T* __restrict__ r, const T* __restrict__ b,              \
             const float* __restrict__ h0, const float* __restrict__ c0,                             \
             const float* __restrict__ n0, const float* __restrict__ m0, int B, int NH, int S,       \
             int DH, int r_rows, T* __restrict__ y, float* __restrict__ h, float* __restrict__ c,    \
             float* __restrict__ n, float* __restrict__ m) {                                         \
        xlstm::slstm::slstm_fwd<T>(x, r, b, h0, c0, n0, m0, B, NH, S, DH, r_rows, y, h, c, n, m);    \
    }

XLSTM_SLSTM_ENTRY(slstm_fwd_kernel_f32, float)
XLSTM_SLSTM_ENTRY(slstm_fwd_kernel_f16, __half)
XLSTM_SLSTM_ENTRY(slstm_fwd_kernel_bf16, __nv_bfloat16)
