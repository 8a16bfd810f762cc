// The plugin kernels (plugins/mlstm_fwd.cu, plugins/slstm_fwd.cu) compiled for the CPU emulation of
// cuda_emu.h, with C entry points that take the launch as TensorRT hands it to the kernel: grid,
// block, dynamic shared memory bytes, then the kernel's own arguments in their AOT order (input
// pointers, int32 scalars, output pointers). Built and called by tests/test_plugins_emu.py.
#include "cuda_emu.h"

#include "mlstm_fwd.cu"
#include "slstm_fwd.cu"

// Dynamic shared memory (`extern __shared__ float smem[]` in each kernel), one buffer per op.
constexpr size_t kSmemBytes = 256 * 1024;  // above every GPU's per-block opt-in limit
namespace xlstm::mlstm { alignas(16) float smem[kSmemBytes / sizeof(float)]; }
namespace xlstm::slstm { alignas(16) float smem[kSmemBytes / sizeof(float)]; }

namespace {

template <typename T>
using MlstmKernel = void (*)(const T*, const T*, const T*, const T*, const T*, const float*, const float*,
                             const float*, int, int, int, int, int, int, int, T*, float*, float*, float*);
template <typename T>
using SlstmKernel = void (*)(const T*, const T*, const T*, const float*, const float*, const float*,
                             const float*, int, int, int, int, int, T*, float*, float*, float*, float*);

template <typename T>
int mlstm(MlstmKernel<T> kernel, const unsigned* launch, void* const* in, const int* a, void* const* out) {
  if (launch[6] > kSmemBytes) return 1;
  emu::launch(kernel, dim3{launch[0], launch[1], launch[2]}, dim3{launch[3], launch[4], launch[5]},
              static_cast<const T*>(in[0]), static_cast<const T*>(in[1]), static_cast<const T*>(in[2]),
              static_cast<const T*>(in[3]), static_cast<const T*>(in[4]), static_cast<const float*>(in[5]),
              static_cast<const float*>(in[6]), static_cast<const float*>(in[7]), a[0], a[1], a[2], a[3],
              a[4], a[5], a[6], static_cast<T*>(out[0]), static_cast<float*>(out[1]),
              static_cast<float*>(out[2]), static_cast<float*>(out[3]));
  return 0;
}

template <typename T>
int slstm(SlstmKernel<T> kernel, const unsigned* launch, void* const* in, const int* a, void* const* out) {
  if (launch[6] > kSmemBytes) return 1;
  emu::launch(kernel, dim3{launch[0], launch[1], launch[2]}, dim3{launch[3], launch[4], launch[5]},
              static_cast<const T*>(in[0]), static_cast<const T*>(in[1]), static_cast<const T*>(in[2]),
              static_cast<const float*>(in[3]), static_cast<const float*>(in[4]),
              static_cast<const float*>(in[5]), static_cast<const float*>(in[6]), a[0], a[1], a[2], a[3],
              a[4], static_cast<T*>(out[0]), static_cast<float*>(out[1]), static_cast<float*>(out[2]),
              static_cast<float*>(out[3]), static_cast<float*>(out[4]));
  return 0;
}

}  // namespace

// launch: grid x, y, z, block x, y, z, dynamic shared memory bytes.  dtype: 0 f32, 1 f16, 2 bf16.
// Returns 0, or 1 when the launch asks for more shared memory than the emulation holds.
extern "C" int emu_mlstm_fwd(int dtype, const unsigned* launch, void* const* in, const int* args,
                             void* const* out) {
  switch (dtype) {
    case 0: return mlstm<float>(mlstm_fwd_kernel_f32, launch, in, args, out);
    case 1: return mlstm<__half>(mlstm_fwd_kernel_f16, launch, in, args, out);
    default: return mlstm<__nv_bfloat16>(mlstm_fwd_kernel_bf16, launch, in, args, out);
  }
}

extern "C" int emu_slstm_fwd(int dtype, const unsigned* launch, void* const* in, const int* args,
                             void* const* out) {
  switch (dtype) {
    case 0: return slstm<float>(slstm_fwd_kernel_f32, launch, in, args, out);
    case 1: return slstm<__half>(slstm_fwd_kernel_f16, launch, in, args, out);
    default: return slstm<__nv_bfloat16>(slstm_fwd_kernel_bf16, launch, in, args, out);
  }
}
