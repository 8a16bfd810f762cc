"""The ``xlstm.cpu`` ops of the native CPU library (plugins/cpu_ops.cc): their one signature table.

Each op's inputs and outputs by name, in the order the kernel reads and writes them, and its
required attributes. :mod:`xlstm_export.ort_native` builds every native node through :func:`node`
(inputs and outputs given by name, never by position); the library carries the same table (each
``make_op`` in cpu_ops.cc names its inputs, outputs and attributes, and ``XlstmCpuOpSignatures()``
reports them) and tests/test_ort_native.py checks the two are equal. Every tensor is float32 (the
function bodies cast before calling) but the bfloat16 weights of the ...Bf16 products. What each op computes: cpu_ops.cc's header.

    from xlstm_export import native_ops
    native_ops.node("PackedMatMul", {"x": "h", "w": "W.packed32"}, {"y": "logits"}, n=50304)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from onnx import NodeProto, helper

__all__ = ["DOMAIN", "OPS", "VERSION", "NativeOp", "node", "signatures"]

DOMAIN = "xlstm.cpu"  # the custom-op domain the library registers
VERSION = 1


@dataclass(frozen=True)
class NativeOp:
    """One op of the library. Shapes: cpu_ops.cc's header comment."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ints: tuple[str, ...] = ()  # required int attributes
    floats: tuple[str, ...] = ()  # required float attributes
    # (input, output) pairs the kernel reads element by element before writing the same element:
    # a caller may bind both to one buffer (xlstm_export.ort.OrtDecoder does)
    in_place: tuple[tuple[str, str], ...] = ()
    bf16: tuple[str, ...] = ()  # inputs of type bfloat16 (every other tensor is float32)

    def signature(self) -> str:
        """``name(in, ...) -> (out, ...) ints(...) floats(...)[ bf16(...)]``, as the library reports it."""
        return (f"{self.name}({','.join(self.inputs)})->({','.join(self.outputs)}) "
                f"ints({','.join(self.ints)}) floats({','.join(self.floats)})"
                + (f" bf16({','.join(self.bf16)})" if self.bf16 else ""))


_MLSTM_STATE = (("c0", "c"), ("n0", "n"), ("m0", "m"))

