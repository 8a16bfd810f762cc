"""Model-local ONNX function bodies of ``xlstm::mLSTM`` and ``xlstm::sLSTM`` in standard ops.

Every ``xlstm`` node of an exported model is backed by one of these FunctionProtos (domain
``xlstm``, same name as the op), so stock onnxruntime runs the model with no extra library, and
TensorRT inlines the body when no plugin is registered (it takes the plugin when one is: the
``plugin_namespace`` / ``plugin_version`` attributes). The bodies follow the contract in
:mod:`xlstm_export.contract` and compute in float32 (Cast in, ``CastLike`` out), so one body serves
float32, float16 and bfloat16 graphs; states are float32 throughout.

mLSTM body: the chunkwise form, time and memory linear in S, exact for any S (S == 1 included),
with float32 casts, q * 1/sqrt(DQK) and logsigmoid(f) first:
  - L = the ``chunk_size`` attribute (an attribute reference: the node's value is used),
    NC = ceil(S / L) chunks of equal length Lc = ceil(S / NC) <= L, so the padding NC*Lc - S is
    less than NC (S <= L: one chunk, no padding). Padded steps get logsigmoid(f) = 0 and
    i = -inf: they neither decay nor write the state, so the final state and the first S outputs
    are exact.
  - A Loop over the NC chunks carries (C, n, m) and emits, per chunk, the inter-chunk terms
    q.C_prev, q.n_prev and m_prev (each the size of the chunk's output, never a per-chunk state).
  - Everything else is parallel over all chunks at once (the D-weighted intra-chunk q k^T v, the
    stabilizer m_t and the denominator): memory B*NH*S*Lc, linear in S.
sLSTM body: a Scan over time (axis 2) carrying (h, c, n, m) and r; gate order i, f, z, o.

Every importer takes these bodies as written (measured with onnxruntime, TensorRT-RTX 1.7's parser
and builder, OpenVINO 2026.4 after inlining): attribute references only at the body's top level
(TensorRT's parser resolves them in the innermost scope alone), an explicit Loop condition, no
Loop inside an If (TensorRT's builder rejects it), and subgraphs of Scan that read only their own
inputs (OpenVINO's Scan). The decode fast path that onnxruntime wants (a single recurrent step of
~35 ops at S == 1, no loop) lives with the runner: :func:`with_decode_step` puts
``If(S == 1, step, chunkwise)`` into the loaded model in memory.

Why onnx.helper and not onnxscript: the bodies need attribute references (``chunk_size``,
``eps``), Loop/Scan subgraphs that capture values of the enclosing function, and exact control of
the emitted nodes (tests read them, TensorRT inlines them). onnx.helper states all three directly;
onnxscript's script front end would translate Python control flow and attribute parameters with
its own conventions, which adds a layer to debug and a version coupling (onnxscript 0.x changes
often) for no gain on ~60 nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
from onnx import (
    AttributeProto,
    FunctionProto,
    ModelProto,
    TensorProto,
    helper,
    numpy_helper,
)

from . import contract
from .contract import DOMAIN, MLSTM, SLSTM
from .graph_rewrite import opset_version

__all__ = ["DEFAULT_OPSET", "STEP_EPS", "STEP_OUTPUTS", "cell_model", "functions", "mlstm_function",
           "mlstm_step_branch", "slstm_function", "step_branch", "with_decode_step"]

DEFAULT_OPSET = 18  # lowest ai.onnx opset the bodies are written for (Split num_outputs, ReduceMax axes input)
_F = TensorProto.FLOAT
_ONNX_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}


class _Builder:
    """Appends nodes with fresh SSA names; ``prefix`` keeps subgraph names apart from the outer ones."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out: Sequence[str] | None = None,
           hint: str | None = None, ref_attrs: dict[str, tuple[str, int]] | None = None, **attrs):
        outs = list(out) if out is not None else [self.name(hint or op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, list(inputs), outs, name=self.name("n_" + op_type), **attrs)
        for attr_name, (ref_name, attr_type) in (ref_attrs or {}).items():
            node.attribute.append(helper.make_attribute_ref(attr_name, attr_type, ref_attr_name=ref_name))
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", hint=hint, value=numpy_helper.from_array(arr))

    # small composites --------------------------------------------------------------------
    def logsigmoid(self, x: str) -> str:
        """log sigmoid(x) = min(x, 0) - log(1 + e), e = exp(-|x|) in (0, 1], stable for any x.

        log(1 + e) is written 2 atanh(e / (2 + e)) (exact, as accurate as log1p): the plain
        Log(Add(1, Exp(.))) is fused into SoftPlus by OpenVINO, whose CPU kernel is off by up to
        3.8e-6 for the negative arguments here (onnxruntime 5.4e-7; this form 4.8e-7 in both), and
        the gate error adds up in the cumulative log forget gates."""
        zero = self.const(0.0, np.float32)
        two = self.const(2.0, np.float32)
        e = self.op("Exp", self.op("Neg", self.op("Abs", x)))
        log1p_e = self.op("Mul", two, self.op("Atanh", self.op("Div", e, self.op("Add", two, e))))
        return self.op("Sub", self.op("Min", x, zero), log1p_e, hint="logsig")

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.const(list(axes)))

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", x, self.const(list(axes)))

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        return self.op(op_type, x, self.const(list(axes)), keepdims=keepdims)


