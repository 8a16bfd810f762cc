"""Native onnxruntime CPU kernels for the xLSTM cells and the weight products: swap them in.

An exported model runs on stock onnxruntime through the ``xlstm`` nodes' function bodies in
standard ops. At decode (S == 1) that body is ~35 small ops per mLSTM cell, each a kernel launch
and, at batch > 1, a pass over the (B, NH, DQK, DV) matrix memory; the sLSTM body is a Scan whose
per-step subgraph costs more than its arithmetic. The library built from ``plugins/cpu_ops.cc``
(:mod:`xlstm_export.plugins.cpu_build`) does both in one kernel each, float32, with one pass over
the state:

* ``xlstm.cpu::mLSTMStep(q, k, v, i, f, c0, n0, m0, eps) -> (h, c, n, m)`` is the mLSTM body's
  decode fast path (``If(S == 1, mLSTMStep, chunkwise)``, see
  :func:`xlstm_export.onnx_functions.with_decode_step`; the chunkwise form, MatMul-bound at
  prefill, is kept);
* ``xlstm.cpu::sLSTMScan(h0, c0, n0, m0, x, r) -> (h, c, n, m, y)`` replaces the sLSTM body's Scan;
* ``xlstm.cpu::PackedMatMul(x, w) -> y`` (attribute ``n``) replaces each float32 MatMul of the main
  graph by a weight initializer [K, n]: the weight is packed into column panels [ceil(n/32), K, 32]
  (:func:`pack_weight`) so that each thread streams one contiguous block of it. A decode step is
  mostly these products reading their weights once; onnxruntime's MatMul reads a [K, n] weight in
  strided pieces and, at a few rows, stays further from the memory-bandwidth floor. What the
  exported graph does right before or after such a product is folded into it where the matcher
  can prove the pattern (every value in between read only there): a residual or bias ``Add``
  (``PackedMatMulAdd``), the RMSNorm before it and the logits' soft cap after it
  (``PackedNormMatMul``), the SwiGLU before the FFN's down-projection with the residual after it
  (``PackedGluMatMulAdd``);
* ``xlstm.cpu::mLSTMLayer`` replaces, in float32 7B-style models, everything between a block's two
  mLSTM weight products: the head reshapes, the gate bias and soft cap, the ``xlstm::mLSTM`` node,
  the per-head LayerNorm, the norm weight and the output gate (~25 nodes, each a few microseconds
  of onnxruntime overhead at decode, see :func:`_match_mlstm_layer`). It runs the cell step by step
  for any S: at these head sizes the recurrence costs ~1% of a prefill's products, so the
  chunkwise form buys nothing on a CPU. A layer the matcher cannot prove is left as it was.

A 7B-style block is then five nodes at decode instead of ~40 (norm + product, layer, product +
residual, norm + product, GLU + product + residual), so a step pays onnxruntime's per-node cost
(a few microseconds each) ~60 times on the 160M model instead of ~400. The decoder
(:class:`xlstm_export.ort.OrtDecoder`) also updates the states only ``mLSTMLayer`` reads in place
(:func:`inplace_states`).

:func:`with_native_ops` rewrites a loaded ModelProto in memory (the file on disk stays portable),
and :func:`register` adds the library to a SessionOptions; ``OrtModel(path, native_ops=True)`` does
both. The cell kernels read float32 (the bodies cast to float32 before them), so fp16 / bf16 exports
use them too; the products are packed only where the MatMul is float32. Parity with the standard-op
graph is tested in tests/test_ort_native.py.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import FunctionProto, GraphProto, ModelProto, helper, numpy_helper

from . import onnx_functions as of
from .contract import DOMAIN, MLSTM, SLSTM
from .export import _all_nodes

__all__ = ["NATIVE_DOMAIN", "PANEL", "NativeOpsError", "inplace_states", "library_path", "pack_weight",
           "register", "with_native_ops"]

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
    """The mLSTM body with the native step as its decode fast path (chunkwise for S > 1)."""
    opset = next((o.version for o in fn.opset_import if o.domain in ("", "ai.onnx")), of.DEFAULT_OPSET)
    fn.CopyFrom(of.mlstm_function(opset, step_branch=_native_step_branch()))


def _rewrite_slstm(fn: FunctionProto) -> None:
    """The sLSTM body's Scan over (h, c, n, m, r; x) as one native sLSTMScan node."""
    scans = [n for n in fn.node if n.op_type == "Scan"]
    if len(scans) == 1 and len(scans[0].input) == 6 and len(scans[0].output) == 6:
        scan = scans[0]
        (h0, c0, n0, m0, r, x), (h, c, n, m, _, y) = scan.input, scan.output  # r passes through the Scan
    elif len(scans) == 1 and len(scans[0].input) == 5 and len(scans[0].output) == 5:
        scan = scans[0]  # a file of xlstm-export <= 0.1.0: the Scan body captured the function's r
        (h0, c0, n0, m0, x), (h, c, n, m, y), r = scan.input, scan.output, of._R_F32
    else:
        raise NativeOpsError(f"the {DOMAIN}::{SLSTM.name} body is not one Scan over (h, c, n, m[, r]; x) "
                             "(not a body written by xlstm_export.onnx_functions)")
    scan.CopyFrom(helper.make_node("sLSTMScan", [h0, c0, n0, m0, x, r], [h, c, n, m, y],
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


def _shapes(graph: GraphProto) -> dict[str, list]:
    """Value name -> dims (ints or symbolic names) from the graph's value_info, inputs and outputs."""
    out = {}
    for v in (*graph.value_info, *graph.input, *graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_param if d.HasField("dim_param") else
                           (d.dim_value if d.HasField("dim_value") else None) for d in v.type.tensor_type.shape.dim]
    return out


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """Producers, readers and constants of one graph, for the layer matcher below."""

    def __init__(self, graph: GraphProto):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.readers: dict[str, list] = {}
        for node in _all_nodes(graph):  # subgraph readers count: such a value is not private
            for x in node.input:
                if x:
                    self.readers.setdefault(x, []).append(node)
        self.outputs = {o.name for o in graph.output}
        self.fed = {i.name for i in graph.input}  # an initializer listed as a graph input can be fed
        # positions in graph.node, keyed by a node's outputs (protobuf wrappers have no stable identity)
        self._position = {tuple(n.output): j for j, n in enumerate(graph.node)}

    def position(self, node) -> int:
        """Where ``node`` (of the main graph, as it was when this was built) stands in graph.node."""
        return self._position[tuple(node.output)]

    def made_by(self, name: str, op_type: str, **attrs):
        """The node that computes ``name`` if it is a standard ``op_type`` whose int / ints
        attributes equal ``attrs``, else None."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            return None
        values = _attrs(node)
        return node if all(values.get(k) == v for k, v in attrs.items()) else None

    def only_reader(self, name: str, op_type: str):
        """The one node reading ``name`` (a standard ``op_type``), or None if ``name`` has other
        readers or is a graph output."""
        readers = self.readers.get(name, [])
        if name in self.outputs or len(readers) != 1:
            return None
        node = readers[0]
        return node if node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def private(self, name: str) -> bool:
        return name not in self.outputs and len(self.readers.get(name, [])) == 1

    def uses(self, name: str) -> int:
        """How many node inputs (subgraphs too) and graph outputs read ``name``."""
        return len(self.readers.get(name, [])) + (name in self.outputs)

    def private_made_by(self, name: str, op_type: str, **attrs):
        """:meth:`made_by`, where nothing but one node reads ``name``."""
        return self.made_by(name, op_type, **attrs) if self.private(name) else None

    def operand(self, node, op_type: str):
        """(the node that makes one input of the two-input ``node``, a private ``op_type``; the
        other input), or (None, None)."""
        if node is None or len(node.input) != 2:
            return None, None
        for j, name in enumerate(node.input):
            inner = self.private_made_by(name, op_type)
            if inner is not None:
                return inner, node.input[1 - j]
        return None, None

    def const(self, name: str, dtype=np.float32) -> np.ndarray | None:
        t = self.inits.get(name)
        if t is None or name in self.fed:
            return None
        a = numpy_helper.to_array(t)
        return a if a.dtype == dtype else None

    def other_input(self, node, name: str) -> str:
        """The input of a two-input node that is not ``name``."""
        a, b = node.input
        return b if a == name else a


def _match_addend(g: _Graph, shapes: dict, y: str, n: int) -> tuple[object, str] | None:
    """(the Add, the other input) if the product ``y`` [..., n] is read only by an Add of a
    tensor of its own known shape (a residual) or of a float32 constant [n] (a bias)."""
    add = g.only_reader(y, "Add")
    if add is None or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    r = g.other_input(add, y)
    if r in g.inits and r not in g.fed:
        bias = g.const(r)
        return (add, r) if bias is not None and bias.shape == (n,) else None
    same_shape = shapes.get(r) is not None and shapes.get(r) == shapes.get(y) and None not in shapes[r]
    return (add, r) if same_shape else None


def _match_rms_norm(g: _Graph, x: str, k: int) -> tuple[str, str, float] | None:
    """(x0, g, eps) if ``x`` is Mul(Div(x0, Sqrt(Add(ReduceMean[-1](Pow(x0, 2)), eps))), g) with g a
    float32 constant [k], every value in between read only there (the exported RMSNorm)."""
    div, g_name = g.operand(g.private_made_by(x, "Mul"), "Div")
    sqrt = div and g.private_made_by(div.input[1], "Sqrt")
    add = sqrt and g.private_made_by(sqrt.input[0], "Add")
    mean, eps_name = g.operand(add, "ReduceMean") if add else (None, None)
    power = mean and g.private_made_by(mean.input[0], "Pow")
    if not power or power.input[0] != div.input[0]:
        return None
    scale, eps, two = g.const(g_name), g.const(eps_name), g.const(power.input[1])
    axes = g.const(mean.input[1], np.int64) if len(mean.input) > 1 else _attrs(mean).get("axes")
    if (scale is None or scale.shape != (k,) or eps is None or eps.size != 1 or two is None or two.size != 1
            or float(two) != 2.0 or axes is None or list(np.ravel(axes)) != [-1]
            or _attrs(mean).get("keepdims", 1) != 1):
        return None
    return div.input[0], g_name, float(eps)


def _match_swiglu(g: _Graph, x: str, k: int) -> str | None:
    """z if ``x`` is Mul(Mul(a, Sigmoid(a)), b) with a, b the two halves [k] of Split(z) on the last
    axis, every value in between read only there (the exported SwiGLU)."""
    silu, b = g.operand(g.private_made_by(x, "Mul"), "Mul")
    sig, a = g.operand(silu, "Sigmoid")
    split = sig is not None and sig.input[0] == a and g.made_by(a, "Split", axis=-1)
    if not split or list(split.output) != [a, b] or g.uses(a) != 2 or g.uses(b) != 1:
        return None
    sizes = g.const(split.input[1], np.int64) if len(split.input) > 1 else None
    halves = _attrs(split).get("num_outputs") == 2 if sizes is None else list(np.ravel(sizes)) == [k, k]
    return split.input[0] if halves else None


def _match_soft_cap(g: _Graph, y: str) -> tuple[object, float] | None:
    """(the last node, cap) if ``y`` is read only by Mul(Tanh(Div(y, cap)), cap), cap a constant."""
    div = g.only_reader(y, "Div")
    tanh = div is not None and div.input[0] == y and g.only_reader(div.output[0], "Tanh")
    mul = tanh and g.only_reader(tanh.output[0], "Mul")
    if not mul:
        return None
    c_div, c_mul = g.const(div.input[1]), g.const(g.other_input(mul, tanh.output[0]))
    if c_div is None or c_mul is None or c_div.size != 1 or c_mul.size != 1 or float(c_div) != float(c_mul):
        return None
    return mul, float(c_div)


def _pack_matmuls(graph: GraphProto) -> int:
    """Swap each float32 ``MatMul(x, W)`` of ``graph`` whose W is an initializer [K, N] read by
    nothing else for ``PackedMatMul(x, pack_weight(W))``; the packed copy replaces W. What the
    graph does right around the product is folded in where the pattern is proven (every value in
    between read only there):

    * an ``Add`` of a residual of the product's own known shape, or of a bias [N]: ``PackedMatMulAdd``
      (the SwiGLU before it as well: ``PackedGluMatMulAdd``);
    * the RMSNorm before the product (and the logits' soft cap after it): ``PackedNormMatMul``.

    Returns how many MatMuls were swapped."""
    g = _Graph(graph)
    shapes = _shapes(graph)
    swapped, leaves_dead_nodes = 0, False
    replaced: set[int] = set()  # positions of nodes whose outputs a packed product now writes
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        x, name = node.input
        t = g.inits.get(name)
        if (t is None or name in g.fed or g.uses(name) != 1 or t.data_type != onnx.TensorProto.FLOAT
                or len(t.dims) != 2):
            continue
        w = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(pack_weight(w), f"{name}.packed{PANEL}"))
        (k, n), y = w.shape, node.output[0]
        add = _match_addend(g, shapes, y, n)
        norm = _match_rms_norm(g, x, k) if add is None else None
        glu = _match_swiglu(g, x, k) if add is not None else None
        if norm is not None:
            x0, g_name, eps = norm
            cap = _match_soft_cap(g, y)
            if cap is not None:  # the product writes the soft cap's output
                replaced.add(g.position(cap[0]))
                y = cap[0].output[0]
            new = helper.make_node("PackedNormMatMul", [x0, t.name, g_name], [y], eps=eps,
                                   soft_cap=cap[1] if cap else 0.0)
        elif add is not None:
            replaced.add(g.position(add[0]))
            op, first = ("PackedGluMatMulAdd", glu) if glu is not None else ("PackedMatMulAdd", x)
            new = helper.make_node(op, [first, t.name, add[1]], list(add[0].output))
        else:
            new = helper.make_node("PackedMatMul", [x, t.name], [y])
        new.domain, new.name = NATIVE_DOMAIN, node.name
        new.attribute.append(helper.make_attribute("n", int(n)))
        node.CopyFrom(new)
        leaves_dead_nodes |= norm is not None or glu is not None
        swapped += 1
    if replaced:
        kept = [n for j, n in enumerate(graph.node) if j not in replaced]
        del graph.node[:]
        graph.node.extend(kept)
    if leaves_dead_nodes:
        _drop_dead_nodes(graph)  # the norms' and GLUs' nodes, now read by nothing
    return swapped


def _match_mlstm_layer(g: _Graph, cell) -> dict | None:
    """The 7B-style mLSTM layer around the ``xlstm::mLSTM`` node ``cell``, as exported from
    models/blocks.py ``LargeBlock`` in float32, or None where the graph differs anywhere:

        q|k|v = Transpose[0,2,1,3](Reshape(x_raw))               x_raw [B, S, NH*D]
        i, f  = Split[axis 1, 2 halves](Transpose[0,2,1](cap(Add(g_raw, gate_bias))))
                cap(x) = Mul(Tanh(Div(x, c)), c), or absent
        h, c, n, m = xlstm::mLSTM(q, k, v, i, f, c0, n0, m0)
        y = Mul(Mul(Reshape(LayerNormalization[axis -1](Transpose[0,2,1,3](h), s, b?)), w), Sigmoid(o_raw))

    Every value in between must have no reader outside the pattern. Returns the layer's inputs,
    constants and the nodes it replaces."""
    removed = [cell]

    def unheads(name):  # x_raw of Transpose(Reshape(x_raw))
        t = g.made_by(name, "Transpose", perm=[0, 2, 1, 3])
        r = t and g.private(name) and g.made_by(t.input[0], "Reshape")
        if not r or not g.private(t.input[0]):
            return None
        removed.extend([t, r])
        return r.input[0]

    q_raw, k_raw, v_raw = (unheads(x) for x in cell.input[:3])
    split = g.made_by(cell.input[3], "Split", axis=1)
    if None in (q_raw, k_raw, v_raw) or split is None or list(split.output) != list(cell.input[3:5]):
        return None
    halves = len(split.input) == 1 and g.made_by(cell.input[3], "Split", num_outputs=2)
    if not halves and len(split.input) == 2:
        sizes = g.const(split.input[1], np.int64)
        halves = sizes is not None and len(sizes) == 2 and sizes[0] == sizes[1]
    gates_t = g.made_by(split.input[0], "Transpose", perm=[0, 2, 1])
    if not halves or gates_t is None or not all(g.private(x) for x in (*cell.input[3:5], split.input[0])):
        return None
    removed.extend([split, gates_t])
    gates, cap = gates_t.input[0], 0.0
    mul = g.made_by(gates, "Mul")
    if mul is not None:  # the soft cap: Mul(Tanh(Div(x, c)), c)
        tanh = next((g.made_by(x, "Tanh") for x in mul.input if g.made_by(x, "Tanh")), None)
        div = tanh and g.made_by(tanh.input[0], "Div")
        c_mul = tanh and g.const(g.other_input(mul, tanh.output[0]))
        c_div = div and g.const(div.input[1])
        if (div is None or c_mul is None or c_div is None or c_mul.size != 1 or c_div.size != 1
                or float(c_mul) != float(c_div) or not all(g.private(x) for x in (gates, tanh.output[0],
                                                                                    div.output[0]))):
            return None
        removed.extend([mul, tanh, div])
        gates, cap = div.input[0], float(c_mul)
    add = g.made_by(gates, "Add")
    nh = None
    if add is not None and g.private(gates):
        bias_name = next((x for x in add.input if g.const(x) is not None), None)
        bias = bias_name and g.const(bias_name)
        nh = bias.shape[0] // 2 if bias is not None and bias.ndim == 1 and bias.shape[0] % 2 == 0 else None
    if nh is None:
        return None
    removed.append(add)
    g_raw = g.other_input(add, bias_name)

    # after the cell
    h_t = g.only_reader(cell.output[0], "Transpose")
    if h_t is None or _attrs(h_t).get("perm") != [0, 2, 1, 3]:
        return None
    ln = g.only_reader(h_t.output[0], "LayerNormalization")
    ln_attrs = _attrs(ln) if ln is not None else {}
    if ln is None or ln_attrs.get("axis", -1) != -1 or any(o and g.readers.get(o) for o in ln.output[1:]):
        return None
    ln_scale = g.const(ln.input[1])
    ln_bias = g.const(ln.input[2]) if len(ln.input) > 2 and ln.input[2] else None
    if ln_scale is None or ln_scale.ndim != 1 or (len(ln.input) > 2 and ln.input[2] and ln_bias is None):
        return None
    reshape = g.only_reader(ln.output[0], "Reshape")
    mul_w = reshape and g.only_reader(reshape.output[0], "Mul")
    weight = mul_w and g.const(g.other_input(mul_w, reshape.output[0]))
    mul_o = weight is not None and g.only_reader(mul_w.output[0], "Mul")
    sig = mul_o and g.made_by(g.other_input(mul_o, mul_w.output[0]), "Sigmoid")
    if not sig or not g.private(sig.output[0]) or weight.ndim != 1:
        return None
    removed.extend([h_t, ln, reshape, mul_w, mul_o, sig])
    inputs, cols = [q_raw, k_raw, v_raw, g_raw, sig.input[0]], [0] * 5
    split = g.made_by(q_raw, "Split", axis=-1)  # the five as column ranges of one fused product
    sizes = split and len(split.input) == 2 and g.const(split.input[1], np.int64)
    if sizes is not None and sizes is not False and all(x in split.output and g.private(x) for x in inputs):
        starts = np.concatenate([[0], np.cumsum(sizes)])
        cols = [int(starts[list(split.output).index(x)]) for x in inputs]
        inputs = [split.input[0]] * 5
    return {"inputs": inputs, "cols": cols, "gate_bias": bias_name, "state": cell.input[5:8],
            "ln_scale": ln.input[1], "ln_bias": ln.input[2] if ln_bias is not None else None,
            "weight": g.other_input(mul_w, reshape.output[0]), "outputs": [mul_o.output[0], *cell.output[1:4]],
            "eps": float(_attrs(cell).get("eps", MLSTM.attr("eps").default)),
            "norm_eps": float(ln_attrs.get("epsilon", 1e-5)), "soft_cap": cap, "removed": removed,
            "dv": int(ln_scale.shape[0])}


def _drop_dead_nodes(graph: GraphProto) -> None:
    """Remove nodes of ``graph`` whose outputs nothing reads, and initializers nothing reads."""
    while True:
        read = {x for node in _all_nodes(graph) for x in node.input} | {o.name for o in graph.output}
        dead = [j for j, n in enumerate(graph.node) if not any(o in read for o in n.output if o)]
        if not dead:
            break
        for j in reversed(dead):
            del graph.node[j]
    read = {x for node in _all_nodes(graph) for x in node.input}
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _fuse_mlstm_layers(graph: GraphProto) -> int:
    """Swap each 7B-style mLSTM layer of ``graph`` between its two weight products (~25 nodes, see
    :func:`_match_mlstm_layer`) for one ``mLSTMLayer`` node. Returns how many were swapped."""
    g = _Graph(graph)
    matches = [m for m in (_match_mlstm_layer(g, n) for n in graph.node
                           if n.domain == DOMAIN and n.op_type == MLSTM.name) if m is not None]
    after: dict[int, object] = {}  # position of a replaced node -> the layer node that goes there
    removed: set[int] = set()  # positions
    for match in matches:
        ln_bias = match["ln_bias"]
        if ln_bias is None:  # the kernel always adds one
            ln_bias = f"{match['ln_scale']}.zero_bias"
            if ln_bias not in g.inits:
                g.inits[ln_bias] = numpy_helper.from_array(np.zeros(match["dv"], np.float32), ln_bias)
                graph.initializer.append(g.inits[ln_bias])
        layer = helper.make_node(
            "mLSTMLayer", [*match["inputs"], match["gate_bias"], *match["state"], match["ln_scale"], ln_bias,
                           match["weight"]], match["outputs"], domain=NATIVE_DOMAIN,
            name=f"{match['removed'][0].name}_layer", eps=match["eps"], norm_eps=match["norm_eps"],
            soft_cap=match["soft_cap"], **dict(zip(("q_col", "k_col", "v_col", "g_col", "o_col"), match["cols"])))
        positions = {g.position(n) for n in match["removed"]}
        after[max(positions)] = layer  # the last one: its outputs' readers come after it
        removed |= positions
    kept = []
    for j, node in enumerate(graph.node):
        if j not in removed:
            kept.append(node)
        elif j in after:
            kept.append(after[j])
    del graph.node[:]
    graph.node.extend(kept)
    fused = len(matches)
    if fused:
        _drop_dead_nodes(graph)
    return fused


def inplace_states(model: ModelProto) -> dict[str, str]:
    """Graph inputs of a rewritten ``model`` that a run may overwrite with a graph output: input ->
    output, for every input whose data only an ``mLSTMLayer`` node reads (as c0, n0 or m0; Shape
    nodes read no data) and whose matching state output that node writes. The kernel reads each
    element of the old state before it writes the new one in the same place, so a caller may bind
    both to one buffer (:class:`xlstm_export.ort.OrtDecoder` does): a decode step then reads and
    writes the state once instead of reading one buffer and filling another (at B=8 on the 160M
    bench model, 28 MB per step: 1.8 against 2.4 ms for the twelve layers alone).
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    readers: dict[str, list] = {}
    for node in _all_nodes(graph):
        for j, x in enumerate(node.input):
            readers.setdefault(x, []).append((node, j))
    pairs = {}
    for i in graph.input:
        data = [(n, j) for n, j in readers.get(i.name, []) if n.op_type != "Shape" or n.domain not in ("", "ai.onnx")]
        if len(data) != 1:
            continue
        node, j = data[0]
        if node.op_type == "mLSTMLayer" and node.domain == NATIVE_DOMAIN and 6 <= j <= 8:
            out = node.output[j - 5]  # c0, n0, m0 (inputs 6-8) -> c, n, m (outputs 1-3)
            if out in outputs:
                pairs[i.name] = out
    return pairs


def _add_opset(imports, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in imports):
        imports.append(helper.make_opsetid(domain, version))


def with_native_ops(model: ModelProto, *, inplace: bool = False, pack_matmuls: bool = True,
                    fuse_layers: bool = True, check_xlstm: bool = True) -> ModelProto:
    """``model`` (a copy unless ``inplace``) with xlstm function bodies that call the native kernels;
    when ``fuse_layers``, its 7B-style mLSTM layers swapped for ``mLSTMLayer``; when
    ``pack_matmuls``, its float32 weight MatMuls swapped for ``PackedMatMul``. A model with no
    xlstm body to rewrite is refused unless ``check_xlstm`` is False."""
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
    if fuse_layers:
        _fuse_mlstm_layers(out.graph)
    if pack_matmuls:
        _pack_matmuls(out.graph)
    _add_opset(out.opset_import, NATIVE_DOMAIN, NATIVE_VERSION)
    return out
