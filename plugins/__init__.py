"""CUDA C++ kernels of the xLSTM cells, their PTX build, and the TensorRT plugin definitions.

    mlstm_fwd.cu, slstm_fwd.cu   forward kernels (extern "C", TensorRT AOT parameter order)
    common.cuh, layout.cuh       dtype helpers; launch geometry (tile sizes: -D flags from launch.py)
    build                        nvcc -> PTX, cached; PTX entry signatures
    launch                       tile sizes (their one owner); grid / block / shared memory / int32 args
    device                       what the current GPU allows (compute capability, shared memory)
    runner                       the same launches from PyTorch through CuPy (GPU tests, benchmarks)
    tensorrt_plugins             tensorrt.plugin register / autotune / aot_impl (needs tensorrt)

Importing this package needs neither TensorRT nor CuPy nor a GPU; only ``tensorrt_plugins`` imports
tensorrt (and raises ImportError saying what to install when it is missing).
"""

__all__ = ["build", "launch", "device", "runner", "tensorrt_plugins"]  # submodules, imported on demand