def _vi(name: str, elem: int) -> onnx.ValueInfoProto:
    """Typed, rank-free value info (subgraph inputs/outputs)."""
    return helper.make_tensor_value_info(name, elem, None)


def _fn_attributes(spec: contract.OpSpec) -> list[AttributeProto]:
    return [helper.make_attribute(a.name, a.default) for a in spec.attrs]


# ---------------------------------------------------------------------------------------------
# mLSTM
# ---------------------------------------------------------------------------------------------


def _mlstm_loop_body() -> onnx.GraphProto:
    """One chunk: emit q.C_prev, q.n_prev, m_prev and carry (C, n, m) to the next chunk.

    Captures ch_Qc, ch_Kc (B,NH,NC,Lc,DQK), ch_Vc (B,NH,NC,Lc,DV), ch_A (B,NH,NC,Lc), ch_G (B,NH,NC)
    from the enclosing chunk branch.
    """
    g = _Builder("lb_")
    it, cond_in, c, n, m = "lb_iter", "lb_cond_in", "lb_c", "lb_n", "lb_m"
    qk = g.op("Gather", "ch_Qc", it, axis=2, hint="q_k")  # (B, NH, Lc, DQK)
    kk = g.op("Gather", "ch_Kc", it, axis=2, hint="k_k")  # (B, NH, Lc, DQK)
    vk = g.op("Gather", "ch_Vc", it, axis=2, hint="v_k")  # (B, NH, Lc, DV)
    ak = g.op("Gather", "ch_A", it, axis=2, hint="a_k")  # (B, NH, Lc)
    gk = g.op("Gather", "ch_G", it, axis=2, hint="g_k")  # (B, NH)
    # inter-chunk terms with the carried state
    g.op("MatMul", qk, c, out=["lb_qc_out"])  # (B, NH, Lc, DV)
    g.op("MatMul", qk, g.unsqueeze(n, [-1]), out=["lb_qn_out"])  # (B, NH, Lc, 1)
    g.op("Identity", m, out=["lb_mprev_out"])  # (B, NH)
    # carry: m' = max(g + m, max_s a_s); C' = e^{g+m-m'} C + sum_s e^{a_s-m'} k_s v_s^T
    gm = g.op("Add", gk, m)  # (B, NH)
    m_new = g.op("Max", gm, g.reduce("ReduceMax", ak, [-1]), out=["lb_m_out"])  # (B, NH)
    w_carry = g.op("Exp", g.op("Sub", gm, m_new))  # (B, NH)
    w_in = g.op("Exp", g.op("Sub", ak, g.unsqueeze(m_new, [-1])))  # (B, NH, Lc)
    kw = g.op("Mul", kk, g.unsqueeze(w_in, [-1]))  # (B, NH, Lc, DQK)
    kv = g.op("MatMul", g.op("Transpose", kw, perm=[0, 1, 3, 2]), vk)  # (B, NH, DQK, DV)
    g.op("Add", g.op("Mul", g.unsqueeze(w_carry, [-1, -2]), c), kv, out=["lb_c_out"])  # (B, NH, DQK, DV)
    g.op("Add", g.op("Mul", g.unsqueeze(w_carry, [-1]), n), g.reduce("ReduceSum", kw, [2]),
         out=["lb_n_out"])  # (B, NH, DQK)
    # the condition out is a constant true, not a pass-through of the condition in: TensorRT's
    # parser does not register the Loop's condition input inside the body
    g.op("Constant", out=["lb_cond_out"], value=helper.make_tensor("lb_true", TensorProto.BOOL, [], [True]))
    return helper.make_graph(
        g.nodes, "mlstm_chunk_loop",
        [helper.make_tensor_value_info(it, TensorProto.INT64, []),  # scalars, as ORT's Loop requires
         helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []), _vi(c, _F), _vi(n, _F), _vi(m, _F)],
        [helper.make_tensor_value_info("lb_cond_out", TensorProto.BOOL, []), _vi("lb_c_out", _F),
         _vi("lb_n_out", _F), _vi("lb_m_out", _F), _vi("lb_qc_out", _F), _vi("lb_qn_out", _F),
         _vi("lb_mprev_out", _F)],
    )