OPS: dict[str, NativeOp] = {op.name: op for op in (
    # one mLSTM decode step (S == 1): the mLSTM body's fast path; eps a one-element tensor
    NativeOp("mLSTMStep", ("q", "k", "v", "i", "f", "c0", "n0", "m0", "eps"), ("h", "c", "n", "m"),
             in_place=_MLSTM_STATE),
    # the sLSTM body's whole time loop (its Scan)
    NativeOp("sLSTMScan", ("h0", "c0", "n0", "m0", "x", "r"), ("h", "c", "n", "m", "y")),
    # y = x W, W packed into column panels (ort_native.pack_weight); n: W's columns
    NativeOp("PackedMatMul", ("x", "w"), ("y",), ints=("n",)),
    # y = x W + r, r like y (a residual) or [n] (a bias)
    NativeOp("PackedMatMulAdd", ("x", "w", "r"), ("y",), ints=("n",)),
    # y = softcap(RMSNorm(x; g, eps) W); round_bf16 = 1: RMSNorm(x) rounded to bfloat16 first (a bf16 export)
    NativeOp("PackedNormMatMul", ("x", "w", "g"), ("y",), ints=("n", "round_bf16"), floats=("eps", "soft_cap")),
    # y = LayerNorm(x; g, beta, eps) W
    NativeOp("PackedLnMatMul", ("x", "w", "g", "beta"), ("y",), ints=("n",), floats=("eps",)),
    # y = GLU(z) W + r: the SwiGLU (gelu = 0) or, with the exact GELU, the GeGLU (gelu = 1; gelu_div:
    # the sqrt 2 it divides by, as the graph holds it)
    NativeOp("PackedGluMatMulAdd", ("z", "w", "r"), ("y",), ints=("n", "gelu"), floats=("gelu_div",)),
    # the same five with w bfloat16, the same layout: for a weight whose values are all bfloat16
    # values (a bf16 checkpoint), the same results to the bit from half the bytes
    NativeOp("PackedMatMulBf16", ("x", "w"), ("y",), ints=("n",), bf16=("w",)),
    NativeOp("PackedMatMulAddBf16", ("x", "w", "r"), ("y",), ints=("n",), bf16=("w",)),
    NativeOp("PackedNormMatMulBf16", ("x", "w", "g"), ("y",), ints=("n", "round_bf16"), floats=("eps", "soft_cap"),
             bf16=("w",)),
    NativeOp("PackedLnMatMulBf16", ("x", "w", "g", "beta"), ("y",), ints=("n",), floats=("eps",), bf16=("w",)),
    NativeOp("PackedGluMatMulAddBf16", ("z", "w", "r"), ("y",), ints=("n", "gelu"), floats=("gelu_div",), bf16=("w",)),
    # each row of n values of x times a block-diagonal matrix of square blocks of 1, 2, 4, 8 or 16,
    # packed (ort_native.pack_block_diagonal); y [rows, n / block, block]
    NativeOp("BlockDiagMatMul", ("x", "w"), ("y",), ints=("n",)),
    # a 7B-style mLSTM layer between its two weight products; q..o may be column ranges of one tensor;
    # round_bf16 = 1: the normed, weighted h rounded to bfloat16 before the output gate (a bf16 export)
    NativeOp("mLSTMLayer", ("q", "k", "v", "g", "o", "gate_bias", "c0", "n0", "m0", "ln_scale", "ln_bias",
                            "weight"), ("y", "c", "n", "m"),
             ints=("q_col", "k_col", "v_col", "g_col", "o_col", "round_bf16"), floats=("eps", "norm_eps", "soft_cap"),
             in_place=_MLSTM_STATE),
    # a paper mLSTM block's layer: as mLSTMLayer with z in place of o, and
    # y = ((LN(h) * ln_scale + ln_bias) * weight + skip * xc) * silu(z) (the first product rounded where round_bf16)
    NativeOp("mLSTMPaperLayer", ("q", "k", "v", "g", "z", "gate_bias", "c0", "n0", "m0", "ln_scale", "ln_bias",
                                 "weight", "skip", "xc"), ("y", "c", "n", "m"),
             ints=("q_col", "k_col", "v_col", "g_col", "z_col", "round_bf16"), floats=("eps", "norm_eps", "soft_cap"),
             in_place=_MLSTM_STATE),
    # a paper sLSTM block's layer between its convolution and its residual: per head, gates
    # [xc W_if | x W_zo] + b, the cell, LayerNorm (ln_scale, ln_bias, norm_eps) and weight (y rounded
    # to bfloat16 where round_bf16 = 1)
    NativeOp("sLSTMPaperLayer", ("xc", "x", "w_if", "w_zo", "r", "b", "h0", "c0", "n0", "m0", "ln_scale", "ln_bias",
                                 "weight"), ("y", "h", "c", "n", "m"), ints=("round_bf16",), floats=("norm_eps",)),
    # a paper block's causal convolution with its state (cat = [past; x] over time), any S, then
    # silu(y) where silu = 1; w [K, D], bias [D]; round_bf16 = 1: past rounded to bfloat16 as read
    NativeOp("CausalConv", ("x", "past", "w", "bias"), ("y", "present"), ints=("silu", "round_bf16")),
)}


def signatures() -> list[str]:
    """Every op's :meth:`NativeOp.signature`, in table order."""
    return [op.signature() for op in OPS.values()]


def node(op: str, inputs: Mapping[str, str], outputs: Mapping[str, str], *, name: str | None = None,
         **attributes) -> NodeProto:
    """A ``xlstm.cpu::op`` node; ``inputs`` / ``outputs`` map the op's tensor names to graph values,
    ``attributes`` are its ints and floats (all of them; helper.make_node's order)."""
    spec = OPS[op]
    for kind, given, want in (("inputs", set(inputs), set(spec.inputs)), ("outputs", set(outputs), set(spec.outputs)),
                              ("attributes", set(attributes), {*spec.ints, *spec.floats})):
        if given != want:
            raise ValueError(f"{DOMAIN}::{op} {kind}: got {sorted(given)}, expected {sorted(want)}")
    return helper.make_node(op, [inputs[k] for k in spec.inputs], [outputs[k] for k in spec.outputs],
                            domain=DOMAIN, name=name, **attributes)
