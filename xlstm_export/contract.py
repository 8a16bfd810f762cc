"""The op contract of ``xlstm::mLSTM`` and ``xlstm::sLSTM`` (domain ``xlstm``, version 1), written once.

Everything that touches the two custom ops reads this module: the torch custom ops' fake
implementations (:mod:`xlstm_export.ops`), the ONNX schemas (type and shape inference, registered by
:func:`register_onnx_schemas`), the ONNX function bodies (:mod:`xlstm_export.onnx_functions`), the
TensorRT plugin descriptors (``xlstm_export.plugins``) and the tests / ``validate``.

Layout is head-first ``[B, NH, S, D]``; recurrent states are float32 in every dtype. The math is
exactly the cell API of :mod:`xlstm_export.kernels` (q is scaled by 1/sqrt(DQK) INSIDE the op)::

    xlstm::mLSTM(q, k, v, i, f, c0, n0, m0) -> (h, c, n, m)
        q, k  [B, NH, S, DQK] T        v [B, NH, S, DV] T       i, f [B, NH, S] T (gate pre-activations)
        c0    [B, NH, DQK, DV] float32  n0 [B, NH, DQK] float32  m0 [B, NH] float32
        h     [B, NH, S, DV] T          c, n, m like c0, n0, m0
        attrs chunk_size:int=64 (>= 1), eps:float=1e-6 (> 0), plugin_namespace="xlstm", plugin_version="1"

    xlstm::sLSTM(x, r, b, h0, c0, n0, m0) -> (y, h, c, n, m)
        x     [B, NH, S, 4*DH] T (W x per head, gate-major [i | f | z | o], no bias)
        r     [NH, DH, 4*DH] T  (pre-activations += h_{t-1} @ r[head])     b [NH, 4*DH] T
        h0, c0, n0, m0 [B, NH, DH] float32
        y     [B, NH, S, DH] T          h, c, n, m like h0
        attrs plugin_namespace="xlstm", plugin_version="1"

    T in {float32, float16, bfloat16}. All-zero initial states == a fresh sequence.

Shape rules (:func:`mlstm_output_shapes`, :func:`slstm_output_shapes`) only index and combine input
dims with ``+ - * //``, so they run unchanged on ints and on symbolic dims (TensorRT's
``tensorrt.plugin`` shape expressions). ONNX ``dim_param`` strings are handled by the schema
inference function here, which only forwards input dims (the rules never need arithmetic on them).

Example::

    >>> mlstm_output_shapes((2, 4, 7, 16), (2, 4, 7, 16), (2, 4, 7, 32))
    [(2, 4, 7, 32), (2, 4, 16, 32), (2, 4, 16), (2, 4)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DOMAIN = "xlstm"  # ONNX domain and TensorRT plugin namespace
VERSION = 1  # ONNX opset version of the domain
PLUGIN_NAMESPACE = "xlstm"  # value of the plugin_namespace attribute on every node
PLUGIN_VERSION = "1"  # value of the plugin_version attribute on every node
LAYOUT = "head-first [B, NH, S, D]"  # sequence tensors; states [B, NH, ...], batch first

# Element types a "T" tensor may have (names as numpy / torch spell them).
T_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
STATE_DTYPE = "float32"


# ---------------------------------------------------------------------------------------------
# Declarative specs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an op."""

    name: str  # ONNX / plugin name of the tensor
    dims: tuple[str, ...]  # symbolic dims, e.g. ("B", "NH", "S", "DQK"); "4*DH" is a product
    dtype: Literal["T", "float32"]  # "T": any of T_DTYPES, the same for all T tensors of the node
    doc: str = ""

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def is_state(self) -> bool:
        return self.dtype == STATE_DTYPE


@dataclass(frozen=True)
class AttrSpec:
    """One node attribute with its default and valid range."""

    name: str
    type: Literal["int", "float", "str"]
    default: int | float | str
    doc: str = ""
    check: Callable[[Any], bool] | None = None  # None: any value of the type
    check_doc: str = ""  # the valid range in words, for error messages

    def validate(self, op: str, value: Any) -> Any:
        py = {"int": int, "float": (int, float), "str": str}[self.type]
        if isinstance(value, bool) or not isinstance(value, py):
            raise ValueError(f"{op}: attribute {self.name} must be {self.type}, got {value!r}")
        if self.check is not None and not self.check(value):
            raise ValueError(f"{op}: attribute {self.name} must be {self.check_doc}, got {value!r}")
        return value


