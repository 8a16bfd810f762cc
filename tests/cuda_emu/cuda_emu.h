// A CPU emulation of the slice of the CUDA execution model that plugins/*.cu use, so the plugin
// kernels' source can run (slowly, at small shapes) where there is no GPU.
//
// Every CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads is a
// barrier over the block's threads; the warp shuffles exchange through a per-warp buffer between
// two barriers over the warp's 32 threads (all 32 lanes must take part, as with kFullMask).
// Shared memory is ordinary memory visible to the block's threads; the dynamic shared memory is
// filled with NaN bytes before every block (on a GPU a block finds whatever the previous one left),
// so a read of shared memory the block has not written turns the outputs NaN instead of reading the
// zeros or the previous block's values. What this checks is the
// kernels' indexing, synchronization structure and arithmetic as written, against the references;
// what it cannot check is nvcc's code generation, timing-dependent races and the real memory model
// (the GPU tier, tests/test_plugins_gpu.py, runs the PTX itself).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include <cuda_bf16.h>  // host implementations of the __half / __nv_bfloat16 conversions; they also
#include <cuda_fp16.h>  // bring CUDA's vector_types.h (dim3, uint3)

// The CUDA headers define these as attributes for a host compiler; here they all mean "plain C++".
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

namespace emu {

struct Block {
  explicit Block(unsigned threads)
      : bar(static_cast<std::ptrdiff_t>(threads)), warps((threads + 31) / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
  }
  struct Warp {
    std::barrier<> bar{32};
    float buf[32];
  };
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* block = nullptr;

}  // namespace emu

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

namespace emu {
// Lane `src`'s value of x (every lane of the warp calls this with its own x).
inline float exchange(float x, int src, bool in_range) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  Block::Warp& w = *block->warps[threadIdx.x / 32];
  w.buf[lane] = x;
  w.bar.arrive_and_wait();
  const float out = in_range ? w.buf[src] : x;
  w.bar.arrive_and_wait();  // nobody overwrites buf before every lane has read it
  return out;
}
}  // namespace emu

inline float __shfl_sync(unsigned, float x, int src) { return emu::exchange(x, src & 31, true); }
inline float __shfl_up_sync(unsigned, float x, unsigned delta) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  return emu::exchange(x, lane - static_cast<int>(delta), lane >= static_cast<int>(delta));
}
inline float __shfl_xor_sync(unsigned, float x, int mask) {
  return emu::exchange(x, static_cast<int>(threadIdx.x % 32) ^ mask, true);
}

template <typename T>
inline T __ldg(const T* p) { return *p; }

inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

namespace emu {
// Run kernel(args...) over grid x block: blocks in sequence, each block's threads concurrently.
// The `smem_bytes` bytes at `smem` (the kernel's dynamic shared memory) are set to 0xff before each
// block: NaN as float32, __half and __nv_bfloat16 alike.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 blk, void* smem, size_t smem_bytes, Args... args) {
  gridDim = grid;
  blockDim = blk;
  const unsigned n = blk.x * blk.y * blk.z;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::memset(smem, 0xff, smem_bytes);
        Block state(n);
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t)
          threads.emplace_back([&, t] {
            block = &state;
            blockIdx = uint3{x, y, z};
            threadIdx = uint3{t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
            kernel(args...);
          });
        for (auto& th : threads) th.join();
      }
}
}  // namespace emu
