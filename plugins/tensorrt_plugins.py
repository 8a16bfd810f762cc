"""TensorRT plugin definitions of ``xlstm::mLSTM`` and ``xlstm::sLSTM`` (``tensorrt.plugin``, AOT).

Importing this module registers both plugins with TensorRT's plugin registry (namespace ``xlstm``,
version ``"1"``, the names of the ONNX nodes), so the ONNX parser maps every exported ``xlstm``
node to its plugin instead of inlining the node's function body. Each plugin is ahead-of-time:
``aot_impl`` hands TensorRT the PTX of ``plugins/*.cu``, the launch parameters computed by
:mod:`.launch` (symbolic in B, NH and S) and the int32 kernel arguments. TensorRT bakes all of it
into the engine, which then runs in any TensorRT runtime (trtexec, C++, Triton Inference Server)
with no Python.

    >>> import xlstm_export.plugins.tensorrt_plugins  # noqa: F401  (needs tensorrt >= 10.9)

Every definition validates dtypes and attributes against the op contract
(:mod:`xlstm_export.contract`) and raises ``ValueError`` naming the op, the tensor and the expected
value: ``tensorrt.plugin`` turns exceptions raised in these callbacks into TensorRT build errors.

mLSTM's attributes are declared as one-element numpy arrays (``chunk_size`` int32, ``eps``
float32), the types the ONNX parser hands over (an ONNX INT / FLOAT attribute becomes a length-1
kINT32 / kFLOAT32 plugin field). Declared as ``int`` / ``float``, TensorRT 10.9 to 11.1 build them
with ``int(field.data)`` on that length-1 array, which NumPy >= 2.4 refuses (TypeError; deprecated
since 1.25), so the parser could not create the plugin; numpy-array attributes are built with
``field.data.astype(dtype)`` in every version (``tensorrt/plugin/_lib.py``,
``_TemplatePluginCreator.create_plugin``; TensorRT 11.2 unwraps length-1 fields).

Networks must prefer AOT Python plugins (``NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS``;
:func:`xlstm_export.tensorrt.build_engine` sets it) or the nodes must carry ``aot=1``; only an AOT
implementation is defined here.
"""
# No `from __future__ import annotations`: tensorrt.plugin inspects the annotations as classes.

from typing import List, Tuple, Union

import numpy as np
import numpy.typing as npt

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        "xlstm_export.plugins.tensorrt_plugins needs TensorRT >= 10.9 with its Python bindings "
        "(`pip install tensorrt` on a machine with an NVIDIA GPU and driver)"
    ) from exc

from xlstm_export import contract
from xlstm_export.contract import MLSTM, SLSTM

from . import build, device, launch

if not hasattr(trtp, "aot_impl") or not hasattr(trtp, "KernelLaunchParams"):  # pragma: no cover
    raise ImportError(f"TensorRT {getattr(trt, '__version__', '?')} has no AOT Python plugins "
                      "(tensorrt.plugin.aot_impl); TensorRT >= 10.9 is needed")
if contract.PLUGIN_VERSION != "1":  # pragma: no cover - tensorrt.plugin registers version "1" only
    raise ImportError("tensorrt.plugin registers plugin version '1', the contract says "
                      f"{contract.PLUGIN_VERSION!r}")

__all__ = ["MLSTM_PLUGIN_ID", "SLSTM_PLUGIN_ID", "trt_dtype_name"]

MLSTM_PLUGIN_ID = f"{contract.PLUGIN_NAMESPACE}::{MLSTM.name}"  # "xlstm::mLSTM"
SLSTM_PLUGIN_ID = f"{contract.PLUGIN_NAMESPACE}::{SLSTM.name}"  # "xlstm::sLSTM"

# mLSTM's attribute types (see the module docstring): one value each, as the ONNX parser passes it.
# The same objects annotate register and aot_impl, whose annotations tensorrt.plugin compares.
ChunkSizeAttr = npt.NDArray[np.int32]
EpsAttr = npt.NDArray[np.float32]

_TRT_DTYPES = {"float32": trt.float32, "float16": trt.float16, "bfloat16": trt.bfloat16}
_AUTOTUNE_NAMES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def trt_dtype_name(dtype) -> str:
    """trt.DataType -> contract dtype name ("float32", "float16", "bfloat16"; else the TRT name)."""
    for name, value in _TRT_DTYPES.items():
        if dtype == value:
            return name
    return str(dtype).replace("DataType.", "").lower()