@dataclass(frozen=True)
class OpSpec:
    """One custom op: name, domain, version, inputs, outputs, attributes."""

    name: str  # "mLSTM" / "sLSTM"
    domain: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[AttrSpec, ...]
    doc: str = ""
    type_param: str = "T"
    type_dtypes: tuple[str, ...] = T_DTYPES

    @property
    def qualname(self) -> str:  # "xlstm::mLSTM", as torch.library and TensorRT spell it
        return f"{self.domain}::{self.name}"

    def attr(self, name: str) -> AttrSpec:
        for a in self.attrs:
            if a.name == name:
                return a
        raise KeyError(f"{self.qualname} has no attribute {name!r}; it has {[a.name for a in self.attrs]}")

    def defaults(self) -> dict[str, int | float | str]:
        return {a.name: a.default for a in self.attrs}

    def validate_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, every value checked; unknown names raise."""
        unknown = set(attrs) - {a.name for a in self.attrs}
        if unknown:
            raise ValueError(f"{self.qualname}: unknown attributes {sorted(unknown)}")
        out = self.defaults()
        out.update(attrs)
        return {a.name: a.validate(self.qualname, out[a.name]) for a in self.attrs}


_PLUGIN_ATTRS = (
    AttrSpec("plugin_namespace", "str", PLUGIN_NAMESPACE,
             "TensorRT plugin namespace: the ONNX parser routes the node to the registered plugin",
             lambda v: v == PLUGIN_NAMESPACE, f"{PLUGIN_NAMESPACE!r}"),
    AttrSpec("plugin_version", "str", PLUGIN_VERSION, "TensorRT plugin version",
             lambda v: v == PLUGIN_VERSION, f"{PLUGIN_VERSION!r}"),
)

MLSTM = OpSpec(
    name="mLSTM",
    domain=DOMAIN,
    version=VERSION,
    inputs=(
        TensorSpec("q", ("B", "NH", "S", "DQK"), "T", "queries, unscaled (the op scales by 1/sqrt(DQK))"),
        TensorSpec("k", ("B", "NH", "S", "DQK"), "T", "keys"),
        TensorSpec("v", ("B", "NH", "S", "DV"), "T", "values"),
        TensorSpec("i", ("B", "NH", "S"), "T", "input-gate pre-activation (exp gate)"),
        TensorSpec("f", ("B", "NH", "S"), "T", "forget-gate pre-activation (logsigmoid gate)"),
        TensorSpec("c0", ("B", "NH", "DQK", "DV"), "float32", "initial matrix memory"),
        TensorSpec("n0", ("B", "NH", "DQK"), "float32", "initial normalizer"),
        TensorSpec("m0", ("B", "NH"), "float32", "initial stabilizer"),
    ),
    outputs=(
        TensorSpec("h", ("B", "NH", "S", "DV"), "T", "hidden states"),
        TensorSpec("c", ("B", "NH", "DQK", "DV"), "float32", "final matrix memory"),
        TensorSpec("n", ("B", "NH", "DQK"), "float32", "final normalizer"),
        TensorSpec("m", ("B", "NH"), "float32", "final stabilizer"),
    ),
    attrs=(
        AttrSpec("chunk_size", "int", 64, "chunk length of the chunkwise form (a performance knob: "
                 "the result does not depend on it beyond rounding)", lambda v: v >= 1, ">= 1"),
        AttrSpec("eps", "float", 1e-6, "added to the denominator max(|n^T q|, exp(-m))",
                 lambda v: v > 0 and math.isfinite(v), "> 0 and finite"),
        *_PLUGIN_ATTRS,
    ),
    doc="mLSTM cell over a sequence (head-first, float32 state; q scaled by 1/sqrt(DQK) inside)",
)

SLSTM = OpSpec(
    name="sLSTM",
    domain=DOMAIN,
    version=VERSION,
    inputs=(
        TensorSpec("x", ("B", "NH", "S", "4*DH"), "T", "W x per head, gate-major [i | f | z | o], no bias"),
        TensorSpec("r", ("NH", "DH", "4*DH"), "T", "recurrent weights: pre-activations += h_{t-1} @ r[head]"),
        TensorSpec("b", ("NH", "4*DH"), "T", "bias, gate-major"),
        TensorSpec("h0", ("B", "NH", "DH"), "float32", "initial hidden state"),
        TensorSpec("c0", ("B", "NH", "DH"), "float32", "initial cell state"),
        TensorSpec("n0", ("B", "NH", "DH"), "float32", "initial normalizer"),
        TensorSpec("m0", ("B", "NH", "DH"), "float32", "initial stabilizer"),
    ),
    outputs=(
        TensorSpec("y", ("B", "NH", "S", "DH"), "T", "hidden state of every step"),
        TensorSpec("h", ("B", "NH", "DH"), "float32", "final hidden state"),
        TensorSpec("c", ("B", "NH", "DH"), "float32", "final cell state"),
        TensorSpec("n", ("B", "NH", "DH"), "float32", "final normalizer"),
        TensorSpec("m", ("B", "NH", "DH"), "float32", "final stabilizer"),
    ),
    attrs=_PLUGIN_ATTRS,
    doc="sLSTM cell over a sequence (head-first, gate order i, f, z, o; float32 state)",
)

OPS: dict[str, OpSpec] = {"mLSTM": MLSTM, "sLSTM": SLSTM}


def get_op(op: str | OpSpec) -> OpSpec:
    """``"mLSTM"``, ``"xlstm::mLSTM"`` or an OpSpec -> the OpSpec."""
    if isinstance(op, OpSpec):
        return op
    name = op.split("::")[-1]
    if name not in OPS:
        raise KeyError(f"unknown xlstm op {op!r}; known: {sorted(OPS)}")
    return OPS[name]


def input_names(op: str | OpSpec) -> list[str]:
    return [t.name for t in get_op(op).inputs]


def output_names(op: str | OpSpec) -> list[str]:
    return [t.name for t in get_op(op).outputs]


# ---------------------------------------------------------------------------------------------
# Shape rules: ints or symbolic dims (anything with + - * //)
# ---------------------------------------------------------------------------------------------


def mlstm_output_shapes(q_shape: Sequence, k_shape: Sequence, v_shape: Sequence) -> list[tuple]:
    """[h, c, n, m] shapes of xlstm::mLSTM from q (B,NH,S,DQK), k (B,NH,S,DQK), v (B,NH,S,DV)."""
    B, NH, S, DQK = q_shape[0], q_shape[1], q_shape[2], q_shape[3]
    DV = v_shape[3]
    return [(B, NH, S, DV), (B, NH, DQK, DV), (B, NH, DQK), (B, NH)]


def slstm_output_shapes(x_shape: Sequence, r_shape: Sequence) -> list[tuple]:
    """[y, h, c, n, m] shapes of xlstm::sLSTM from x (B,NH,S,4*DH) and r (NH,DH,4*DH)."""
    B, NH, S = x_shape[0], x_shape[1], x_shape[2]
    DH = r_shape[1]  # static weight dim: no division needed on symbolic dims
    return [(B, NH, S, DH), (B, NH, DH), (B, NH, DH), (B, NH, DH), (B, NH, DH)]


def output_shapes(op: str | OpSpec, shapes: Sequence[Sequence]) -> list[tuple]:
    """Output shapes of ``op`` from the shapes of ALL its inputs (in contract order)."""
    spec = get_op(op)
    if spec is MLSTM:
        return mlstm_output_shapes(shapes[0], shapes[1], shapes[2])
    return slstm_output_shapes(shapes[0], shapes[1])


def _dim_env(spec: OpSpec, shapes: Sequence[Sequence]) -> dict[str, Any]:
    """Symbolic dim name -> value, read from the inputs that define each dim first."""
    if spec is MLSTM:
        q = shapes[0]
        return {"B": q[0], "NH": q[1], "S": q[2], "DQK": q[3], "DV": shapes[2][3]}
    x, r = shapes[0], shapes[1]
    return {"B": x[0], "NH": x[1], "S": x[2], "DH": r[1]}


def expected_shape(spec: OpSpec, tensor: TensorSpec, env: dict[str, Any]) -> tuple:
    """Shape of ``tensor`` given the dim values ``env`` ("4*DH" -> 4 * env["DH"])."""
    out = []
    for d in tensor.dims:
        if "*" in d:
            factor, name = d.split("*")
            out.append(int(factor) * env[name])
        else:
            out.append(env[d])
    return tuple(out)


def validate_shapes(op: str | OpSpec, shapes: Sequence[Sequence[int]]) -> list[tuple]:
    """Check every input shape against the op's dims; return the output shapes.

    ``shapes`` holds concrete int shapes of all inputs in contract order. Raises ValueError naming the
    op, the input, and the expected and actual shapes.
    """
    spec = get_op(op)
    if len(shapes) != len(spec.inputs):
        raise ValueError(f"{spec.qualname}: expected {len(spec.inputs)} inputs "
                         f"({input_names(spec)}), got {len(shapes)}")
    for t, s in zip(spec.inputs, shapes):
        if len(s) != t.rank:
            raise ValueError(f"{spec.qualname}: input {t.name} must have rank {t.rank} "
                             f"{list(t.dims)}, got shape {tuple(s)}")
    env = _dim_env(spec, shapes)
    for t, s in zip(spec.inputs, shapes):
        want = expected_shape(spec, t, env)
        if tuple(int(d) for d in s) != tuple(int(d) for d in want):
            raise ValueError(f"{spec.qualname}: input {t.name} {list(t.dims)} expected shape "
                             f"{tuple(want)}, got {tuple(s)}")
    for name in ("B", "NH", "S", "DQK", "DV", "DH"):
        if name in env and int(env[name]) < 1:
            raise ValueError(f"{spec.qualname}: dim {name} must be >= 1, got {env[name]} "
                             f"(input shapes {[tuple(s) for s in shapes]})")
    return output_shapes(spec, shapes)


def validate_dtypes(op: str | OpSpec, dtypes: Sequence[str]) -> str:
    """Check input dtype names (``"float32"``...); return T. Raises ValueError naming the input."""
    spec = get_op(op)
    t_dtype = None
    for t, d in zip(spec.inputs, dtypes):
        d = str(d).replace("torch.", "")
        if t.dtype == "T":
            if d not in spec.type_dtypes:
                raise ValueError(f"{spec.qualname}: input {t.name} dtype must be one of "
                                 f"{spec.type_dtypes}, got {d}")
            if t_dtype is None:
                t_dtype = d
            elif d != t_dtype:
                raise ValueError(f"{spec.qualname}: input {t.name} dtype {d} differs from T={t_dtype} "
                                 f"of input {spec.inputs[0].name}")
        elif d != STATE_DTYPE:
            raise ValueError(f"{spec.qualname}: state input {t.name} must be float32, got {d}")
    return t_dtype


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` (torch.allclose semantics)."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class DtypeTolerance:
    outputs: Tolerance  # h / y / logits in dtype T
    states: Tolerance  # final states, always float32 but computed from T-rounded inputs
    reason: str = ""


# Tolerances of one implementation against another on the same inputs (the float32 reference
# applied to the same dtype-T inputs, or ORT vs PyTorch at the same dtype).
TOLERANCES: dict[str, DtypeTolerance] = {
    # float32: both sides compute in float32; differences are summation order only.
    "float32": DtypeTolerance(Tolerance(1e-4, 1e-5), Tolerance(1e-4, 1e-5), "summation order"),
    # float16: outputs are rounded to fp16 (unit roundoff 4.9e-4) and implementations may keep
    # intermediates in fp16 at different points; a few roundings accumulate.
    "float16": DtypeTolerance(Tolerance(1e-2, 1e-2), Tolerance(1e-2, 1e-2),
                              "fp16 rounding (2^-11) of inputs / intermediates at different points"),
    # bfloat16: 8-bit mantissa (unit roundoff 3.9e-3); one rounding of an intermediate already
    # moves a value by ~0.4 %, a few accumulate through the gates and the exp stabilizer.
    "bfloat16": DtypeTolerance(Tolerance(5e-2, 5e-2), Tolerance(5e-2, 5e-2),
                               "bf16 rounding (2^-8) of inputs / intermediates at different points"),
}

# Relative error (max |a - e| / max |e|) allowed for whole-model logits and states of an export in
# that dtype, against the PyTorch model in float32 or in the export's dtype (what `validate`
# reports against). Measured on the tiny presets (random weights, B <= 3, S <= 129):
# float32: the 1e-4 requirement (measured ~1e-6).
# float16: every weight and activation rounded to fp16; measured up to ~1e-2 vs float32 and
#   ~6e-3 vs PyTorch fp16.
# bfloat16: 8 mantissa bits; onnxruntime (CPU: float32 arithmetic over bf16 weights) measured up to
#   ~2.5e-2 vs float32 and ~3.3e-2 vs PyTorch bf16; PyTorch bf16 itself is ~4.5e-2 off float32.
MAX_RELATIVE_ERROR: dict[str, float] = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 8e-2}

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "float": "float32",
                 "half": "float16"}


def canonical_dtype(dtype: Any) -> str:
    """"fp16", "float16", torch.float16, np.float16 -> "float16"."""
    s = str(dtype).replace("torch.", "")
    s = DTYPE_ALIASES.get(s, s)
    if s not in T_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {T_DTYPES} (or fp32/fp16/bf16)")
    return s


def tolerance(dtype: Any) -> DtypeTolerance:
    return TOLERANCES[canonical_dtype(dtype)]


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| (scale-aware; 0/0 -> 0), computed in float64."""
    import numpy as np

    a = _to_numpy64(actual)
    e = _to_numpy64(expected)
    if a.shape != e.shape:
        raise ValueError(f"relative_error: shapes differ {a.shape} vs {e.shape}")
    if a.size == 0:
        return 0.0
    err = float(np.max(np.abs(a - e)))
    scale = float(np.max(np.abs(e)))
    if not (math.isfinite(err) and math.isfinite(scale)):
        return math.inf
    return err / scale if scale > 0 else err


