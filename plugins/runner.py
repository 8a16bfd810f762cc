"""Launch the plugin kernels from PyTorch through CuPy, exactly as TensorRT's AOT plugin does.

Same PTX (:func:`build.ptx` for the device's target), same entry point (:func:`build.kernel_name`),
same launch parameters and int32 arguments (:mod:`.launch`), same argument order (input pointers,
int32 scalars, output pointers). This is how the GPU tests and the benchmarks exercise the
kernels without TensorRT::

    h, c, n, m = mlstm_plugin_forward(q, k, v, i, f, c0, n0, m0, chunk_size=64, eps=1e-6)
    y, h, c, n, m = slstm_plugin_forward(x, r, b, h0, c0, n0, m0)

Needs a CUDA GPU, torch with CUDA and CuPy (``pip install cupy-cuda12x`` or ``cupy-cuda13x``).
"""

from __future__ import annotations

import functools
from typing import Sequence

from xlstm_export import contract
from xlstm_export.contract import MLSTM, SLSTM

from . import build, device, launch

__all__ = ["mlstm_plugin_forward", "slstm_plugin_forward", "launch_kernel"]

_DEFAULT_SMEM = 48 * 1024  # above this a kernel must opt in (cudaFuncAttributeMaxDynamicSharedMemorySize)


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError("launching the plugin kernels from PyTorch needs CuPy: "
                           "pip install cupy-cuda12x (or cupy-cuda13x)") from exc
    return cupy


@functools.lru_cache(maxsize=None)
def _kernel(op: str, dtype: str, arch: str):
    cupy = _cupy()
    module = cupy.RawModule(path=str(build.build_ptx(op, arch)))
    return module.get_function(build.kernel_name(op, dtype))


def launch_kernel(op: str, dtype: str, params: launch.LaunchParams, inputs: Sequence, outputs: Sequence) -> None:
    """Launch ``op``'s kernel for ``dtype`` on torch's current stream: (inputs, int32 args, outputs)."""
    import numpy as np
    import torch

    cupy = _cupy()
    launch.check_limits(params, smem_limit=device.smem_optin_bytes(), op=f"xlstm::{op}")
    fn = _kernel(op, dtype, device.ptx_arch())
    if params.shared_mem > _DEFAULT_SMEM:
        fn.max_dynamic_shared_size_bytes = params.shared_mem
    args = ([np.uint64(t.data_ptr()) for t in inputs]
            + [np.int32(a) for a in params.extra_args]
            + [np.uint64(t.data_ptr()) for t in outputs])
    stream = torch.cuda.current_stream()
    with cupy.cuda.ExternalStream(stream.cuda_stream):
        fn(tuple(params.grid), tuple(params.block), tuple(args), shared_mem=params.shared_mem)


def _check(spec: contract.OpSpec, tensors) -> str:
    import torch

    contract.validate_shapes(spec, [tuple(t.shape) for t in tensors])
    t_dtype = contract.validate_dtypes(spec, [str(t.dtype) for t in tensors])
    for t_spec, t in zip(spec.inputs, tensors):
        if not (isinstance(t, torch.Tensor) and t.is_cuda and t.is_contiguous()):
            raise ValueError(f"{spec.qualname}: input {t_spec.name} must be a contiguous CUDA tensor")
    return t_dtype


def _empty(shape, dtype, like, poison: bool):
    import torch

    out = torch.empty(shape, dtype=dtype, device=like.device)
    if poison:
        out.fill_(float("nan"))  # unwritten memory must fail the comparison
    return out


def mlstm_plugin_forward(q, k, v, i, f, c0, n0, m0, *, chunk_size: int = 64, eps: float = 1e-6,
                         poison: bool = False):
    """xlstm::mLSTM on the CUDA kernel: h (B, NH, S, DV) in the dtype of q; c, n, m float32."""
    import torch

    inputs = (q, k, v, i, f, c0, n0, m0)
    t_dtype = _check(MLSTM, inputs)
    MLSTM.validate_attrs({"chunk_size": chunk_size, "eps": eps})
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    shapes = contract.mlstm_output_shapes(q.shape, k.shape, v.shape)
    outs = [_empty(s, q.dtype if o.dtype == "T" else torch.float32, q, poison)
            for s, o in zip(shapes, MLSTM.outputs)]
    params = launch.mlstm_launch(B, NH, S, DQK, DV, chunk_size=chunk_size, eps=eps)
    launch_kernel("mLSTM", t_dtype, params, inputs, outs)
    return tuple(outs)


def slstm_plugin_forward(x, r, b, h0, c0, n0, m0, *, poison: bool = False, smem_limit: int | None = None):
    """xlstm::sLSTM on the CUDA kernel: y (B, NH, S, DH) in the dtype of x; h, c, n, m float32.

    ``smem_limit`` (tests only) caps the shared memory the launch may plan with, to force rows of r
    out of shared memory; None: the device's limit, as the TensorRT plugin plans.
    """
    import torch

    inputs = (x, r, b, h0, c0, n0, m0)
    t_dtype = _check(SLSTM, inputs)
    B, NH, S = x.shape[:3]
    DH = r.shape[1]
    shapes = contract.slstm_output_shapes(x.shape, r.shape)
    outs = [_empty(s, x.dtype if o.dtype == "T" else torch.float32, x, poison)
            for s, o in zip(shapes, SLSTM.outputs)]
    limit = device.smem_optin_bytes() if smem_limit is None else min(smem_limit, device.smem_optin_bytes())
    params = launch.slstm_launch(B, NH, S, DH, itemsize=x.element_size(), smem_limit=limit)
    launch_kernel("sLSTM", t_dtype, params, inputs, outs)
    return tuple(outs)
