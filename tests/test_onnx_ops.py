"""The torch custom ops xlstm::mLSTM / xlstm::sLSTM and their ONNX function bodies in onnxruntime.

The function bodies run through a one-node model (``onnx_functions.cell_model``) in stock
onnxruntime and are compared with the PyTorch references of ``xlstm_export.kernels``.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from op_inputs import op_args
from slstm_oracle import check_against_official, extreme_first_step_inputs
from xlstm_export.kernels.mlstm.naive import naive_chunk_mlstm, naive_recurrent_mlstm
from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm

from xlstm_export import contract as C
from xlstm_export import kernels
from xlstm_export.kernels import custom_op  # noqa: F401  (defines torch.ops.xlstm.*)
from xlstm_export import onnx_functions as OF
from xlstm_export.ort import _ortvalue_to_numpy

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- inputs ----------------------------------------------------------------------------------------


def mlstm_inputs(B, NH, S, DQK, DV, dtype="float32", *, with_state=True, seed=0):
    """The node's eight inputs; f ~ N(2, 1) (forget gates mostly open); a state as a previous
    sequence leaves it (m of either sign, n and C non-zero) or zeros."""
    return op_args(C.MLSTM, dict(B=B, NH=NH, S=S, DQK=DQK, DV=DV), seed=seed, dtype=TORCH_DTYPES[dtype],
                   state=with_state, how={"f": lambda z: z + 2.0})


def slstm_inputs(B, NH, S, DH, dtype="float32", *, with_state=True, seed=0):
    """The node's seven inputs; r ~ N(0, 1) / sqrt(DH); n0 > 0, as the normalizer of a real state."""
    return op_args(C.SLSTM, dict(B=B, NH=NH, S=S, DH=DH), seed=seed, dtype=TORCH_DTYPES[dtype], state=with_state,
                   how={"r": lambda z: z / DH**0.5, "n0": lambda z: z.abs() + 0.5})


# --- onnxruntime helpers ---------------------------------------------------------------------------


_SESSIONS: dict = {}


def session(op: str, dtype: str, **attrs) -> ort.InferenceSession:
    key = (op, dtype, tuple(sorted(attrs.items())))
    if key not in _SESSIONS:
        model = OF.cell_model(op, dtype, **attrs)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), opts,
                                              providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def _ortvalue(t: torch.Tensor):
    if t.dtype == torch.bfloat16:
        raw = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(t.contiguous().numpy())


def run_ort(op: str, dtype: str, inputs, **attrs) -> list[torch.Tensor]:
    sess = session(op, dtype, **attrs)
    feeds = {n: _ortvalue(t) for n, t in zip(C.input_names(op), inputs)}
    outs = sess.run_with_ort_values(C.output_names(op), feeds)
    res = []
    for o in outs:
        t = torch.from_numpy(np.array(_ortvalue_to_numpy(o)))
        # bf16 comes back upcast (exactly) to float32: restore the graph's dtype
        res.append(t.to(torch.bfloat16) if o.data_type() == "tensor(bfloat16)" else t)
    return res


def assert_close(actual, expected, tol: C.Tolerance, what: str):
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    torch.testing.assert_close(a, e, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what}: {m}")


# --- torch custom ops ------------------------------------------------------------------------------


@pytest.mark.usefixtures("poison_empty")  # unwritten output memory would be NaN
@pytest.mark.parametrize("S", [1, 7, 20])
def test_torch_mlstm_op_matches_reference(S):
    inputs = mlstm_inputs(2, 3, S, 8, 6)
    h, c, n, m = torch.ops.xlstm.mLSTM(*inputs, chunk_size=8, eps=1e-6)
    ref_h, (rc, rn, rm) = naive_chunk_mlstm(*inputs[:5], inputs[5:], chunk_size=8, eps=1e-6)
    for a, e, name in ((h, ref_h, "h"), (c, rc, "c"), (n, rn, "n"), (m, rm, "m")):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=name)  # the reference itself


