"""torch.library custom ops ``xlstm::mLSTM`` and ``xlstm::sLSTM``: the cell backend "custom_op".

The ops are the PyTorch face of the op contract (:mod:`xlstm_export.contract`): same name, same
inputs (initial states explicit, float32), same outputs (final states float32), same attributes.
Their real implementation is the pure-PyTorch reference of :mod:`xlstm_export.kernels`; their fake
implementation (used by ``torch.export`` with symbolic B and S) comes from the contract's shape
rules. ``torch.export`` keeps each call as ONE opaque node, which the ONNX exporter
(:mod:`xlstm_export.export`) turns into one ``xlstm::*`` node carrying a function body.

Example::

    >>> import torch, xlstm_export.kernels.custom_op  # defines torch.ops.xlstm.*
    >>> q = k = torch.randn(1, 2, 5, 8); v = torch.randn(1, 2, 5, 16); i = f = torch.randn(1, 2, 5)
    >>> c0, n0, m0 = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8), torch.zeros(1, 2)
    >>> h, c, n, m = torch.ops.xlstm.mLSTM(q, k, v, i, f, c0, n0, m0, chunk_size=64, eps=1e-6)
    >>> h.shape, c.shape
    (torch.Size([1, 2, 5, 16]), torch.Size([1, 2, 8, 16]))

The backend "custom_op" (``model.set_backend("custom_op")``; :mod:`xlstm_export.kernels` lists it
beside "torch" and "triton" and imports this module on its first call) routes the fixed cell API
through these ops, with zeros for a ``None`` state.
"""

from __future__ import annotations

import torch

from .. import contract
from ..contract import MLSTM, SLSTM

__all__ = ["BACKEND_NAME", "mlstm_custom_op", "slstm_custom_op", "torch_schema"]

BACKEND_NAME = "custom_op"


_SCHEMA_TYPES = {"int": "SymInt", "float": "float"}  # contract attribute type -> torch schema type


def torch_schema(spec: contract.OpSpec) -> str:
    """The op's torch.library schema from its contract: the tensors in contract order, the numeric
    attributes with their defaults (the string attributes name the TensorRT plugin: ONNX only), one
    Tensor per output."""
    args = [f"Tensor {t.name}" for t in spec.inputs]
    args += [f"{_SCHEMA_TYPES[a.type]} {a.name}={a.default!r}" for a in spec.attrs if a.type in _SCHEMA_TYPES]
    return f"({', '.join(args)}) -> ({', '.join('Tensor' for _ in spec.outputs)})"


_MLSTM_DEFAULTS = MLSTM.defaults()  # the Python defaults (the schema's are for callers of torch.ops)


def _check(spec: contract.OpSpec, tensors: tuple[torch.Tensor, ...]) -> None:
    """Contract validation with concrete shapes (real implementation only)."""
    contract.validate_shapes(spec, [tuple(t.shape) for t in tensors])
    contract.validate_dtypes(spec, [str(t.dtype) for t in tensors])