# names the function body defines for its branches (float32 unless noted)
_PRE = {
    "q": "pre_q", "k": "pre_k", "v": "pre_v",  # (B, NH, S, DQK|DV), q scaled
    "i": "pre_i", "logf": "pre_logf",  # (B, NH, S)
    "b_nh": "pre_b_nh", "s": "pre_s", "dqk": "pre_dqk", "dv": "pre_dv", "chunk": "pre_chunk",  # int64 [2] / [1]
    "eps": "pre_eps",  # scalar
}
_BRANCH_OUT = ("h", "c", "n", "m")

# the interface of a decode-step branch (mlstm_function's step_branch): it reads the function's
# inputs (contract.input_names(MLSTM)) and STEP_EPS, and writes STEP_OUTPUTS, all float32
STEP_EPS = _PRE["eps"]  # the body's eps attribute as a float32 scalar
STEP_OUTPUTS = {o: f"st_{o}_out" for o in _BRANCH_OUT}  # h (B, NH, 1, DV), c, n, m like c0, n0, m0


def _branch_graph(g: _Builder, name: str) -> onnx.GraphProto:
    outs = [f"{g.prefix}{o}_out" for o in _BRANCH_OUT]
    return helper.make_graph(g.nodes, name, [], [_vi(o, _F) for o in outs])


def step_branch(nodes: Sequence[onnx.NodeProto], name: str) -> onnx.GraphProto:
    """A decode-step branch for :func:`mlstm_function` from ``nodes`` that read the function's
    inputs and :data:`STEP_EPS` and write :data:`STEP_OUTPUTS` (a native kernel, say)."""
    return helper.make_graph(list(nodes), name, [], [_vi(o, _F) for o in STEP_OUTPUTS.values()])


def _scale_and_cast_q(g: _Builder, out: str | None = None) -> str:
    """q in float32 times 1/sqrt(DQK) (DQK read from q's shape)."""
    dqk = g.op("Cast", g.op("Shape", "q", start=3, end=4), to=_F)  # [DQK]
    scale = g.op("Reciprocal", g.op("Sqrt", dqk))  # [1]  1/sqrt(DQK)
    return g.op("Mul", g.op("Cast", "q", to=_F), scale, out=[out] if out else None)  # (B, NH, S, DQK)


