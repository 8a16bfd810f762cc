"""The op contract of ``xlstm::mLSTM`` and ``xlstm::sLSTM`` (domain ``xlstm``, version 1), written once.

Everything that touches the two custom ops reads this module: the torch custom ops' fake
implementations (:mod:`xlstm_export.kernels.custom_op`), the ONNX schemas (type and shape
inference, registered by :func:`register_onnx_schemas`), the ONNX function bodies
(:mod:`xlstm_export.onnx_functions`), the TensorRT plugin descriptors (``xlstm_export.plugins``)
and the tests / ``validate``.

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

Every implementation (the PyTorch references, the Triton kernels) checks its inputs with
:func:`check_inputs`: the shapes, dtypes and attribute ranges below, plus the capabilities it
states (a reference also takes float64; Triton's chunk_size is a power of two >= 16).

Shape rules (:func:`mlstm_output_shapes`, :func:`slstm_output_shapes`) only index and combine input
dims with ``+ - * //``, so they run unchanged on ints and on symbolic dims (TensorRT's
``tensorrt.plugin`` shape expressions). ONNX ``dim_param`` strings are handled by the schema
inference function here, which only forwards input dims (the rules never need arithmetic on them).

Example::

    >>> mlstm_output_shapes((2, 4, 7, 16), (2, 4, 7, 16), (2, 4, 7, 32))
    [(2, 4, 7, 32), (2, 4, 16, 32), (2, 4, 16), (2, 4)]
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
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

    @functools.cached_property
    def parsed_dims(self) -> tuple[tuple[str, str, str], ...]:
        """(dim, factor, name) per dim: "4*DH" -> ("4*DH", "4", "DH"), "B" -> ("B", "", "B")."""
        return tuple((d, *d.rpartition("*")[::2]) for d in self.dims)


@dataclass(frozen=True)
class AttrSpec:
    """One node attribute with its default and valid range (the one statement of that range: the
    ONNX schema, the fake impl, the plugins and every kernel entry point read it from here)."""

    name: str
    type: Literal["int", "float", "str"]
    default: int | float | str
    doc: str = ""
    minimum: float | None = None  # numbers: value >= minimum (> minimum when exclusive); floats finite
    exclusive: bool = False
    choices: tuple[str, ...] = ()  # strings: the allowed values (empty: any)

    def check(self, value: Any) -> bool:
        if self.choices and value not in self.choices:
            return False
        if self.type == "float" and not math.isfinite(value):
            return False
        if self.minimum is None:
            return True
        return value > self.minimum if self.exclusive else value >= self.minimum

    @property
    def check_doc(self) -> str:
        """The valid range in words, as the op's error messages and the ONNX schema write it."""
        if self.choices:
            return " or ".join(repr(c) for c in self.choices)
        if self.minimum is None:
            return "finite" if self.type == "float" else ""
        rng = f"{'>' if self.exclusive else '>='} {self.minimum:g}"
        return f"{rng} and finite" if self.type == "float" else rng

    @property
    def words(self) -> str:
        """The same range as a phrase for a function's argument ("a positive int")."""
        positive = self.minimum is not None and (
            (self.minimum == 0 and self.exclusive) or (self.type == "int" and self.minimum == 1 and not self.exclusive))
        if positive:
            return f"a {'finite ' if self.type == 'float' else ''}positive {self.type}"
        return f"a {self.type} {self.check_doc}".rstrip()

    def validate(self, op: str, value: Any, *, argument: bool = False) -> Any:
        """``value`` checked; raises ValueError naming ``op`` (the op, or with ``argument`` the
        function whose keyword argument it is), the attribute, the range and the value."""
        py = {"int": int, "float": (int, float), "str": str}[self.type]
        ok_type = not isinstance(value, bool) and isinstance(value, py)
        if argument and not (ok_type and self.check(value)):
            raise ValueError(f"{op}: {self.name} must be {self.words}, got {value!r}")
        if not ok_type:
            raise ValueError(f"{op}: attribute {self.name} must be {self.type}, got {value!r}")
        if not self.check(value):
            raise ValueError(f"{op}: attribute {self.name} must be {self.check_doc}, got {value!r}")
        return value