def _t_dtype(spec: contract.OpSpec, descs) -> str:
    """Validate the input dtypes against the contract; return T."""
    return contract.validate_dtypes(spec, [trt_dtype_name(d.dtype) for d in descs])


def _mlstm_attrs(chunk_size, eps) -> dict:
    """The one-element attribute arrays as the contract's validated {"chunk_size": int, "eps": float}."""
    values = {}
    for name, value, kind in (("chunk_size", chunk_size, int), ("eps", eps, float)):
        flat = np.asarray(value).reshape(-1)
        if flat.size != 1:
            raise ValueError(f"{MLSTM.qualname}: attribute {name} must be one value, got {flat.size}: {value!r}")
        values[name] = kind(flat[0])
    return MLSTM.validate_attrs(values)


def _check_ranks(spec: contract.OpSpec, descs) -> None:
    for t, desc in zip(spec.inputs, descs):
        contract.check_rank(spec, t, desc.ndim, f"rank {desc.ndim}")


def _output_descs(spec: contract.OpSpec, shapes, t_dtype: str):
    dtypes = [_TRT_DTYPES[t_dtype] if o.dtype == "T" else trt.float32 for o in spec.outputs]
    return tuple(trtp.from_shape_expr(tuple(s), dtype=d) for s, d in zip(shapes, dtypes))


def _autotune(spec: contract.OpSpec) -> List[trtp.AutoTuneCombination]:
    # "FP32|FP16|BF16" at every T position moves together (dependent); states are always FP32
    t = "|".join(_AUTOTUNE_NAMES[d] for d in spec.type_dtypes)
    io = [t if x.dtype == "T" else "FP32" for x in (*spec.inputs, *spec.outputs)]
    return [trtp.AutoTuneCombination(", ".join(io), "LINEAR")]


def _static_dim(spec: contract.OpSpec, name: str, expr) -> int:
    """A head dim as an int: it chooses the kernel's shared-memory layout, so it must be static."""
    if isinstance(expr, int):
        return expr
    if getattr(expr, "is_fake", False) or not expr.is_constant:
        raise ValueError(f"{spec.qualname}: dim {name} must be static (a build-time constant) for the "
                         "plugin kernel; export the model with fixed head dims")
    return int(expr.constant_value())


def _aot_result(spec: contract.OpSpec, t_dtype: str, params: launch.LaunchParams):
    launch.check_limits(params, smem_limit=device.smem_optin_bytes(), op=spec.qualname)
    arch = device.ptx_arch()
    name = build.kernel_name(spec.name, t_dtype)
    ptx = build.ptx(spec.name, arch)
    lp = trtp.KernelLaunchParams()
    lp.grid_x, lp.grid_y, lp.grid_z = params.grid
    lp.block_x, lp.block_y, lp.block_z = params.block
    lp.shared_mem = params.shared_mem
    extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(a) for a in params.extra_args])
    return name, ptx, lp, extra


# ---------------------------------------------------------------------------------------------
# xlstm::mLSTM
# ---------------------------------------------------------------------------------------------


