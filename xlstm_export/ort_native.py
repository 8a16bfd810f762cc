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
  (``PackedNormMatMul``), the paper blocks' LayerNorm before it (``PackedLnMatMul``), the SwiGLU
  (7B-style) or GeGLU (paper) before the FFN's down-projection with the residual after it
  (``PackedGluMatMulAdd``);
* ``xlstm.cpu::BlockDiagMatMul(x, w) -> y`` (attribute ``n``) replaces, in float32 paper-architecture
  models, each block-diagonal product of the q / k / v projections (``Reshape``, ``Transpose``, a
  batched ``MatMul`` by [nb, BLK, BLK], ``Transpose``: onnxruntime runs one tiny product per block,
  ~50 us for the 384 blocks of xlstm-125m), its blocks packed 16 / BLK to a vector
  (:func:`pack_block_diagonal`);
* ``xlstm.cpu::mLSTMLayer`` replaces, in float32 7B-style models, everything between a block's two
  mLSTM weight products: the head reshapes, the gate bias and soft cap, the ``xlstm::mLSTM`` node,
  the per-head LayerNorm, the norm weight and the output gate (~25 nodes, each a few microseconds
  of onnxruntime overhead at decode, see :func:`_match_mlstm_layer`). It runs the cell step by step
  for any S: at these head sizes the recurrence costs ~1% of a prefill's products, so the
  chunkwise form buys nothing on a CPU. A layer the matcher cannot prove is left as it was;
* ``xlstm.cpu::mLSTMPaperLayer`` does the same for float32 paper-architecture mLSTM blocks: the
  head reshapes, the i and f gate biases, the ``xlstm::mLSTM`` node, the per-head LayerNorm, its
  weight, the learnable skip of the convolution's output and the SiLU gate of z (~25 nodes and the
  cell's function, see :func:`_match_paper_mlstm_layer`). Step by step at prefill too: on xlstm-125m
  (heads of 384 x 384) a 64-token prefill took 0.91x the chunkwise body's time; heads too large
  for a core's L2 (xlstm-1.3b's 1024 x 1024: 1.26x) keep the body (bench/ab_native_pass.py);
* ``xlstm.cpu::sLSTMPaperLayer`` replaces, in float32 paper-architecture sLSTM blocks, everything
  between the convolution and the residual: the head-wise gate products (two batched ``MatMul`` by
  [NH, DH, 2*DH] with their reshapes), the ``xlstm::sLSTM`` node, the per-head LayerNorm and its
  weight (~15 nodes and the cell's function, see :func:`_match_paper_slstm_layer`), step by step;
* ``xlstm.cpu::CausalConv(x, past, w, bias) -> (y, present)`` replaces, in float32 paper-architecture
  models, each block's causal convolution over time with its state and the SiLU after it (a
  ``Concat``, K + 1 ``Slice``, K ``Mul``, K ``Add``, the SiLU's two nodes: 16 nodes at K = 4, see
  :func:`_match_causal_conv`) for any S.

A 7B-style block is then five nodes at decode instead of ~40 (norm + product, layer, product +
residual, norm + product, GLU + product + residual), so a step pays onnxruntime's per-node cost
(a few microseconds each) ~60 times on the 160M model instead of ~400; the paper model tiny's
decode graph went from 154 nodes to 42. The decoder
(:class:`xlstm_export.ort.OrtDecoder`) and the server's slots also update in place, at decode
steps, the mLSTM states that ``mLSTMLayer``, ``mLSTMPaperLayer`` or the paper blocks'
``mLSTMStep`` alone read
(:func:`inplace_states`).

:func:`with_native_ops` rewrites a loaded ModelProto in memory (the file on disk stays portable),
and :func:`register` adds the library to a SessionOptions; ``OrtModel(path, native_ops=True)`` does
both. The cell kernels read float32 (the bodies cast to float32 before them), so fp16 / bf16 exports
use them too; the products are packed only where the MatMul is float32. Parity with the standard-op
graph is tested in tests/test_ort_native.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, NodeProto, helper, numpy_helper

from . import contract, native_ops
from . import onnx_functions as of
from .contract import DOMAIN, MLSTM, SLSTM
from .graph_rewrite import (
    STANDARD_DOMAINS,
    Edit,
    GraphIndex,
    Rule,
    apply_rules,
    attrs,
    drop_dead_nodes,
    opset_version,
)

__all__ = ["NATIVE_DOMAIN", "PANEL", "NativeOpsError", "bfloat16_bits", "inplace_states", "library_path",
           "pack_block_diagonal", "pack_weight", "register", "with_native_ops"]

NATIVE_DOMAIN = native_ops.DOMAIN  # custom-op domain of the library (the ops: xlstm_export.native_ops)
NATIVE_VERSION = native_ops.VERSION
PANEL = 32  # columns per packed weight panel (kPanel in plugins/cpu_gemm.h)


class NativeOpsError(RuntimeError):
    """The model has no xlstm function body this rewrite knows, or the library cannot be used."""


def library_path() -> str:
    """Path of the compiled custom-op library (built on first use, see plugins/cpu_build.py)."""
    from .plugins import cpu_build

    return str(cpu_build.library_path())


def register(session_options) -> None:
    """Register the native kernels with an ``onnxruntime.SessionOptions``. Set the options'
    ``session.intra_op.allow_spinning`` first: the library reads it here, and splits work over
    the intra-op pool only where a hand-off pays for that kind of pool (a sleeping worker costs a
    wake-up)."""
    session_options.register_custom_ops_library(library_path())


# --- the function bodies: built anew from the contract with the native kernels in them ----------


def _native_step_branch() -> GraphProto:
    """The mLSTM ``S == 1`` branch as one native node (same outputs as the standard-op branch)."""
    f32 = {"to": onnx.TensorProto.FLOAT}
    inputs = {x: x for x in contract.input_names(MLSTM)}  # q, k, v, i, f, c0, n0, m0: the function's
    cast = {x: f"nt_{x}" for x in ("q", "k", "v", "i", "f")}  # the T inputs, as float32
    nodes = [helper.make_node("Cast", [x], [y], **f32) for x, y in cast.items()]
    nodes.append(native_ops.node("mLSTMStep", {**inputs, **cast, "eps": of.STEP_EPS}, of.STEP_OUTPUTS,
                                 name="native_mlstm_step"))
    return of.step_branch(nodes, "mlstm_step_native")


def _native_time_loop(inputs: dict[str, str], outputs: dict[str, str]) -> NodeProto:
    """The sLSTM body's time loop as one native sLSTMScan node."""
    return native_ops.node("sLSTMScan", inputs, outputs, name="native_slstm_scan")


def _native_function(fn: onnx.FunctionProto) -> bool:
    """``fn`` (an xlstm function of the model) rebuilt from the contract at its own opset with the
    native kernels: the mLSTM decode step as the ``S == 1`` branch (chunkwise for S > 1), the sLSTM
    time loop as sLSTMScan. What the file's body looked like does not matter. False: not ours."""
    opset = opset_version(fn.opset_import, of.DEFAULT_OPSET)
    if fn.domain != DOMAIN or fn.name not in (MLSTM.name, SLSTM.name):
        return False
    if fn.name == MLSTM.name:
        fn.CopyFrom(of.mlstm_function(opset, step_branch=_native_step_branch()))
    else:
        fn.CopyFrom(of.slstm_function(opset, time_loop=_native_time_loop))
    _add_opset(fn.opset_import, NATIVE_DOMAIN, NATIVE_VERSION)
    return True


# --- the packed weight products ------------------------------------------------------------------


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


# A packed weight of at least this many float32 bytes whose values are all bfloat16 values is held as
# bfloat16. A weight this large does not stay in a core's L2 between decode steps, so each step
# streams it and half the bytes pay: a bf16 export of xlstm-large-160m decodes at B = 1 / 8 / 32 in
# 0.62 / 0.75 / 0.99x the time (prefill 1.05x; with interleaved rows, 0.53-0.58 / 0.67-0.84 /
# 0.88-1.04x, prefill 0.86-0.92x). Weights that stay in cache only pay the widening: tiny-large's
# (<= 384 KiB) took 0.98 / 1.07 / 1.10x (bench/ab_native_pass.py --pass bf16-weights).
BF16_MIN_BYTES = 1 << 20