def test_torch_ops_opcheck():
    """Fake implementations (contract shape rules) agree with the real ones; schemas are sound."""
    torch.library.opcheck(torch.ops.xlstm.mLSTM.default, mlstm_inputs(2, 2, 5, 4, 8),
                          {"chunk_size": 4, "eps": 1e-6},
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.xlstm.sLSTM.default, slstm_inputs(2, 2, 5, 4),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_op_rejects_contract_violations():
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(2, 3, 5, 8, 6)
    with pytest.raises(ValueError, match=r"xlstm::mLSTM: input k .*expected shape \(2, 3, 5, 8\)"):
        torch.ops.xlstm.mLSTM(q, k[:, :, :4], v, i, f, c0, n0, m0)
    with pytest.raises(ValueError, match="state input c0 must be float32"):
        torch.ops.xlstm.mLSTM(q, k, v, i, f, c0.half(), n0, m0)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        torch.ops.xlstm.mLSTM(q, k, v, i, f, c0, n0, m0, chunk_size=0)


def test_custom_op_backend_routes_the_cell_api():
    assert "custom_op" in kernels.MLSTM_BACKENDS and "custom_op" in kernels.SLSTM_BACKENDS
    q, k, v, i, f, *_ = mlstm_inputs(1, 2, 9, 4, 4, with_state=False, seed=1)
    h_none, st_none = kernels.mlstm_cell(q, k, v, i, f, None, backend="custom_op", chunk_size=4)
    h_ref, st_ref = kernels.mlstm_cell(q, k, v, i, f, None, backend="torch", chunk_size=4)
    torch.testing.assert_close(h_none, h_ref)
    for a, e in zip(st_none, st_ref):
        torch.testing.assert_close(a, e)
    x, r, b, *_ = slstm_inputs(1, 2, 6, 4, seed=1)
    y, st = kernels.slstm_cell(x, r, b, None, backend="custom_op")
    y_ref, st_ref = naive_recurrent_slstm(x, r, b)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(st, st_ref):
        torch.testing.assert_close(a, e)


# --- ONNX function bodies in onnxruntime: float32 ------------------------------------------------

MLSTM_CASES = [
    # B, NH, S, DQK, DV, chunk_size
    pytest.param(1, 2, 1, 8, 8, 4, id="B1-S1-NH2-D8-chunk4"),  # decode branch
    pytest.param(2, 3, 7, 8, 6, 4, id="B2-S7-NH3-D8x6-chunk4"),  # odd S, 2 chunks of 4 (1 pad)
    pytest.param(2, 2, 16, 8, 8, 8, id="B2-S16-NH2-D8-chunk8"),  # S a multiple of the chunk
    pytest.param(3, 2, 19, 16, 8, 8, id="B3-S19-NH2-D16x8-chunk8"),  # S not a multiple: 3 chunks of 7
    pytest.param(1, 1, 5, 4, 4, 1, id="B1-S5-NH1-D4-chunk1"),  # one step per chunk
    pytest.param(2, 2, 13, 8, 4, 64, id="B2-S13-NH2-D8x4-chunk64"),  # one chunk, S < chunk
    pytest.param(1, 2, 129, 8, 8, 64, id="B1-S129-NH2-D8-chunk64"),  # 3 chunks of 43
]


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "fresh"])
@pytest.mark.parametrize("B,NH,S,DQK,DV,chunk", MLSTM_CASES)
def test_onnx_mlstm_body_matches_reference_fp32(B, NH, S, DQK, DV, chunk, with_state):
    inputs = mlstm_inputs(B, NH, S, DQK, DV, with_state=with_state, seed=S)
    h, c, n, m = run_ort("mLSTM", "float32", inputs, chunk_size=chunk)
    ref_h, ref_state = naive_recurrent_mlstm(*inputs[:5], inputs[5:])  # the plainest form
    for a, e, name in zip((h, c, n, m), (ref_h, *ref_state), "hcnm"):
        assert C.relative_error(a, e) < 1e-4, (name, C.relative_error(a, e))
        assert_close(a, e, C.TOLERANCES["float32"].outputs if name == "h" else C.TOLERANCES["float32"].states,
                     f"mLSTM {name}")


