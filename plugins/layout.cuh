// Launch geometry of the xLSTM kernels (mlstm_fwd.cu, slstm_fwd.cu): the tile sizes come from
// plugins/launch.py as -D flags (launch.cuda_defines(): build.py's nvcc, the CPU tests' g++).
// Host + device constexpr only: no CUDA types, so a plain host program can include it.
#pragma once

#ifndef __CUDACC__
#define __host__
#define __device__
#endif

namespace xlstm {

__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }

#if !defined(XLSTM_MLSTM_THREADS) || !defined(XLSTM_MLSTM_CHUNK) || !defined(XLSTM_MLSTM_TILE_V) || \
    !defined(XLSTM_MLSTM_STEP_V) || !defined(XLSTM_MLSTM_SLAB) || !defined(XLSTM_SLSTM_MAX_THREADS)
#error "compile with the -D flags of plugins/launch.py (launch.cuda_defines()): the tile sizes live there"
#endif

namespace mlstm {

constexpr int kThreads = XLSTM_MLSTM_THREADS;  // threads per block: 16 x 16 for the 64 x 64 tiles
constexpr int kChunk = XLSTM_MLSTM_CHUNK;      // longest chunk held on chip (chunk_size is clamped to it)
constexpr int kTileV = XLSTM_MLSTM_TILE_V;     // DV columns per block in the chunk path
constexpr int kStepV = XLSTM_MLSTM_STEP_V;     // DV columns per block in the step path; grid.x = ceil(DV/kStepV)
constexpr int kSlab = XLSTM_MLSTM_SLAB;        // DQK rows of q/k/C streamed per pass in the chunk path
constexpr int kRowQK = kSlab + 1;   // padded row of the q/k slabs (conflict-free column walks)
constexpr int kRowS = kChunk + 1;   // padded row of the L x L score tile
constexpr int kStepGroups = kThreads / kStepV;  // DQK row groups in the step path (8)

static_assert(kTileV == 2 * kStepV, "a chunk-path tile is two step-path tiles");
static_assert(kChunk == 64 && kSlab == 64 && kTileV == 64, "the 4 x 4 micro-tiles assume 64 x 64");
static_assert(kThreads == 16 * 16, "one 4 x 4 micro-tile per thread of a 16 x 16 block");

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

constexpr int kMaxThreads = XLSTM_SLSTM_MAX_THREADS;  // DH <= kMaxThreads
constexpr int kMaxColsPerThread = 4;  // 4*DH gate columns over >= DH threads (DH <= kMaxThreads)

// Threads per block: one per gate column, rounded up to whole warps, at most kMaxThreads.
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
