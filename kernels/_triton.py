"""Where the Triton kernels run, written once: the package, the interpreter, the device.

``TRITON_INTERPRET=1`` makes ``triton.jit`` build interpreted kernels (CPU tensors, slow, for
tests). Triton decides that when a kernel module is imported, so :func:`interpreting` asks Triton
the same way (a probe kernel, see :mod:`._tl`) instead of re-reading the environment later.

    >>> triton_runs_on(torch.device("cuda"))    # True where triton is installed
    >>> require_triton("chunk_mlstm", q.device)  # RuntimeError with the fix when it cannot run
"""

from __future__ import annotations

__all__ = [
    "DOT_MIN",
    "dot_precision",
    "dot_tile",
    "interpreting",
    "is_pow2",
    "next_pow2",
    "require_triton",
    "triton_available",
    "triton_runs_on",
]

DOT_MIN = 16  # tl.dot needs M, N, K >= 16: the smallest tile of every kernel that multiplies


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when the Triton kernels run in the interpreter (TRITON_INTERPRET=1 at their import)."""
    if not triton_available():
        return False
    from ._tl import INTERPRETED

    return INTERPRETED


def triton_runs_on(device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device`` (CUDA, or CPU when interpreted;
    never meta or another device, which the interpreter cannot read)."""
    return triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def require_triton(fn: str, device) -> None:
    """Raise one RuntimeError naming ``fn`` and the fix when the kernels cannot run on ``device``."""
    if not triton_available():
        raise RuntimeError(f"{fn} needs the triton package: pip install 'xlstm-export[triton]'")
    if not triton_runs_on(device):
        raise RuntimeError(
            f"{fn} got tensors on {device.type}; Triton runs on CUDA, or on CPU only under "
            "TRITON_INTERPRET=1 set before the kernels are imported (slow, for tests). "
            "Use backend 'torch' or 'auto'."
        )


def is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def dot_tile(x: int) -> int:
    """The smallest tile that covers ``x`` and tl.dot takes: a power of two >= DOT_MIN."""
    return max(DOT_MIN, next_pow2(x))


def dot_precision(dtype, fp32: str = "ieee") -> str:
    """The mode of ``_tl.mm`` / ``_tl.cast`` for operands of ``dtype``: ``fp32`` (tl.dot's
    input_precision) for float32; "ieee" for 16-bit operands (where it has no effect), except
    bfloat16 under the interpreter: "interpret-bf16" (see :mod:`._tl`)."""
    import torch

    if dtype == torch.bfloat16 and interpreting():
        return "interpret-bf16"
    return fp32 if dtype == torch.float32 else "ieee"