def test_onnx_mlstm_body_chunk_size_and_eps_attributes_are_used():
    inputs = mlstm_inputs(2, 2, 11, 8, 8, seed=3)
    a = run_ort("mLSTM", "float32", inputs, chunk_size=3)
    b = run_ort("mLSTM", "float32", inputs, chunk_size=64)
    for x, y in zip(a, b):  # chunking only changes rounding
        assert C.relative_error(x, y) < 1e-5
    # eps enters the denominator: a large eps must change h exactly as the reference says
    h_big = run_ort("mLSTM", "float32", inputs, chunk_size=4, eps=10.0)[0]
    ref_big = naive_chunk_mlstm(*inputs[:5], inputs[5:], chunk_size=4, eps=10.0)[0]
    assert C.relative_error(h_big, ref_big) < 1e-4
    assert C.relative_error(h_big, a[0]) > 1e-2


def test_onnx_state_passing_equals_whole_sequence():
    """Running S in pieces through the body, carrying (c, n, m), equals running it whole."""
    q, k, v, i, f, c0, n0, m0 = mlstm_inputs(2, 2, 23, 8, 8, seed=5)
    whole = run_ort("mLSTM", "float32", (q, k, v, i, f, c0, n0, m0), chunk_size=8)
    state, hs = (c0, n0, m0), []
    for lo, hi in ((0, 10), (10, 11), (11, 23)):  # includes a single-step (decode-branch) piece
        h, *state = run_ort("mLSTM", "float32", (q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi],
                                                 i[:, :, lo:hi], f[:, :, lo:hi], *state), chunk_size=8)
        hs.append(h)
    assert C.relative_error(torch.cat(hs, dim=2), whole[0]) < 1e-5
    for a, e in zip(state, whole[1:]):
        assert C.relative_error(a, e) < 1e-5


SLSTM_CASES = [
    pytest.param(1, 2, 1, 4, id="B1-S1-NH2-DH4"),
    pytest.param(2, 3, 6, 8, id="B2-S6-NH3-DH8"),
    pytest.param(3, 2, 11, 4, id="B3-S11-NH2-DH4"),
]


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "fresh"])
@pytest.mark.parametrize("B,NH,S,DH", SLSTM_CASES)
def test_onnx_slstm_body_matches_reference_fp32(B, NH, S, DH, with_state):
    inputs = slstm_inputs(B, NH, S, DH, with_state=with_state, seed=S)
    outs = run_ort("sLSTM", "float32", inputs)
    y, state = naive_recurrent_slstm(inputs[0], inputs[1], inputs[2], inputs[3:])
    for a, e, name in zip(outs, (y, *state), "yhcnm"):
        assert C.relative_error(a, e) < 1e-4, (name, C.relative_error(a, e))
        assert_close(a, e, C.TOLERANCES["float32"].outputs if name == "y" else C.TOLERANCES["float32"].states,
                     f"sLSTM {name}")


def test_onnx_slstm_body_extreme_first_step_input_gate_matches_official():
    """An input gate far below -104 on the first step of a fresh sequence: the Scan body stays
    finite, as the official vanilla cell (m starts at i~ where n == 0)."""
    B, NH, S, DH = 2, 2, 5, 6
    x, r, b = extreme_first_step_inputs(B, NH, S, DH)
    y, *state = run_ort("sLSTM", "float32", (x, r, b, *(torch.zeros(B, NH, DH) for _ in range(4))))
    check_against_official(y, state, x, r, b, 1e-5)