def mlstm_step_branch() -> onnx.GraphProto:
    """S == 1: one recurrent step (the decode path), exactly the per-step update.

    Self-contained (reads the function inputs, computes only what the step needs) and kept small:
    at decode every node is paid once per block per token. Gates and stabilizer live in a
    (B, NH, 1, 1) layout that broadcasts against q, k, v (B, NH, 1, D) and C (B, NH, DQK, DV), so
    no Unsqueeze sits between them; n is updated as (B, NH, 1, DQK) (k's layout) and squeezed once.
    """
    g = _Builder("st_")
    q = _scale_and_cast_q(g)  # (B, NH, 1, DQK) scaled
    k = g.op("Cast", "k", to=_F)  # (B, NH, 1, DQK)
    v = g.op("Cast", "v", to=_F)  # (B, NH, 1, DV)
    i = g.unsqueeze(g.op("Cast", "i", to=_F), [3])  # (B, NH, 1, 1)
    log_f = g.logsigmoid(g.unsqueeze(g.op("Cast", "f", to=_F), [3]))  # (B, NH, 1, 1)
    lfm = g.op("Add", log_f, g.unsqueeze("m0", [2, 3]))  # (B, NH, 1, 1)  logsigmoid(f) + m_prev
    m_new = g.op("Max", lfm, i)  # (B, NH, 1, 1)
    f_a = g.op("Exp", g.op("Sub", lfm, m_new))  # (B, NH, 1, 1)
    i_a = g.op("Exp", g.op("Sub", i, m_new))  # (B, NH, 1, 1)
    ki = g.op("Mul", k, i_a)  # (B, NH, 1, DQK)  i' k
    kv = g.op("MatMul", g.op("Transpose", ki, perm=[0, 1, 3, 2]), v)  # (B, NH, DQK, DV)  i' k v^T
    c = g.op("Add", g.op("Mul", f_a, "c0"), kv, out=[STEP_OUTPUTS["c"]])  # (B, NH, DQK, DV)
    n = g.op("Add", g.op("Mul", f_a, g.unsqueeze("n0", [2])), ki)  # (B, NH, 1, DQK)
    g.op("Squeeze", n, g.const([2]), out=[STEP_OUTPUTS["n"]])  # (B, NH, DQK)
    num = g.op("MatMul", q, c)  # (B, NH, 1, DV)
    qn = g.op("MatMul", q, g.op("Transpose", n, perm=[0, 1, 3, 2]))  # (B, NH, 1, 1)
    floor = g.op("Exp", g.op("Neg", m_new))  # (B, NH, 1, 1)  exp(-m)
    den = g.op("Add", g.op("Max", g.op("Abs", qn), floor), STEP_EPS)  # (B, NH, 1, 1)
    g.op("Div", num, den, out=[STEP_OUTPUTS["h"]])  # (B, NH, 1, DV)
    g.op("Squeeze", m_new, g.const([2, 3]), out=[STEP_OUTPUTS["m"]])  # (B, NH)
    return step_branch(g.nodes, "mlstm_step")


def _mlstm_chunk_prelude(g: _Builder) -> None:
    """Defines the _PRE values the chunkwise branch reads: float32 q (scaled), k, v, i, logsigmoid(f)
    and the dims [B, NH], [S], [DQK], [DV], [L]."""
    f32 = {"to": _F}
    shape_q = g.op("Shape", "q")  # [B, NH, S, DQK]
    g.op("Slice", shape_q, g.const([0]), g.const([2]), out=[_PRE["b_nh"]])  # [B, NH]
    g.op("Slice", shape_q, g.const([2]), g.const([3]), out=[_PRE["s"]])  # [S]
    g.op("Slice", shape_q, g.const([3]), g.const([4]), out=[_PRE["dqk"]])  # [DQK]
    g.op("Shape", "v", start=3, end=4, out=[_PRE["dv"]])  # [DV]
    chunk = g.op("Constant", hint="chunk", ref_attrs={"value_int": ("chunk_size", AttributeProto.INT)})
    g.op("Reshape", chunk, g.const([1]), out=[_PRE["chunk"]])  # [L]
    _scale_and_cast_q(g, out=_PRE["q"])  # (B, NH, S, DQK)
    g.op("Cast", "k", out=[_PRE["k"]], **f32)  # (B, NH, S, DQK)
    g.op("Cast", "v", out=[_PRE["v"]], **f32)  # (B, NH, S, DV)
    g.op("Cast", "i", out=[_PRE["i"]], **f32)  # (B, NH, S)
    g.op("Identity", g.logsigmoid(g.op("Cast", "f", **f32)), out=[_PRE["logf"]])  # (B, NH, S)