def _fresh(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A custom op's output must not alias an input (the reference may return a state as is)."""
    if any(out.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in inputs):
        return out.clone()
    return out


# ---------------------------------------------------------------------------------------------
# xlstm::mLSTM
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("xlstm::mLSTM", mutates_args=(), schema=torch_schema(MLSTM))
def mlstm_op(q, k, v, i, f, c0, n0, m0, chunk_size=_MLSTM_DEFAULTS["chunk_size"], eps=_MLSTM_DEFAULTS["eps"]):
    """xlstm::mLSTM (inputs, attributes and defaults: ``contract.MLSTM``): q, k (B,NH,S,DQK), v (B,NH,S,DV),
    i, f (B,NH,S) in T; c0 (B,NH,DQK,DV), n0 (B,NH,DQK), m0 (B,NH) float32
    -> h (B,NH,S,DV) T, c (B,NH,DQK,DV), n (B,NH,DQK), m (B,NH) float32."""
    from .mlstm.naive import naive_chunk_mlstm

    inputs = (q, k, v, i, f, c0, n0, m0)
    _check(MLSTM, inputs)
    MLSTM.validate_attrs({"chunk_size": chunk_size, "eps": eps})
    h, (c, n, m) = naive_chunk_mlstm(q, k, v, i, f, (c0, n0, m0), chunk_size=chunk_size, eps=eps)
    return tuple(_fresh(t, inputs) for t in (h, c.float(), n.float(), m.float()))  # type: ignore[return-value]


@mlstm_op.register_fake
def _mlstm_fake(q, k, v, i, f, c0, n0, m0, chunk_size=_MLSTM_DEFAULTS["chunk_size"], eps=_MLSTM_DEFAULTS["eps"]):
    h_s, c_s, n_s, m_s = contract.mlstm_output_shapes(q.shape, k.shape, v.shape)
    return (
        q.new_empty(h_s, dtype=v.dtype),  # (B, NH, S, DV) T
        q.new_empty(c_s, dtype=torch.float32),  # (B, NH, DQK, DV)
        q.new_empty(n_s, dtype=torch.float32),  # (B, NH, DQK)
        q.new_empty(m_s, dtype=torch.float32),  # (B, NH)
    )


# ---------------------------------------------------------------------------------------------
# xlstm::sLSTM
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("xlstm::sLSTM", mutates_args=(), schema=torch_schema(SLSTM))
def slstm_op(x, r, b, h0, c0, n0, m0):
    """xlstm::sLSTM (inputs: ``contract.SLSTM``): x (B,NH,S,4*DH), r (NH,DH,4*DH), b (NH,4*DH) in T;
    h0, c0, n0, m0 (B,NH,DH) float32 -> y (B,NH,S,DH) T, h, c, n, m (B,NH,DH) float32."""
    from .slstm.naive import naive_recurrent_slstm

    inputs = (x, r, b, h0, c0, n0, m0)
    _check(SLSTM, inputs)
    y, (h, c, n, m) = naive_recurrent_slstm(x, r, b, (h0, c0, n0, m0))
    return tuple(_fresh(t, inputs) for t in (y, h.float(), c.float(), n.float(), m.float()))  # type: ignore[return-value]


@slstm_op.register_fake
def _slstm_fake(x, r, b, h0, c0, n0, m0):
    y_s, *state_s = contract.slstm_output_shapes(x.shape, r.shape)
    return (x.new_empty(y_s, dtype=x.dtype),  # (B, NH, S, DH) T
            *(x.new_empty(s, dtype=torch.float32) for s in state_s))  # 4 x (B, NH, DH)


# ---------------------------------------------------------------------------------------------
# the cell backend "custom_op" (the fixed cell API on top of the ops)
# ---------------------------------------------------------------------------------------------


def mlstm_custom_op(q, k, v, i, f, state=None, *, chunk_size: int = 64, eps: float = 1e-6):
    """Cell API -> ``torch.ops.xlstm.mLSTM``; returns h, (c, n, m)."""
    if state is None:
        B, NH, _, DQK = q.shape
        DV = v.shape[3]
        state = (q.new_zeros(B, NH, DQK, DV, dtype=torch.float32),  # c (B, NH, DQK, DV)
                 q.new_zeros(B, NH, DQK, dtype=torch.float32),  # n (B, NH, DQK)
                 q.new_zeros(B, NH, dtype=torch.float32))  # m (B, NH)
    c0, n0, m0 = state
    h, c, n, m = torch.ops.xlstm.mLSTM(q, k, v, i, f, c0, n0, m0, chunk_size=chunk_size, eps=eps)
    return h, (c, n, m)


def slstm_custom_op(x, r, b, state=None):
    """Cell API -> ``torch.ops.xlstm.sLSTM``; returns y, (h, c, n, m)."""
    if state is None:
        B, NH = x.shape[0], x.shape[1]
        DH = r.shape[1]
        z = x.new_zeros(B, NH, DH, dtype=torch.float32)  # (B, NH, DH)
        state = (z, z, z, z)
    h0, c0, n0, m0 = state
    y, h, c, n, m = torch.ops.xlstm.sLSTM(x, r, b, h0, c0, n0, m0)
    return y, (h, c, n, m)