def max_abs_error(actual, expected) -> float:
    import numpy as np

    a, e = _to_numpy64(actual), _to_numpy64(expected)
    return float(np.max(np.abs(a - e))) if a.size else 0.0


def _to_numpy64(x):
    import numpy as np

    if hasattr(x, "detach"):  # torch tensor (bf16 has no numpy dtype)
        return x.detach().to("cpu").double().numpy()
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# ONNX schemas (type + shape inference) -> infer_shapes and check_model(full_check=True) pass
# ---------------------------------------------------------------------------------------------

_ONNX_TYPE_STR = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)"}


def _onnx_attr_type(t: str):
    from onnx.defs import OpSchema

    return {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT,
            "str": OpSchema.AttrType.STRING}[t]


def _make_onnx_attribute(a: AttrSpec):
    import onnx.helper
    from onnx.defs import OpSchema

    return OpSchema.Attribute(a.name, onnx.helper.make_attribute(a.name, a.default),
                              f"{a.doc} ({a.check_doc})" if a.check_doc else a.doc)


def _onnx_dims(type_proto) -> list | None:
    """TypeProto -> list of int (dim_value) / str (dim_param) / None (unknown), or None if unranked."""
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    out = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _make_inference_function(spec: OpSpec):
    import onnx
    from onnx import TensorProto, helper

    def infer(ctx) -> None:
        n_in = ctx.get_num_inputs()
        types = [ctx.get_input_type(j) if ctx.has_input(j) else None for j in range(n_in)]
        t_elem = TensorProto.UNDEFINED
        for t, tp in zip(spec.inputs, types):
            if t.dtype == "T" and tp is not None and tp.tensor_type.elem_type:
                t_elem = tp.tensor_type.elem_type
                break
        shapes = [(_onnx_dims(tp) if tp is not None else None) for tp in types]
        # rank checks (static rank is part of the contract)
        for t, s in zip(spec.inputs, shapes):
            if s is not None and len(s) != t.rank:
                raise onnx.shape_inference.InferenceError(
                    f"[ShapeInferenceError] {spec.qualname}: input {t.name} must have rank "
                    f"{t.rank} {list(t.dims)}, got {len(s)}")
        out_shapes = None
        need = (0, 1, 2) if spec is MLSTM else (0, 1)
        if all(shapes[j] is not None for j in need):
            out_shapes = output_shapes(spec, [shapes[j] if j in need else None
                                              for j in range(len(spec.inputs))])
            # int-only consistency checks; dim_params / unknowns are left to runtime
            env = _dim_env(spec, [s if s is not None else [None] * t.rank
                                  for t, s in zip(spec.inputs, shapes)])
            for t, s in zip(spec.inputs, shapes):
                if s is None:
                    continue
                for name, dim, have in zip(t.dims, _expected_or_none(t, env), s):
                    if isinstance(dim, int) and isinstance(have, int) and dim != have:
                        raise onnx.shape_inference.InferenceError(
                            f"[ShapeInferenceError] {spec.qualname}: input {t.name} {list(t.dims)} "
                            f"dim {name} expected {dim}, got {have} (shape {s})")
        for j, t in enumerate(spec.outputs):
            if j >= ctx.get_num_outputs() or not ctx.has_output(j):
                continue
            elem = TensorProto.FLOAT if t.dtype == "float32" else t_elem
            if elem == TensorProto.UNDEFINED:
                continue
            shape = None
            if out_shapes is not None:
                shape = [d if isinstance(d, (int, str)) else None for d in out_shapes[j]]
            ctx.set_output_type(j, helper.make_tensor_type_proto(elem, shape))

    return infer