def _mlstm_chunkwise() -> _Builder:
    """Any S: chunkwise (Loop over chunks for the state, parallel inside the chunks). The nodes,
    writing ``ch_{h,c,n,m}_out``, go at the body's top level (the portable body) or into the else
    branch of onnxruntime's decode fast path (:func:`mlstm_function` with a ``step_branch``)."""
    g = _Builder("ch_")
    _mlstm_chunk_prelude(g)
    s, one = _PRE["s"], g.const([1])
    chunk = _PRE["chunk"]
    nc = g.op("Div", g.op("Sub", g.op("Add", s, chunk), one), chunk, hint="nc")  # [NC] = ceil(S / L)
    lc = g.op("Div", g.op("Sub", g.op("Add", s, nc), one), nc, hint="lc")  # [Lc] = ceil(S / NC) <= L
    pad = g.op("Sub", g.op("Mul", nc, lc), s, hint="pad")  # [NC*Lc - S] < NC

    # pad S -> NC*Lc: q, k, v with 0, log_f with 0 (no decay), i with -inf (no write)
    pads4 = g.op("Concat", g.const([0, 0, 0, 0, 0, 0]), pad, g.const([0]), axis=0)  # 8 pads
    pads3 = g.op("Concat", g.const([0, 0, 0, 0, 0]), pad, axis=0)  # 6 pads
    zero_f = g.const(0.0, np.float32)
    ninf = g.const(-np.inf, np.float32)
    q = g.op("Pad", _PRE["q"], pads4, zero_f)  # (B, NH, NC*Lc, DQK)
    k = g.op("Pad", _PRE["k"], pads4, zero_f)  # (B, NH, NC*Lc, DQK)
    v = g.op("Pad", _PRE["v"], pads4, zero_f)  # (B, NH, NC*Lc, DV)
    log_f = g.op("Pad", _PRE["logf"], pads3, zero_f)  # (B, NH, NC*Lc)
    ig = g.op("Pad", _PRE["i"], pads3, ninf)  # (B, NH, NC*Lc)

    # chunked views (allowzero=1: no dim of these shapes is 0-as-copy, and TensorRT then need not
    # plan for a data-dependent 0)
    b_nh, dqk, dv = _PRE["b_nh"], _PRE["dqk"], _PRE["dv"]
    g.op("Reshape", q, g.op("Concat", b_nh, nc, lc, dqk, axis=0), out=["ch_Qc"], allowzero=1)  # (B, NH, NC, Lc, DQK)
    g.op("Reshape", k, g.op("Concat", b_nh, nc, lc, dqk, axis=0), out=["ch_Kc"], allowzero=1)  # (B, NH, NC, Lc, DQK)
    g.op("Reshape", v, g.op("Concat", b_nh, nc, lc, dv, axis=0), out=["ch_Vc"], allowzero=1)  # (B, NH, NC, Lc, DV)
    sh4 = g.op("Concat", b_nh, nc, lc, axis=0)
    ic = g.op("Reshape", ig, sh4, hint="ic", allowzero=1)  # (B, NH, NC, Lc)
    bcum = g.op("CumSum", g.op("Reshape", log_f, sh4, allowzero=1), g.const(3), hint="bcum")  # (B, NH, NC, Lc)
    g_last = g.op("Slice", bcum, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([3]))  # (B,NH,NC,1)
    g.op("Squeeze", g_last, g.const([3]), out=["ch_G"])  # (B, NH, NC)  b_L
    g.op("Add", g.op("Sub", g_last, bcum), ic, out=["ch_A"])  # (B, NH, NC, Lc)  a_s = b_L - b_s + i_s

    # the recurrence over chunks
    nc_scalar = g.squeeze(nc, [0])
    # a trip count and no condition input (a loop TensorRT's parser imports cleanly); the body still
    # emits its condition, a constant true (see _mlstm_loop_body)
    g.op("Loop", nc_scalar, "", "c0", "n0", "m0", out=["ch_c_out", "ch_n_out", "ch_m_out", "ch_qc_all",
                                                        "ch_qn_all", "ch_mprev_all"], body=_mlstm_loop_body())
    # ch_qc_all (NC, B, NH, Lc, DV), ch_qn_all (NC, B, NH, Lc, 1), ch_mprev_all (NC, B, NH)
    q_cprev = g.op("Transpose", "ch_qc_all", perm=[1, 2, 0, 3, 4])  # (B, NH, NC, Lc, DV)
    q_nprev = g.squeeze(g.op("Transpose", "ch_qn_all", perm=[1, 2, 0, 3, 4]), [4])  # (B, NH, NC, Lc)
    m_prev = g.unsqueeze(g.op("Transpose", "ch_mprev_all", perm=[1, 2, 0]), [3])  # (B, NH, NC, 1)

    # intra-chunk, parallel over all chunks
    rng = g.op("Range", g.const(0), g.squeeze(lc, [0]), g.const(1))  # (Lc,)
    causal = g.op("GreaterOrEqual", g.unsqueeze(rng, [1]), g.unsqueeze(rng, [0]))  # (Lc, Lc)  s <= t
    log_d = g.op("Add", g.op("Sub", g.unsqueeze(bcum, [4]), g.unsqueeze(bcum, [3])),
                 g.unsqueeze(ic, [3]))  # (B, NH, NC, Lc, Lc)  b_t - b_s + i_s
    log_d = g.op("Where", causal, log_d, ninf)  # (B, NH, NC, Lc, Lc)
    log_inter = g.op("Add", bcum, m_prev)  # (B, NH, NC, Lc)  b_t + m_prev
    m_t = g.op("Max", g.reduce("ReduceMax", log_d, [-1]), log_inter, hint="m_t")  # (B, NH, NC, Lc)
    d = g.op("Exp", g.op("Sub", log_d, g.unsqueeze(m_t, [-1])))  # (B, NH, NC, Lc, Lc)
    w_inter = g.op("Exp", g.op("Sub", log_inter, m_t))  # (B, NH, NC, Lc)
    qk = g.op("MatMul", "ch_Qc", g.op("Transpose", "ch_Kc", perm=[0, 1, 2, 4, 3]))  # (B, NH, NC, Lc, Lc)
    scores = g.op("Mul", qk, d)  # (B, NH, NC, Lc, Lc)
    num = g.op("Add", g.op("MatMul", scores, "ch_Vc"),
               g.op("Mul", g.unsqueeze(w_inter, [-1]), q_cprev))  # (B, NH, NC, Lc, DV)
    qn = g.op("Add", g.reduce("ReduceSum", scores, [-1]), g.op("Mul", w_inter, q_nprev))  # (B, NH, NC, Lc)
    den = g.op("Add", g.op("Max", g.op("Abs", qn), g.op("Exp", g.op("Neg", m_t))), _PRE["eps"])
    h = g.op("Div", num, g.unsqueeze(den, [-1]))  # (B, NH, NC, Lc, DV)
    h = g.op("Reshape", h, g.op("Concat", b_nh, g.op("Mul", nc, lc), dv, axis=0), allowzero=1)  # (B, NH, NC*Lc, DV)
    g.op("Slice", h, g.const([0]), s, g.const([2]), out=["ch_h_out"])  # (B, NH, S, DV)
    return g


