"""Native onnxruntime CPU kernels for the xLSTM cells and the weight products: swap them in.

An exported model runs on stock onnxruntime through the ``xlstm`` nodes' function bodies in
standard ops. At decode (S == 1) that body is ~35 small ops per mLSTM cell, each a kernel launch
and, at batch > 1, a pass over the (B, NH, DQK, DV) matrix memory; the sLSTM body is a Scan whose
per-step subgraph costs more than its arithmetic. The library built from ``plugins/cpu_ops.cc``
(:mod:`xlstm_export.plugins.cpu_build`) does both in one kernel each, float32, with one pass over
the state:

* ``xlstm.cpu::mLSTMStep(q, k, v, i, f, c0, n0, m0, eps) -> (h, c, n, m)`` replaces the ``S == 1``
  branch of the mLSTM body (the chunkwise branch, MatMul-bound at prefill, is kept);
* ``xlstm.cpu::sLSTMScan(h0, c0, n0, m0, x, r) -> (h, c, n, m, y)`` replaces the sLSTM body's Scan;
* ``xlstm.cpu::PackedMatMul(x, w) -> y`` (attribute ``n``) replaces each float32 MatMul of the main
  graph by a weight initializer [K, n]: the weight is packed into column panels [ceil(n/32), K, 32]
  (:func:`pack_weight`) so that each thread streams one contiguous block of it. A decode step is
  mostly these products reading their weights once; onnxruntime's MatMul reads a [K, n] weight in
  strided pieces and, at a few rows, stays further from the memory-bandwidth floor.

:func:`with_native_ops` rewrites a loaded ModelProto in memory (the file on disk stays portable),
and :func:`register` adds the library to a SessionOptions; ``OrtModel(path, native_ops=True)`` does
both. The cell kernels read float32 (the bodies cast to float32 before them), so fp16 / bf16 exports
use them too; the products are packed only where the MatMul is float32. Parity with the standard-op
graph is tested in tests/test_ort_native.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import FunctionProto, GraphProto, ModelProto, helper, numpy_helper

from . import onnx_functions as of
from .contract import DOMAIN, MLSTM, SLSTM
from .export import _all_nodes

__all__ = ["NATIVE_DOMAIN", "PANEL", "NativeOpsError", "library_path", "pack_weight", "register",
           "with_native_ops"]

NATIVE_DOMAIN = "xlstm.cpu"  # custom-op domain of the library (cpu_ops.cc registers these names)
NATIVE_VERSION = 1
PANEL = 32  # columns per packed weight panel (kPanel in plugins/cpu_gemm.h)


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


def pack_weight(w: np.ndarray) -> np.ndarray:
    """A MatMul weight [K, N] in PackedMatMul's layout [ceil(N / 32), K, 32] (panel p = columns
    32p .. 32p+31, row after row; the last panel zero-padded), float32 and contiguous."""
    if w.ndim != 2:
        raise ValueError(f"a MatMul weight is [K, N], got shape {w.shape}")
    k, n = w.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), dtype=np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))


def _pack_matmuls(graph: GraphProto) -> int:
    """Swap each float32 ``MatMul(x, W)`` of ``graph`` whose W is an initializer [K, N] read by
    nothing else for ``PackedMatMul(x, pack_weight(W))``; the packed copy replaces W. Returns how
    many were swapped."""
    inits = {t.name: t for t in graph.initializer}
    overridable = {i.name for i in graph.input}  # an initializer listed as a graph input can be fed
    uses = Counter(x for node in _all_nodes(graph) for x in node.input if x)  # subgraphs too
    uses.update(o.name for o in graph.output)
    swapped = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        name = node.input[1]
        t = inits.get(name)
        if (t is None or name in overridable or uses[name] != 1 or t.data_type != onnx.TensorProto.FLOAT
                or len(t.dims) != 2):
            continue
        w = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(pack_weight(w), f"{name}.packed{PANEL}"))
        node.CopyFrom(helper.make_node("PackedMatMul", [node.input[0], t.name], list(node.output),
                                       domain=NATIVE_DOMAIN, name=node.name, n=int(w.shape[1])))
        swapped += 1
    return swapped


def _add_opset(imports, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in imports):
        imports.append(helper.make_opsetid(domain, version))


def with_native_ops(model: ModelProto, *, inplace: bool = False, pack_matmuls: bool = True,
                    check_xlstm: bool = True) -> ModelProto:
    """``model`` (a copy unless ``inplace``) with xlstm function bodies that call the native kernels
    and, when ``pack_matmuls``, its float32 weight MatMuls swapped for ``PackedMatMul``. A model
    with no xlstm body to rewrite is refused unless ``check_xlstm`` is False."""
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
    if not rewritten and check_xlstm:
        raise NativeOpsError("the model has no xlstm::mLSTM / xlstm::sLSTM function body to run natively")
    if pack_matmuls:
        _pack_matmuls(out.graph)
    _add_opset(out.opset_import, NATIVE_DOMAIN, NATIVE_VERSION)
    return out