@trtp.register(MLSTM_PLUGIN_ID)
def mlstm_plugin_desc(
    q: trtp.TensorDesc,  # (B, NH, S, DQK) T
    k: trtp.TensorDesc,  # (B, NH, S, DQK) T
    v: trtp.TensorDesc,  # (B, NH, S, DV) T
    i: trtp.TensorDesc,  # (B, NH, S) T
    f: trtp.TensorDesc,  # (B, NH, S) T
    c0: trtp.TensorDesc,  # (B, NH, DQK, DV) float32
    n0: trtp.TensorDesc,  # (B, NH, DQK) float32
    m0: trtp.TensorDesc,  # (B, NH) float32
    chunk_size: ChunkSizeAttr,  # [chunk_size] int32
    eps: EpsAttr,  # [eps] float32
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    """h (B, NH, S, DV) T, c (B, NH, DQK, DV), n (B, NH, DQK), m (B, NH) float32."""
    t_dtype = _t_dtype(MLSTM, (q, k, v, i, f, c0, n0, m0))
    _mlstm_attrs(chunk_size, eps)
    _check_ranks(MLSTM, (q, k, v, i, f, c0, n0, m0))
    shapes = contract.mlstm_output_shapes(q.shape_expr, k.shape_expr, v.shape_expr)
    return _output_descs(MLSTM, shapes, t_dtype)


@trtp.autotune(MLSTM_PLUGIN_ID)
def mlstm_plugin_autotune(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, i: trtp.TensorDesc, f: trtp.TensorDesc,
    c0: trtp.TensorDesc, n0: trtp.TensorDesc, m0: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
) -> List[trtp.AutoTuneCombination]:
    return _autotune(MLSTM)


@trtp.aot_impl(MLSTM_PLUGIN_ID)
def mlstm_plugin_aot_impl(
    q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, i: trtp.TensorDesc, f: trtp.TensorDesc,
    c0: trtp.TensorDesc, n0: trtp.TensorDesc, m0: trtp.TensorDesc, chunk_size: ChunkSizeAttr, eps: EpsAttr,
    outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
    t_dtype = _t_dtype(MLSTM, (q, k, v, i, f, c0, n0, m0))
    attrs = _mlstm_attrs(chunk_size, eps)
    B, NH, S = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    DQK = _static_dim(MLSTM, "DQK", q.shape_expr[3])
    DV = _static_dim(MLSTM, "DV", v.shape_expr[3])
    params = launch.mlstm_launch(B, NH, S, DQK, DV, chunk_size=attrs["chunk_size"], eps=attrs["eps"])
    return _aot_result(MLSTM, t_dtype, params)


# ---------------------------------------------------------------------------------------------
# xlstm::sLSTM
# ---------------------------------------------------------------------------------------------


@trtp.register(SLSTM_PLUGIN_ID)
def slstm_plugin_desc(
    x: trtp.TensorDesc,  # (B, NH, S, 4*DH) T
    r: trtp.TensorDesc,  # (NH, DH, 4*DH) T
    b: trtp.TensorDesc,  # (NH, 4*DH) T
    h0: trtp.TensorDesc,  # (B, NH, DH) float32
    c0: trtp.TensorDesc,  # (B, NH, DH) float32
    n0: trtp.TensorDesc,  # (B, NH, DH) float32
    m0: trtp.TensorDesc,  # (B, NH, DH) float32
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
    """y (B, NH, S, DH) T, h, c, n, m (B, NH, DH) float32."""
    t_dtype = _t_dtype(SLSTM, (x, r, b, h0, c0, n0, m0))
    _check_ranks(SLSTM, (x, r, b, h0, c0, n0, m0))
    shapes = contract.slstm_output_shapes(x.shape_expr, r.shape_expr)
    return _output_descs(SLSTM, shapes, t_dtype)


@trtp.autotune(SLSTM_PLUGIN_ID)
def slstm_plugin_autotune(
    x: trtp.TensorDesc, r: trtp.TensorDesc, b: trtp.TensorDesc, h0: trtp.TensorDesc, c0: trtp.TensorDesc,
    n0: trtp.TensorDesc, m0: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc],
) -> List[trtp.AutoTuneCombination]:
    return _autotune(SLSTM)


@trtp.aot_impl(SLSTM_PLUGIN_ID)
def slstm_plugin_aot_impl(
    x: trtp.TensorDesc, r: trtp.TensorDesc, b: trtp.TensorDesc, h0: trtp.TensorDesc, c0: trtp.TensorDesc,
    n0: trtp.TensorDesc, m0: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc], tactic: int,
) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]:
    t_dtype = _t_dtype(SLSTM, (x, r, b, h0, c0, n0, m0))
    B, NH, S = x.shape_expr[0], x.shape_expr[1], x.shape_expr[2]
    DH = _static_dim(SLSTM, "DH", r.shape_expr[1])
    G = _static_dim(SLSTM, "4*DH", r.shape_expr[2])
    if G != 4 * DH:
        raise ValueError(f"{SLSTM.qualname}: r must be (NH, DH, 4*DH), got last dims ({DH}, {G})")
    params = launch.slstm_launch(B, NH, S, DH, itemsize=_ITEMSIZE[t_dtype], smem_limit=device.smem_optin_bytes())
    return _aot_result(SLSTM, t_dtype, params)