def mlstm_function(opset: int = DEFAULT_OPSET, step_branch: onnx.GraphProto | None = None) -> FunctionProto:
    """FunctionProto ``xlstm.mLSTM`` in standard ops (see the module docstring).

    The portable body (``step_branch`` None, what every export carries) is the chunkwise form at
    the body's top level: it is exact for any S, S == 1 included, and every importer takes it
    (TensorRT's parser rejects a Loop nested in an If). ``step_branch``, a graph emitting
    :data:`STEP_OUTPUTS` from the function inputs (:func:`mlstm_step_branch`, or a native kernel's
    :func:`step_branch`),
    gives onnxruntime's decode fast path instead: ``If(S == 1, step_branch, chunkwise)``, so a
    decode step runs ~35 small ops and no loop (:func:`with_decode_step`).
    """
    g = _Builder("")
    g.op("Constant", out=[_PRE["eps"]], ref_attrs={"value_float": ("eps", AttributeProto.FLOAT)})
    chunkwise = _mlstm_chunkwise()
    if step_branch is None:
        g.nodes.extend(chunkwise.nodes)
        h, c, n, m = (f"{chunkwise.prefix}{o}_out" for o in _BRANCH_OUT)
        body = "chunkwise (Loop over chunks, parallel inside; linear in S)"
    else:
        s = g.op("Shape", "q", start=2, end=3)  # [S]
        is_step = g.op("Equal", s, g.const([1]))  # bool [1]: If takes a one-element condition
        h, c, n, m = g.op("If", is_step, n_out=4, hint="branch", then_branch=step_branch,
                          else_branch=_branch_graph(chunkwise, "mlstm_chunkwise"))
        body = "If(S == 1) step, else chunkwise (onnxruntime's decode fast path)"
    g.op("Identity", c, out=["c"])  # (B, NH, DQK, DV)
    g.op("Identity", n, out=["n"])  # (B, NH, DQK)
    g.op("Identity", m, out=["m"])  # (B, NH)
    g.op("CastLike", h, "v", out=["h"])  # (B, NH, S, DV) T

    return helper.make_function(
        DOMAIN, MLSTM.name, contract.input_names(MLSTM), contract.output_names(MLSTM), g.nodes,
        [helper.make_opsetid("", opset)],
        attribute_protos=_fn_attributes(MLSTM),
        doc_string=f"{MLSTM.doc} -- body: {body}",
    )


