// Launch geometry of the xLSTM kernels, shared by the kernels (mlstm_fwd.cu, slstm_fwd.cu) and,
// through a host build in the CPU tests, checked against the Python side (plugins/launch.py).
// Host + device constexpr only: no CUDA types, so a plain host program can include it.
#pragma once

#ifndef __CUDACC__
#define __host__
#define __device__
#endif

namespace xlstm {

__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

namespace mlstm {

constexpr int kThreads = 256;       // threads per block: 16 x 16 for the 64 x 64 tiles
constexpr int kChunk = 64;          // longest chunk held on chip (chunk_size is clamped to it)
constexpr int kTileV = 64;          // DV columns per block in the chunk path
constexpr int kStepV = 32;          // DV columns per block in the step path; grid.x = ceil(DV/32)
constexpr int kSlab = 64;           // DQK rows of q/k/C streamed per pass in the chunk path
constexpr int kRowQK = kSlab + 1;   // padded row of the q/k slabs (conflict-free column walks)
constexpr int kRowS = kChunk + 1;   // padded row of the L x L score tile
constexpr int kStepGroups = kThreads / kStepV;  // DQK row groups in the step path (8)

static_assert(kTileV == 2 * kStepV, "a chunk-path tile is two step-path tiles");
static_assert(kChunk == 64 && kSlab == 64 && kTileV == 64, "the 4 x 4 micro-tiles assume 64 x 64");

// Dynamic shared memory of one block, in floats (launch.py::mlstm_shared_bytes == 4 * this).
__host__ __device__ constexpr int smem_floats(int dqk) {
    return round_up(dqk, kSlab) * (kTileV + 1)  // C tile [DQKp][64] + n [DQKp]
           + 2 * kChunk * kRowQK                // q slab, k slab [64][65]
           + kChunk * kRowS                     // decay-weighted scores [64][65]
           + kChunk * kTileV                    // v chunk tile [64][64]
           + 6 * kChunk                         // per-step gate terms of the chunk
           + 8;                                 // scalars
}

}  // namespace mlstm

namespace slstm {

constexpr int kMaxThreads = 1024;
constexpr int kMaxColsPerThread = 4;  // 4*DH <= 4 * 1024 columns: DH <= 1024

// Threads per block: one per gate column, rounded up to whole warps, at most 1024.
__host__ __device__ constexpr int threads_for(int dh) {
    return round_up(4 * dh, 32) < kMaxThreads ? round_up(4 * dh, 32) : kMaxThreads;
}

// Dynamic shared memory of one block in bytes (launch.py::slstm_shared_bytes == this):
// pre-activations [4*DH] + h [DH] in float32, then r_rows rows of r[head] in T.
__host__ __device__ constexpr int smem_bytes(int dh, int r_rows, int t_size) {
    return 4 * (4 * dh + dh) + r_rows * 4 * dh * t_size;
}

}  // namespace slstm
}  // namespace xlstm
