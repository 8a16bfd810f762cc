// The plugin kernels (plugins/mlstm_fwd.cu, plugins/slstm_fwd.cu) compiled for the CPU emulation of
// cuda_emu.h, with C entry points that take the launch as TensorRT hands it to the kernel: grid,
// block, dynamic shared memory bytes, then the kernel's own arguments in their AOT order (input
// pointers, int32 scalars, output pointers). Built and called by tests/test_plugins_emu.py.
#include <tuple>
#include <type_traits>

#include "cuda_emu.h"

#include "mlstm_fwd.cu"
#include "slstm_fwd.cu"

// Dynamic shared memory (`extern __shared__ float smem[]` in each kernel), one buffer per op.
constexpr size_t kSmemBytes = 256 * 1024;  // above every GPU's per-block opt-in limit
namespace xlstm::mlstm { alignas(16) float smem[kSmemBytes / sizeof(float)]; }
namespace xlstm::slstm { alignas(16) float smem[kSmemBytes / sizeof(float)]; }

namespace {

// Launch `kernel` with its parameters taken in order from the flat arrays (TensorRT's AOT order):
// each `const X*` parameter is the next input pointer, each int the next of `a`, each `X*` the next
// output pointer; `smem` is the kernel's dynamic shared memory, all of it poisoned before each block
// (so a read past the launch's bytes reads NaN too, unless the block wrote there). Returns 0, or 1
// when the launch asks for more shared memory than the emulation has.
template <typename... P>
int run(void (*kernel)(P...), float* smem, const unsigned* launch, void* const* in, const int* a,
        void* const* out) {
  if (launch[6] > kSmemBytes) return 1;
  size_t n_in = 0, n_a = 0, n_out = 0;
  auto next = [&]<typename Q>(std::type_identity<Q>) -> Q {
    if constexpr (std::is_same_v<Q, int>) return a[n_a++];
    else if constexpr (std::is_const_v<std::remove_pointer_t<Q>>) return static_cast<Q>(in[n_in++]);
    else return static_cast<Q>(out[n_out++]);
  };
  const std::tuple<P...> params{next(std::type_identity<P>{})...};  // braced: evaluated left to right
  std::apply([&](auto... p) { emu::launch(kernel, dim3{launch[0], launch[1], launch[2]},
                                          dim3{launch[3], launch[4], launch[5]}, smem, kSmemBytes, p...); },
             params);
  return 0;
}

// The entry point of `dtype` (0 f32, 1 f16, 2 bf16).
template <typename F32, typename F16, typename BF16>
int run_dtype(int dtype, F32 f32, F16 f16, BF16 bf16, float* smem, const unsigned* launch, void* const* in,
              const int* a, void* const* out) {
  if (dtype == 0) return run(f32, smem, launch, in, a, out);
  return dtype == 1 ? run(f16, smem, launch, in, a, out) : run(bf16, smem, launch, in, a, out);
}

}  // namespace

// How the next launches schedule a block's threads (cuda_emu.h): 0 all at once (the default),
// 1 one at a time in ascending thread order, 2 in descending order.
extern "C" void emu_set_schedule(int schedule) { emu::schedule = static_cast<emu::Schedule>(schedule); }

// launch: grid x, y, z, block x, y, z, dynamic shared memory bytes.  dtype: 0 f32, 1 f16, 2 bf16.
// Returns 0, or 1 when the launch asks for more shared memory than the emulation holds.
extern "C" int emu_mlstm_fwd(int dtype, const unsigned* launch, void* const* in, const int* args,
                             void* const* out) {
  return run_dtype(dtype, mlstm_fwd_kernel_f32, mlstm_fwd_kernel_f16, mlstm_fwd_kernel_bf16, xlstm::mlstm::smem,
                   launch, in, args, out);
}

extern "C" int emu_slstm_fwd(int dtype, const unsigned* launch, void* const* in, const int* args,
                             void* const* out) {
  return run_dtype(dtype, slstm_fwd_kernel_f32, slstm_fwd_kernel_f16, slstm_fwd_kernel_bf16, xlstm::slstm::smem,
                   launch, in, args, out);
}