def with_decode_step(model: ModelProto, step_branch: onnx.GraphProto | None = None) -> ModelProto:
    """``model`` (changed in place) with its ``xlstm.mLSTM`` function given the decode fast path
    (``If(S == 1, step_branch, chunkwise)``; default step: :func:`mlstm_step_branch`).

    For runtimes that take a Loop inside an If (onnxruntime): the file keeps the portable body,
    and a runner applies this in memory. The function is built anew from the contract, so what the
    file's body looked like does not matter, only that the model is ours.
    """
    for fn in model.functions:
        if fn.domain == DOMAIN and fn.name == MLSTM.name:
            fn.CopyFrom(mlstm_function(opset_version(fn.opset_import, DEFAULT_OPSET),
                                       step_branch or mlstm_step_branch()))
    return model


# ---------------------------------------------------------------------------------------------
# sLSTM
# ---------------------------------------------------------------------------------------------


_R_F32 = "Rf"  # the sLSTM body's float32 r (NH, DH, 4*DH), a Scan state


def _slstm_scan_body() -> onnx.GraphProto:
    """One step: (h, c, n, m, r), x_t (B, NH, 4*DH) -> new state, r unchanged, y_t.

    r is a Scan state passed through, not a value captured from the function: OpenVINO's Scan
    takes only explicit inputs ("Number of Scan node inputs (5) is less than required (6)").
    """
    g = _Builder("sb_")
    h, c, n, m, r, x_t = "sb_h", "sb_c", "sb_n", "sb_m", "sb_r", "sb_x"
    rec = g.squeeze(g.op("MatMul", g.unsqueeze(h, [2]), r), [2])  # (B, NH, 4*DH)  h_{t-1} @ r[head]
    pre = g.op("Add", x_t, rec)  # (B, NH, 4*DH)
    i_p, f_p, z_p, o_p = g.op("Split", pre, axis=-1, num_outputs=4, n_out=4)  # each (B, NH, DH)
    log_f = g.logsigmoid(f_p)
    lfm = g.op("Add", log_f, m)  # (B, NH, DH)
    # n == 0 (a fresh sequence): m starts at i~ as in NX-AI's vanilla cell, so n_1 = 1 for any i~
    # (max(i~, lfm) would underflow i = exp(i~ - m) to 0 below i~ ~ -104: h = 0/0); f capped at 1
    zero = g.const(0.0, np.float32)
    m_new = g.op("Where", g.op("Equal", n, zero), i_p, g.op("Max", i_p, lfm), out=["sb_m_out"])
    i_a = g.op("Exp", g.op("Sub", i_p, m_new))
    f_a = g.op("Exp", g.op("Min", g.op("Sub", lfm, m_new), zero))
    c_new = g.op("Add", g.op("Mul", f_a, c), g.op("Mul", i_a, g.op("Tanh", z_p)), out=["sb_c_out"])
    n_new = g.op("Add", g.op("Mul", f_a, n), i_a, out=["sb_n_out"])
    h_new = g.op("Div", g.op("Mul", g.op("Sigmoid", o_p), c_new), n_new, out=["sb_h_out"])
    g.op("Identity", r, out=["sb_r_out"])
    g.op("Identity", h_new, out=["sb_y_out"])
    return helper.make_graph(
        g.nodes, "slstm_step",
        [_vi(h, _F), _vi(c, _F), _vi(n, _F), _vi(m, _F), _vi(r, _F), _vi(x_t, _F)],
        [_vi("sb_h_out", _F), _vi("sb_c_out", _F), _vi("sb_n_out", _F), _vi("sb_m_out", _F), _vi("sb_r_out", _F),
         _vi("sb_y_out", _F)],
    )


TimeLoop = Callable[[dict[str, str], dict[str, str]], onnx.NodeProto]