def _expected_or_none(t: TensorSpec, env: dict[str, Any]) -> list:
    out = []
    for d in t.dims:
        if "*" in d:
            factor, name = d.split("*")
            v = env.get(name)
            out.append(int(factor) * v if isinstance(v, int) else None)
        else:
            out.append(env.get(d))
    return out


_REGISTERED = False


def onnx_schema(op: str | OpSpec):
    """The onnx.defs.OpSchema of ``op`` (not registered; see :func:`register_onnx_schemas`)."""
    from onnx.defs import OpSchema

    spec = get_op(op)
    allowed = [_ONNX_TYPE_STR[d] for d in spec.type_dtypes]

    def param(t: TensorSpec):
        type_str = spec.type_param if t.dtype == "T" else "tensor(float)"
        return OpSchema.FormalParameter(t.name, type_str, f"{list(t.dims)} {t.doc}")

    schema = OpSchema(
        spec.name, spec.domain, spec.version, spec.doc,
        inputs=[param(t) for t in spec.inputs],
        outputs=[param(t) for t in spec.outputs],
        type_constraints=[(spec.type_param, allowed, "element type of the sequence tensors")],
        attributes=[_make_onnx_attribute(a) for a in spec.attrs],
    )
    schema.set_type_and_shape_inference_function(_make_inference_function(spec))
    return schema


def register_onnx_schemas() -> None:
    """Register both schemas with onnx (idempotent), so shape inference and the checker know them."""
    global _REGISTERED
    if _REGISTERED:
        return
    import onnx.defs

    for spec in OPS.values():
        if onnx.defs.has(spec.name, spec.version, spec.domain):
            existing = onnx.defs.get_schema(spec.name, spec.version, spec.domain)
            if existing.since_version == spec.version:
                continue
        onnx.defs.register_schema(onnx_schema(spec))
    _REGISTERED = True


__all__ = [
    "DOMAIN",
    "LAYOUT",
    "MAX_RELATIVE_ERROR",
    "MLSTM",
    "OPS",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "SLSTM",
    "STATE_DTYPE",
    "TOLERANCES",
    "T_DTYPES",
    "VERSION",
    "AttrSpec",
    "DtypeTolerance",
    "OpSpec",
    "TensorSpec",
    "Tolerance",
    "canonical_dtype",
    "get_op",
    "input_names",
    "max_abs_error",
    "mlstm_output_shapes",
    "onnx_schema",
    "output_names",
    "output_shapes",
    "register_onnx_schemas",
    "relative_error",
    "slstm_output_shapes",
    "tolerance",
    "validate_dtypes",
    "validate_shapes",
]