# --- fp16 / bf16: the body on T inputs vs the reference on the same T inputs ----------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("S", [1, 9])
def test_onnx_mlstm_body_low_precision(dtype, S):
    inputs = mlstm_inputs(2, 2, S, 8, 8, dtype, seed=11)
    h, c, n, m = run_ort("mLSTM", dtype, inputs, chunk_size=4)
    assert h.dtype == TORCH_DTYPES[dtype] and c.dtype == n.dtype == m.dtype == torch.float32
    ref_h, ref_state = naive_chunk_mlstm(*inputs[:5], inputs[5:], chunk_size=4)
    tol = C.TOLERANCES[dtype]
    assert_close(h, ref_h, tol.outputs, f"mLSTM h {dtype}")
    for a, e, name in zip((c, n, m), ref_state, "cnm"):
        assert_close(a, e, tol.states, f"mLSTM {name} {dtype}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_onnx_slstm_body_low_precision(dtype):
    inputs = slstm_inputs(2, 2, 7, 4, dtype, seed=12)
    y, *state = run_ort("sLSTM", dtype, inputs)
    assert y.dtype == TORCH_DTYPES[dtype] and all(s.dtype == torch.float32 for s in state)
    ref_y, ref_state = naive_recurrent_slstm(inputs[0], inputs[1], inputs[2], inputs[3:])
    tol = C.TOLERANCES[dtype]
    assert_close(y, ref_y, tol.outputs, f"sLSTM y {dtype}")
    for a, e, name in zip(state, ref_state, "hcnm"):
        assert_close(a, e, tol.states, f"sLSTM {name} {dtype}")


# --- structure of the bodies -----------------------------------------------------------------------


def _ops_in(graph_or_fn) -> list[str]:
    out = []
    for node in graph_or_fn.node:
        out.append(node.op_type)
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.extend(_ops_in(a.g))
    return out


def test_function_bodies_structure():
    fm, fs = OF.functions(18)
    assert (fm.domain, fm.name, list(fm.input), list(fm.output)) == (
        "xlstm", "mLSTM", C.input_names("mLSTM"), C.output_names("mLSTM"))
    assert (fs.domain, fs.name) == ("xlstm", "sLSTM")
    assert [a.name for a in fm.attribute_proto] == ["chunk_size", "eps", "plugin_namespace", "plugin_version"]
    ops_m = _ops_in(fm)
    # chunkwise: exactly one Loop (over chunks) and no If (TensorRT rejects a Loop inside an If);
    # standard ops only
    assert ops_m.count("Loop") == 1 and "If" not in ops_m and "Scan" not in ops_m
    assert all(not n.domain for n in fm.node)
    ops_s = _ops_in(fs)
    assert ops_s.count("Scan") == 1
    # onnxruntime's decode fast path: If(S == 1, step, chunkwise), built from the same pieces
    fast = OF.mlstm_function(18, OF.mlstm_step_branch())
    assert _ops_in(fast).count("If") == 1 and _ops_in(fast).count("Loop") == 1
    # float32 compute inside, cast back to T at the end
    assert "CastLike" in ops_m and "CastLike" in ops_s
    assert [o.version for o in fm.opset_import] == [18]
    assert [o.version for o in OF.functions(20)[0].opset_import] == [20]
    with pytest.raises(ValueError, match="opset >= 18"):
        OF.functions(17)


def _subgraphs(nodes):
    for node in nodes:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield node, a.g


def test_function_bodies_import_everywhere():
    """The rules TensorRT's parser and OpenVINO's importer need (issue measurements in the module
    docstring of onnx_functions): attribute references at the body's top level only, a Loop with a
    trip count and no condition input whose body makes its own condition, Scan bodies that read
    nothing but their own inputs."""
    for fn in OF.functions(18):
        for node, g in _subgraphs(fn.node):
            inner = [n for n in g.node]
            assert not any(a.ref_attr_name for n in inner for a in n.attribute), (fn.name, node.op_type)
            produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
            if node.op_type == "Loop":
                assert node.input[1] == "", "the Loop's condition input must be empty (a trip count)"
                cond_out = g.output[0].name
                maker = next(n for n in g.node if cond_out in n.output)
                assert maker.op_type == "Constant"
            if node.op_type == "Scan":
                captured = {x for n in g.node for x in n.input if x and x not in produced}
                assert not captured, f"the Scan body reads outer values {sorted(captured)}"
