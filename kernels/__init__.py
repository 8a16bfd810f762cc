"""The xLSTM cell math: one public signature per op, several implementations (backends).

Every backend of an op computes the same function with the same signature:

mLSTM (head-first, float32 state; q is scaled by 1/sqrt(DHQK) inside the cell, so the state
holds unscaled k, the `mlstm_kernels` / transformers convention)::

    h, (c, n, m) = mlstm_cell(q, k, v, i, f, state=None, *, backend="auto", chunk_size=64, eps=1e-6)
    # q, k: (B, NH, S, DHQK)   v: (B, NH, S, DHV)   i, f: (B, NH, S) gate pre-activations
    # state: None or (c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)), all float32
    # h: (B, NH, S, DHV) in the dtype of v; the final state is float32 (float64 for float64 inputs)

sLSTM (head-first, block-diagonal recurrence, gate order i, f, z, o)::

    y, (h, c, n, m) = slstm_cell(x, r, b, state=None, *, backend="auto")
    # x: (B, NH, S, 4*DH)  W x per head, laid out gate-major [i | f | z | o], no bias
    # r: (NH, DH, 4*DH)    recurrent weights: pre-activations += h_{t-1} @ r[head]
    # b: (NH, 4*DH)        bias, same gate-major layout
    # state: None or (h, c, n, m), each (B, NH, DH) float32
    # y: (B, NH, S, DH) in the dtype of x; the final state is float32 (float64 for float64 inputs)

A state of all zeros is a fresh sequence (identical to ``state=None``).

Backends live in small dict registries. "torch" is the pure-PyTorch reference (runs anywhere),
"triton" the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1), and "auto" picks Triton on
CUDA tensors (float32 / float16 / bfloat16) and the reference elsewhere (float64 included);
"custom_op" runs the reference as the opaque ``torch.ops.xlstm.*`` nodes the ONNX exporter needs
(:mod:`.custom_op`). Each backend's module is imported on its first call; :func:`register_backend`
adds others.

Where Triton runs is decided in one place (``_triton.py``): :func:`triton_available`,
:func:`interpreting` (TRITON_INTERPRET=1 when the kernels were imported) and
:func:`triton_runs_on` (CUDA, or CPU when interpreted). Every implementation checks its inputs with
``xlstm_export.contract.check_inputs`` (the op spec's shapes, dtypes and attribute ranges).
"""

from __future__ import annotations

from typing import Callable

import torch

from ._triton import interpreting, require_triton, triton_available, triton_runs_on

__all__ = [
    "MLSTM_BACKENDS",
    "SLSTM_BACKENDS",
    "interpreting",
    "mlstm_cell",
    "register_backend",
    "slstm_cell",
    "triton_available",
    "triton_runs_on",
]

MLSTM_BACKENDS: dict[str, Callable] = {}
SLSTM_BACKENDS: dict[str, Callable] = {}


def register_backend(name: str, *, mlstm: Callable, slstm: Callable) -> None:
    """Make ``name`` usable as a cell backend (``model.set_backend(name)``)."""
    MLSTM_BACKENDS[name] = mlstm
    SLSTM_BACKENDS[name] = slstm


def _mlstm_torch(q, k, v, i, f, state=None, *, chunk_size=64, eps=1e-6):
    from .mlstm.naive import naive_chunk_mlstm, naive_step_mlstm

    if q.shape[2] == 1 and state is not None:
        return naive_step_mlstm(q, k, v, i, f, state, eps=eps)
    return naive_chunk_mlstm(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps)


def _slstm_torch(x, r, b, state=None):
    from .slstm.naive import naive_recurrent_slstm

    return naive_recurrent_slstm(x, r, b, state)


def _mlstm_triton(q, k, v, i, f, state=None, *, chunk_size=64, eps=1e-6):
    require_triton("backend 'triton'", q.device)
    from .mlstm.chunk import chunk_mlstm
    from .mlstm.fused_recurrent import fused_recurrent_step_mlstm

    if q.shape[2] == 1 and state is not None and not torch.is_grad_enabled():
        return fused_recurrent_step_mlstm(q, k, v, i, f, state, eps=eps)
    return chunk_mlstm(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps)