def slstm_function(opset: int = DEFAULT_OPSET, time_loop: TimeLoop | None = None) -> FunctionProto:
    """FunctionProto ``xlstm.sLSTM``: a Scan over time in standard ops, state (h, c, n, m, r).

    ``time_loop`` (a native kernel) makes the one node that runs the loop instead of the Scan: it
    gets the loop's float32 inputs {h0, c0, n0, m0: (B, NH, DH), x: (B, NH, S, 4*DH) with the bias
    added, r: (NH, DH, 4*DH)} and outputs {h, c, n, m, y: (B, NH, S, DH)} by name.
    """
    g = _Builder("")
    x = g.op("Cast", "x", to=_F)  # (B, NH, S, 4*DH)
    bias = g.unsqueeze(g.op("Cast", "b", to=_F), [1])  # (NH, 1, 4*DH)
    g.op("Cast", "r", to=_F, out=[_R_F32])  # (NH, DH, 4*DH)
    xb = g.op("Add", x, bias)  # (B, NH, S, 4*DH)
    h, c, n, m, _, y = g.op("Scan", "h0", "c0", "n0", "m0", _R_F32, xb, n_out=6, body=_slstm_scan_body(),
                            num_scan_inputs=1, scan_input_axes=[2], scan_output_axes=[2])
    if time_loop is not None:  # the same values from one node
        g.nodes[-1] = time_loop({"h0": "h0", "c0": "c0", "n0": "n0", "m0": "m0", "x": xb, "r": _R_F32},
                                {"h": h, "c": c, "n": n, "m": m, "y": y})
    for src, dst in ((h, "h"), (c, "c"), (n, "n"), (m, "m")):
        g.op("Identity", src, out=[dst])  # (B, NH, DH)
    g.op("CastLike", y, "x", out=["y"])  # (B, NH, S, DH) T
    return helper.make_function(
        DOMAIN, SLSTM.name, contract.input_names(SLSTM), contract.output_names(SLSTM), g.nodes,
        [helper.make_opsetid("", opset)],
        attribute_protos=_fn_attributes(SLSTM),
        doc_string=SLSTM.doc + " -- body: Scan over time",
    )


def functions(opset: int = DEFAULT_OPSET, ops: Sequence[str] = ("mLSTM", "sLSTM")) -> list[FunctionProto]:
    """The function bodies for ``ops`` at ai.onnx ``opset`` (must match the model's opset import)."""
    if opset < DEFAULT_OPSET:
        raise ValueError(f"the xlstm function bodies need ai.onnx opset >= {DEFAULT_OPSET}, got {opset}")
    build = {"mLSTM": mlstm_function, "sLSTM": slstm_function}
    return [build[contract.get_op(o).name](opset) for o in ops]


def cell_model(op: str, dtype: str = "float32", *, opset: int = DEFAULT_OPSET,
               dims: dict[str, int | str] | None = None, **attrs) -> ModelProto:
    """A one-node model running ``xlstm::<op>`` through its function body (tests, plugin checks).

    Graph inputs / outputs are named as in the contract; ``dims`` maps the contract's symbolic dims
    ("B", "NH", "S", "DQK", "DV", "DH") to ints or dim_param strings (default: B and S symbolic, the
    rest left unknown).
    """
    spec = contract.get_op(op)
    dtype = contract.canonical_dtype(dtype)
    attrs = spec.validate_attrs(attrs)
    dims = {"B": "B", "S": "S", **(dims or {})}

    def dim(d: str):  # "4*DH" -> 4 * dims["DH"] (None unless an int), "S" -> dims["S"]
        factor, _, name = d.rpartition("*")
        v = dims.get(name)
        return v if not factor else (int(factor) * v if isinstance(v, int) else None)

    def shape(t: contract.TensorSpec):
        return [dim(d) for d in t.dims]

    def vi(t: contract.TensorSpec):
        elem = _ONNX_ELEM[dtype] if t.dtype == "T" else TensorProto.FLOAT
        return helper.make_tensor_value_info(t.name, elem, shape(t))

    node = helper.make_node(spec.name, contract.input_names(spec), contract.output_names(spec),
                            domain=DOMAIN, name=f"{spec.name}_0", **attrs)
    graph = helper.make_graph([node], f"xlstm_{spec.name}", [vi(t) for t in spec.inputs],
                              [vi(t) for t in spec.outputs])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, contract.VERSION)],
        functions=functions(opset, [spec.name]), ir_version=10)
    return model
