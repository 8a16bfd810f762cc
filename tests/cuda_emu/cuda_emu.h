// A CPU emulation of the slice of the CUDA execution model that plugins/*.cu use, so the plugin
// kernels' source can run (slowly, at small shapes) where there is no GPU.
//
// Every CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads is a
// barrier over the block's threads; the warp shuffles exchange through a per-warp buffer between
// two barriers over the warp's 32 threads (all 32 lanes must take part, as with kFullMask).
// Shared memory is ordinary memory visible to the block's threads; the dynamic shared memory is
// filled with NaN bytes before every block (on a GPU a block finds whatever the previous one left),
// so a read of shared memory the block has not written turns the outputs NaN instead of reading the
// zeros or the previous block's values.
//
// Schedules (emu::schedule): by default the block's threads run at once and the OS decides how they
// interleave, so a shared-memory race (one thread writes a word another reads, with no barrier
// between) shows only by chance. The two serial schedules run one thread at a time: the runnable
// thread of lowest (kAscending) or highest (kDescending) index runs until it waits at a
// __syncthreads or a shuffle, then the next. Every stretch between two barriers then runs thread
// after thread in that order, so of two racing threads the reader runs before the writer in one
// order and after it in the other: on every run, one of the two orders reads the value a missing
// barrier should have kept from it. Every __syncthreads counts arrivals at one barrier (as bar.sync
// 0 does), so a __syncthreads in divergent code shows only through wrong results; threads left
// waiting at a barrier nobody else reaches abort the process with a message (a hang otherwise).
//
// What this checks is the kernels' indexing, synchronization structure and arithmetic as written,
// against the references; what it cannot check is nvcc's code generation, the warp-synchronous
// behaviour of real warps, bank conflicts, resource limits and the real memory model (the GPU
// tier, tests/test_plugins_gpu.py, runs the PTX itself).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <semaphore>
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

enum class Schedule { kConcurrent = 0, kAscending = 1, kDescending = 2 };
inline Schedule schedule = Schedule::kConcurrent;

// The baton of a block under a serial schedule: exactly one of its threads runs at a time.
class Serial {
 public:
  static constexpr int kRunnable = -1, kAtSyncthreads = -2, kExited = -3;  // else: at warp w's exchange

  Serial(int threads, bool descending)
      : state_(threads, kRunnable), descending_(descending), go_(threads) {
    for (auto& g : go_) g = std::make_unique<std::binary_semaphore>(0);
    go_[pick()]->release();
  }
  void begin(int tid) { go_[tid]->acquire(); }
  // Thread `tid` waits at `at` (kAtSyncthreads, or its warp's index): the next thread runs.
  void wait(int tid, int at) {
    hand_on(tid, at);
    go_[tid]->acquire();
  }
  void exit(int tid) { hand_on(tid, kExited); }

 private:
  int pick() const {  // the runnable thread that runs next, or -1
    const int n = static_cast<int>(state_.size());
    for (int k = 0; k < n; ++k) {
      const int t = descending_ ? n - 1 - k : k;
      if (state_[t] == kRunnable) return t;
    }
    return -1;
  }
  void release() {  // nobody runnable: open the barriers every thread they wait for has reached
    const int n = static_cast<int>(state_.size());
    bool all_at_sync = true;  // exited threads count as arrived
    for (int s : state_) all_at_sync = all_at_sync && (s == kAtSyncthreads || s == kExited);
    for (int t = 0; t < n; ++t) {
      const int at = state_[t];
      if (at == kAtSyncthreads && all_at_sync) state_[t] = kRunnable;
      if (at < 0) continue;
      bool warp_in = true;  // every lane of warp `at` waits at its exchange
      for (int l = 32 * at; l < 32 * at + 32; ++l) warp_in = warp_in && l < n && state_[l] == at;
      if (warp_in)
        for (int l = 32 * at; l < 32 * at + 32; ++l) state_[l] = kRunnable;
    }
  }
  void hand_on(int tid, int at) {
    int next;
    {
      std::lock_guard<std::mutex> lock(mu_);
      state_[tid] = at;
      next = pick();
      if (next < 0) {
        release();
        next = pick();
      }
      if (next < 0) {
        for (int s : state_)
          if (s != kExited) {
            std::fprintf(stderr, "cuda_emu: deadlock, threads wait at barriers nobody else reaches\n");
            std::abort();
          }
        return;  // the block is done
      }
    }
    go_[next]->release();
  }

  std::mutex mu_;
  std::vector<int> state_;
  bool descending_;
  std::vector<std::unique_ptr<std::binary_semaphore>> go_;
};

struct Block {
  explicit Block(unsigned threads)
      : bar(static_cast<std::ptrdiff_t>(threads)), warps((threads + 31) / 32) {
    for (auto& w : warps) w = std::make_unique<Warp>();
    if (schedule != Schedule::kConcurrent)
      serial = std::make_unique<Serial>(static_cast<int>(threads), schedule == Schedule::kDescending);
  }
  struct Warp {
    std::barrier<> bar{32};
    float buf[32];
  };
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::unique_ptr<Serial> serial;  // null under kConcurrent
};

inline thread_local Block* block = nullptr;
inline thread_local int thread_rank = 0;  // linear index of this thread in its block

}  // namespace emu

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() {
  if (emu::block->serial) emu::block->serial->wait(emu::thread_rank, emu::Serial::kAtSyncthreads);
  else emu::block->bar.arrive_and_wait();
}

namespace emu {
// Lane `src`'s value of x (every lane of the warp calls this with its own x).
inline float exchange(float x, int src, bool in_range) {
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  Block::Warp& w = *block->warps[warp];
  auto warp_barrier = [&] {
    if (block->serial) block->serial->wait(thread_rank, warp);
    else w.bar.arrive_and_wait();
  };
  w.buf[lane] = x;
  warp_barrier();
  const float out = in_range ? w.buf[src] : x;
  warp_barrier();  // nobody overwrites buf before every lane has read it
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
            thread_rank = static_cast<int>(t);
            blockIdx = uint3{x, y, z};
            threadIdx = uint3{t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y)};
            if (state.serial) state.serial->begin(thread_rank);
            kernel(args...);
            if (state.serial) state.serial->exit(thread_rank);
          });
        for (auto& th : threads) th.join();
      }
}
}  // namespace emu