@dataclass(frozen=True)
class OpSpec:
    """One custom op: name, domain, version, inputs, outputs, attributes."""

    name: str  # "mLSTM" / "sLSTM"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attrs: tuple[AttrSpec, ...]
    doc: str = ""
    domain: str = DOMAIN
    version: int = VERSION
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

    @functools.cached_property
    def split_inputs(self) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(the sequence inputs and weights, the states), each in contract order."""
        return tuple(t for t in self.inputs if not t.is_state), tuple(t for t in self.inputs if t.is_state)

    @functools.cached_property
    def dims(self) -> tuple[str, ...]:
        """The op's dim names in order of first use: ("B", "NH", "S", "DQK", "DV") / (..., "DH")."""
        out: list[str] = []
        for t in self.inputs:
            for d in t.dims:
                name = d.split("*")[-1]
                if name not in out:
                    out.append(name)
        return tuple(out)

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
             choices=(PLUGIN_NAMESPACE,)),
    AttrSpec("plugin_version", "str", PLUGIN_VERSION, "TensorRT plugin version", choices=(PLUGIN_VERSION,)),
)

def _finals(states: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    """The final-state outputs: each initial state's name without the 0, same dims and dtype."""
    return tuple(TensorSpec(t.name.rstrip("0"), t.dims, t.dtype, t.doc.replace("initial", "final")) for t in states)


_MLSTM_STATES = (
    TensorSpec("c0", ("B", "NH", "DQK", "DV"), "float32", "initial matrix memory"),
    TensorSpec("n0", ("B", "NH", "DQK"), "float32", "initial normalizer"),
    TensorSpec("m0", ("B", "NH"), "float32", "initial stabilizer"),
)

MLSTM = OpSpec(
    name="mLSTM",
    inputs=(
        TensorSpec("q", ("B", "NH", "S", "DQK"), "T", "queries, unscaled (the op scales by 1/sqrt(DQK))"),
        TensorSpec("k", ("B", "NH", "S", "DQK"), "T", "keys"),
        TensorSpec("v", ("B", "NH", "S", "DV"), "T", "values"),
        TensorSpec("i", ("B", "NH", "S"), "T", "input-gate pre-activation (exp gate)"),
        TensorSpec("f", ("B", "NH", "S"), "T", "forget-gate pre-activation (logsigmoid gate)"),
        *_MLSTM_STATES,
    ),
    outputs=(TensorSpec("h", ("B", "NH", "S", "DV"), "T", "hidden states"), *_finals(_MLSTM_STATES)),
    attrs=(
        AttrSpec("chunk_size", "int", 64, "chunk length of the chunkwise form (a performance knob: "
                 "the result does not depend on it beyond rounding)", minimum=1),
        # eps > 0: the denominator max(|n^T q|, exp(-m)) + eps is already > 0 for eps = 0 (the
        # references evaluate that limit, see kernels/mlstm/naive.py); the op keeps eps > 0
        AttrSpec("eps", "float", 1e-6, "added to the denominator max(|n^T q|, exp(-m))",
                 minimum=0.0, exclusive=True),
        *_PLUGIN_ATTRS,
    ),
    doc="mLSTM cell over a sequence (head-first, float32 state; q scaled by 1/sqrt(DQK) inside)",
)

_SLSTM_STATES = tuple(TensorSpec(f"{name}0", ("B", "NH", "DH"), "float32", f"initial {doc}") for name, doc in
                      (("h", "hidden state"), ("c", "cell state"), ("n", "normalizer"), ("m", "stabilizer")))

SLSTM = OpSpec(
    name="sLSTM",
    inputs=(
        TensorSpec("x", ("B", "NH", "S", "4*DH"), "T", "W x per head, gate-major [i | f | z | o], no bias"),
        TensorSpec("r", ("NH", "DH", "4*DH"), "T", "recurrent weights: pre-activations += h_{t-1} @ r[head]"),
        TensorSpec("b", ("NH", "4*DH"), "T", "bias, gate-major"),
        *_SLSTM_STATES,
    ),
    outputs=(TensorSpec("y", ("B", "NH", "S", "DH"), "T", "hidden state of every step"), *_finals(_SLSTM_STATES)),
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
    """Symbolic dim name -> value, each read from the first input (contract order) that has it as
    a plain dim: a product ("4*DH") never defines its factor, so nothing is divided and the rule
    runs on symbolic dims (DH comes from r)."""
    env: dict[str, Any] = {}
    for t, s in zip(spec.inputs, shapes):
        for d, v in zip(t.dims, s):
            if "*" not in d and d not in env:
                env[d] = v
    return env


def expected_shape(spec: OpSpec, tensor: TensorSpec, env: dict[str, Any]) -> tuple:
    """Shape of ``tensor`` given the dim values ``env`` ("4*DH" -> 4 * env["DH"])."""
    return tuple(int(factor) * env[name] if factor else env[name] for _, factor, name in tensor.parsed_dims)


# The Python cell API (kernels/) spells the mLSTM head dims DHQK / DHV (mlstm_kernels' names).
CELL_DIM_NAMES = {"DQK": "DHQK", "DV": "DHV"}
# How a mismatching state shape is worded: the mLSTM states name the values first
# ("state c must be (2, 2, 4, 6) (B, NH, DHQK, DHV), got ..."), everything else the dims first
# ("state h must be (B, NH, DH) = (2, 3, 4), got ..."); tests match both wordings.
_VALUES_FIRST_STATES = ("mLSTM",)


def _fmt(shape: Sequence) -> str:
    return str(tuple(int(d) if isinstance(d, int) else d for d in shape))


def _dim_doc(d: str, names: dict[str, str]) -> str:
    factor, star, name = d.rpartition("*")
    return f"{factor}{star}{names.get(name, name)}"


def _dims_doc(t: TensorSpec, names: dict[str, str]) -> str:
    return "(" + ", ".join(_dim_doc(d, names) for d in t.dims) + ")"


def _check_shapes(spec: OpSpec, who: str, shapes: Sequence[Sequence[int] | None], label, names: dict[str, str],
                  products: bool, mismatch=None) -> dict[str, int]:
    """The shape rules of ``spec`` on concrete shapes (None: an input not given); returns the dims.

    ``label(t)`` names an input in messages ("k", "state c"); ``names`` renames dims for the
    messages (the cell API's DHQK). A wrong shape reads ``{who}: {label} must be {dims} =
    {expected}, got {actual}``, or ``mismatch(t, expected, actual)`` when given."""
    # 1. the dims, each from the first input that has it; that input's rank must be right
    env: dict[str, int] = {}
    origin: dict[str, tuple[TensorSpec, Sequence[int]]] = {}
    for t, s in zip(spec.inputs, shapes):
        if s is None:
            continue
        parsed = t.parsed_dims
        new = [d for d, factor, name in parsed if name not in env and (products or not factor)]
        if not new:
            continue
        if len(s) != t.rank:
            raise ValueError(f"{who}: {label(t)} must be {_dims_doc(t, names)}, got shape {_fmt(s)} "
                             f"({label(t)} must have {t.rank} dims)")
        for j, ((d, factor, name), v) in enumerate(zip(parsed, s)):
            if d not in new:
                continue
            if factor and (v < int(factor) or v % int(factor)):
                where = "the last dim" if j == t.rank - 1 else f"dim {j}"
                raise ValueError(f"{who}: {where} of {label(t)} must be {_dim_doc(d, names)} "
                                 f"(a positive multiple of {factor}), got {label(t)} of shape {_fmt(s)}")
            if name not in env:
                env[name] = v // int(factor) if factor else v
                origin[name] = (t, s)
    # 2. every given input against the dims
    for t, s in zip(spec.inputs, shapes):
        if s is None:
            continue
        want = expected_shape(spec, t, env)
        if tuple(s) != tuple(want):  # no int(): symbolic (traced) dims compare without specializing
            if mismatch is not None:
                raise ValueError(mismatch(t, want, s))
            if t.is_state and spec.name in _VALUES_FIRST_STATES:
                raise ValueError(f"{who}: {label(t)} must be {_fmt(want)} {_dims_doc(t, names)}, got {_fmt(s)}")
            raise ValueError(f"{who}: {label(t)} must be {_dims_doc(t, names)} = {_fmt(want)}, got {_fmt(s)}")
    # 3. no empty dim
    for name, v in env.items():
        if v < 1:
            t, s = origin[name]
            raise ValueError(f"{who}: dim {names.get(name, name)} must be >= 1, got {label(t)} of shape {_fmt(s)}")
    return env


def check_rank(spec: OpSpec, t: TensorSpec, ndim: int, got: str) -> None:
    """One input's rank against the op's dims: ValueError naming the op, the input, both ranks
    (``got`` says what was seen: "shape (2, 3)", "rank 2")."""
    if ndim != t.rank:
        raise ValueError(f"{spec.qualname}: input {t.name} must have rank {t.rank} {list(t.dims)}, got {got}")


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
        check_rank(spec, t, len(s), f"shape {_fmt(s)}")

    def mismatch(t: TensorSpec, want: tuple, got: Sequence) -> str:
        return f"{spec.qualname}: input {t.name} {list(t.dims)} expected shape {_fmt(want)}, got {_fmt(got)}"

    _check_shapes(spec, spec.qualname, shapes, lambda t: f"input {t.name}", {}, False, mismatch)
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


@functools.lru_cache(maxsize=64)
def _dtype_str(dtype) -> str:
    """"float32" for torch.float32 (or numpy's float32)."""
    return str(dtype).replace("torch.", "")


def _words(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def check_inputs(
    op: str | OpSpec,
    fn: str,
    inputs: Sequence,  # the sequence inputs and weights in contract order: (q, k, v, i, f) / (x, r, b)
    state: Sequence | None = None,  # None or the states in contract order: (c, n, m) / (h, c, n, m)
    attrs: dict[str, Any] | None = None,  # attribute values passed as keyword arguments
    *,
    dtypes: Sequence[str] = T_DTYPES,  # what the implementation takes for T (a reference: float64 too)
    same_dtype: Sequence[str] = (),  # inputs that must share one dtype (the kernel's tl.dot operands)
    state_dtypes: Sequence[str] | None = (STATE_DTYPE,),  # None: any floating point (cast inside)
    state_required: bool = False,
    step: bool = False,  # a decoding step: S must be 1
    allow: dict[str, tuple] | None = None,  # attribute values an implementation takes beyond the range
) -> tuple[int, ...]:
    """The one input check of every implementation of ``op`` (the naive references, the Triton
    kernels); returns the dims in ``spec.dims`` order ((B, NH, S, DQK, DV) / (B, NH, S, DH)).

    Works on torch tensors or anything with ``.shape``, ``.dtype`` and ``.device``. Raises
    TypeError for a non-tensor and ValueError otherwise, each naming ``fn``, the tensor or
    attribute, what was expected and what came. The op's facts (shapes, state dtype, attribute
    ranges) come from the spec; the keyword arguments state an implementation's capabilities.

    Example::

        >>> B, NH, S, DHQK, DHV = check_inputs(MLSTM, "chunk_mlstm", (q, k, v, i, f), state,
        ...                                    {"chunk_size": 64, "eps": 1e-6}, same_dtype="qkv")
    """
    spec = get_op(op)
    seq, states = spec.split_inputs
    if state is None and state_required:
        raise ValueError(f"{fn}: state is required, got None (use zeros for a fresh sequence)")
    if state is not None and (not isinstance(state, (tuple, list)) or len(state) != len(states)):
        state_doc = "(" + ", ".join(t.name.rstrip("0") for t in states) + ")"
        raise ValueError(f"{fn}: state must be None or a tuple {state_doc}, got {type(state).__name__}"
                         + (f" of length {len(state)}" if isinstance(state, (tuple, list)) else ""))
    given = list(zip(seq, inputs)) + list(zip(states, state or ()))
    first = seq[0].name
    for t, x in given:
        if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "device")):
            raise TypeError(f"{fn}: {_label(t)} must be a tensor, got {type(x).__name__}")
        d = _dtype_str(x.dtype)
        if t.is_state:
            if state_dtypes is None and not d.startswith(("float", "bfloat")):
                raise ValueError(f"{fn}: {_label(t)} must be floating point, got dtype {x.dtype}")
            if state_dtypes is not None and d not in state_dtypes:
                raise ValueError(f"{fn}: {_label(t)} must be {_words(state_dtypes)}, got {x.dtype}")
        elif d not in dtypes:
            raise ValueError(f"{fn}: {_label(t)} must be a floating-point tensor of dtype {_words(dtypes)}, "
                             f"got {x.dtype}")
    shared = [(t.name, x) for t, x in given if t.name in same_dtype]
    if len({x.dtype for _, x in shared}) > 1:
        raise ValueError(f"{fn}: {', '.join(n for n, _ in shared)} must share one dtype, got "
                         f"{', '.join(str(x.dtype) for _, x in shared)}")
    shapes = [tuple(x.shape) for x in inputs] + ([tuple(x.shape) for x in state] if state is not None
                                                 else [None] * len(states))
    env = _check_shapes(spec, fn, shapes, _label, CELL_DIM_NAMES, products=True)
    if step and env["S"] != 1:
        raise ValueError(f"{fn}: needs S == 1, got {first} of shape {_fmt(inputs[0].shape)} (S={env['S']})")
    device = inputs[0].device
    for t, x in given[1:]:
        if x.device != device:
            raise ValueError(f"{fn}: {_label(t)} is on {x.device} but {first} is on {device}")
    for name, value in (attrs or {}).items():
        if value not in (allow or {}).get(name, ()):
            spec.attr(name).validate(fn, value, argument=True)
    return tuple(env[d] for d in spec.dims)


def _label(t: TensorSpec) -> str:
    """How the cell API names an input: "q", or "state c" for the state input c0."""
    return f"state {t.name.rstrip('0')}" if t.is_state else t.name


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
    "check_inputs",
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
