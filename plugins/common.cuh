// Shared device helpers of the xLSTM CUDA kernels (mlstm_fwd.cu, slstm_fwd.cu).
//
// Element types: T in {float, __half, __nv_bfloat16} for the sequence tensors; states and every
// accumulation are float32. Conversions go through load_f32 / store_t so each kernel is written
// once as a template and instantiated explicitly per dtype by its extern "C" entry points.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace xlstm {

// ---- element type conversions -----------------------------------------------------------------

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Read-only global load (through the non-coherent cache) converted to float32.
template <typename T> __device__ __forceinline__ float load_f32(const T* p) { return to_f32(__ldg(p)); }

// ---- scalar math (float32, IEEE expf/logf: no fast-math, the references are float32 too) --------

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), stable for any x.
__device__ __forceinline__ float logsigmoid(float x) { return fminf(x, 0.0f) - log1pf(expf(-fabsf(x))); }

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// ---- warp-level scans / reductions (full warp participates) ------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_inclusive_sum(float x, int lane) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float y = __shfl_up_sync(kFullMask, x, off);
        if (lane >= off) x += y;
    }
    return x;
}

__device__ __forceinline__ float warp_inclusive_max(float x, int lane) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const float y = __shfl_up_sync(kFullMask, x, off);
        if (lane >= off) x = fmaxf(x, y);
    }
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
    return x;
}

}  // namespace xlstm
