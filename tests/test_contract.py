"""The op contract: shape rules, validation, attributes, tolerances, ONNX schemas."""

from __future__ import annotations

import onnx
import pytest
import sympy

from xlstm_export import contract as C
from xlstm_export import onnx_functions as OF

# --- shape rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,NH,S,DQK,DV",
    [pytest.param(1, 1, 1, 1, 1, id="B1-S1-all1"), pytest.param(2, 4, 7, 16, 32, id="B2-S7-NH4-DQK16-DV32"),
     pytest.param(3, 8, 129, 256, 512, id="B3-S129-NH8-7Bdims")],
)
def test_mlstm_output_shapes_ints(B, NH, S, DQK, DV):
    h, c, n, m = C.mlstm_output_shapes((B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV))
    assert h == (B, NH, S, DV)
    assert c == (B, NH, DQK, DV)
    assert n == (B, NH, DQK)
    assert m == (B, NH)
    shapes = [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S),
              (B, NH, DQK, DV), (B, NH, DQK), (B, NH)]
    assert C.validate_shapes("mLSTM", shapes) == [h, c, n, m]


@pytest.mark.parametrize("B,NH,S,DH", [(1, 1, 1, 1), (2, 4, 9, 32), (3, 2, 64, 8)])
def test_slstm_output_shapes_ints(B, NH, S, DH):
    y, *state = C.slstm_output_shapes((B, NH, S, 4 * DH), (NH, DH, 4 * DH))
    assert y == (B, NH, S, DH)
    assert state == [(B, NH, DH)] * 4
    shapes = [(B, NH, S, 4 * DH), (NH, DH, 4 * DH), (NH, 4 * DH)] + [(B, NH, DH)] * 4
    assert C.validate_shapes("xlstm::sLSTM", shapes) == [y, *state]


def test_shape_rules_on_symbolic_dims():
    """The rules only index / combine dims, so symbolic objects (here sympy) pass through."""
    B, S = sympy.symbols("B S", positive=True, integer=True)
    h, c, n, m = C.mlstm_output_shapes((B, 4, S, 16), (B, 4, S, 16), (B, 4, S, 32))
    assert h == (B, 4, S, 32) and c == (B, 4, 16, 32) and n == (B, 4, 16) and m == (B, 4)
    DH = sympy.Symbol("DH", positive=True, integer=True)
    y, hh, *_ = C.slstm_output_shapes((B, 2, S, 4 * DH), (2, DH, 4 * DH))
    assert y == (B, 2, S, DH) and hh == (B, 2, DH)


def _mlstm_shapes(B=2, NH=4, S=7, DQK=16, DV=32):
    return [(B, NH, S, DQK), (B, NH, S, DQK), (B, NH, S, DV), (B, NH, S), (B, NH, S),
            (B, NH, DQK, DV), (B, NH, DQK), (B, NH)]


@pytest.mark.parametrize(
    "index,bad,needle",
    [
        (1, (2, 4, 7, 8), "input k"),  # DQK differs from q
        (2, (2, 4, 6, 32), "input v"),  # S differs
        (3, (2, 4, 7, 1), "input i"),  # wrong rank
        (5, (2, 4, 16, 31), "input c0"),  # DV differs from v
        (7, (2, 3), "input m0"),  # NH differs
    ],
)
def test_mlstm_validate_shapes_names_op_input_and_shapes(index, bad, needle):
    shapes = _mlstm_shapes()
    good = shapes[index]
    shapes[index] = bad
    with pytest.raises(ValueError) as e:
        C.validate_shapes("mLSTM", shapes)
    msg = str(e.value)
    assert "xlstm::mLSTM" in msg and needle in msg and str(tuple(bad)) in msg
    if len(bad) == len(good):  # same rank: the expected shape is named too
        assert str(tuple(good)) in msg


def test_slstm_validate_shapes_rejects_bad_gate_width_and_recurrence():
    B, NH, S, DH = 2, 4, 5, 8
    shapes = [(B, NH, S, 4 * DH + 1), (NH, DH, 4 * DH), (NH, 4 * DH)] + [(B, NH, DH)] * 4
    with pytest.raises(ValueError, match=r"xlstm::sLSTM: input x .*\(2, 4, 5, 32\).*\(2, 4, 5, 33\)"):
        C.validate_shapes("sLSTM", shapes)
    shapes = [(B, NH, S, 4 * DH), (NH, DH, 4 * DH), (NH, 4 * DH)] + [(B, NH, DH)] * 3 + [(B, NH, DH + 1)]
    with pytest.raises(ValueError, match="input m0"):
        C.validate_shapes("sLSTM", shapes)
    with pytest.raises(ValueError, match="expected 7 inputs"):
        C.validate_shapes("sLSTM", shapes[:3])


def test_validate_dtypes():
    assert C.validate_dtypes("mLSTM", ["float16"] * 5 + ["float32"] * 3) == "float16"
    assert C.validate_dtypes("sLSTM", ["torch.bfloat16"] * 3 + ["torch.float32"] * 4) == "bfloat16"
    with pytest.raises(ValueError, match="input k dtype float32 differs from T=float16"):
        C.validate_dtypes("mLSTM", ["float16", "float32"] + ["float16"] * 3 + ["float32"] * 3)
    with pytest.raises(ValueError, match="state input c0 must be float32, got float16"):
        C.validate_dtypes("mLSTM", ["float16"] * 6 + ["float32"] * 2)
    with pytest.raises(ValueError, match="must be one of"):
        C.validate_dtypes("mLSTM", ["float64"] * 5 + ["float32"] * 3)