def _slstm_triton(x, r, b, state=None):
    require_triton("backend 'triton'", x.device)
    from .slstm.fused_recurrent import fused_recurrent_slstm, fused_recurrent_step_slstm

    if x.shape[2] == 1 and state is not None and not torch.is_grad_enabled():
        return fused_recurrent_step_slstm(x, r, b, state)
    return fused_recurrent_slstm(x, r, b, state)


def _mlstm_auto(q, *args, **kwargs):
    # float64 (a float64 model computes in float64 end to end) runs the reference: the Triton
    # kernels take float32 / float16 / bfloat16
    fn = _mlstm_triton if q.is_cuda and q.dtype != torch.float64 and triton_available() else _mlstm_torch
    return fn(q, *args, **kwargs)


def _slstm_auto(x, r, *args, **kwargs):
    use_triton = x.is_cuda and x.dtype != torch.float64 and triton_available()
    if use_triton:  # the fused kernel keeps r on chip; larger heads run the reference
        from .slstm.fused_recurrent import MAX_HEAD_DIM

        use_triton = r.shape[1] <= MAX_HEAD_DIM
    return (_slstm_triton if use_triton else _slstm_torch)(x, r, *args, **kwargs)


def _mlstm_custom_op(q, k, v, i, f, state=None, *, chunk_size=64, eps=1e-6):
    from .custom_op import mlstm_custom_op  # defines torch.ops.xlstm.* on first use

    return mlstm_custom_op(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps)


def _slstm_custom_op(x, r, b, state=None):
    from .custom_op import slstm_custom_op

    return slstm_custom_op(x, r, b, state)


register_backend("torch", mlstm=_mlstm_torch, slstm=_slstm_torch)
register_backend("triton", mlstm=_mlstm_triton, slstm=_slstm_triton)
register_backend("auto", mlstm=_mlstm_auto, slstm=_slstm_auto)
# the cells as the opaque torch.ops.xlstm.* nodes the ONNX exporter turns into xlstm:: nodes
register_backend("custom_op", mlstm=_mlstm_custom_op, slstm=_slstm_custom_op)


def mlstm_cell(q, k, v, i, f, state=None, *, backend: str = "auto", chunk_size: int = 64, eps: float = 1e-6):
    """mLSTM cell over a sequence with the chosen backend (see the module docstring)."""
    fn = _lookup(MLSTM_BACKENDS, backend)
    _check_tensors("mlstm_cell", dict(q=q, k=k, v=v, i=i, f=f), state, ("c", "n", "m"))
    return fn(q, k, v, i, f, state, chunk_size=chunk_size, eps=eps)


def slstm_cell(x, r, b, state=None, *, backend: str = "auto"):
    """sLSTM cell over a sequence with the chosen backend (see the module docstring)."""
    fn = _lookup(SLSTM_BACKENDS, backend)
    _check_tensors("slstm_cell", dict(x=x, r=r, b=b), state, ("h", "c", "n", "m"))
    return fn(x, r, b, state)


def _check_tensors(fn: str, inputs: dict, state, state_names: tuple[str, ...]) -> None:
    """TypeError naming the argument when an input (or a state entry) is not a torch.Tensor: the
    backends read .device / .is_cuda before the op's own checks, so a numpy array or a list ended in
    an AttributeError from inside a backend (or the contract's 'k is on cpu but q is on cpu')."""
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if isinstance(state, (tuple, list)):  # its length and shapes: the op's own check
        for name, t in zip(state_names, state):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: state {name} must be a tensor, got {type(t).__name__}")


def _lookup(registry: dict[str, Callable], backend: str) -> Callable:
    try:
        return registry[backend]
    except KeyError:
        raise ValueError(f"unknown cell backend {backend!r}; known: {sorted(registry)}") from None