def bfloat16_bits(w: np.ndarray) -> np.ndarray | None:
    """The bfloat16 bits (uint16, the float32 values' high halves) of a float32 array whose values
    are all bfloat16 values (a bfloat16 checkpoint, widened), else None: then a ...Bf16 product
    over them gives the same results to the bit as over ``w``, from half the bytes."""
    bits = np.ascontiguousarray(w, np.float32).view(np.uint32)
    if (bits & 0xFFFF).any():
        return None
    return (bits >> 16).astype(np.uint16)


def interleave_bf16_rows(bits: np.ndarray) -> np.ndarray:
    """Packed bfloat16 bits [P, K, 32] as the ...Bf16 ops read them: each 32-column row interleaved,
    columns j and 16 + j side by side (16-bit values 2j and 2j + 1: the low and high half of 32-bit
    word j), so that the kernel widens a row's 32 weights with one load and two bit operations
    (plugins/cpu_gemm.h load_weight_row)."""
    p, k, width = bits.shape
    return np.ascontiguousarray(bits.reshape(p, k, 2, width // 2).transpose(0, 1, 3, 2).reshape(p, k, width))


def _match_addend(g: GraphIndex, y: str, n: int) -> tuple[NodeProto, str] | None:
    """(the Add, the other input) if the product ``y`` [..., n] is read only by an Add of a
    tensor of its own known shape (a residual) or of a float32 constant [n] (a bias)."""
    add = g.only_reader(y, "Add")
    if add is None or len(add.input) != 2 or add.input[0] == add.input[1]:
        return None
    r = g.other_input(add, y)
    if r in g.inits and r not in g.fed:
        bias = g.const(r)
        return (add, r) if bias is not None and bias.shape == (n,) else None
    shapes = g.shapes
    same_shape = shapes.get(r) is not None and shapes.get(r) == shapes.get(y) and None not in shapes[r]
    return (add, r) if same_shape else None


def _bf16_round_trip(g: GraphIndex, x: str) -> str | None:
    """x0 if ``x`` is Cast[to float32](Cast[to bfloat16](x0)), the value in between and ``x`` read
    only there: a bf16 export's rounding point as :func:`xlstm_export.ort.upcast_bfloat16` leaves it."""
    widen = g.private_made_by(x, "Cast", to=onnx.TensorProto.FLOAT)
    cast = widen and g.private_made_by(widen.input[0], "Cast", to=onnx.TensorProto.BFLOAT16)
    return cast.input[0] if cast else None


def _through_bf16_round_trip(g: GraphIndex, y: str) -> tuple[list[NodeProto], str]:
    """([the two Casts], their output) if ``y`` is read only by a rounding point
    (:func:`_bf16_round_trip`), else ([], y)."""
    cast = g.only_reader(y, "Cast")
    widen = cast and g.only_reader(cast.output[0], "Cast")
    if widen and _bf16_round_trip(g, widen.output[0]) == y:
        return [cast, widen], widen.output[0]
    return [], y


def _match_rms_norm(g: GraphIndex, x: str, k: int) -> tuple[str, str, float] | None:
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
    axes = g.const(mean.input[1], np.int64) if len(mean.input) > 1 else attrs(mean).get("axes")
    if (scale is None or scale.shape != (k,) or eps is None or eps.size != 1 or two is None or two.size != 1
            or float(two) != 2.0 or axes is None or list(np.ravel(axes)) != [-1]
            or attrs(mean).get("keepdims", 1) != 1):
        return None
    return div.input[0], g_name, float(eps)


def _match_layer_norm(g: GraphIndex, x: str, k: int) -> tuple[str, str, str | None, float] | None:
    """(x0, scale, bias or None, eps) if ``x`` is LayerNormalization[axis -1](x0, scale, bias?) in
    float32 (stash_type 1), scale and bias float32 constants [k], read only there and its mean and
    inverse-deviation outputs unread (the paper blocks' norm before a product)."""
    ln = g.private_made_by(x, "LayerNormalization")
    a = attrs(ln) if ln is not None else {}
    if ln is None or a.get("axis", -1) != -1 or a.get("stash_type", 1) != 1:
        return None
    if any(o and g.uses(o) for o in ln.output[1:]):
        return None
    scale = g.const(ln.input[1])
    bias = ln.input[2] if len(ln.input) > 2 and ln.input[2] else None
    bias_value = g.const(bias) if bias is not None else np.zeros(k, np.float32)  # absent: zeros
    if scale is None or scale.shape != (k,) or bias_value is None or bias_value.shape != (k,):
        return None
    return ln.input[0], ln.input[1], bias, float(a.get("epsilon", 1e-5))


SQRT2 = float(np.float32(np.sqrt(2.0)))  # the exported GELU's divisor in float32 ...
SQRT2_BF16 = 1.4140625  # ... and in a bf16 export (sqrt 2 rounded to bfloat16)


def _gelu_input(g: GraphIndex, y: str) -> tuple[str, float] | None:
    """(a, d) if ``y`` is Mul(a, Mul(0.5, Add(Erf(Div(a, d)), 1))), the exact GELU as exported with
    d its sqrt 2 (:data:`SQRT2`, or :data:`SQRT2_BF16` in a bf16 export; the constants float32
    scalars, each input in either place), every value in between read only there."""
    half, a = g.operand(g.private_made_by(y, "Mul"), "Mul")
    add, c_half = g.operand(half, "Add")
    erf, c_one = g.operand(add, "Erf")
    div = erf and g.private_made_by(erf.input[0], "Div")
    if not div or div.input[0] != a:
        return None
    consts = [g.const(c) for c in (c_half, c_one, div.input[1])]
    if any(c is None or c.size != 1 for c in consts):
        return None
    half_value, one, d = (c.item() for c in consts)
    return (a, d) if half_value == 0.5 and one == 1.0 and d in (SQRT2, SQRT2_BF16) else None


def _match_glu(g: GraphIndex, x: str, k: int) -> tuple[str, bool, float] | None:
    """(z, gelu, the GELU's divisor) if ``x`` is Mul(act(a), b) with a, b the two halves [k] of
    Split(z) on the last axis and act silu, Mul(a, Sigmoid(a)) (the exported SwiGLU), or the exact
    GELU (:func:`_gelu_input`; the GeGLU), every value in between read only there."""
    gate, b = g.operand(g.private_made_by(x, "Mul"), "Mul")
    if gate is None:
        return None
    sig, a = g.operand(gate, "Sigmoid")
    gelu, div = sig is None, SQRT2
    if gelu:
        a, div = _gelu_input(g, gate.output[0]) or (None, None)
    elif sig.input[0] != a:
        return None
    split = a is not None and g.made_by(a, "Split")
    if not split or list(split.output) != [a, b] or g.uses(a) != 2 or g.uses(b) != 1:
        return None
    shape = g.shapes.get(split.input[0])
    last = len(shape) - 1 if shape else -1  # axis -1, or the last one by number where the rank is known
    if attrs(split).get("axis", 0) not in (-1, last):
        return None
    sizes = g.const(split.input[1], np.int64) if len(split.input) > 1 else None
    halves = attrs(split).get("num_outputs") == 2 if sizes is None else list(np.ravel(sizes)) == [k, k]
    return (split.input[0], gelu, div) if halves else None


def _soft_cap_of(g: GraphIndex, y: str) -> tuple[str, float, list[NodeProto]] | None:
    """(x, cap, its three nodes) if ``y`` is Mul(Tanh(Div(x, cap)), cap), cap a one-element
    constant, the values in between read only there (the exported soft cap)."""
    mul = g.made_by(y, "Mul")
    tanh = mul and next((t for t in (g.made_by(v, "Tanh") for v in mul.input) if t is not None), None)
    div = tanh and g.made_by(tanh.input[0], "Div")
    if not div or not g.private(tanh.output[0]) or not g.private(div.output[0]):
        return None
    c_mul, c_div = g.const(g.other_input(mul, tanh.output[0])), g.const(div.input[1])
    if c_mul is None or c_div is None or c_mul.size != 1 or c_div.size != 1 or float(c_mul) != float(c_div):
        return None
    return div.input[0], float(c_mul), [mul, tanh, div]


def _match_soft_cap_after(g: GraphIndex, y: str) -> tuple[NodeProto, float] | None:
    """(the last node, cap) if ``y`` is read only by a soft cap (:func:`_soft_cap_of`)."""
    div = g.only_reader(y, "Div")
    tanh = div and g.only_reader(div.output[0], "Tanh")
    mul = tanh and g.only_reader(tanh.output[0], "Mul")
    cap = mul and _soft_cap_of(g, mul.output[0])
    return (mul, cap[1]) if cap and cap[0] == y else None


@dataclass
class _Product:
    """A float32 ``MatMul(x, W)`` with what is folded into it (each None where absent)."""

    matmul: NodeProto
    weight: onnx.TensorProto  # W [k, n], an initializer nothing else reads
    n: int
    add: tuple[NodeProto, str] | None  # the Add after it, its other input
    norm: tuple[str, str, float] | None  # the RMSNorm before it: x0, scale, eps
    norm_bf16: bool  # the RMSNorm's output rounded to bfloat16 on its way (a bf16 export)
    layer_norm: tuple[str, str, str | None, float] | None  # the LayerNorm before it: x0, scale, bias, eps
    glu: tuple[str, bool, float] | None  # the gated unit before it: its input, whether its act is the GELU, its divisor
    cap: tuple[NodeProto, float] | None  # the soft cap after the normed product: last node, cap


def _match_product(g: GraphIndex, node: NodeProto) -> _Product | None:
    """Pattern: a standard float32 MatMul by an initializer [K, N] read by nothing else, with the
    residual / bias Add after it (and then the SwiGLU before it), or the RMSNorm before it (a bf16
    export's rounding point between them or not; and then the soft cap after it), where they are
    proven (:func:`_match_addend` ...)."""
    if node.op_type != "MatMul" or node.domain not in STANDARD_DOMAINS or len(node.input) != 2:
        return None
    x, name = node.input
    t = g.inits.get(name)
    if (t is None or name in g.fed or g.uses(name) != 1 or t.data_type != onnx.TensorProto.FLOAT
            or len(t.dims) != 2):
        return None
    (k, n), y = t.dims, node.output[0]
    add = _match_addend(g, y, n)
    rounded = _bf16_round_trip(g, x) if add is None else None
    norm = _match_rms_norm(g, rounded or x, k) if add is None else None
    layer_norm = _match_layer_norm(g, x, k) if add is None and norm is None else None
    glu = _match_glu(g, x, k) if add is not None else None
    cap = _match_soft_cap_after(g, y) if norm is not None else None
    return _Product(node, t, int(n), add, norm, norm is not None and rounded is not None, layer_norm, glu, cap)


def _packed_product(edit: Edit, p: _Product) -> bool | None:
    """Replacement: the product as one packed node (the folded nodes removed with it), its weight
    packed in place (:func:`pack_weight`), as bfloat16 with the ...Bf16 op where all its values
    are bfloat16 values (:func:`bfloat16_bits`) and it is large (:data:`BF16_MIN_BYTES`). True where
    a norm or a GLU was folded (their nodes are then dead), None where a node is already part of
    another replacement (nothing done)."""
    packed = pack_weight(numpy_helper.to_array(p.weight))
    bf16 = bfloat16_bits(packed) if packed.nbytes >= BF16_MIN_BYTES else None
    suffix = "Bf16" if bf16 is not None else ""
    w = f"{p.weight.name}.packed{PANEL}{suffix.lower()}"
    x, y, replaced = p.matmul.input[0], p.matmul.output[0], [p.matmul]
    if p.norm is not None:
        x0, g_name, eps = p.norm
        if p.cap is not None:  # the product writes the soft cap's output
            replaced.append(p.cap[0])
            y = p.cap[0].output[0]
        new = native_ops.node("PackedNormMatMul" + suffix, {"x": x0, "w": w, "g": g_name}, {"y": y}, n=p.n,
                              eps=eps, soft_cap=p.cap[1] if p.cap else 0.0, round_bf16=int(p.norm_bf16))
    elif p.layer_norm is not None:
        x0, g_name, beta, eps = p.layer_norm
        zero_beta = beta is None  # the kernel always adds one: zeros, named after this product's weight
        beta = f"{p.weight.name}.ln_zero_bias" if zero_beta else beta
        new = native_ops.node("PackedLnMatMul" + suffix, {"x": x0, "w": w, "g": g_name, "beta": beta}, {"y": y},
                              n=p.n, eps=eps)
    elif p.add is not None:
        replaced.append(p.add[0])
        if p.glu is not None:
            z, gelu, div = p.glu
            new = native_ops.node("PackedGluMatMulAdd" + suffix, {"z": z, "w": w, "r": p.add[1]},
                                  {"y": p.add[0].output[0]}, n=p.n, gelu=int(gelu), gelu_div=div)
        else:
            new = native_ops.node("PackedMatMulAdd" + suffix, {"x": x, "w": w, "r": p.add[1]},
                                  {"y": p.add[0].output[0]}, n=p.n)
    else:
        new = native_ops.node("PackedMatMul" + suffix, {"x": x, "w": w}, {"y": y}, n=p.n)
    new.name = p.matmul.name
    if not edit.replace(replaced, [new], at=p.matmul):
        return None
    if p.layer_norm is not None and zero_beta:
        edit.add_initializer(numpy_helper.from_array(np.zeros(packed.shape[1], np.float32), beta))
    if bf16 is None:
        p.weight.CopyFrom(numpy_helper.from_array(packed, w))
    else:
        p.weight.CopyFrom(helper.make_tensor(w, onnx.TensorProto.BFLOAT16, packed.shape,
                                             interleave_bf16_rows(bf16).tobytes(), raw=True))
    return p.norm is not None or p.layer_norm is not None or p.glu is not None


def _pack_matmuls(graph: GraphProto) -> int:
    """Swap each float32 ``MatMul(x, W)`` of ``graph`` whose W is an initializer [K, N] read by
    nothing else for ``PackedMatMul(x, pack_weight(W))``; the packed copy replaces W. What the
    graph does right around the product is folded in where the pattern is proven (every value in
    between read only there):

    * an ``Add`` of a residual of the product's own known shape, or of a bias [N]: ``PackedMatMulAdd``
      (the SwiGLU or the GeGLU before it as well: ``PackedGluMatMulAdd``);
    * the RMSNorm before the product (and the logits' soft cap after it): ``PackedNormMatMul``, with
      round_bf16 = 1 where a bf16 export rounds the norm's output on its way (:func:`_bf16_round_trip`);
    * the LayerNorm before the product (the paper blocks'): ``PackedLnMatMul``.

    Returns how many MatMuls were swapped."""
    folded = []  # per swap: whether it left the nodes of a norm or a GLU unread

    def rewrite(edit: Edit, p: _Product) -> bool:
        done = _packed_product(edit, p)
        if done is not None:
            folded.append(done)
        return done is not None

    apply_rules(graph, [Rule("MatMul by a constant -> packed product", _match_product, rewrite)])
    if any(folded):
        drop_dead_nodes(graph)  # the norms' and GLUs' nodes, now read by nothing
    return len(folded)


# --- block-diagonal products ----------------------------------------------------------------------

BLOCK_DIAGONAL_SIZES = (1, 2, 4, 8, 16)  # square blocks BlockDiagMatMul takes (16-float vectors)


def pack_block_diagonal(w: np.ndarray) -> np.ndarray:
    """Blocks W_j [nb, BLK, BLK] (y[j*BLK + a] = sum_b x[j*BLK + b] W_j[b, a]) in BlockDiagMatMul's
    layout [ceil(nb * BLK / 16), BLK, 16]: vector c, row b, lane l holds W_j[b, l % BLK] of block
    j = c * (16 / BLK) + l / BLK (zero past the last block), float32 and contiguous."""
    if w.ndim != 3 or w.shape[1] != w.shape[2] or w.shape[1] not in BLOCK_DIAGONAL_SIZES:
        raise ValueError(f"blocks are [nb, BLK, BLK] with BLK in {BLOCK_DIAGONAL_SIZES}, got shape {w.shape}")
    nb, blk, _ = w.shape
    per = 16 // blk  # blocks per vector
    vectors = -(-nb // per)
    padded = np.zeros((vectors * per, blk, blk), np.float32)
    padded[:nb] = w
    # [c, j', b, a] -> [c, b, j', a]: lane l = j' * BLK + a
    return np.ascontiguousarray(padded.reshape(vectors, per, blk, blk).transpose(0, 2, 1, 3).reshape(vectors, blk, 16))


@dataclass
class _BlockDiagonal:
    nodes: list[NodeProto]  # [Reshape, [Transpose,]] MatMul, Transpose: what the replacement removes
    x: str
    weight: onnx.TensorProto  # [nb, BLK, BLK]
    y: str


def _match_block_diagonal(g: GraphIndex, node: NodeProto) -> _BlockDiagonal | None:
    """Pattern (models/layers.py HeadwiseLinear, as exported): ``Reshape(x, [-1, nb, BLK])``,
    ``Transpose[1, 0, 2]``, ``MatMul`` by a float32 initializer [nb, BLK, BLK] that nothing else
    reads, ``Transpose[1, 0, 2]`` read by the MatMul alone; BLK in BLOCK_DIAGONAL_SIZES. The last
    Transpose's output [rows, nb, BLK] is what BlockDiagMatMul writes. The Reshape and the first
    Transpose may feed other products too (the paper block's q and k read one input): they go
    with the MatMul where it reads them alone, else when nothing reads them any more."""
    if node.op_type != "MatMul" or node.domain not in STANDARD_DOMAINS or len(node.input) != 2:
        return None
    xt, name = node.input
    t = g.inits.get(name)
    if (t is None or name in g.fed or g.uses(name) != 1 or t.data_type != onnx.TensorProto.FLOAT
            or len(t.dims) != 3 or t.dims[1] != t.dims[2] or t.dims[1] not in BLOCK_DIAGONAL_SIZES):
        return None
    nb, blk = int(t.dims[0]), int(t.dims[1])
    before = g.made_by(xt, "Transpose", perm=[1, 0, 2])
    reshape = before and g.made_by(before.input[0], "Reshape")
    shape = reshape and g.const(reshape.input[1], np.int64)
    after = g.only_reader(node.output[0], "Transpose")
    if shape is None or shape.tolist() != [-1, nb, blk] or after is None or attrs(after).get("perm") != [1, 0, 2]:
        return None
    shared = [] if not g.private(xt) else [before] if not g.private(before.input[0]) else [reshape, before]
    return _BlockDiagonal([*shared, node, after], reshape.input[0], t, after.output[0])


def _block_diagonal_products(graph: GraphProto) -> int:
    """Swap each float32 block-diagonal product of ``graph`` (:func:`_match_block_diagonal`) for
    ``BlockDiagMatMul`` over its packed blocks (:func:`pack_block_diagonal`). Returns how many."""

    def rewrite(edit: Edit, p: _BlockDiagonal) -> bool:
        w = f"{p.weight.name}.blockdiag16"
        blk = int(p.weight.dims[1])
        new = native_ops.node("BlockDiagMatMul", {"x": p.x, "w": w}, {"y": p.y}, n=int(p.weight.dims[0]) * blk,
                              name=p.nodes[-2].name)
        if not edit.replace(p.nodes, [new], at=p.nodes[-1]):
            return False
        p.weight.CopyFrom(numpy_helper.from_array(pack_block_diagonal(numpy_helper.to_array(p.weight)), w))
        return True

    rule = Rule("block-diagonal MatMul -> BlockDiagMatMul", _match_block_diagonal, rewrite)
    done = apply_rules(graph, [rule])[rule.name]
    if done:
        drop_dead_nodes(graph)  # shared Reshapes and Transposes no product reads now, their shape constants
    return done


# --- the paper blocks' causal convolutions --------------------------------------------------------

_SLICE_TO_END = 1 << 62  # a Slice end at least this large: to the end of the axis


@dataclass
class _CausalConv:
    nodes: list[NodeProto]  # Concat, Slices, Muls, Adds, the bias Add [, Sigmoid, Mul]: what goes
    x: str
    past: str
    weights: list[np.ndarray]  # K of [D], w[0] multiplies the oldest position
    bias: np.ndarray  # [D]
    silu: bool
    y: str
    present: str
    round_bf16: bool  # past read through a bf16 export's rounding point


def _slice_bounds(g: GraphIndex, node: NodeProto) -> tuple[int, int] | None:
    """(start, end) of a standard Slice over axis 1 with step 1 and constant bounds, or None."""
    if node.op_type != "Slice" or node.domain not in STANDARD_DOMAINS or not g.holds(node) or len(node.input) < 4:
        return None
    start, end, axes = (g.const(n, np.int64) for n in node.input[1:4])
    step = g.const(node.input[4], np.int64) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
    if any(v is None or v.size != 1 for v in (start, end, axes, step)) or int(axes[0]) != 1 or int(step[0]) != 1:
        return None
    return int(start[0]), int(end[0])


def _match_causal_conv(g: GraphIndex, node: NodeProto) -> _CausalConv | None:
    """Pattern (models/layers.py CausalConv1d, as exported, K >= 2): ``cat = Concat[axis=1](past, x)``
    read by K + 1 Slices over axis 1: the terms ``cat[:, k : k + 1 - K]`` (the last to the end),
    each times a float32 initializer [D] (``Mul``), summed in order by a chain of ``Add``, plus a
    bias initializer [D] (``Add``); and ``present = cat[:, 1 - K :]``. A SiLU right after
    (``Mul(y, Sigmoid(y))``, y read by those two alone) goes into the kernel too. Every value in
    between is read only there. In a bf16 export past comes through a rounding point
    (:func:`_bf16_round_trip`), which goes in too."""
    if (node.op_type != "Concat" or node.domain not in STANDARD_DOMAINS or len(node.input) != 2
            or attrs(node).get("axis") != 1):
        return None
    past, x = node.input
    rounded, casts = _bf16_round_trip(g, past), []  # a bf16 export's state: read through a rounding point
    if rounded is not None:
        widen = g.producer[past]
        casts, past = [widen, g.producer[widen.input[0]]], rounded
    cat = node.output[0]
    slices = g.readers.get(cat, [])
    k = len(slices) - 1
    if cat in g.outputs or k < 2:
        return None
    terms: dict[int, NodeProto] = {}
    present = None
    for s in slices:
        bounds = _slice_bounds(g, s)
        if bounds is None:
            return None
        start, end = bounds
        if start == 1 - k and end >= _SLICE_TO_END and present is None:
            present = s
        elif 0 <= start < k and start not in terms and (end >= _SLICE_TO_END if start == k - 1
                                                         else end == start + 1 - k):
            terms[start] = s
        else:
            return None
    # past [B, K-1, D] (known: it is a state input), present read by no node (a state output)
    shape = g.shapes.get(past)
    if (present is None or len(terms) != k or g.readers.get(present.output[0]) or not shape or len(shape) != 3
            or shape[1] != k - 1):
        return None
    nodes, weights, y = [node, *slices], [], None
    for j in range(k):
        mul = g.only_reader(terms[j].output[0], "Mul")
        w = mul and g.const(g.other_input(mul, terms[j].output[0]))
        if w is None or w.shape != (shape[2],):
            return None
        weights.append(w)
        nodes.append(mul)
        if j == 0:
            y = mul.output[0]
            continue
        add = g.only_reader(y, "Add")
        if add is None or g.other_input(add, y) != mul.output[0] or not g.private(mul.output[0]):
            return None
        nodes.append(add)
        y = add.output[0]
    add = g.only_reader(y, "Add")
    bias = add and g.const(g.other_input(add, y))
    if bias is None or bias.shape != weights[0].shape:
        return None
    nodes.append(add)
    y = add.output[0]
    readers = g.readers.get(y, [])
    sigmoid = next((r for r in readers if r.op_type == "Sigmoid" and r.domain in STANDARD_DOMAINS), None)
    gate = sigmoid and g.only_reader(sigmoid.output[0], "Mul")
    silu = (y not in g.outputs and len(readers) == 2 and gate is not None and gate in readers
            and g.other_input(gate, sigmoid.output[0]) == y)
    if silu:
        nodes += [sigmoid, gate]
        y = gate.output[0]
    return _CausalConv(nodes + casts, x, past, weights, bias, silu, y, present.output[0], bool(casts))


def _causal_convs(graph: GraphProto) -> int:
    """Swap each causal convolution of ``graph`` (:func:`_match_causal_conv`: the paper
    blocks', ~16 nodes each) for one ``CausalConv``. Returns how many."""

    def rewrite(edit: Edit, p: _CausalConv) -> bool:
        name = p.nodes[0].name or p.present
        w, b = f"{name}.conv_weight", f"{name}.conv_bias"
        new = native_ops.node("CausalConv", {"x": p.x, "past": p.past, "w": w, "bias": b},
                              {"y": p.y, "present": p.present}, silu=int(p.silu), round_bf16=int(p.round_bf16),
                              name=name)
        if not edit.replace(p.nodes, [new]):
            return False
        edit.add_initializer(numpy_helper.from_array(np.stack(p.weights).astype(np.float32), w))
        edit.add_initializer(numpy_helper.from_array(p.bias.astype(np.float32), b))
        return True

    rule = Rule("causal convolution -> CausalConv", _match_causal_conv, rewrite)
    done = apply_rules(graph, [rule])[rule.name]
    if done:
        drop_dead_nodes(graph)  # the terms' weights and the biases, now read by nothing
    return done


# --- the 7B-style mLSTM layer --------------------------------------------------------------------


def _heads_input(g: GraphIndex, name: str, removed: list) -> str | None:
    """x_raw if ``name`` is Transpose[0,2,1,3](Reshape(x_raw)), the values in between private."""
    t = g.made_by(name, "Transpose", perm=[0, 2, 1, 3])
    r = t and g.private(name) and g.made_by(t.input[0], "Reshape")
    if not r or not g.private(t.input[0]):
        return None
    removed.extend([t, r])
    return r.input[0]


def _gates_input(g: GraphIndex, i: str, f: str, removed: list) -> tuple[str, str, float] | None:
    """(g_raw, gate_bias, cap) if i, f = Split[axis 1, 2 halves](Transpose[0,2,1](cap(Add(g_raw,
    gate_bias)))), gate_bias a float32 constant [2*NH], cap(x) the soft cap or absent (cap 0)."""
    split = g.made_by(i, "Split", axis=1)
    if split is None or list(split.output) != [i, f]:
        return None
    halves = len(split.input) == 1 and g.made_by(i, "Split", num_outputs=2)
    if not halves and len(split.input) == 2:
        sizes = g.const(split.input[1], np.int64)
        halves = sizes is not None and len(sizes) == 2 and sizes[0] == sizes[1]
    gates_t = g.made_by(split.input[0], "Transpose", perm=[0, 2, 1])
    if not halves or gates_t is None or not all(g.private(x) for x in (i, f, split.input[0])):
        return None
    removed.extend([split, gates_t])
    gates, cap = gates_t.input[0], 0.0
    if g.made_by(gates, "Mul") is not None:  # the soft cap
        found = _soft_cap_of(g, gates)
        if found is None or not g.private(gates):
            return None
        gates, cap = found[0], found[1]
        removed.extend(found[2])
    add = g.made_by(gates, "Add")
    if add is None or not g.private(gates):
        return None
    bias_name = next((x for x in add.input if g.const(x) is not None), None)
    bias = bias_name and g.const(bias_name)
    if bias is None or bias.ndim != 1 or bias.shape[0] % 2 != 0:
        return None
    removed.append(add)
    return g.other_input(add, bias_name), bias_name, cap


def _normed_heads(g: GraphIndex, h: str) -> tuple[list[NodeProto], dict] | None:
    """What both architectures' layers do first after the cell's ``h``:
    Mul(Reshape(LayerNormalization[axis -1](Transpose[0,2,1,3](h), scale, bias?)), weight), each
    value read only by the next node, scale, bias and weight float32 constants [DV] / [NH*DV].
    (its nodes, the last one's output "y" with "ln_scale", "ln_bias" (None: none), "weight",
    "norm_eps", "dv")."""
    h_t = g.only_reader(h, "Transpose")
    if h_t is None or attrs(h_t).get("perm") != [0, 2, 1, 3]:
        return None
    ln = g.only_reader(h_t.output[0], "LayerNormalization")
    ln_attrs = attrs(ln) if ln is not None else {}
    if ln is None or ln_attrs.get("axis", -1) != -1 or any(o and g.readers.get(o) for o in ln.output[1:]):
        return None
    ln_scale = g.const(ln.input[1])
    has_bias = len(ln.input) > 2 and bool(ln.input[2])
    if ln_scale is None or ln_scale.ndim != 1 or (has_bias and g.const(ln.input[2]) is None):
        return None
    reshape = g.only_reader(ln.output[0], "Reshape")
    mul_w = reshape and g.only_reader(reshape.output[0], "Mul")
    weight = mul_w and g.const(g.other_input(mul_w, reshape.output[0]))
    if weight is None or weight is False or weight.ndim != 1:
        return None
    return [h_t, ln, reshape, mul_w], {
        "y": mul_w.output[0], "ln_scale": ln.input[1], "ln_bias": ln.input[2] if has_bias else None,
        "weight": g.other_input(mul_w, reshape.output[0]), "norm_eps": float(ln_attrs.get("epsilon", 1e-5)),
        "dv": int(ln_scale.shape[0])}


def _layer_output(g: GraphIndex, h: str, removed: list) -> dict | None:
    """The layer's tail after the cell's ``h``: y = Mul(:func:`_normed_heads`, Sigmoid(o_raw)), the
    normed heads rounded to bfloat16 on the way in a bf16 export (:func:`_bf16_round_trip`:
    "round_bf16" 1); what it reads."""
    found = _normed_heads(g, h)
    if found is None:
        return None
    nodes, out = found
    casts, normed = _through_bf16_round_trip(g, out["y"])
    mul_o = g.only_reader(normed, "Mul")
    sig = mul_o and g.made_by(g.other_input(mul_o, normed), "Sigmoid")
    if not sig or not g.private(sig.output[0]):
        return None
    removed.extend([*nodes, *casts, mul_o, sig])
    return {**out, "o_raw": sig.input[0], "y": mul_o.output[0], "round_bf16": int(bool(casts))}


def _fused_columns(g: GraphIndex, inputs: list[str]) -> tuple[list[str], list[int]]:
    """(inputs, first columns): the five inputs as column ranges of the one fused product they
    are split from (the export's sibling-MatMul fusion), or as they are from column 0."""
    split = g.made_by(inputs[0], "Split", axis=-1)
    sizes = split and len(split.input) == 2 and g.const(split.input[1], np.int64)
    if sizes is None or sizes is False or not all(x in split.output and g.private(x) for x in inputs):
        return inputs, [0] * len(inputs)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [split.input[0]] * len(inputs), [int(starts[list(split.output).index(x)]) for x in inputs]


def _match_mlstm_layer(g: GraphIndex, cell: NodeProto) -> dict | None:
    """The 7B-style mLSTM layer around the ``xlstm::mLSTM`` node ``cell``, as exported from
    models/blocks.py ``LargeBlock`` in float32 or bfloat16, or None where the graph differs anywhere:

        q|k|v = Transpose[0,2,1,3](Reshape(x_raw))               x_raw [B, S, NH*D]
        i, f  = Split[axis 1, 2 halves](Transpose[0,2,1](cap(Add(g_raw, gate_bias))))
                cap(x) = Mul(Tanh(Div(x, c)), c), or absent
        h, c, n, m = xlstm::mLSTM(q, k, v, i, f, c0, n0, m0)
        y = Mul(Mul(Reshape(LayerNormalization[axis -1](Transpose[0,2,1,3](h), s, b?)), w), Sigmoid(o_raw))

    (in a bf16 export the inner Mul's output passes a rounding point, :func:`_bf16_round_trip`,
    before the gate: round_bf16 = 1). Every value in between must have no reader outside the
    pattern. Returns the layer's named inputs and attributes and the nodes it replaces."""
    if cell.domain != DOMAIN or cell.op_type != MLSTM.name:
        return None
    removed = [cell]
    cell_in = dict(zip(contract.input_names(MLSTM), cell.input))
    cell_out = dict(zip(contract.output_names(MLSTM), cell.output))
    q_raw, k_raw, v_raw = (_heads_input(g, cell_in[x], removed) for x in ("q", "k", "v"))
    gates = None not in (q_raw, k_raw, v_raw) and _gates_input(g, cell_in["i"], cell_in["f"], removed)
    tail = gates and _layer_output(g, cell_out["h"], removed)
    if not tail:
        return None
    g_raw, gate_bias, cap = gates
    inputs, cols = _fused_columns(g, [q_raw, k_raw, v_raw, g_raw, tail["o_raw"]])
    return {"inputs": dict(zip(("q", "k", "v", "g", "o"), inputs)), "gate_bias": gate_bias,
            "state": {x: cell_in[x] for x in ("c0", "n0", "m0")}, "ln_scale": tail["ln_scale"],
            "ln_bias": tail["ln_bias"], "weight": tail["weight"], "dv": tail["dv"],
            "outputs": {"y": tail["y"], **{x: cell_out[x] for x in ("c", "n", "m")}},
            "attributes": {"eps": float(attrs(cell).get("eps", MLSTM.attr("eps").default)),
                           "norm_eps": tail["norm_eps"], "soft_cap": cap, "round_bf16": tail["round_bf16"],
                           **{f"{x}_col": c for x, c in zip(("q", "k", "v", "g", "o"), cols)}},
            "removed": removed}


def _paper_gates_input(g: GraphIndex, i: str, f: str, removed: list) -> tuple[str, np.ndarray] | None:
    """(g_raw, gate_bias [2*NH]) if i|f = Transpose[0,2,1](Add(i_raw|f_raw, bias_i|bias_f)) with
    i_raw, f_raw = Split[last axis, NH and NH](g_raw): the paper block's i and f gate products, fused
    into one by the export, each with its bias (float32 constants [NH])."""
    found = []
    for x in (i, f):
        t = g.private_made_by(x, "Transpose", perm=[0, 2, 1])
        add = t and g.private_made_by(t.input[0], "Add")
        bias_name = add and next((y for y in add.input if g.const(y) is not None), None)
        bias = g.const(bias_name) if bias_name else None
        if bias is None or bias.ndim != 1:
            return None
        found.append((t, add, g.other_input(add, bias_name), bias))
    (ti, ai, i_raw, bi), (tf, af, f_raw, bf) = found
    split = g.made_by(i_raw, "Split")
    sizes = split and len(split.input) == 2 and g.const(split.input[1], np.int64)
    if (split is None or sizes is None or sizes is False or attrs(split).get("axis") not in (-1, 2)
            or list(split.output) != [i_raw, f_raw] or sizes.tolist() != [len(bi), len(bf)] or len(bi) != len(bf)
            or not (g.private(i_raw) and g.private(f_raw))):
        return None
    removed.extend([ti, tf, ai, af, split])
    return split.input[0], np.concatenate([bi, bf]).astype(np.float32)


def _paper_layer_output(g: GraphIndex, h: str, removed: list) -> dict | None:
    """The paper mLSTM block's tail after the cell's ``h``: y = Mul(Add(:func:`_normed_heads`,
    Mul(skip, xc)), Mul(z, Sigmoid(z))), the normed heads rounded to bfloat16 on the way in a bf16
    export (:func:`_bf16_round_trip`: "round_bf16" 1); what it reads."""
    found = _normed_heads(g, h)
    if found is None:
        return None
    nodes, out = found
    casts, normed = _through_bf16_round_trip(g, out["y"])
    add = g.only_reader(normed, "Add")
    mul_skip = add and g.private_made_by(g.other_input(add, normed), "Mul")
    skip_name = mul_skip and next((x for x in mul_skip.input if g.const(x) is not None), None)
    mul_z = skip_name and g.only_reader(add.output[0], "Mul")
    silu = mul_z and g.private_made_by(g.other_input(mul_z, add.output[0]), "Mul")
    sig = silu and next((n for n in (g.private_made_by(x, "Sigmoid") for x in silu.input) if n), None)
    if (not sig or g.other_input(silu, sig.output[0]) != sig.input[0]
            or g.const(skip_name).shape != g.const(out["weight"]).shape):
        return None
    removed.extend([*nodes, *casts, add, mul_skip, mul_z, silu, sig])
    return {**out, "z": sig.input[0], "xc": g.other_input(mul_skip, skip_name), "skip": skip_name,
            "y": mul_z.output[0], "round_bf16": int(bool(casts))}


# The paper layer runs its cell step by step at prefill too, reading and writing each head's matrix
# memory once per token; the chunkwise body touches it once per chunk. That pays while a head's
# memory stays in a core's L2: xlstm-125m's heads (384 x 384 floats, 576 KiB) prefill 64 tokens in
# 0.91x the body's time, but xlstm-1.3b's (1024 x 1024, 4 MiB; two of its blocks) in 1.26x
# (bench/ab_native_pass.py --pass paper-layer). Layers with larger heads keep the body.
PAPER_LAYER_MAX_HEAD_BYTES = 1 << 20


def _match_paper_mlstm_layer(g: GraphIndex, cell: NodeProto) -> dict | None:
    """The paper mLSTM block's layer around the ``xlstm::mLSTM`` node ``cell``, as exported from
    models/blocks.py ``mLSTMBlock`` in float32 or bfloat16 (the first Mul's output through a rounding
    point, :func:`_bf16_round_trip`: round_bf16 = 1), or None where the graph differs anywhere:

        q|k|v = Transpose[0,2,1,3](Reshape(x_raw))       x_raw [B, S, NH*D]: the q, k, v products
        i|f   = Transpose[0,2,1](Add(i_raw|f_raw, bias))  i_raw, f_raw = Split[-1, NH + NH](g_raw)
        h, c, n, m = xlstm::mLSTM(q, k, v, i, f, c0, n0, m0)
        y = Mul(Add(Mul(Reshape(LayerNormalization[axis -1](Transpose[0,2,1,3](h), s, b?)), w),
                    Mul(skip, xc)), Mul(z, Sigmoid(z)))

    (xc: the convolution's output, z: the up-projection's second half.) Every value in between
    must have no reader outside the pattern, and a head's matrix memory (c0 [B, NH, DQK, DV], its
    dims known) must fit in :data:`PAPER_LAYER_MAX_HEAD_BYTES`. The same dictionary as
    :func:`_match_mlstm_layer`."""
    if cell.domain != DOMAIN or cell.op_type != MLSTM.name:
        return None
    removed = [cell]
    cell_in = dict(zip(contract.input_names(MLSTM), cell.input))
    cell_out = dict(zip(contract.output_names(MLSTM), cell.output))
    c0 = g.shapes.get(cell_in["c0"])
    head_bytes = 4 * c0[2] * c0[3] if c0 and len(c0) == 4 and all(isinstance(d, int) for d in c0[2:]) else None
    if head_bytes is None or head_bytes > PAPER_LAYER_MAX_HEAD_BYTES:
        return None
    q_raw, k_raw, v_raw = (_heads_input(g, cell_in[x], removed) for x in ("q", "k", "v"))
    gates = None not in (q_raw, k_raw, v_raw) and _paper_gates_input(g, cell_in["i"], cell_in["f"], removed)
    tail = gates and _paper_layer_output(g, cell_out["h"], removed)
    if not tail:
        return None
    g_raw, gate_bias = gates
    inputs, cols = _fused_columns(g, [q_raw, k_raw, v_raw, g_raw, tail["z"]])
    return {"op": "mLSTMPaperLayer", "inputs": dict(zip(("q", "k", "v", "g", "z"), inputs)),
            "gate_bias": f"{cell.name or cell_out['c']}.gate_bias", "gate_bias_value": gate_bias,
            "extra": {"skip": tail["skip"], "xc": tail["xc"]},
            "state": {x: cell_in[x] for x in ("c0", "n0", "m0")}, "ln_scale": tail["ln_scale"],
            "ln_bias": tail["ln_bias"], "weight": tail["weight"], "dv": tail["dv"],
            "outputs": {"y": tail["y"], **{x: cell_out[x] for x in ("c", "n", "m")}},
            "attributes": {"eps": float(attrs(cell).get("eps", MLSTM.attr("eps").default)),
                           "norm_eps": tail["norm_eps"], "soft_cap": 0.0, "round_bf16": tail["round_bf16"],
                           **{f"{x}_col": c for x, c in zip(("q", "k", "v", "g", "z"), cols)}},
            "removed": removed}


def _mlstm_layer(edit: Edit, match: dict) -> None:
    """Replacement: one mLSTMLayer (or mLSTMPaperLayer) node where the layer's last node stood."""
    ln_bias = match["ln_bias"]
    if ln_bias is None:  # the kernel always adds one
        ln_bias = f"{match['ln_scale']}.zero_bias"
        if ln_bias not in edit.index.inits:
            edit.add_initializer(numpy_helper.from_array(np.zeros(match["dv"], np.float32), ln_bias))
    if "gate_bias_value" in match:  # the paper block's i and f biases, joined
        edit.add_initializer(numpy_helper.from_array(match["gate_bias_value"], match["gate_bias"]))
    layer = native_ops.node(
        match.get("op", "mLSTMLayer"),
        {**match["inputs"], "gate_bias": match["gate_bias"], **match["state"], "ln_scale": match["ln_scale"],
         "ln_bias": ln_bias, "weight": match["weight"], **match.get("extra", {})},
        match["outputs"], name=f"{match['removed'][0].name}_layer", **match["attributes"])
    edit.replace(match["removed"], [layer])


def _fuse_mlstm_layers(graph: GraphProto) -> int:
    """Swap each mLSTM layer of ``graph`` between its weight products for one node: 7B-style ones
    (~25 nodes, see :func:`_match_mlstm_layer`) for ``mLSTMLayer``, paper ones (~25 nodes and the
    cell's function, see :func:`_match_paper_mlstm_layer`) for ``mLSTMPaperLayer``. Returns how
    many were swapped."""
    rules = [Rule("7B-style mLSTM layer -> mLSTMLayer", _match_mlstm_layer, _mlstm_layer),
             Rule("paper mLSTM layer -> mLSTMPaperLayer", _match_paper_mlstm_layer, _mlstm_layer)]
    fused = sum(apply_rules(graph, rules).values())
    if fused:
        drop_dead_nodes(graph)
    return fused


# --- the paper sLSTM layer --------------------------------------------------------------------------


def _gate_pair_weight(g: GraphIndex, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is a float32 constant [NH, DH, 2*DH], or
    Transpose[0,2,1](Concat[axis 1](W_a, W_b)) of two constants [NH, DH, DH] (two gates' head-wise
    weights side by side, as the export leaves them unfolded for larger models), else None."""
    w = g.const(name)
    if w is None:
        t = g.made_by(name, "Transpose", perm=[0, 2, 1])
        cat = t and g.made_by(t.input[0], "Concat", axis=1)
        parts = [g.const(x) for x in cat.input] if cat and len(cat.input) == 2 else [None]
        if any(x is None or x.ndim != 3 or x.shape != parts[0].shape for x in parts):
            return None
        w = np.concatenate(parts, axis=1).transpose(0, 2, 1)
    return w if w.ndim == 3 and w.shape[2] == 2 * w.shape[1] else None


def _headwise_product(g: GraphIndex, y: str, nh: int) -> tuple[list[NodeProto], str, np.ndarray] | None:
    """([MatMul, Transpose, Reshape], x, w [NH, DH, 2*DH]) if ``y`` is
    MatMul(Transpose[1,0,2](Reshape(x, [-1, NH, DH])), w), w constant (:func:`_gate_pair_weight`): a
    paper sLSTM block's head-wise product of two gates (models/blocks.py ``_gate_preacts``). ``y``
    and the Reshape's output are private; the Transpose's output may feed the block's other gate
    product too (the caller checks)."""
    mm = g.private_made_by(y, "MatMul")
    t = mm and g.made_by(mm.input[0], "Transpose", perm=[1, 0, 2])
    r = t and g.private_made_by(t.input[0], "Reshape")
    w = _gate_pair_weight(g, mm.input[1]) if r else None
    shape = g.const(r.input[1], np.int64) if r else None
    if w is None or shape is None or w.shape[0] != nh or shape.tolist() != [-1, nh, w.shape[1]]:
        return None
    return [mm, t, r], r.input[0], w.astype(np.float32)


def _match_paper_slstm_layer(g: GraphIndex, cell: NodeProto) -> dict | None:
    """The paper sLSTM block's layer around the ``xlstm::sLSTM`` node ``cell``, as exported from
    models/blocks.py ``sLSTMBlock`` in float32 or bfloat16 (out through a rounding point,
    :func:`_bf16_round_trip`: round_bf16 = 1), or None where the graph differs anywhere:

        a = MatMul(Transpose[1,0,2](Reshape(xc, [-1, NH, DH])), w_if)   (NH, B*S, 2*DH): i, f gates
        b = MatMul(Transpose[1,0,2](Reshape(x, [-1, NH, DH])), w_zo)    (NH, B*S, 2*DH): z, o gates
        y, h, c, n, m = xlstm::sLSTM(Transpose[1,0,2,3](Reshape(Concat[-1](a, b))), r, bias, h0, c0, n0, m0)
        out = Mul(Reshape(LayerNormalization[axis -1](Transpose[0,2,1,3](y), s, b?)), weight)

    (xc: the convolution's output, or x without one; x: the block's normed input; r, bias float32
    constants; w_if, w_zo constants or two gates' weights joined, see :func:`_gate_pair_weight`.)
    Every value in between must have no reader outside the pattern. Returns the layer's inputs by
    name, its outputs, the gate weights' values, the LayerNorm's eps and the nodes it replaces."""
    if cell.domain != DOMAIN or cell.op_type != SLSTM.name:
        return None
    cell_in = dict(zip(contract.input_names(SLSTM), cell.input))
    cell_out = dict(zip(contract.output_names(SLSTM), cell.output))
    r, bias = g.const(cell_in["r"]), g.const(cell_in["b"])
    if r is None or bias is None or r.ndim != 3 or bias.shape != (r.shape[0], r.shape[2]):
        return None
    nh = r.shape[0]
    removed = [cell]
    t = g.private_made_by(cell_in["x"], "Transpose", perm=[1, 0, 2, 3])
    reshape = t and g.private_made_by(t.input[0], "Reshape")
    cat = reshape and g.private_made_by(reshape.input[0], "Concat")
    if not cat or len(cat.input) != 2 or attrs(cat).get("axis") not in (-1, 2):  # (NH, B*S, 2*DH) twice
        return None
    removed.extend([t, reshape, cat])
    gates_if = _headwise_product(g, cat.input[0], nh)
    gates_zo = gates_if and _headwise_product(g, cat.input[1], nh)
    if not gates_zo:
        return None
    (mm_if, t_if, r_if), (mm_zo, t_zo, r_zo) = gates_if[0], gates_zo[0]
    if t_if is t_zo:  # no convolution: both products read one head split of x
        if g.readers.get(t_if.output[0]) != [mm_if, mm_zo] or t_if.output[0] in g.outputs:
            return None
        removed.extend([mm_if, mm_zo, t_if, r_if])
    elif g.private(t_if.output[0]) and g.private(t_zo.output[0]):
        removed.extend([mm_if, t_if, r_if, mm_zo, t_zo, r_zo])
    else:
        return None
    found = _normed_heads(g, cell_out["y"])
    if not found:
        return None
    nodes, tail = found
    if g.const(tail["ln_scale"]).shape != (r.shape[1],) or g.const(tail["weight"]).shape != (nh * r.shape[1],):
        return None
    casts, y = _through_bf16_round_trip(g, tail["y"])
    removed.extend([*nodes, *casts])
    return {"inputs": {"xc": gates_if[1], "x": gates_zo[1], "r": cell_in["r"], "b": cell_in["b"],
                       **{k: cell_in[k] for k in ("h0", "c0", "n0", "m0")},
                       "ln_scale": tail["ln_scale"], "ln_bias": tail["ln_bias"], "weight": tail["weight"]},
            "outputs": {"y": y, **{k: cell_out[k] for k in ("h", "c", "n", "m")}},
            "weights": {"w_if": gates_if[2], "w_zo": gates_zo[2]}, "norm_eps": tail["norm_eps"], "dh": tail["dv"],
            "round_bf16": int(bool(casts)), "removed": removed}


def _slstm_layer(edit: Edit, match: dict) -> bool:
    """Replacement: one sLSTMPaperLayer node where the layer's last node stood, with the gate
    weights as its own initializers [NH, DH, 2*DH] (folded here where the export did not) and a zero
    LayerNorm bias where the norm has none (the kernel always adds one)."""
    inputs = dict(match["inputs"])
    name = match["removed"][0].name or match["outputs"]["h"]
    added = {w: match["weights"][w] for w in ("w_if", "w_zo")}
    if inputs["ln_bias"] is None:
        inputs["ln_bias"] = f"{inputs['ln_scale']}.zero_bias"
        if inputs["ln_bias"] not in edit.index.inits:
            added["ln_bias"] = np.zeros(match["dh"], np.float32)
    inputs.update({"w_if": f"{name}.w_if", "w_zo": f"{name}.w_zo"})
    layer = native_ops.node("sLSTMPaperLayer", inputs, match["outputs"], name=f"{name}_layer",
                            norm_eps=match["norm_eps"], round_bf16=match["round_bf16"])
    if not edit.replace(match["removed"], [layer]):
        return False
    for key, value in added.items():
        edit.add_initializer(numpy_helper.from_array(value, inputs[key]))
    return True


def _fuse_slstm_layers(graph: GraphProto) -> int:
    """Swap each paper sLSTM layer of ``graph`` (~15 nodes and the cell's function, see
    :func:`_match_paper_slstm_layer`) for one ``sLSTMPaperLayer``. Returns how many."""
    rule = Rule("paper sLSTM layer -> sLSTMPaperLayer", _match_paper_slstm_layer, _slstm_layer)
    fused = apply_rules(graph, [rule])[rule.name]
    if fused:
        drop_dead_nodes(graph)
    return fused


def _native_step_in_place(model: ModelProto) -> bool:
    """The model's ``xlstm::mLSTM`` function is the native one (:func:`_native_function`) and, at
    S == 1, its state inputs c0, n0, m0 are read by nothing but mLSTMStep: its top-level nodes
    read them only inside the If, whose step branch hands them to mLSTMStep alone."""
    states = {c for c, _ in native_ops.OPS["mLSTMStep"].in_place}
    for fn in model.functions:
        if fn.domain != DOMAIN or fn.name != MLSTM.name:
            continue
        ifs = [n for n in fn.node if n.op_type == "If"]
        if len(ifs) != 1 or any(states & set(n.input) for n in fn.node):
            return False
        step = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
        readers = [n for n in step.node if states & set(n.input)]
        return len(readers) == 1 and readers[0].op_type == "mLSTMStep" and readers[0].domain == NATIVE_DOMAIN
    return False


def inplace_states(model: ModelProto) -> dict[str, str]:
    """Graph inputs of a rewritten ``model`` that a decode step (S == 1) may overwrite with a graph
    output: input -> output, for every input whose data only one node reads, as an input the node
    updates in place, and whose matching output that node writes as a graph output. Nodes that
    update in place: the native ops with :attr:`native_ops.NativeOp.in_place` (mLSTMLayer's and
    mLSTMPaperLayer's c0, n0, m0, at any S), and the paper blocks' ``xlstm::mLSTM`` nodes whose
    native function runs a decode step as mLSTMStep (the same three states; at S > 1 that function runs its chunkwise
    branch, so a caller binds one buffer for decode steps only). Shape nodes read no data. The
    kernels read each element of the old state before they write the new one in the same place, so
    a caller may bind both to one buffer (:class:`xlstm_export.ort.OrtDecoder` and the server's
    slots do, for decode steps): a step then reads and writes the state once instead of reading one
    buffer and filling another (at B=8 on the 160M bench model, 28 MB per step: 1.8 against 2.4 ms
    for the twelve layers alone).
    """
    g = GraphIndex(model.graph)
    native_step = _native_step_in_place(model)
    pairs = {}
    for i in model.graph.input:
        data = [n for n in g.readers.get(i.name, []) if n.op_type != "Shape" or n.domain not in STANDARD_DOMAINS]
        if len(data) != 1:
            continue
        node = data[0]
        if node.domain == NATIVE_DOMAIN and node.op_type in native_ops.OPS:
            op = native_ops.OPS[node.op_type]
            names_in, names_out, in_place = op.inputs, op.outputs, op.in_place
        elif node.domain == DOMAIN and node.op_type == MLSTM.name and native_step:
            names_in, names_out = contract.input_names(MLSTM), contract.output_names(MLSTM)
            in_place = native_ops.OPS["mLSTMStep"].in_place
        else:
            continue
        node_in = dict(zip(names_in, node.input))
        node_out = dict(zip(names_out, node.output))
        for state_in, state_out in in_place:
            if node_in.get(state_in) == i.name and node_out.get(state_out) in g.outputs:
                pairs[i.name] = node_out[state_out]
    return pairs


def _add_opset(imports, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in imports):
        imports.append(helper.make_opsetid(domain, version))


def with_native_ops(model: ModelProto, *, inplace: bool = False, pack_matmuls: bool = True,
                    fuse_layers: bool = True, check_xlstm: bool = True) -> ModelProto:
    """``model`` (a copy unless ``inplace``) with xlstm function bodies that call the native kernels;
    when ``fuse_layers``, its 7B-style mLSTM layers swapped for ``mLSTMLayer``, its paper ones for
    ``mLSTMPaperLayer`` and its paper blocks' convolutions for ``CausalConv``; when
    ``pack_matmuls``, its float32 block-diagonal products swapped for ``BlockDiagMatMul`` and its
    float32 weight MatMuls for ``PackedMatMul``. A bf16 export, run as float32 on the CPU provider
    (:func:`xlstm_export.ort.upcast_bfloat16` first), gets the same, each kernel rounding to
    bfloat16 where its graph does (``round_bf16``). A model with no xlstm body to rewrite is refused
    unless ``check_xlstm`` is False."""
    out = model
    if not inplace:
        out = ModelProto()
        out.CopyFrom(model)
    rewritten = sum(_native_function(fn) for fn in out.functions)
    if not rewritten and check_xlstm:
        raise NativeOpsError("the model has no xlstm::mLSTM / xlstm::sLSTM function body to run natively")
    if fuse_layers:
        _fuse_mlstm_layers(out.graph)
        _fuse_slstm_layers(out.graph)
        _causal_convs(out.graph)
    if pack_matmuls:
        _block_diagonal_products(out.graph)
        _pack_matmuls(out.graph)
    _add_opset(out.opset_import, NATIVE_DOMAIN, NATIVE_VERSION)
    return out