# --- names and attributes --------------------------------------------------------------------------


def test_names_and_specs():
    assert C.input_names("mLSTM") == ["q", "k", "v", "i", "f", "c0", "n0", "m0"]
    assert C.output_names("mLSTM") == ["h", "c", "n", "m"]
    assert C.input_names(C.SLSTM) == ["x", "r", "b", "h0", "c0", "n0", "m0"]
    assert C.output_names("xlstm::sLSTM") == ["y", "h", "c", "n", "m"]
    assert C.MLSTM.qualname == "xlstm::mLSTM" and C.MLSTM.domain == "xlstm" and C.MLSTM.version == 1
    assert [t.name for t in C.MLSTM.inputs if t.is_state] == ["c0", "n0", "m0"]
    assert all(t.dtype == "float32" for t in C.SLSTM.outputs[1:])
    with pytest.raises(KeyError, match="unknown xlstm op"):
        C.get_op("gru")


def test_attributes_defaults_and_ranges():
    assert C.MLSTM.defaults() == {"chunk_size": 64, "eps": 1e-6, "plugin_namespace": "xlstm",
                                  "plugin_version": "1"}
    assert C.SLSTM.defaults() == {"plugin_namespace": "xlstm", "plugin_version": "1"}
    assert C.MLSTM.validate_attrs({"chunk_size": 16})["chunk_size"] == 16
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        C.MLSTM.validate_attrs({"chunk_size": 0})
    with pytest.raises(ValueError, match="chunk_size must be int"):
        C.MLSTM.validate_attrs({"chunk_size": 1.5})
    with pytest.raises(ValueError, match="eps must be > 0"):
        C.MLSTM.validate_attrs({"eps": 0.0})
    with pytest.raises(ValueError, match="plugin_version"):
        C.SLSTM.validate_attrs({"plugin_version": "2"})
    with pytest.raises(ValueError, match="unknown attributes"):
        C.SLSTM.validate_attrs({"chunk_size": 4})


def test_tolerances_and_errors():
    assert set(C.TOLERANCES) == set(C.T_DTYPES)
    assert C.TOLERANCES["float32"].outputs.rtol <= 1e-4 and C.MAX_RELATIVE_ERROR["float32"] == 1e-4
    for dt in C.T_DTYPES:  # looser for lower precision, never tighter
        assert C.TOLERANCES[dt].outputs.rtol >= C.TOLERANCES["float32"].outputs.rtol
    assert C.tolerance("fp16") is C.TOLERANCES["float16"]
    assert C.canonical_dtype("bf16") == "bfloat16"
    with pytest.raises(ValueError, match="unsupported dtype"):
        C.canonical_dtype("int8")
    assert C.relative_error([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert C.relative_error([1.0, 2.5], [1.0, 2.0]) == pytest.approx(0.25)
    assert C.max_abs_error([1.0, 2.5], [1.0, 2.0]) == pytest.approx(0.5)
    assert C.relative_error([float("nan")], [1.0]) == float("inf")


# --- ONNX schemas --------------------------------------------------------------------------------


def test_register_onnx_schemas_is_idempotent():
    C.register_onnx_schemas()
    C.register_onnx_schemas()
    for spec in (C.MLSTM, C.SLSTM):
        schema = onnx.defs.get_schema(spec.name, spec.version, spec.domain)
        assert [p.name for p in schema.inputs] == C.input_names(spec)
        assert [p.name for p in schema.outputs] == C.output_names(spec)
        assert set(schema.attributes) == {a.name for a in spec.attrs}
        tc = {t.type_param_str: set(t.allowed_type_strs) for t in schema.type_constraints}
        assert tc == {"T": {"tensor(float)", "tensor(float16)", "tensor(bfloat16)"}}


def _shape_of(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_infer_shapes_and_checker_mlstm(dtype):
    C.register_onnx_schemas()
    model = OF.cell_model("mLSTM", dtype, dims={"NH": 4, "DQK": 16, "DV": 32}, chunk_size=8)
    onnx.checker.check_model(model, full_check=True)
    # clear the declared outputs' types: inference must produce them from the schema
    for o in model.graph.output:
        o.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    outs = {o.name: o for o in inferred.graph.output}
    elem = {"float32": 1, "float16": 10, "bfloat16": 16}[dtype]
    assert outs["h"].type.tensor_type.elem_type == elem
    assert all(outs[n].type.tensor_type.elem_type == onnx.TensorProto.FLOAT for n in "cnm")
    assert _shape_of(outs["h"]) == ["B", 4, "S", 32]
    assert _shape_of(outs["c"]) == ["B", 4, 16, 32]
    assert _shape_of(outs["n"]) == ["B", 4, 16]
    assert _shape_of(outs["m"]) == ["B", 4]


def test_infer_shapes_slstm():
    C.register_onnx_schemas()
    model = OF.cell_model("sLSTM", "float16", dims={"NH": 2, "DH": 8})
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    outs = {o.name: o for o in inferred.graph.output}
    assert _shape_of(outs["y"]) == ["B", 2, "S", 8]
    assert _shape_of(outs["m"]) == ["B", 2, 8]


def test_infer_shapes_rejects_inconsistent_dims():
    C.register_onnx_schemas()
    model = OF.cell_model("mLSTM", "float32", dims={"NH": 4, "DQK": 16, "DV": 32})
    # k gets DQK = 8 while q has 16
    k = next(v for v in model.graph.input if v.name == "k")
    k.type.tensor_type.shape.dim[3].dim_value = 8
    with pytest.raises(onnx.shape_inference.InferenceError, match="input k .*DQK expected 16, got 8"):
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
