"""Native onnxruntime CPU kernels for the xLSTM cells: swap them into an exported model's bodies.

An exported model runs on stock onnxruntime through the ``xlstm`` nodes' function bodies in
standard ops. At decode (S == 1) that body is ~35 small ops per mLSTM cell, each a kernel launch
and, at batch > 1, a pass over the (B, NH, DQK, DV) matrix memory; the sLSTM body is a Scan whose
per-step subgraph costs more than its arithmetic. The library built from ``plugins/cpu_ops.cc``
(:mod:`xlstm_export.plugins.cpu_build`) does both in one kernel each, float32, with one pass over
the state:

* ``xlstm.cpu::mLSTMStep(q, k, v, i, f, c0, n0, m0, eps) -> (h, c, n, m)`` replaces the ``S == 1``
  branch of the mLSTM body (the chunkwise branch, MatMul-bound at prefill, is kept);
* ``xlstm.cpu::sLSTMScan(h0, c0, n0, m0, x, r) -> (h, c, n, m, y)`` replaces the sLSTM body's Scan.

:func:`with_native_ops` rewrites a loaded ModelProto in memory (the file on disk stays portable),
and :func:`register` adds the library to a SessionOptions; ``OrtModel(path, native_ops=True)`` does
both. Both kernels read float32 (the bodies cast to float32 before them), so fp16 / bf16 exports
use them too. Parity with the standard-op bodies is tested in tests/test_ort_native.py.
"""

from __future__ import annotations

import onnx
from onnx import FunctionProto, GraphProto, ModelProto, helper

from . import onnx_functions as of
from .contract import DOMAIN, MLSTM, SLSTM

__all__ = ["NATIVE_DOMAIN", "NativeOpsError", "library_path", "register", "with_native_ops"]

NATIVE_DOMAIN = "xlstm.cpu"  # custom-op domain of the library (cpu_ops.cc registers these names)
NATIVE_VERSION = 1


class NativeOpsError(RuntimeError):
    """The model has no xlstm function body this rewrite knows, or the library cannot be used."""


def library_path() -> str:
    """Path of the compiled custom-op library (built on first use, see plugins/cpu_build.py)."""
    from .plugins import cpu_build

    return str(cpu_build.library_path())


def register(session_options) -> None:
    """Register the native kernels with an ``onnxruntime.SessionOptions``."""
    session_options.register_custom_ops_library(library_path())


def _native_step_branch() -> GraphProto:
    """The mLSTM ``S == 1`` branch as one native node (same outputs as the standard-op branch)."""
    f32 = {"to": onnx.TensorProto.FLOAT}
    nodes = [helper.make_node("Cast", [x], [f"nt_{x}"], **f32) for x in ("q", "k", "v", "i", "f")]
    outs = [f"st_{o}_out" for o in of._BRANCH_OUT]  # the names the If node's then_branch must emit
    nodes.append(helper.make_node(
        "mLSTMStep", ["nt_q", "nt_k", "nt_v", "nt_i", "nt_f", "c0", "n0", "m0", of._PRE["eps"]], outs,
        domain=NATIVE_DOMAIN, name="native_mlstm_step"))
    return helper.make_graph(nodes, "mlstm_step_native", [],
                             [of._vi(o, onnx.TensorProto.FLOAT) for o in outs])


def _rewrite_mlstm(fn: FunctionProto) -> None:
    branches = [n for n in fn.node if n.op_type == "If"]
    if len(branches) != 1:
        raise NativeOpsError(f"the {DOMAIN}::{MLSTM.name} body has {len(branches)} If nodes, expected 1 "
                             "(not a body written by this version of xlstm_export.onnx_functions)")
    for attr in branches[0].attribute:
        if attr.name == "then_branch":
            attr.g.CopyFrom(_native_step_branch())


def _rewrite_slstm(fn: FunctionProto) -> None:
    scans = [j for j, n in enumerate(fn.node) if n.op_type == "Scan"]
    if len(scans) != 1 or list(fn.node[scans[0]].input)[:4] != ["h0", "c0", "n0", "m0"]:
        raise NativeOpsError(f"the {DOMAIN}::{SLSTM.name} body is not a Scan over (h0, c0, n0, m0, x) "
                             "(not a body written by this version of xlstm_export.onnx_functions)")
    scan = fn.node[scans[0]]
    scan.CopyFrom(helper.make_node("sLSTMScan", [*scan.input, of._R_F32], list(scan.output),
                                   domain=NATIVE_DOMAIN, name="native_slstm_scan"))


def _add_opset(imports, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in imports):
        imports.append(helper.make_opsetid(domain, version))


def with_native_ops(model: ModelProto, *, inplace: bool = False) -> ModelProto:
    """``model`` (a copy unless ``inplace``) with xlstm function bodies that call the native kernels."""
    out = model
    if not inplace:
        out = ModelProto()
        out.CopyFrom(model)
    rewritten = 0
    for fn in out.functions:
        if fn.domain != DOMAIN:
            continue
        if fn.name == MLSTM.name:
            _rewrite_mlstm(fn)
        elif fn.name == SLSTM.name:
            _rewrite_slstm(fn)
        else:
            continue
        _add_opset(fn.opset_import, NATIVE_DOMAIN, NATIVE_VERSION)
        rewritten += 1
    if not rewritten:
        raise NativeOpsError("the model has no xlstm::mLSTM / xlstm::sLSTM function body to run natively")
    _add_opset(out.opset_import, NATIVE_DOMAIN, NATIVE_VERSION)
    return out
