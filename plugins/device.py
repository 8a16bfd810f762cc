"""What the current CUDA device allows: compute capability and opt-in shared memory per block.

Asked through whichever of torch, CuPy or cuda-python is importable and sees a GPU; ``None`` where
none does (CPU machines). Used at TensorRT build time (``aot_impl`` picks the PTX target and checks
the launch against the device) and by the GPU tests and benchmarks.
"""

from __future__ import annotations

import functools

from .launch import SMEM_OPTIN_BYTES

__all__ = ["capability", "smem_optin_bytes", "ptx_arch"]

DEFAULT_ARCH = "sm_80"  # the smallest supported target: its PTX runs on every newer GPU


@functools.lru_cache(maxsize=None)
def capability() -> tuple[int, int] | None:
    """(major, minor) of the current CUDA device, or None when no GPU is visible."""
    try:
        import torch

        if torch.cuda.is_available():
            return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - any import / driver problem means "no answer from torch"
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            cc = cupy.cuda.Device().compute_capability  # e.g. "90"
            return int(cc[:-1]), int(cc[-1])
    except Exception:  # noqa: BLE001
        pass
    try:
        from cuda.bindings import runtime as cudart

        err, dev = cudart.cudaGetDevice()
        if int(err) == 0:
            _, major = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, dev)
            _, minor = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, dev)
            return int(major), int(minor)
    except Exception:  # noqa: BLE001
        pass
    return None


@functools.lru_cache(maxsize=None)
def smem_optin_bytes() -> int:
    """Max dynamic shared memory per block of the current device (opt-in), else the sm_80 value."""
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            value = getattr(props, "shared_memory_per_block_optin", 0)
            if value:
                return int(value)
    except Exception:  # noqa: BLE001
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return int(cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])
    except Exception:  # noqa: BLE001
        pass
    cc = capability()
    if cc is not None:
        return SMEM_OPTIN_BYTES.get(f"sm_{cc[0]}{cc[1]}", SMEM_OPTIN_BYTES[DEFAULT_ARCH])
    return SMEM_OPTIN_BYTES[DEFAULT_ARCH]


def ptx_arch() -> str:
    """PTX target for the current device ("sm_90" on Hopper and newer, else "sm_80")."""
    from .build import select_arch

    cc = capability()
    return DEFAULT_ARCH if cc is None else select_arch(*cc)
