"""The native onnxruntime CPU kernels (plugins/cpu_ops.cc via xlstm_export.ort_native).

They replace the mLSTM decode step and the sLSTM time loop inside the exported function bodies and
the weight MatMuls of the main graph (PackedMatMul over packed weights), so they are checked (1) op
by op against float64 references, (2) whole models against the same file run through its standard
ops, and (3) at the CLI. The library is compiled with
the system C++ compiler on first use; without one these tests skip and say so.
"""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from model_makers import perturbed_model
from op_inputs import op_args
from slstm_oracle import check_against_official, extreme_first_step_inputs
from xlstm_export.kernels.mlstm.naive import naive_recurrent_mlstm, naive_step_mlstm
from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm
from xlstm_export.models import preset, xLSTMLM
from xlstm_export.plugins import cpu_build

from xlstm_export import contract as C
from xlstm_export import native_ops, ort_native
from xlstm_export import onnx_functions as OF
from xlstm_export.cli import main as cli
from xlstm_export.export import export_onnx
from xlstm_export.generate import generate
from xlstm_export.graph_rewrite import attrs
from xlstm_export.ort import OrtModel, upcast_bfloat16

pytestmark = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="no C++ compiler on PATH: the native onnxruntime CPU kernels are compiled on first use")

# float32 kernels against float64 references. The kernels follow the references' operation order
# (h = num / den, logsigmoid as min(x, 0) - log1p(exp(-|x|))), so what remains is float32 rounding
# of ~DQK-term sums, amplified by the n.q cancellation of random q, k (see test_mlstm_ref).
TOL_CELL = {"h": 2e-5, "state": 1e-5}
# whole models, native vs standard-op bodies, both float32 (fp16 graphs: the cells still run in
# float32, so only the unchanged fp16 parts differ, i.e. nothing: same tolerance).
TOL_MODEL = 1e-5


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    ort_native.register(opts)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _rel(a, e) -> float:
    return C.relative_error(np.asarray(a, np.float64), np.asarray(e, np.float64))


# --- the library ---------------------------------------------------------------------------------


def test_library_builds_once_and_exports_the_entry_point(tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_EXPORT_CACHE", str(tmp_path))
    path = cpu_build.library_path()
    assert path.is_file() and path.is_relative_to(tmp_path)
    mtime = path.stat().st_mtime_ns
    assert cpu_build.library_path() == path and path.stat().st_mtime_ns == mtime  # cached
    assert b"RegisterCustomOps" in path.read_bytes()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no partial files left


def test_missing_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_build.shutil, "which", lambda name: None)
    with pytest.raises(cpu_build.CompilerNotFoundError, match="no C\\+\\+ compiler"):
        cpu_build.library_path()


# --- cell by cell ----------------------------------------------------------------------------------


def _mlstm_inputs(B, NH, S, DQK, DV, seed):
    """float64: i ~ 3 N(0, 1) (exp input gate well above and below 0), f ~ 4 N(0, 1) + 1 (log-sigmoid
    forget gate, closed to wide open), a used state with m of either sign."""
    return op_args(C.MLSTM, dict(B=B, NH=NH, S=S, DQK=DQK, DV=DV), seed=seed, dtype=torch.float64,
                   draw_dtype=torch.float64, state_dtype=torch.float64,
                   how={"i": lambda z: 3 * z, "f": lambda z: 4 * z + 1, "m0": lambda z: 2 * z})


@pytest.mark.parametrize("B,NH,S,DQK,DV", [(1, 1, 1, 8, 8), (3, 2, 1, 7, 13), (2, 4, 1, 32, 64),
                                           (5, 4, 1, 48, 72),  # B*NH*DQK*DV >= 2^16: heads split over threads
                                           (3, 2, 9, 7, 13)])
def test_mlstm_native_step_matches_reference(B, NH, S, DQK, DV):
    """S == 1 runs the native step; S > 1 the unchanged chunkwise branch (checked for the wiring)."""
    x = _mlstm_inputs(B, NH, S, DQK, DV, seed=B * 100 + DQK)
    eps = 1e-6
    model = ort_native.with_native_ops(OF.cell_model("mLSTM", dims={"NH": NH, "DQK": DQK, "DV": DV}, eps=eps))
    feeds = dict(zip(C.input_names("mLSTM"), (t.float().numpy() for t in x)))
    h, c, n, m = _session(model).run(None, feeds)
    ref = naive_step_mlstm if S == 1 else naive_recurrent_mlstm
    h_ref, (c_ref, n_ref, m_ref) = ref(*x[:5], x[5:], eps=eps)
    assert h.shape == (B, NH, S, DV) and c.shape == (B, NH, DQK, DV)
    assert _rel(h, h_ref) < TOL_CELL["h"]
    for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]


def test_mlstm_native_step_from_a_fresh_state():
    x = list(_mlstm_inputs(2, 2, 1, 16, 24, seed=5))
    x[5:] = [torch.zeros_like(t) for t in x[5:]]  # all-zero state == a fresh sequence
    model = ort_native.with_native_ops(OF.cell_model("mLSTM", dims={"NH": 2, "DQK": 16, "DV": 24}))
    h, c, n, m = _session(model).run(None, dict(zip(C.input_names("mLSTM"), (t.float().numpy() for t in x))))
    h_ref, (c_ref, n_ref, m_ref) = naive_step_mlstm(*x[:5], tuple(x[5:]))
    assert _rel(h, h_ref) < TOL_CELL["h"]
    for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]


# B = 6 and 11: rows in blocks of 4 within a task of up to 8 (cpu_cells.h rows_times_matrix, the
# tasks of cpu_ops.cc); the last case large enough to split over threads
@pytest.mark.parametrize("B,NH,S,DH", [(1, 1, 1, 4), (3, 2, 1, 5), (3, 2, 17, 5), (2, 3, 9, 21), (6, 2, 3, 16),
                                       (11, 2, 1, 7), (2, 4, 33, 32)])
def test_slstm_native_scan_matches_reference(B, NH, S, DH):
    g = torch.Generator().manual_seed(S * 10 + DH)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    x, w, b = 2 * r(B, NH, S, 4 * DH), r(NH, DH, 4 * DH) / DH**0.5, r(NH, 4 * DH)
    h0, c0, n0, m0 = r(B, NH, DH), r(B, NH, DH), r(B, NH, DH).abs() + 0.5, r(B, NH, DH)
    model = ort_native.with_native_ops(OF.cell_model("sLSTM", dims={"NH": NH, "DH": DH}))
    assert [n.op_type for n in model.functions[0].node].count("sLSTMScan") == 1
    feeds = dict(zip(C.input_names("sLSTM"), (t.float().numpy() for t in (x, w, b, h0, c0, n0, m0))))
    y, h, c, n, m = _session(model).run(None, feeds)
    y_ref, (h_ref, c_ref, n_ref, m_ref) = naive_recurrent_slstm(x, w, b, (h0, c0, n0, m0))
    assert y.shape == (B, NH, S, DH)
    assert _rel(y, y_ref) < TOL_CELL["h"]
    for got, want in ((h, h_ref), (c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]


def test_slstm_native_scan_extreme_first_step_input_gate_matches_official():
    """An input gate far below -104 on the first step of a fresh sequence: finite, as the official
    vanilla cell (m starts at i~ where n == 0)."""
    B, NH, S, DH = 2, 2, 5, 6
    x, w, b = extreme_first_step_inputs(B, NH, S, DH)
    model = ort_native.with_native_ops(OF.cell_model("sLSTM", dims={"NH": NH, "DH": DH}))
    zeros = [np.zeros((B, NH, DH), np.float32)] * 4
    feeds = dict(zip(C.input_names("sLSTM"), [t.numpy() for t in (x, w, b)] + zeros))
    y, *state = _session(model).run(None, feeds)
    check_against_official(torch.from_numpy(y), [torch.from_numpy(t) for t in state], x, w, b, TOL_CELL["h"])


def test_native_kernel_rejects_inconsistent_shapes_with_its_own_message():
    model = ort_native.with_native_ops(OF.cell_model("mLSTM", dims={"NH": 2}))
    x = [t.float().numpy() for t in _mlstm_inputs(1, 2, 1, 8, 8, seed=0)]
    x[6] = np.zeros((1, 2, 9), np.float32)  # n0 with DQK 9 against q's 8
    with pytest.raises(Exception, match=r"xlstm\.cpu::mLSTMStep: inputs disagree"):
        _session(model).run(None, dict(zip(C.input_names("mLSTM"), x)))


def test_library_ops_have_the_python_tables_signatures():
    """plugins/cpu_ops.cc's op table (names, inputs, outputs, attributes) is native_ops.OPS."""
    import ctypes

    report = ctypes.CDLL(ort_native.library_path()).XlstmCpuOpSignatures
    report.restype = ctypes.c_char_p
    assert report().decode().splitlines() == native_ops.signatures()


# The kernels' 16-lane math (plugins/cpu_vec.h) against float64, relative error: each is within ~2
# float32 ulps (eps 1.19e-7) over its whole range, tiny arguments included (expm1, tanh, log1p near 0).
TOL_VECTOR_MATH = 3e-7


def _vector_math(name: str, x: np.ndarray) -> np.ndarray:
    fn = ctypes.CDLL(ort_native.library_path()).XlstmCpuVectorMath
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    x = np.ascontiguousarray(x, np.float32)
    y = np.empty_like(x)
    assert fn(name.encode(), x.ctypes.data, y.ctypes.data, x.size) == 0, name
    return y


def test_vector_math_matches_float64():
    rng = np.random.default_rng(11)
    tiny = np.logspace(-30, 0, 1001)
    x = np.concatenate([rng.uniform(-87, 88, 9999), rng.uniform(-1, 1, 9999), tiny, -tiny, [0.0]]).astype(np.float32)
    u = np.concatenate([rng.uniform(0, 1, 9999), np.logspace(-38, 0, 1001), [0.0]]).astype(np.float32)  # log1p's
    t = x[np.abs(x) < 40]  # tanh's: 1 to the last bit beyond
    ls = x[np.abs(x) <= 87]  # log_sigmoid's: beyond, e^-|x| is below float32's normals (exp16's clamp)
    x64, u64, t64, ls64 = (a.astype(np.float64) for a in (x, u, t, ls))
    cases = {"exp": (x, np.exp(x64)), "expm1": (x, np.expm1(x64)), "tanh": (t, np.tanh(t64)),
             "log1p_unit": (u, np.log1p(u64)), "sigmoid": (x, 1 / (1 + np.exp(-x64))),
             "log_sigmoid": (ls, np.minimum(ls64, 0) - np.log1p(np.exp(-np.abs(ls64))))}
    for name, (arg, want) in cases.items():
        got = _vector_math(name, arg)
        err = np.abs(got - want) / np.maximum(np.abs(want), np.finfo(np.float32).tiny)
        assert err.max() < TOL_VECTOR_MATH, (name, float(err.max()), arg[err.argmax()])
    s = rng.standard_normal(16 * 37).astype(np.float32)  # 37 sums of 16 lanes
    sums = _vector_math("hsum", s)[:37]  # the k-th sum at y[k]
    want = s.astype(np.float64).reshape(37, 16).sum(1)
    assert np.all(np.abs(sums - want) <= 16 * np.finfo(np.float32).eps * np.abs(s).reshape(37, 16).sum(1))


def test_rewrite_copies_and_refuses_models_without_xlstm_bodies():
    model = OF.cell_model("mLSTM")
    before = model.SerializeToString()
    native = ort_native.with_native_ops(model)
    assert model.SerializeToString() == before  # the input is left as it was
    assert any(o.domain == ort_native.NATIVE_DOMAIN for o in native.opset_import)
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Neg", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    with pytest.raises(ort_native.NativeOpsError, match="no xlstm::mLSTM / xlstm::sLSTM function body"):
        ort_native.with_native_ops(plain)


# --- mLSTMLayer: the 7B-style layer between its two products -------------------------------------

LAYER_INPUTS = ["q", "k", "v", "g", "o", "gate_bias", "c0", "n0", "m0", "ln_scale", "ln_bias", "weight"]


PAPER_LAYER_INPUTS = ["z" if x == "o" else x for x in LAYER_INPUTS] + ["skip", "xc"]


def _layer_model(eps: float, norm_eps: float, cap: float, cols=(0, 0, 0, 0, 0), fused: bool = False,
                 paper: bool = False, round_bf16: bool = False) -> onnx.ModelProto:
    """One xlstm.cpu::mLSTMLayer node (``paper``: mLSTMPaperLayer) over graph inputs of any shape;
    ``fused``: q, k, v, g and o are column ranges (from ``cols``) of one input "z"."""
    vi = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)  # noqa: E731
    inputs = PAPER_LAYER_INPUTS if paper else ["z"] * 5 + LAYER_INPUTS[5:] if fused else LAYER_INPUTS
    last = "z_col" if paper else "o_col"
    node = onnx.helper.make_node("mLSTMPaperLayer" if paper else "mLSTMLayer", inputs, ["y", "c", "n", "m"],
                                 domain=ort_native.NATIVE_DOMAIN, eps=eps, norm_eps=norm_eps, soft_cap=cap,
                                 round_bf16=int(round_bf16), **dict(zip(("q_col", "k_col", "v_col", "g_col", last), cols)))
    graph = onnx.helper.make_graph([node], "layer", [vi(x) for x in dict.fromkeys(inputs)],
                                   [vi(x) for x in "ycnm"])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                        onnx.helper.make_opsetid(ort_native.NATIVE_DOMAIN, 1)])


def _bf16_rounded(t: torch.Tensor) -> torch.Tensor:
    """float64 values rounded to the nearest bfloat16 (ties to even; torch's conversion), as float64."""
    return t.float().bfloat16().double()


def _nearly_all_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-5) -> float:
    """The fraction of elements of ``got`` off ``want`` by more than ``rtol`` of the largest |want|:
    where a bf16 rounding point sits, a value within float32 rounding of a tie between two bfloat16
    neighbours may round either way (2^-8 of it), so a few are; without the rounding, nearly all."""
    return float(np.mean(np.abs(got - want) > rtol * np.abs(want).max()))


def _layer_reference(x: dict, eps: float, norm_eps: float, cap: float, round_bf16: bool = False):
    """The layer in float64 from the cell reference: heads, soft-capped gates, cell, per-head
    LayerNorm, norm weight, output gate (models/blocks.py LargeBlock between its products); with
    x["z"] (the paper block's mLSTMBlock): the norm weight, the learnable skip of the convolution's
    output xc, the SiLU gate of z."""
    t = {k: torch.from_numpy(v).double() for k, v in x.items()}
    B, NH, _, DV = t["c0"].shape
    S = t["q"].shape[1]
    heads = lambda a: a.reshape(B, S, NH, -1).transpose(1, 2)  # noqa: E731
    gates = t["g"] + t["gate_bias"]
    if cap > 0:
        gates = cap * torch.tanh(gates / cap)
    i, f = gates.transpose(1, 2).split(NH, dim=1)  # (B, NH, S) each
    h, (c, n, m) = naive_recurrent_mlstm(heads(t["q"]), heads(t["k"]), heads(t["v"]), i, f,
                                         (t["c0"], t["n0"], t["m0"]), eps=eps)
    h = h.transpose(1, 2)  # (B, S, NH, DV)
    h = torch.nn.functional.layer_norm(h, (DV,), t["ln_scale"], t["ln_bias"], norm_eps)
    h = h.reshape(B, S, NH * DV) * t["weight"]
    if round_bf16:
        h = _bf16_rounded(h)
    if "z" in t:
        return (h + t["skip"] * t["xc"]) * torch.nn.functional.silu(t["z"]), c, n, m
    return h * torch.sigmoid(t["o"]), c, n, m


def _layer_inputs(B, S, NH, DQK, DV, seed) -> dict:
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"q": r(B, S, NH * DQK), "k": r(B, S, NH * DQK), "v": r(B, S, NH * DV),
            "g": 8 * r(B, S, 2 * NH),  # beyond the soft cap's linear range, both signs
            "o": r(B, S, NH * DV), "gate_bias": r(2 * NH), "c0": r(B, NH, DQK, DV), "n0": r(B, NH, DQK),
            "m0": 2 * r(B, NH), "ln_scale": 1 + 0.3 * r(DV), "ln_bias": 0.3 * r(DV), "weight": 1 + 0.3 * r(NH * DV)}


@pytest.mark.parametrize("B,S,NH,DQK,DV,cap", [(1, 1, 1, 8, 8, 15.0), (3, 1, 2, 7, 13, 15.0), (2, 7, 4, 16, 24, 0.0),
                                               (3, 33, 2, 9, 11, 3.0),
                                               (2, 5, 4, 48, 72, 15.0)])  # B*NH*S*DQK*DV >= 2^16: threads
def test_mlstm_layer_matches_float64_reference(B, S, NH, DQK, DV, cap):
    """S == 1 is the decode step; S > 1 runs the steps one after another with the state in place."""
    x = _layer_inputs(B, S, NH, DQK, DV, seed=B * 1000 + S * 10 + DQK)
    eps, norm_eps = 1e-6, 1e-5
    y, c, n, m = _session(_layer_model(eps, norm_eps, cap)).run(None, x)
    y_ref, c_ref, n_ref, m_ref = _layer_reference(x, eps, norm_eps, cap)
    assert y.shape == (B, S, NH * DV) and c.shape == (B, NH, DQK, DV)
    # LayerNorm divides by the std of h over DV values: relative error of h, not amplified
    assert _rel(y, y_ref) < TOL_CELL["h"]
    for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]


@pytest.mark.parametrize("paper", [False, True])
@pytest.mark.parametrize("B,S,NH,DQK,DV", [(3, 1, 2, 7, 13), (2, 7, 4, 16, 24), (1, 5, 2, 32, 64)])
def test_mlstm_layer_rounds_to_bfloat16_before_the_gate(B, S, NH, DQK, DV, paper):
    """round_bf16 = 1 (a bf16 export's layer): LN(h) * weight is rounded to bfloat16 before the output
    gate (the paper layer: before its skip is added), in the 16-lane loop and in its scalar tail
    (DV = 13, 24). Against float64 rounded there: equal but for values within float32 rounding of
    a tie; the state is not rounded."""
    x = _layer_inputs(B, S, NH, DQK, DV, seed=B * 100 + S * 10 + DV)
    cap = 0.0 if paper else 15.0
    if paper:
        rng = np.random.default_rng(DV)
        x["z"] = x.pop("o")
        x["skip"] = (1 + 0.3 * rng.standard_normal(NH * DV)).astype(np.float32)
        x["xc"] = rng.standard_normal((B, S, NH * DV)).astype(np.float32)
    eps, norm_eps = 1e-6, 1e-5
    y, c, n, m = _session(_layer_model(eps, norm_eps, cap, paper=paper, round_bf16=True)).run(None, x)
    y_ref, c_ref, n_ref, m_ref = _layer_reference(x, eps, norm_eps, cap, round_bf16=True)
    y_ref = y_ref.numpy()
    assert _nearly_all_close(y, y_ref) < 0.01
    assert np.all(np.abs(y - y_ref) <= 2.0**-7 * np.abs(y_ref) + 1e-6 * np.abs(y_ref).max())  # one bf16 step
    for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]
    unrounded = _layer_reference(x, eps, norm_eps, cap)[0].numpy()
    assert _nearly_all_close(unrounded, y_ref) > 0.3  # the rounding is what the check sees


@pytest.mark.parametrize("B,S,NH,DQK,DV", [(1, 1, 4, 64, 64), (3, 1, 2, 7, 13), (2, 9, 4, 16, 24),
                                         (2, 5, 4, 48, 72)])  # B*NH*S*DQK*DV >= 2^16: threads
def test_mlstm_paper_layer_matches_float64_reference(B, S, NH, DQK, DV):
    """The paper block's layer (tiny's heads: 4 x 64 x 64): the same cell and norm, then its own
    skip and SiLU gate; S > 1 step by step."""
    x = _layer_inputs(B, S, NH, DQK, DV, seed=B * 100 + S * 10 + DQK)
    rng = np.random.default_rng(DV)
    x["z"] = x.pop("o")
    x["skip"] = (1 + 0.3 * rng.standard_normal(NH * DV)).astype(np.float32)
    x["xc"] = rng.standard_normal((B, S, NH * DV)).astype(np.float32)
    eps, norm_eps = 1e-6, 1e-5
    y, c, n, m = _session(_layer_model(eps, norm_eps, 0.0, paper=True)).run(None, x)
    y_ref, c_ref, n_ref, m_ref = _layer_reference(x, eps, norm_eps, 0.0)
    assert y.shape == (B, S, NH * DV) and c.shape == (B, NH, DQK, DV)
    assert _rel(y, y_ref) < TOL_CELL["h"]
    for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]


def test_mlstm_paper_layer_rejects_a_mismatched_skip_input_with_its_own_message():
    x = _layer_inputs(2, 3, 2, 8, 8, seed=1)
    x["z"] = x.pop("o")
    x["skip"], x["xc"] = np.ones(16, np.float32), np.ones((2, 4, 16), np.float32)  # xc: 4 steps, not 3
    with pytest.raises(Exception, match=r"xlstm\.cpu::mLSTMPaperLayer: skip must be \[NH\*DV\] = \[16\] and xc "
                                        r"\[B, S, NH\*DV\] = \[2, 3, NH\*DV\]"):
        _session(_layer_model(1e-6, 1e-5, 0.0, paper=True)).run(None, x)


def test_mlstm_layer_reads_column_ranges_of_one_fused_input():
    """The rewrite hands the layer the block's fused product once, with each input's first column."""
    B, S, NH, DQK, DV = 2, 5, 2, 8, 12
    x = _layer_inputs(B, S, NH, DQK, DV, seed=3)
    pad = np.full((B, S, 3), np.nan, np.float32)  # never read
    parts = {"o": x["o"], "pad": pad, "q": x["q"], "g": x["g"], "k": x["k"], "v": x["v"]}  # any order
    starts = dict(zip(parts, np.cumsum([0] + [a.shape[-1] for a in parts.values()])))
    feeds = {"z": np.concatenate(list(parts.values()), axis=-1), **{k: x[k] for k in LAYER_INPUTS[5:]}}
    cols = [int(starts[k]) for k in "qkvgo"]
    y, c, n, m = _session(_layer_model(1e-6, 1e-5, 15.0, cols, fused=True)).run(None, feeds)
    y_ref, c_ref, n_ref, m_ref = _layer_reference(x, 1e-6, 1e-5, 15.0)
    assert _rel(y, y_ref) < TOL_CELL["h"]
    for got, want in ((c, c_ref), (n, n_ref), (m, m_ref)):
        assert _rel(got, want) < TOL_CELL["state"]


def test_mlstm_layer_rejects_inconsistent_shapes_with_its_own_message():
    x = _layer_inputs(1, 3, 2, 8, 8, seed=0)
    x["g"] = x["g"][..., :3]  # 3 gate columns for 2 heads
    with pytest.raises(Exception, match=r"xlstm\.cpu::mLSTMLayer: inputs disagree with c0 \[B=1, NH=2"):
        _session(_layer_model(1e-6, 1e-5, 15.0)).run(None, x)


def _large_model(tmp_path, name: str, **changes) -> Path:
    cfg = preset("tiny-large")
    for k, v in changes.items():  # past the config's checks: gate_soft_cap=None, no cap at all
        setattr(cfg, k, v)
    return export_onnx(perturbed_model(cfg, seed=4), tmp_path / f"{name}.onnx", progress=False)


def _assert_outputs_match(exported: onnx.ModelProto, native: onnx.ModelProto) -> None:
    """Every graph output of ``native`` (a rewrite of ``exported``) as the standard graph gives it, on
    two prompts of five tokens from a zero state."""
    ids = np.random.default_rng(5).integers(0, 256, (2, 5))
    feeds = {"input_ids": ids, **{i.name: np.zeros([2, *[d.dim_value for d in i.type.tensor_type.shape.dim[1:]]],
                                                   np.float32) for i in exported.graph.input[1:]}}
    want = dict(zip([o.name for o in exported.graph.output],
                    ort.InferenceSession(exported.SerializeToString()).run(None, feeds)))
    got = dict(zip([o.name for o in native.graph.output], _session(native).run(None, feeds)))
    for name, value in want.items():
        assert _rel(got[name], value) < TOL_MODEL, name


def _op_counts(model: onnx.ModelProto) -> dict:
    counts: dict = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


@pytest.mark.parametrize("cap", [15.0, None])
def test_layer_rewrite_fuses_every_7b_layer(cap, tmp_path):
    """Each 7B-style block's mLSTM layer becomes one node (with and without the gate soft cap), the
    graph's other values and the function bodies stay, and the model computes the same."""
    path = _large_model(tmp_path, f"cap{cap}", gate_soft_cap=cap, num_blocks=3)
    exported = onnx.load(path)
    native = ort_native.with_native_ops(exported)
    counts = _op_counts(native)
    assert counts.get("mLSTMLayer") == 3 and "mLSTM" not in counts
    assert len(native.graph.node) < len(exported.graph.node) - 3 * 15  # ~20 nodes per layer are gone
    assert {i.name for i in native.graph.input} == {i.name for i in exported.graph.input}
    assert [o.name for o in native.graph.output] == [o.name for o in exported.graph.output]
    body, fast = OrtModel(path, intra_op_threads=2), OrtModel(path, intra_op_threads=2, native_ops=True)
    rng = np.random.default_rng(11)
    for B, S in ((1, 1), (3, 7), (1, 64), (3, 129)):  # the chunkwise body beside the step-by-step layer
        ids = rng.integers(0, 256, (B, S))
        state = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in body.init_state(B).items()}
        (lb, sb), (ln, sn) = body.run(ids, state), fast.run(ids, state)
        assert _rel(ln, lb) < TOL_MODEL, (B, S)
        for key in sb:
            assert _rel(sn[key], sb[key]) < TOL_MODEL, (B, S, key)


def test_layer_rewrite_leaves_a_layer_whose_values_are_read_elsewhere(tmp_path):
    """A value inside the pattern that something else reads (here: a graph output) keeps that
    layer as it was; the other layers are still fused."""
    path = _large_model(tmp_path, "tapped")
    exported = onnx.load(path)
    cell = next(n for n in exported.graph.node if n.op_type == "mLSTM")
    tapped = cell.input[3]  # block 0's input gate
    exported.graph.output.append(onnx.helper.make_tensor_value_info(tapped, onnx.TensorProto.FLOAT, None))
    native = ort_native.with_native_ops(exported)
    counts = _op_counts(native)
    assert counts.get("mLSTMLayer") == 1 and counts.get("mLSTM") == 1
    _assert_outputs_match(exported, native)


def _paper_model(tmp_path, name: str, **changes) -> Path:
    return export_onnx(perturbed_model(preset("tiny", **changes), seed=4), tmp_path / f"{name}.onnx",
                       progress=False)


def test_layer_rewrite_fuses_every_paper_mlstm_layer(tmp_path):
    """Each paper mLSTM block's layer (head reshapes, gate biases, the cell, the norm, skip and gate)
    becomes one mLSTMPaperLayer, the sLSTM block's (head-wise gate products, the cell, the norm)
    one sLSTMPaperLayer; the model computes the same, at decode and at prefill lengths where the
    mLSTM body runs chunkwise."""
    path = _paper_model(tmp_path, "paper", num_blocks=4, slstm_at=[1])
    exported = onnx.load(path)
    native = ort_native.with_native_ops(exported)
    counts = _op_counts(native)
    assert counts.get("mLSTMPaperLayer") == 3 and "mLSTM" not in counts
    assert counts.get("sLSTMPaperLayer") == 1 and "sLSTM" not in counts
    # each block's conv (15 nodes) and layer (~20 mLSTM, ~14 sLSTM)
    assert len(native.graph.node) < len(exported.graph.node) - 3 * (15 + 15) - (15 + 12)
    assert {i.name for i in native.graph.input} == {i.name for i in exported.graph.input}
    assert [o.name for o in native.graph.output] == [o.name for o in exported.graph.output]
    body, fast = OrtModel(path, intra_op_threads=2), OrtModel(path, intra_op_threads=2, native_ops=True)
    rng = np.random.default_rng(12)
    for B, S in ((1, 1), (3, 7), (1, 64), (2, 129)):
        # from a state the model reached: random n and m make the cell ill-conditioned (B = 3, S = 7:
        # the chunkwise body 3.8e-3 and the step-by-step layer 6.8e-3 off float64 PyTorch, 1.5e-4 apart)
        _, state = body.run(rng.integers(0, 256, (B, 5)))
        ids = rng.integers(0, 256, (B, S))
        (lb, sb), (ln, sn) = body.run(ids, state), fast.run(ids, state)
        assert _rel(ln, lb) < TOL_MODEL, (B, S)
        for key in sb:
            assert _rel(sn[key], sb[key]) < TOL_MODEL, (B, S, key)


def test_paper_layer_rewrite_leaves_layers_whose_heads_outgrow_the_limit(tmp_path, monkeypatch):
    """A head's matrix memory above PAPER_LAYER_MAX_HEAD_BYTES (tiny's: 64 x 64 floats, 16 KiB)
    keeps the chunkwise body (mLSTMStep at decode); the convolutions are still swapped."""
    path = _paper_model(tmp_path, "big_heads")
    monkeypatch.setattr(ort_native, "PAPER_LAYER_MAX_HEAD_BYTES", 16 * 1024 - 4)
    counts = _op_counts(ort_native.with_native_ops(onnx.load(path)))
    assert "mLSTMPaperLayer" not in counts and counts.get("mLSTM") == 2 and counts.get("CausalConv") == 3
    monkeypatch.setattr(ort_native, "PAPER_LAYER_MAX_HEAD_BYTES", 16 * 1024)
    assert _op_counts(ort_native.with_native_ops(onnx.load(path))).get("mLSTMPaperLayer") == 2


@pytest.mark.parametrize("tap", ["skip", "norm"])
def test_paper_layer_rewrite_leaves_a_layer_whose_values_are_read_elsewhere(tap, tmp_path):
    """A value inside the paper pattern that something else reads (a graph output: the skip term,
    the per-head norm's output) keeps that layer as it was; the other is still fused."""
    path = _paper_model(tmp_path, "tapped")
    exported = onnx.load(path)
    ln = next(n for n in exported.graph.node if n.op_type == "LayerNormalization" and
              (p := next((m for m in exported.graph.node if n.input[0] in m.output), None)) and p.op_type == "Transpose"
              and any(p.input[0] in c.output for c in exported.graph.node if c.op_type == "mLSTM"))
    if tap == "norm":
        tapped = ln.output[0]
    else:  # Mul(skip, xc): the Mul read by the Add after the norm's Reshape and weight
        readers = lambda x: [m for m in exported.graph.node if x in m.input]  # noqa: E731
        mul_w = readers(readers(ln.output[0])[0].output[0])[0]
        add = readers(mul_w.output[0])[0]
        tapped = next(x for x in add.input if x != mul_w.output[0])
    exported.graph.output.append(onnx.helper.make_tensor_value_info(tapped, onnx.TensorProto.FLOAT, None))
    native = ort_native.with_native_ops(exported)
    counts = _op_counts(native)
    assert counts.get("mLSTMPaperLayer") == 1 and counts.get("mLSTM") == 1
    _assert_outputs_match(exported, native)


# --- the paper sLSTM layer -------------------------------------------------------------------------


def _slstm_layer_model(round_bf16: bool = False) -> onnx.ModelProto:
    """One sLSTMPaperLayer node, every input a graph input."""
    h, f32 = onnx.helper, onnx.TensorProto.FLOAT
    op = native_ops.OPS["sLSTMPaperLayer"]
    node = native_ops.node("sLSTMPaperLayer", {k: k for k in op.inputs}, {k: k for k in op.outputs}, norm_eps=1e-5,
                           round_bf16=int(round_bf16))
    graph = h.make_graph([node], "slstm_layer", [h.make_tensor_value_info(k, f32, None) for k in op.inputs],
                         [h.make_tensor_value_info(k, f32, None) for k in op.outputs])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18),
                                              h.make_opsetid(ort_native.NATIVE_DOMAIN, ort_native.NATIVE_VERSION)])


def _slstm_layer_inputs(B, S, NH, DH, seed) -> dict[str, np.ndarray]:
    """Fresh random float64 inputs of one sLSTMPaperLayer (its op's names)."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s)  # noqa: E731
    E = NH * DH
    return {"xc": r(B, S, E), "x": r(B, S, E), "w_if": r(NH, DH, 2 * DH) / DH**0.5,
            "w_zo": r(NH, DH, 2 * DH) / DH**0.5, "r": r(NH, DH, 4 * DH) / DH**0.5, "b": r(NH, 4 * DH),
            "h0": r(B, NH, DH), "c0": r(B, NH, DH), "n0": np.abs(r(B, NH, DH)) + 0.5, "m0": r(B, NH, DH),
            "ln_scale": 1 + 0.3 * r(DH), "ln_bias": 0.3 * r(DH), "weight": 1 + 0.3 * r(E)}


def _slstm_layer_ref(a: dict, eps: float = 1e-5):
    """models/blocks.py sLSTMBlock between its convolution and its residual, in float64:
    (y [B, S, NH*DH], (h, c, n, m))."""
    B, S, E = a["x"].shape
    NH, DH = a["r"].shape[:2]
    heads = lambda t, w: np.einsum("bshd,hdg->bhsg", t.reshape(B, S, NH, DH), w)  # noqa: E731
    gates = np.concatenate([heads(a["xc"], a["w_if"]), heads(a["x"], a["w_zo"])], axis=-1)  # (B, NH, S, 4*DH)
    t = lambda k: torch.from_numpy(a[k])  # noqa: E731
    y, state = naive_recurrent_slstm(torch.from_numpy(gates), t("r"), t("b"), tuple(t(k) for k in ("h0", "c0", "n0", "m0")))
    y = y.numpy().transpose(0, 2, 1, 3)  # (B, S, NH, DH)
    mean = y.mean(-1, keepdims=True)
    normed = (y - mean) / np.sqrt(((y - mean) ** 2).mean(-1, keepdims=True) + eps) * a["ln_scale"] + a["ln_bias"]
    return normed.reshape(B, S, E) * a["weight"], tuple(x.numpy() for x in state)


@pytest.mark.parametrize("B,S,NH,DH", [(1, 1, 1, 4), (3, 7, 2, 5), (2, 9, 3, 21), (6, 1, 2, 16), (11, 3, 2, 7),
                                       (2, 33, 4, 32)])  # as for the scan: row blocks, the threaded split
def test_slstm_paper_layer_matches_float64(B, S, NH, DH):
    a = _slstm_layer_inputs(B, S, NH, DH, seed=B * S + NH * DH)
    y, *state = _session(_slstm_layer_model()).run(None, {k: v.astype(np.float32) for k, v in a.items()})
    y_ref, state_ref = _slstm_layer_ref(a)
    assert y.shape == (B, S, NH * DH)
    assert _rel(y, y_ref) < TOL_CELL["h"]  # 1.5e-7 to 2.5e-7 here
    for got, want in zip(state, state_ref):
        assert _rel(got, want) < TOL_CELL["state"]


@pytest.mark.parametrize("B,S,NH,DH", [(3, 7, 2, 5), (2, 9, 3, 21)])
def test_slstm_paper_layer_rounds_its_output_to_bfloat16(B, S, NH, DH):
    """round_bf16 = 1 (a bf16 export's layer, whose output the graph rounds before the residual):
    y against float64 rounded there, as for the mLSTM layers; the state is not rounded."""
    a = _slstm_layer_inputs(B, S, NH, DH, seed=B * S + NH * DH)
    y, *state = _session(_slstm_layer_model(round_bf16=True)).run(None, {k: v.astype(np.float32) for k, v in a.items()})
    y_ref, state_ref = _slstm_layer_ref(a)
    rounded = _bf16_rounded(torch.from_numpy(y_ref)).numpy()
    assert _nearly_all_close(y, rounded) < 0.01
    assert np.all(np.abs(y - rounded) <= 2.0**-7 * np.abs(rounded) + 1e-6 * np.abs(rounded).max())
    assert _nearly_all_close(y_ref, rounded) > 0.3  # the rounding is what the check sees
    for got, want in zip(state, state_ref):
        assert _rel(got, want) < TOL_CELL["state"]


def test_slstm_paper_layer_rejects_inconsistent_shapes_with_its_own_message():
    a = {k: v.astype(np.float32) for k, v in _slstm_layer_inputs(2, 3, 2, 8, seed=0).items()}
    a["w_zo"] = a["w_zo"][:, :, :12]  # [NH, DH, 12] against 2 * DH = 16
    with pytest.raises(Exception, match=r"xlstm\.cpu::sLSTMPaperLayer: inputs disagree with r \[NH=2, DH=8"):
        _session(_slstm_layer_model()).run(None, a)


@pytest.mark.parametrize("tap", ["gates", "norm"])
def test_slstm_layer_rewrite_leaves_a_layer_whose_values_are_read_elsewhere(tap, tmp_path):
    """A value inside the sLSTM pattern that something else reads (a graph output: the cell's gate
    input, the per-head norm's output) keeps the layer as it was (the cell and its nodes)."""
    path = _paper_model(tmp_path, "tapped_slstm")
    exported = onnx.load(path)
    cell = next(n for n in exported.graph.node if n.op_type == "sLSTM")
    if tap == "gates":
        tapped = cell.input[0]
    else:
        transpose = next(n for n in exported.graph.node if cell.output[0] in n.input)
        tapped = next(n for n in exported.graph.node if transpose.output[0] in n.input).output[0]
    exported.graph.output.append(onnx.helper.make_tensor_value_info(tapped, onnx.TensorProto.FLOAT, None))
    native = ort_native.with_native_ops(exported)
    counts = _op_counts(native)
    assert "sLSTMPaperLayer" not in counts and counts.get("sLSTM") == 1
    _assert_outputs_match(exported, native)


def test_slstm_layer_rewrite_takes_gate_weights_the_export_left_unfolded(tmp_path):
    """Larger exports (xlstm-125m's) keep each pair of gate weights as Transpose[0,2,1](Concat[1](W_a,
    W_b)) of the two [NH, DH, DH] weights; tiny's are folded into one [NH, DH, 2*DH] initializer.
    tiny with its two pairs unfolded so is fused the same and computes the same."""
    exported = onnx.load(_paper_model(tmp_path, "unfolded"))
    h = onnx.helper
    inits = {t.name: t for t in exported.graph.initializer}
    unfolded = 0
    for node in list(exported.graph.node):
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 3 or w.dims[2] != 2 * w.dims[1]:  # not the q / k / v blocks
            continue
        value, name = onnx.numpy_helper.to_array(w), node.input[1]
        dh = value.shape[1]
        parts = [np.ascontiguousarray(value[:, :, j * dh:(j + 1) * dh].transpose(0, 2, 1)) for j in (0, 1)]
        exported.graph.initializer.remove(w)
        exported.graph.initializer.extend(onnx.numpy_helper.from_array(x, f"{name}.{j}") for j, x in enumerate(parts))
        exported.graph.node.insert(0, h.make_node("Transpose", [f"{name}.cat"], [name], perm=[0, 2, 1]))
        exported.graph.node.insert(0, h.make_node("Concat", [f"{name}.0", f"{name}.1"], [f"{name}.cat"], axis=1))
        unfolded += 1
    assert unfolded == 2
    native = ort_native.with_native_ops(exported)
    assert _op_counts(native).get("sLSTMPaperLayer") == 1
    _assert_outputs_match(exported, native)


def test_slstm_layer_rewrite_without_a_convolution(tmp_path):
    """An sLSTM block without its convolution (slstm_conv1d_kernel_size = 0: i and f read the normed
    input too) is fused the same way and computes the same."""
    path = _paper_model(tmp_path, "no_slstm_conv", slstm_conv1d_kernel_size=0)
    exported = onnx.load(path)
    native = ort_native.with_native_ops(exported)
    (layer,) = [n for n in native.graph.node if n.op_type == "sLSTMPaperLayer"]
    assert layer.input[0] == layer.input[1]  # xc is x
    _assert_outputs_match(exported, native)


# --- PackedMatMul -----------------------------------------------------------------------------------


def _matmul_model(k: int, n: int, w: np.ndarray, x_rank: int) -> onnx.ModelProto:
    h = onnx.helper
    x_dims = ["M", k] if x_rank == 2 else ["B", "S", k] if x_rank == 3 else [k]
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_dims)],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                         initializer=[onnx.numpy_helper.from_array(w, "w")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def test_interleave_bf16_rows_layout():
    """The ...Bf16 ops' rows: 16-bit value 2j is column j, 2j + 1 column 16 + j (the low and high half
    of 32-bit word j, which the kernel widens with one shift and one mask)."""
    bits = np.arange(3 * 5 * 32, dtype=np.uint16).reshape(3, 5, 32)
    rows = ort_native.interleave_bf16_rows(bits)
    assert rows.shape == bits.shape and rows.flags.c_contiguous
    assert np.array_equal(rows[..., 0::2], bits[..., :16]) and np.array_equal(rows[..., 1::2], bits[..., 16:])
    words = rows.view(np.uint32)  # little-endian: 2j the low half
    assert np.array_equal(words & 0xFFFF, bits[..., :16]) and np.array_equal(words >> 16, bits[..., 16:])


def test_pack_weight_layout():
    w = np.random.default_rng(0).standard_normal((5, 70), dtype=np.float32)
    p = ort_native.pack_weight(w)
    assert p.shape == (3, 5, 32) and p.flags.c_contiguous  # ceil(70 / 32) panels
    assert np.array_equal(p.transpose(1, 0, 2).reshape(5, 96)[:, :70], w)
    assert not p[2, :, 6:].any()  # the last panel's padding is zero
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        ort_native.pack_weight(w[0])


# (x shape, N): decode rows (M = 1 .. 8), remainders of the 8-row block, prefill-like M, odd K,
# N below, at and across panel edges, and products large enough for the multi-threaded path
@pytest.mark.parametrize("x_shape,n", [((45,), 5), ((1, 45), 32), ((3, 100), 33), ((8, 77), 200),
                                       ((2, 7, 61), 97), ((13, 300), 1000), ((1, 1, 768), 2312),
                                       ((5, 37, 129), 300)])
def test_packed_matmul_matches_float64(x_shape, n):
    rng = np.random.default_rng(sum(x_shape) + n)
    k = x_shape[-1]
    w = rng.standard_normal((k, n), dtype=np.float32)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    native = ort_native.with_native_ops(_matmul_model(k, n, w, len(x_shape)), check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["PackedMatMul"]
    assert [tuple(t.dims) for t in native.graph.initializer] == [(-(-n // 32), k, 32)]
    (y,) = _session(native).run(None, {"x": x})
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == ref.shape and y.dtype == np.float32
    # float32 sums of K products in k order against float64: ~sqrt(K) * 2^-24 relative
    assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("spinning,pool", [("0", "sleeping"), ("1", "spinning"), (None, "spinning"),
                                           ("false", "sleeping")])  # onnxruntime spins only for "1"
def test_sleeping_or_spinning_workers_give_the_same_bits(spinning, pool):
    """The library reads the session's session.intra_op.allow_spinning when it is registered and
    splits work over the pool only where a hand-off pays for that kind of pool: the splits differ,
    the bits may not. Products below, between and above both kinds' thresholds; an mLSTMLayer above
    the spinning pool's threshold only."""
    rng = np.random.default_rng(11)
    library = ctypes.CDLL(ort_native.library_path())  # the handle onnxruntime loads: the same state
    library.XlstmCpuLastRegisteredPool.restype = ctypes.c_char_p

    def run(model, feeds, threads, spin):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        if spin is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
        ort_native.register(opts)
        assert library.XlstmCpuLastRegisteredPool().decode() == ("spinning" if spin is None else pool)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)

    # (1, 768, 400): above both by its weight's bytes; (64, 384, 512): between, by multiply-adds;
    # (400, 384, 512): above both by multiply-adds
    for m, k, n in [(3, 40, 50), (8, 128, 768), (1, 768, 400), (64, 384, 512), (400, 384, 512)]:
        w = rng.standard_normal((k, n), dtype=np.float32)
        x = rng.standard_normal((m, k), dtype=np.float32)
        model = ort_native.with_native_ops(_matmul_model(k, n, w, 2), check_xlstm=False)
        (one,) = run(model, {"x": x}, 1, None)
        (two,) = run(model, {"x": x}, 2, spinning)
        assert np.array_equal(one, two), (m, k, n)
        assert _rel(two, x.astype(np.float64) @ w.astype(np.float64)) < 1e-5
    x = _layer_inputs(4, 3, 4, 32, 48, seed=12)  # B*NH*S*DQK*DV = 2^16 * 1.125
    model = _layer_model(1e-6, 1e-5, 15.0)
    for got, want in zip(run(model, x, 2, spinning), run(model, x, 1, None)):
        assert np.array_equal(got, want)


def test_packed_matmul_long_sums_are_as_accurate_as_onnxruntimes_gemm():
    """K = 4096: the blocked summation keeps the rms error against float64 at onnxruntime's level
    (one running sum over K had ~3x its error, which 12 blocks of a 160M model amplified ~6x)."""
    rng = np.random.default_rng(8)
    M, K, N = 64, 4096, 96
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    model = _matmul_model(K, N, w, 2)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    rms = lambda y: float(np.sqrt(((y - ref) ** 2).mean()))  # noqa: E731
    (mlas,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    (packed,) = _session(ort_native.with_native_ops(model, check_xlstm=False)).run(None, {"x": x})
    assert rms(packed) < 1.5 * rms(mlas)


def test_packed_matmul_every_row_remainder():
    """M = 1 .. 17 covers every remainder of the 8-row register block, alone and after full blocks."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((23, 50), dtype=np.float32)
    sess = _session(ort_native.with_native_ops(_matmul_model(23, 50, w, 2), check_xlstm=False))
    for m in range(1, 18):
        x = rng.standard_normal((m, 23), dtype=np.float32)
        (y,) = sess.run(None, {"x": x})
        assert _rel(y, x.astype(np.float64) @ w.astype(np.float64)) < 1e-5, f"M = {m}"


def test_packed_matmul_rewrite_leaves_what_it_cannot_pack():
    """Only a float32 MatMul by a 2-D initializer that nothing else reads is packed: a weight shared
    with another node (a tied embedding), a float16 one, one fed as a graph input, a computed one
    stay standard MatMuls."""
    h, rng = onnx.helper, np.random.default_rng(1)
    f32 = [onnx.numpy_helper.from_array(rng.standard_normal((8, 16), dtype=np.float32), n)
           for n in ("packed", "shared", "overridable")]
    f16 = onnx.numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float16), "half")
    nodes = [h.make_node("MatMul", ["x", "packed"], ["y0"]),
             h.make_node("MatMul", ["x", "shared"], ["y1"]), h.make_node("Identity", ["shared"], ["y2"]),
             h.make_node("MatMul", ["x", "overridable"], ["y3"]),
             h.make_node("Cast", ["x"], ["xh"], to=onnx.TensorProto.FLOAT16), h.make_node("MatMul", ["xh", "half"], ["y4"]),
             h.make_node("Transpose", ["packed_t"], ["wt"]), h.make_node("MatMul", ["x", "wt"], ["y5"])]
    wt = onnx.numpy_helper.from_array(rng.standard_normal((16, 8), dtype=np.float32), "packed_t")
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8]),
                                      h.make_tensor_value_info("overridable", onnx.TensorProto.FLOAT, [8, 16])],
                         [h.make_tensor_value_info(f"y{j}", onnx.TensorProto.FLOAT16 if j == 4 else
                                                   onnx.TensorProto.FLOAT, None) for j in range(6)],
                         initializer=[*f32, f16, wt])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    native = ort_native.with_native_ops(model, check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node if "MatMul" in nd.op_type] == [
        "PackedMatMul", "MatMul", "MatMul", "MatMul", "MatMul"]
    x = rng.standard_normal((2, 8), dtype=np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    got = _session(native).run(None, {"x": x})
    for a, e in zip(got, want):
        assert _rel(a, e) < 1e-5


def test_packed_matmul_rejects_a_mismatched_input_with_its_own_message():
    w = np.random.default_rng(2).standard_normal((16, 40), dtype=np.float32)
    native = ort_native.with_native_ops(_matmul_model(16, 40, w, 2), check_xlstm=False)
    native.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "K"  # let a wrong K through
    with pytest.raises(Exception, match=r"xlstm\.cpu::PackedMatMul: x must be \[\.\.\., K\] with K = 16"):
        _session(native).run(None, {"x": np.ones((2, 15), np.float32)})


def _matmul_add_model(w: np.ndarray, r_dims, r_const: np.ndarray | None = None, y_is_output: bool = False
                      ) -> onnx.ModelProto:
    """y = x W + r with x [B, S, K]: r a graph input of dims ``r_dims``, or the constant ``r_const``."""
    h = onnx.helper
    k, n = w.shape
    inits = [onnx.numpy_helper.from_array(w, "w")]
    inputs = [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "S", k])]
    if r_const is None:
        inputs.append(h.make_tensor_value_info("r", onnx.TensorProto.FLOAT, r_dims))
    else:
        inits.append(onnx.numpy_helper.from_array(r_const, "r"))
    outputs = [h.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)]
    if y_is_output:
        outputs.append(h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    graph = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"]), h.make_node("Add", ["r", "y"], ["z"])], "mma",
                         inputs, outputs, initializer=inits,
                         value_info=[h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "S", n])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    return model


@pytest.mark.parametrize("B,S,K,N", [(1, 1, 45, 33), (3, 7, 61, 97), (2, 9, 128, 300),
                                     (3, 45, 2048, 70)])  # 135 rows: blocks of 64 rows at K = 2048, and a rest
def test_packed_matmul_add_folds_a_residual_and_a_bias(B, S, K, N):
    rng = np.random.default_rng(B * S + N)
    w = rng.standard_normal((K, N), dtype=np.float32)
    x = rng.standard_normal((B, S, K), dtype=np.float32)
    for r_dims, r_const in ((["B", "S", N], None), (None, rng.standard_normal(N, dtype=np.float32))):
        r = rng.standard_normal((B, S, N), dtype=np.float32) if r_const is None else r_const
        native = ort_native.with_native_ops(_matmul_add_model(w, r_dims, r_const), check_xlstm=False)
        assert [nd.op_type for nd in native.graph.node] == ["PackedMatMulAdd"]
        (z,) = _session(native).run(None, {"x": x} if r_const is not None else {"x": x, "r": r})
        ref = x.astype(np.float64) @ w.astype(np.float64) + r.astype(np.float64)
        assert z.shape == ref.shape
        assert _rel(z, ref) < 1e-5  # as the plain product: one more float32 rounding


def test_packed_matmul_add_is_folded_only_where_shapes_are_known_equal():
    w = np.random.default_rng(4).standard_normal((16, 40), dtype=np.float32)
    kept = {  # the Add must stay: a broadcast, an unknown shape, a product read elsewhere
        "broadcast": _matmul_add_model(w, ["B", 1, 40]),
        "unknown": _matmul_add_model(w, None),
        "bias of the wrong length": _matmul_add_model(w, None, np.ones(39, np.float32)),
        "product also an output": _matmul_add_model(w, ["B", "S", 40], y_is_output=True),
    }
    for why, model in kept.items():
        ops = [nd.op_type for nd in ort_native.with_native_ops(model, check_xlstm=False).graph.node]
        assert ops == ["PackedMatMul", "Add"], why


def test_packed_matmul_add_rejects_a_mismatched_addend_with_its_own_message():
    w = np.random.default_rng(2).standard_normal((16, 40), dtype=np.float32)
    native = ort_native.with_native_ops(_matmul_add_model(w, ["B", "S", 40]), check_xlstm=False)
    native.graph.input[1].type.tensor_type.shape.dim[2].dim_param = "N"  # let a wrong addend through
    with pytest.raises(Exception, match=r"xlstm\.cpu::PackedMatMulAdd: r must have the product's shape"):
        _session(native).run(None, {"x": np.ones((2, 3, 16), np.float32), "r": np.ones((2, 3, 39), np.float32)})


def _rms_norm_matmul_model(w: np.ndarray, g: np.ndarray, eps: float, normed_is_output: bool = False,
                           cap: float | None = None, round_bf16: bool = False) -> onnx.ModelProto:
    """y = RMSNorm(x) W in the exported form: Mul(Div(x, Sqrt(Add(ReduceMean(Pow(x, 2)), eps))), g),
    with ``round_bf16`` rounded on its way as a bf16 export's graph on the CPU provider does it
    (Cast to bfloat16 and back: ort.upcast_bfloat16), then, with ``cap``, the logits' soft cap
    Mul(Tanh(Div(y, cap)), cap)."""
    h, f32 = onnx.helper, onnx.TensorProto.FLOAT
    k, n = w.shape
    c = lambda name, v: onnx.numpy_helper.from_array(np.asarray(v), name)  # noqa: E731
    nodes = [h.make_node("Pow", ["x", "two"], ["sq"]), h.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             h.make_node("Add", ["ms", "eps"], ["ms_eps"]), h.make_node("Sqrt", ["ms_eps"], ["rms"]),
             h.make_node("Div", ["x", "rms"], ["xn"]), h.make_node("Mul", ["xn", "g"], ["normed"]),
             h.make_node("MatMul", ["normed", "w"], ["y"])]
    if round_bf16:
        nodes[-1].input[0] = "normed_bf16"
        nodes[-1:-1] = [h.make_node("Cast", ["normed"], ["normed_bf16__bf16"], to=onnx.TensorProto.BFLOAT16),
                        h.make_node("Cast", ["normed_bf16__bf16"], ["normed_bf16"], to=f32)]
    consts = []
    if cap is not None:
        nodes[-1].output[0] = "p"
        nodes += [h.make_node("Div", ["p", "cap"], ["pc"]), h.make_node("Tanh", ["pc"], ["t"]),
                  h.make_node("Mul", ["t", "cap"], ["y"])]
        consts.append(onnx.numpy_helper.from_array(np.float32(cap), "cap"))
    outputs = [h.make_tensor_value_info("y", f32, None)]
    if normed_is_output:
        outputs.append(h.make_tensor_value_info("normed", f32, None))
    graph = h.make_graph(nodes, "norm_mm", [h.make_tensor_value_info("x", f32, ["B", "S", k])], outputs,
                         initializer=[c("two", np.float32(2.0)), c("axes", np.array([-1], np.int64)),
                                      c("eps", np.float32(eps)), c("g", g), c("w", w), *consts])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize("B,S,K,N,cap", [(1, 1, 45, 33, None), (3, 7, 128, 97, 30.0), (2, 9, 61, 300, None),
                                         (2, 5, 64, 200, 4.0),  # a cap well inside the products' range
                                         (2, 70, 2048, 40, 30.0)])  # 140 rows: three row blocks
def test_packed_norm_matmul_folds_the_exported_rms_norm_and_soft_cap(B, S, K, N, cap):
    rng = np.random.default_rng(K + N)
    w, g = rng.standard_normal((K, N), dtype=np.float32), 1 + 0.3 * rng.standard_normal(K, dtype=np.float32)
    x = 3 * rng.standard_normal((B, S, K), dtype=np.float32)
    native = ort_native.with_native_ops(_rms_norm_matmul_model(w, g, 1e-6, cap=cap), check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["PackedNormMatMul"]
    (y,) = _session(native).run(None, {"x": x})
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * g @ w.astype(np.float64)
    if cap is not None:
        ref = cap * np.tanh(ref / cap)
    # as the plain product, plus the K-term mean of squares; tanh as 1 - 2 / (e^2u + 1): absolute
    # error ~1e-7 cap near 0, relative to the largest |y| below that
    assert _rel(y, ref) < 1e-5


def test_packed_norm_matmul_rounds_to_bfloat16_as_onnxruntimes_cast():
    """round_bf16 = 1 rounds as onnxruntime's Cast to bfloat16 does, to the bit: rows of ones with
    eps 0 make RMSNorm(x) = g exactly, and W = I hands the rounded g out, so g holds the values to
    round: ties both ways, subnormals, the largest finite ones, both signs."""
    rng = np.random.default_rng(3)
    tie = np.float32(1 + 2.0**-8)  # halfway between two bfloat16 values: to the even one
    special = np.array([tie, -tie, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-23, 1e-40, -3e-39, 3.3e38, -0.0, 0.0,
                        np.float32(1.00390625), 65504.0, 2.0**-126], np.float32)
    g = np.concatenate([special, (rng.standard_normal(101) * 10.0 ** rng.integers(-30, 30, 101)).astype(np.float32)])
    k = len(g)
    model = _rms_norm_matmul_model(np.eye(k, dtype=np.float32), g, 0.0, round_bf16=True)
    native = ort_native.with_native_ops(model, check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["PackedNormMatMul"]
    assert onnx.helper.get_attribute_value(next(a for a in native.graph.node[0].attribute if a.name == "round_bf16")) == 1
    x = np.ones((1, 3, k), np.float32)
    (got,), (want,) = _session(native).run(None, {"x": x}), _session(model).run(None, {"x": x})
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(got[0, 0], _bf16_rounded(torch.from_numpy(g).double()).float().numpy())


@pytest.mark.parametrize("B,S,K,N", [(1, 1, 45, 33), (3, 7, 128, 97)])
def test_packed_norm_matmul_folds_a_bf16_exports_rounded_norm(B, S, K, N):
    """A bf16 export's RMSNorm rounds its output to bfloat16 before the product: the fold keeps the
    rounding (round_bf16 = 1). Against float64 rounded there, as the layer's test."""
    rng = np.random.default_rng(K * N)
    w, g = rng.standard_normal((K, N), dtype=np.float32), 1 + 0.3 * rng.standard_normal(K, dtype=np.float32)
    x = 3 * rng.standard_normal((B, S, K), dtype=np.float32)
    native = ort_native.with_native_ops(_rms_norm_matmul_model(w, g, 1e-6, round_bf16=True), check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["PackedNormMatMul"]
    (y,) = _session(native).run(None, {"x": x})
    x64 = torch.from_numpy(x).double()
    normed = _bf16_rounded(x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * torch.from_numpy(g).double())
    ref = (normed @ torch.from_numpy(w).double()).numpy()
    assert _nearly_all_close(y, ref) < 0.02  # a value near a tie moves ~K outputs a little
    unrounded = (x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-6) * torch.from_numpy(g).double()
                 @ torch.from_numpy(w).double()).numpy()
    assert _nearly_all_close(unrounded, ref) > 0.5


def _layer_norm_matmul_model(w: np.ndarray, g: np.ndarray, beta: np.ndarray | None, eps: float,
                             normed_is_output: bool = False) -> onnx.ModelProto:
    """y = LayerNormalization[axis -1](x, g, beta?) W (the paper blocks' norm before a product)."""
    h, f32 = onnx.helper, onnx.TensorProto.FLOAT
    k, n = w.shape
    inits = [onnx.numpy_helper.from_array(g, "g"), onnx.numpy_helper.from_array(w, "w")]
    if beta is not None:
        inits.append(onnx.numpy_helper.from_array(beta, "beta"))
    nodes = [h.make_node("LayerNormalization", ["x", "g", "beta" if beta is not None else ""], ["normed"],
                         axis=-1, epsilon=eps),
             h.make_node("MatMul", ["normed", "w"], ["y"])]
    outputs = [h.make_tensor_value_info("y", f32, None)]
    if normed_is_output:
        outputs.append(h.make_tensor_value_info("normed", f32, None))
    graph = h.make_graph(nodes, "ln_mm", [h.make_tensor_value_info("x", f32, ["B", "S", k])], outputs,
                         initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 37, 33), (3, 7, 128, 97), (2, 9, 61, 300)])
def test_packed_ln_matmul_folds_the_layer_norm(B, S, K, N, with_bias):
    rng = np.random.default_rng(K + N)
    w = rng.standard_normal((K, N), dtype=np.float32)
    g = (1 + 0.3 * rng.standard_normal(K)).astype(np.float32)
    beta = (0.3 * rng.standard_normal(K)).astype(np.float32) if with_bias else None
    x = 2 + 3 * rng.standard_normal((B, S, K), dtype=np.float32)  # an offset: the mean matters
    native = ort_native.with_native_ops(_layer_norm_matmul_model(w, g, beta, 1e-5), check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["PackedLnMatMul"]
    (y,) = _session(native).run(None, {"x": x})
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    normed = (x64 - mean) / np.sqrt(((x64 - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * g
    ref = (normed + (beta if with_bias else 0)) @ w.astype(np.float64)
    assert _rel(y, ref) < 1e-5  # as the plain product, plus the K-term mean and variance


def test_packed_ln_matmul_leaves_a_norm_read_elsewhere():
    rng = np.random.default_rng(3)
    w, g = rng.standard_normal((16, 8), dtype=np.float32), np.ones(16, np.float32)
    native = ort_native.with_native_ops(_layer_norm_matmul_model(w, g, None, 1e-5, normed_is_output=True),
                                        check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["LayerNormalization", "PackedMatMul"]


def _glu_model(w: np.ndarray, gelu: bool = False, sqrt2: float = float(np.sqrt(2.0)), axis: int = -1
               ) -> onnx.ModelProto:
    """out = (act(a) * b) W + r with [a | b] = Split(z): act silu (the exported 7B FFN after its
    up-product) or, where ``gelu``, the exact GELU as the paper blocks' GeGLU exports it, a over
    ``sqrt2``; z [B, S, 2K] split on ``axis``."""
    h, f32 = onnx.helper, onnx.TensorProto.FLOAT
    k, n = w.shape
    if gelu:
        act = [h.make_node("Div", ["a", "sqrt2"], ["scaled"]), h.make_node("Erf", ["scaled"], ["erf"]),
               h.make_node("Add", ["erf", "one"], ["erf1"]), h.make_node("Mul", ["half", "erf1"], ["cdf"]),
               h.make_node("Mul", ["a", "cdf"], ["act"])]
    else:
        act = [h.make_node("Sigmoid", ["a"], ["sa"]), h.make_node("Mul", ["a", "sa"], ["act"])]
    nodes = [h.make_node("Split", ["z", "halves"], ["a", "b"], axis=axis), *act,
             h.make_node("Mul", ["act", "b"], ["gated"]),
             h.make_node("MatMul", ["gated", "w"], ["y"]), h.make_node("Add", ["r", "y"], ["out"])]
    scalars = {"sqrt2": sqrt2, "one": 1.0, "half": 0.5}
    graph = h.make_graph(nodes, "glu", [h.make_tensor_value_info("z", f32, ["B", "S", 2 * k]),
                                        h.make_tensor_value_info("r", f32, ["B", "S", n])],
                         [h.make_tensor_value_info("out", f32, None)],
                         initializer=[onnx.numpy_helper.from_array(np.array([k, k], np.int64), "halves"),
                                      onnx.numpy_helper.from_array(w, "w")]
                         + [onnx.numpy_helper.from_array(np.array(v, np.float32), name) for name, v in scalars.items()],
                         value_info=[h.make_tensor_value_info("y", f32, ["B", "S", n])])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


# gelu, the split's axis (the paper's exports say 2), the GELU's sqrt 2 (a bf16 export's: 1.4140625)
@pytest.mark.parametrize("gelu,axis,sqrt2", [(False, -1, None), (True, -1, ort_native.SQRT2), (True, 2, ort_native.SQRT2),
                                             (True, -1, ort_native.SQRT2_BF16)])
@pytest.mark.parametrize("B,S,K,N", [(1, 1, 37, 33), (3, 7, 128, 97), (2, 9, 61, 300)])
def test_packed_glu_matmul_add_folds_the_exported_swiglu_and_geglu(B, S, K, N, gelu, axis, sqrt2):
    rng = np.random.default_rng(K * N)
    w = rng.standard_normal((K, N), dtype=np.float32)
    z = 4 * rng.standard_normal((B, S, 2 * K), dtype=np.float32)  # sigmoid (and erf) from ~0 to ~1
    r = rng.standard_normal((B, S, N), dtype=np.float32)
    native = ort_native.with_native_ops(_glu_model(w, gelu, sqrt2=sqrt2 or ort_native.SQRT2, axis=axis),
                                        check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["PackedGluMatMulAdd"]
    if gelu:
        assert attrs(native.graph.node[0])["gelu_div"] == sqrt2
    (out,) = _session(native).run(None, {"z": z, "r": r})
    a, b = z[..., :K].astype(np.float64), z[..., K:].astype(np.float64)
    act = a * 0.5 * (1 + torch.erf(torch.from_numpy(a / np.float64(sqrt2 or 1.0))).numpy()) if gelu else a / (1 + np.exp(-a))
    ref = (act * b) @ w.astype(np.float64) + r
    assert _rel(out, ref) < 1e-5  # exp to ~2e-7 relative (erf to ~3 ulps), then the product


@pytest.mark.parametrize("sqrt2", [ort_native.SQRT2, ort_native.SQRT2_BF16])
def test_geglu_erf_against_float64(sqrt2):
    """The GeGLU's erf (cpu_vec.h erf16) against float64 over [-6, 6], through a GeGLU whose b is 1
    and whose product is the identity: y = gelu(a) as the kernel computes it, over the graph's sqrt 2
    (float32's, or a bf16 export's: 1.1e-4 less, ~3e-5 |a| apart near |a| = 1)."""
    k = 160
    w = np.eye(k, dtype=np.float32)
    a = np.linspace(-6, 6, 48 * k, dtype=np.float32).reshape(48, 1, k)
    z = np.concatenate([a, np.ones_like(a)], axis=-1)
    native = ort_native.with_native_ops(_glu_model(w, gelu=True, sqrt2=sqrt2), check_xlstm=False)
    (y,) = _session(native).run(None, {"z": z, "r": np.zeros_like(a)})
    a64 = a.astype(np.float64)
    ref = a64 * 0.5 * (1 + torch.erf(torch.from_numpy(a64 / np.float64(sqrt2))).numpy())
    # erf's few ulps (of 1 near |erf| ~ 1, where 1 + erf cancels) and gelu's own float32 steps,
    # times a: 1.2e-7 |a| at most here (onnxruntime's Erf in the unfused graph: 1.0e-7 |a|)
    assert np.max(np.abs(y - ref) / np.maximum(np.abs(a64), 1e-3)) < 2e-7


def test_glu_fold_leaves_another_gelu_or_split():
    """A GELU over some other constant than sqrt 2 is not the exact GELU, and halves split on an
    axis other than the last are not the GLU's: the product stays unfolded."""
    w = np.random.default_rng(0).standard_normal((16, 8), dtype=np.float32)
    for model in (_glu_model(w, gelu=True, sqrt2=1.5), _glu_model(w, gelu=True, axis=1), _glu_model(w, axis=1)):
        native = ort_native.with_native_ops(model, check_xlstm=False)
        assert [nd.op_type for nd in native.graph.node].count("PackedGluMatMulAdd") == 0


# --- bfloat16 weights -------------------------------------------------------------------------------


def _bf16_values(a: np.ndarray) -> np.ndarray:
    """``a`` truncated to bfloat16 values (float32 with the low 16 bits zero): a bf16 checkpoint's."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)


def test_bfloat16_bits_of_bfloat16_values_only():
    w = _bf16_values(np.random.default_rng(0).standard_normal((7, 33), dtype=np.float32))
    bits = ort_native.bfloat16_bits(w)
    assert bits.dtype == np.uint16 and bits.shape == w.shape
    assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), w)  # exact: the same values
    for bit in range(16):  # one value off the bfloat16 grid by any one of the low 16 bits
        off = w.copy()
        off.view(np.uint32)[3, 5] |= np.uint32(1 << bit)
        assert ort_native.bfloat16_bits(off) is None, bit


def _bf16_products(w, g):
    """(model, feeds, the Bf16 op) for each packed product kind over the weight ``w`` [K, N]."""
    rng = np.random.default_rng(w.shape[0])
    k, n = w.shape
    x = rng.standard_normal((2, 9, k), dtype=np.float32)
    r = rng.standard_normal((2, 9, n), dtype=np.float32)
    z = 4 * rng.standard_normal((2, 9, 2 * k), dtype=np.float32)
    return [(_matmul_model(k, n, w, 3), {"x": x}, "PackedMatMulBf16"),
            (_matmul_add_model(w, ["B", "S", n]), {"x": x, "r": r}, "PackedMatMulAddBf16"),
            (_rms_norm_matmul_model(w, g, 1e-6, cap=30.0), {"x": x}, "PackedNormMatMulBf16"),
            (_rms_norm_matmul_model(w, g, 1e-6, round_bf16=True), {"x": x}, "PackedNormMatMulBf16"),
            (_layer_norm_matmul_model(w, g, 0.5 * g, 1e-5), {"x": x}, "PackedLnMatMulBf16"),
            (_glu_model(w), {"z": z, "r": r}, "PackedGluMatMulAddBf16"),
            (_glu_model(w, gelu=True), {"z": z, "r": r}, "PackedGluMatMulAddBf16")]


@pytest.mark.parametrize("K,N", [(45, 33), (128, 300), (384, 64)])
def test_bf16_packed_products_equal_float32_ones_to_the_bit(K, N, monkeypatch):
    """A weight whose values are all bfloat16 values (a bf16 checkpoint, widened) is packed as
    bfloat16 and read by the ...Bf16 ops: widening is exact and the sums run in the same order, so
    every kind of packed product gives the float32 packing's results to the bit."""
    monkeypatch.setattr(ort_native, "BF16_MIN_BYTES", 0)  # small weights too
    rng = np.random.default_rng(K + N)
    w = _bf16_values(rng.standard_normal((K, N), dtype=np.float32))
    g = (1 + 0.3 * rng.standard_normal(K)).astype(np.float32)
    for model, feeds, op in _bf16_products(w, g):
        bf16 = ort_native.with_native_ops(model, check_xlstm=False)
        assert [nd.op_type for nd in bf16.graph.node] == [op]
        (packed,) = [t for t in bf16.graph.initializer if t.name.endswith(".packed32bf16")]
        assert packed.data_type == onnx.TensorProto.BFLOAT16
        with monkeypatch.context() as m:
            m.setattr(ort_native, "bfloat16_bits", lambda _: None)
            f32 = ort_native.with_native_ops(model, check_xlstm=False)
        assert [nd.op_type for nd in f32.graph.node] == [op.removesuffix("Bf16")]
        (got,), (want,) = _session(bf16).run(None, feeds), _session(f32).run(None, feeds)
        assert np.array_equal(got, want), op


def test_only_large_weights_on_the_bfloat16_grid_are_held_as_bfloat16():
    """A weight of 1 MiB (512 x 512) of bfloat16 values is held as bfloat16; a smaller one of the
    same values (512 x 480: it would stay in cache, only the widening would cost) and float32
    values off the grid stay float32."""
    rng = np.random.default_rng(1)
    big = _bf16_values(rng.standard_normal((512, 512), dtype=np.float32))
    for w, op in ((big, "PackedMatMulBf16"), (np.ascontiguousarray(big[:, :480]), "PackedMatMul"),
                  (rng.standard_normal((512, 512), dtype=np.float32), "PackedMatMul")):
        native = ort_native.with_native_ops(_matmul_model(512, w.shape[1], w, 2), check_xlstm=False)
        assert [nd.op_type for nd in native.graph.node] == [op], w.shape


def test_packed_norm_matmul_leaves_a_norm_read_elsewhere():
    rng = np.random.default_rng(1)
    model = _rms_norm_matmul_model(rng.standard_normal((16, 40), dtype=np.float32), np.ones(16, np.float32), 1e-6,
                                   normed_is_output=True)
    ops = [nd.op_type for nd in ort_native.with_native_ops(model, check_xlstm=False).graph.node]
    assert ops[-1] == "PackedMatMul" and "Pow" in ops


# --- block-diagonal products ----------------------------------------------------------------------


def _block_diag_model(w: np.ndarray, x_dims, *, reshape=None, after_perm=(1, 0, 2), readers: int = 1
                      ) -> onnx.ModelProto:
    """The exported HeadwiseLinear (models/layers.py): Reshape(x, [-1, nb, blk]), Transpose[1, 0, 2],
    MatMul by W [nb, bi, bo], Transpose, Reshape back to x's rows; ``readers`` products with weights
    w, w + 1, ... read the one Reshape and Transpose (the paper block's q and k)."""
    h = onnx.helper
    nb, bi, bo = w.shape
    inits = [onnx.numpy_helper.from_array(np.array(reshape or [-1, nb, bi], np.int64), "shape"),
             onnx.numpy_helper.from_array(np.array([-1, nb * bo], np.int64), "back")]
    nodes = [h.make_node("Reshape", ["x", "shape"], ["r"]), h.make_node("Transpose", ["r"], ["t"], perm=[1, 0, 2])]
    outputs = []
    for j in range(readers):
        inits.append(onnx.numpy_helper.from_array((w + j).astype(w.dtype), f"w{j}"))
        nodes += [h.make_node("MatMul", ["t", f"w{j}"], [f"m{j}"]),
                  h.make_node("Transpose", [f"m{j}"], [f"u{j}"], perm=list(after_perm)),
                  h.make_node("Reshape", [f"u{j}", "back"], [f"y{j}"])]
        outputs.append(h.make_tensor_value_info(f"y{j}", onnx.TensorProto.FLOAT, None))
    graph = h.make_graph(nodes, "blockdiag", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_dims)],
                         outputs, initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def _block_diag_ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    nb, bi, bo = w.shape
    rows = x.astype(np.float64).reshape(-1, nb, bi)
    return np.einsum("rjb,jba->rja", rows, w.astype(np.float64)).reshape(-1, nb * bo)


def test_pack_block_diagonal_layout():
    w = np.random.default_rng(0).standard_normal((5, 4, 4), dtype=np.float32)
    p = ort_native.pack_block_diagonal(w)
    assert p.shape == (2, 4, 16) and p.flags.c_contiguous  # 4 blocks of 4 per 16-float vector, 5 -> 2
    for j in range(5):
        c, lane = divmod(j, 4)
        assert np.array_equal(p[c, :, 4 * lane : 4 * lane + 4], w[j])
    assert not p[1, :, 4:].any()  # past the last block: zero
    for bad in (np.zeros((3, 4, 8), np.float32), np.zeros((3, 3, 3), np.float32), np.zeros((3, 32, 32), np.float32)):
        with pytest.raises(ValueError, match=r"\[nb, BLK, BLK\]"):
            ort_native.pack_block_diagonal(bad)


# (blocks, block size, x dims): the paper models' q/k/v (blocks of 4: 64 of them in tiny, 384 in
# xlstm-125m), every block size, a last vector part full (5 blocks of 4, 3 of 8, 9 of 1), decode and
# prefill rows, and enough rows (1,500 x 256 x 4) for the split over threads
@pytest.mark.parametrize("nb,blk,x_dims", [(64, 4, (1, 1)), (384, 4, (3, 1)), (5, 4, (3, 7)), (7, 2, (2, 5)),
                                           (3, 8, (5, 1)), (2, 16, (4, 3)), (9, 1, (2, 2)), (64, 4, (3, 500))])
def test_block_diag_matmul_matches_float64(nb, blk, x_dims):
    rng = np.random.default_rng(nb * blk + sum(x_dims))
    w = rng.standard_normal((nb, blk, blk), dtype=np.float32)
    x = rng.standard_normal((*x_dims, nb * blk), dtype=np.float32)
    native = ort_native.with_native_ops(_block_diag_model(w, [*x_dims, nb * blk]), check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["BlockDiagMatMul", "Reshape"]
    assert [t.name for t in native.graph.initializer] == ["back", "w0.blockdiag16"]  # the shape constant went
    (y,) = _session(native).run(None, {"x": x})
    assert y.dtype == np.float32 and y.shape == (np.prod(x_dims), nb * blk)
    # float32 sums of blk products against float64
    assert _rel(y, _block_diag_ref(x, w)) < 1e-6


def test_block_diag_rewrite_takes_products_that_share_their_input():
    """The paper block's q and k products read one Reshape + Transpose of the conv output: both are
    swapped, and the shared nodes go once nothing reads them."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 4), dtype=np.float32)
    x = rng.standard_normal((2, 3, 32), dtype=np.float32)
    model = _block_diag_model(w, [2, 3, 32], readers=2)
    native = ort_native.with_native_ops(model, check_xlstm=False)
    assert [nd.op_type for nd in native.graph.node] == ["BlockDiagMatMul", "Reshape"] * 2
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    for got, e, j in zip(_session(native).run(None, {"x": x}), want, range(2)):
        assert _rel(got, e) < 1e-6 and _rel(got, _block_diag_ref(x, w + j)) < 1e-6


def test_block_diag_rewrite_leaves_what_it_cannot_prove():
    """Blocks that are not square or not of 1, 2, 4, 8 or 16 (the sLSTM's [NH, DH, 2 DH] gate
    products), a float16 weight, a Reshape to other blocks than the weight's, another permutation
    after the product: each stays a standard MatMul and gives the same numbers."""
    rng = np.random.default_rng(4)
    f32 = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    cases = [(_block_diag_model(f32(4, 8, 16), [3, 32]), (3, 32)),
             (_block_diag_model(f32(4, 3, 3), [3, 12]), (3, 12)),
             (_block_diag_model(f32(2, 32, 32), [3, 64]), (3, 64)),
             (_block_diag_model(f32(4, 4, 4), [3, 16], reshape=[-1, 2, 8]), None),  # MatMul would fail: not run
             (_block_diag_model(f32(4, 4, 4), [4, 16], after_perm=(0, 1, 2)), (4, 16))]
    half = _block_diag_model(f32(4, 4, 4), [3, 16])
    half.graph.initializer[2].CopyFrom(onnx.numpy_helper.from_array(
        onnx.numpy_helper.to_array(half.graph.initializer[2]).astype(np.float16), "w0"))
    for model, x_dims in cases + [(half, None)]:
        native = ort_native.with_native_ops(model, check_xlstm=False)
        assert "MatMul" in [nd.op_type for nd in native.graph.node], model.graph.initializer[2].dims
        if x_dims is not None:
            x = rng.standard_normal(x_dims, dtype=np.float32)
            (want,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
            (got,) = _session(native).run(None, {"x": x})
            assert np.array_equal(got, want)


def test_block_diag_matmul_rejects_partial_rows_with_its_own_message():
    w = np.random.default_rng(5).standard_normal((4, 4, 4), dtype=np.float32)
    native = ort_native.with_native_ops(_block_diag_model(w, ["R", "C"]), check_xlstm=False)
    with pytest.raises(Exception, match=r"xlstm\.cpu::BlockDiagMatMul: x must hold whole rows of n = 16 values, "
                                        r"got 30 values"):
        _session(native).run(None, {"x": np.ones((3, 10), np.float32)})


# --- the paper blocks' causal convolutions ----------------------------------------------------------

INT64_MAX = np.iinfo(np.int64).max


def _conv_model(w: np.ndarray, bias: np.ndarray, *, silu: bool = True, dtype=np.float32, present_start=None,
                extra_output: str | None = None, round_bf16: bool = False) -> onnx.ModelProto:
    """models/layers.py CausalConv1d as exported (w [K, D]): cat = Concat[axis=1](past, x); the terms
    cat[:, k : k + 1 - K] (the last to the end) times w[k], summed by a chain of Adds, plus the bias;
    present = cat[:, 1 - K :]; then the block's SiLU (Sigmoid, Mul) when ``silu``. ``extra_output``
    names a value inside the pattern that the graph also outputs (read elsewhere); ``round_bf16``:
    past comes through a Cast to bfloat16 and back (a bf16 export's state on the CPU provider)."""
    h = onnx.helper
    K, D = w.shape
    tdt = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    const = lambda name, v: onnx.numpy_helper.from_array(np.array([v], np.int64), name)  # noqa: E731
    inits = [const("one", 1), const("to_end", INT64_MAX), const("present_start", present_start or 1 - K),
             onnx.numpy_helper.from_array(bias.astype(dtype), "bias")]
    nodes = [h.make_node("Concat", ["past", "x"], ["cat"], axis=1)]
    if round_bf16:
        nodes[0].input[0] = "past_rounded"
        nodes[:0] = [h.make_node("Cast", ["past"], ["past_bf16"], to=onnx.TensorProto.BFLOAT16),
                     h.make_node("Cast", ["past_bf16"], ["past_rounded"], to=onnx.TensorProto.FLOAT)]
    for k in range(K):
        inits += [const(f"start{k}", k), const(f"end{k}", k + 1 - K),
                  onnx.numpy_helper.from_array(w[k].astype(dtype), f"w{k}")]
        nodes += [h.make_node("Slice", ["cat", f"start{k}", f"end{k}" if k < K - 1 else "to_end", "one", "one"],
                              [f"s{k}"]),
                  h.make_node("Mul", [f"s{k}", f"w{k}"], [f"m{k}"])]
        if k:
            nodes.append(h.make_node("Add", [f"a{k - 1}" if k > 1 else "m0", f"m{k}"], [f"a{k}"]))
    nodes += [h.make_node("Slice", ["cat", "present_start", "to_end", "one", "one"], ["present"]),
              h.make_node("Add", [f"a{K - 1}", "bias"], ["conv"])]
    y = "conv"
    if silu:
        nodes += [h.make_node("Sigmoid", ["conv"], ["sig"]), h.make_node("Mul", ["conv", "sig"], ["y"])]
        y = "y"
    outputs = [h.make_tensor_value_info(n, tdt, None)
               for n in (y, "present", *([extra_output] if extra_output else []))]
    graph = h.make_graph(nodes, "conv", [h.make_tensor_value_info("x", tdt, ["B", "S", D]),
                                         h.make_tensor_value_info("past", tdt, ["B", K - 1, D])],
                         outputs, initializer=inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


def _conv_ref(x, past, w, bias, silu: bool):
    """float64: y[t] = sum_k cat[t + k] w[k] + bias (then silu), present = cat's last K - 1 rows."""
    K = w.shape[0]
    cat = np.concatenate([past, x], axis=1).astype(np.float64)
    S = x.shape[1]
    y = sum(cat[:, k : k + S] * w[k].astype(np.float64) for k in range(K)) + bias.astype(np.float64)
    if silu:
        y = y / (1 + np.exp(-y))
    return y, cat[:, S:]


# (B, S, K, D, silu): a decode step and prefill chunks, D a whole number of vectors or not (37: a
# partial one), the paper's K = 4 and others, shorter prompts than K - 1, the SiLU or not, and
# enough sequences (64 x 64 x 256 x 4) for the split over threads
@pytest.mark.parametrize("B,S,K,D,silu", [(1, 1, 4, 256, True), (3, 1, 4, 37, True), (2, 7, 4, 48, True),
                                          (3, 2, 4, 16, False), (2, 5, 2, 20, True), (1, 9, 6, 33, False),
                                          (64, 64, 4, 256, True)])
def test_causal_conv_matches_float64(B, S, K, D, silu):
    rng = np.random.default_rng(B * S + K * D)
    w, bias = rng.standard_normal((K, D), dtype=np.float32), rng.standard_normal(D, dtype=np.float32)
    x = rng.standard_normal((B, S, D), dtype=np.float32)
    past = rng.standard_normal((B, K - 1, D), dtype=np.float32)
    native = ort_native.with_native_ops(_conv_model(w, bias, silu=silu), check_xlstm=False)
    (node,) = native.graph.node
    assert node.op_type == "CausalConv" and attrs(node)["silu"] == int(silu)
    y, present = _session(native).run(None, {"x": x, "past": past})
    want_y, want_present = _conv_ref(x, past, w, bias, silu)
    assert y.dtype == np.float32 and y.shape == (B, S, D) and present.shape == (B, K - 1, D)
    assert np.array_equal(present, want_present)  # copied, not computed
    assert _rel(y, want_y) < 1e-6  # float32 sums of K products, a vector exp within ~2 ulps


@pytest.mark.parametrize("B,S,K,D", [(1, 1, 4, 256), (3, 2, 4, 37), (2, 7, 4, 48)])
def test_causal_conv_rounds_a_bf16_exports_state_to_bfloat16(B, S, K, D):
    """A bf16 export reads the conv state through a rounding point: the fold takes it (round_bf16
    = 1), and the kernel convolves the rounded state and hands it on in present, to the bit as
    onnxruntime's Cast rounds it."""
    rng = np.random.default_rng(B * S + K * D)
    w, bias = rng.standard_normal((K, D), dtype=np.float32), rng.standard_normal(D, dtype=np.float32)
    x = rng.standard_normal((B, S, D), dtype=np.float32)
    past = rng.standard_normal((B, K - 1, D), dtype=np.float32)
    model = _conv_model(w, bias, round_bf16=True)
    native = ort_native.with_native_ops(model, check_xlstm=False)
    (node,) = native.graph.node
    assert node.op_type == "CausalConv" and attrs(node)["round_bf16"] == 1 and node.input[1] == "past"
    y, present = _session(native).run(None, {"x": x, "past": past})
    rounded = _bf16_rounded(torch.from_numpy(past).double()).float().numpy()
    want_y, want_present = _conv_ref(x, rounded, w, bias, True)
    assert np.array_equal(present, want_present)
    assert np.array_equal(present, _session(model).run(None, {"x": x, "past": past})[1])
    assert _rel(y, want_y) < 1e-6
    assert _rel(_conv_ref(x, past, w, bias, True)[0], want_y) > 1e-4  # the rounding is what it checks


def test_causal_conv_rewrite_leaves_what_it_cannot_prove():
    """The pre-SiLU sum read elsewhere: the convolution is swapped, the SiLU stays. A term or a
    partial sum read elsewhere, float16 weights, a state slice that is not the last K - 1 rows: the
    standard nodes stay. Every case gives the standard graph's numbers."""
    rng = np.random.default_rng(6)
    K, D = 4, 24
    w, bias = rng.standard_normal((K, D), dtype=np.float32), rng.standard_normal(D, dtype=np.float32)
    x = rng.standard_normal((2, 3, D), dtype=np.float32)
    past = rng.standard_normal((2, K - 1, D), dtype=np.float32)
    cases = [(_conv_model(w, bias, extra_output="conv"), ["CausalConv", "Sigmoid", "Mul"]),
             (_conv_model(w, bias, extra_output="m2"), None),
             (_conv_model(w, bias, extra_output="a1"), None),
             (_conv_model(w, bias, present_start=-2), None),
             (_conv_model(w, bias, dtype=np.float16), None)]
    for model, ops in cases:
        native = ort_native.with_native_ops(model, check_xlstm=False)
        got_ops = [nd.op_type for nd in native.graph.node]
        if ops is None:
            assert "CausalConv" not in got_ops and len(got_ops) == len(model.graph.node)
        else:
            assert got_ops == ops
        dt = np.float16 if model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
        feeds = {"x": x.astype(dt), "past": past.astype(dt)}
        want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
        for got, e in zip(_session(native).run(None, feeds), want):
            assert got.shape == e.shape and _rel(got, e) < 1e-6


def test_causal_conv_rejects_a_mismatched_state_with_its_own_message():
    rng = np.random.default_rng(8)
    w, bias = rng.standard_normal((4, 8), dtype=np.float32), rng.standard_normal(8, dtype=np.float32)
    model = _conv_model(w, bias)
    native = ort_native.with_native_ops(model, check_xlstm=False)
    native.graph.input[1].type.tensor_type.ClearField("shape")  # then feed a past of 2 positions, not 3
    with pytest.raises(Exception, match=r"xlstm\.cpu::CausalConv: past must be \[B, K-1, D\] = \[1, 3, D\]"):
        _session(native).run(None, {"x": np.ones((1, 2, 8), np.float32), "past": np.ones((1, 2, 8), np.float32)})


# --- whole models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model, path): the paper stack (mLSTM + sLSTM) and the 7B-style stack, float32."""
    root = tmp_path_factory.mktemp("native")
    out = {}
    for kind, name in (("paper", "tiny"), ("large", "tiny-large")):
        model = perturbed_model(preset(name), seed=1)
        out[kind] = (model, export_onnx(model, root / f"{kind}.onnx", progress=False))
    return out


@pytest.mark.parametrize("kind", ["paper", "large"])
def test_native_model_matches_standard_bodies_prefill_and_decode(kind, exported):
    _, path = exported[kind]
    body, native = OrtModel(path, intra_op_threads=2), OrtModel(path, intra_op_threads=2, native_ops=True)
    rng = np.random.default_rng(7)
    B = 3
    ids = rng.integers(0, 256, (B, 7))
    (lb, sb), (ln, sn) = body.run(ids), native.run(ids)  # prefill: native sLSTM loop, chunkwise mLSTM
    for step in range(4):  # decode: native mLSTM step and sLSTM loop, state carried
        assert _rel(ln, lb) < TOL_MODEL, f"logits, step {step}"
        for key in sb:
            assert _rel(sn[key], sb[key]) < TOL_MODEL, f"state {key}, step {step}"
        tok = rng.integers(0, 256, (B, 1))
        (lb, sb), (ln, sn) = body.run(tok, sb), native.run(tok, sn)


def test_native_paper_model_runs_its_q_k_v_products_block_diagonal(exported):
    """tiny's two mLSTM blocks: q, k, v each a BlockDiagMatMul (blocks of 4), no batched MatMul of
    them left; the whole model's parity is the test above."""
    _, path = exported["paper"]
    native = ort_native.with_native_ops(onnx.load(path))
    ops = [nd.op_type for nd in native.graph.node]
    inits = {t.name: t for t in native.graph.initializer}
    assert ops.count("BlockDiagMatMul") == 6
    assert not [nd for nd in native.graph.node if nd.op_type == "MatMul" and nd.input[1] in inits
                and len(inits[nd.input[1]].dims) == 3 and inits[nd.input[1]].dims[1] == 4]


def test_native_paper_model_runs_its_convolutions_as_causal_conv(exported):
    """tiny's three convolutions (two mLSTM blocks, one sLSTM block), each with its SiLU, are one
    CausalConv each; no Concat of a conv state is left. The whole model's parity is the test above."""
    _, path = exported["paper"]
    native = ort_native.with_native_ops(onnx.load(path))
    convs = [nd for nd in native.graph.node if nd.op_type == "CausalConv"]
    assert sorted(nd.input[1] for nd in convs) == ["past.0.conv", "past.1.conv", "past.2.conv"]
    assert all(attrs(nd)["silu"] == 1 for nd in convs)
    assert not [nd for nd in native.graph.node if nd.op_type == "Concat" and nd.input[0].endswith(".conv")]


@pytest.mark.parametrize("kind", ["paper", "large"])
def test_native_decoder_updates_mlstm_states_in_place(kind, exported):
    """The decoder binds the mLSTM states to one buffer (input and output): those mLSTMLayer reads
    (7B-style), and those of the paper blocks' mLSTM nodes, whose decode step is mLSTMStep inside an
    If. The same numbers as run(), step after step; every other state (the paper blocks' conv
    windows, the sLSTM's) keeps two buffers taken by turns."""
    model, path = exported[kind]
    om = OrtModel(path, intra_op_threads=2, native_ops=True)
    cfg = model.config
    expected = {f"{b}.{s}" for b in range(cfg.num_blocks) if b not in cfg.slstm_at for s in "cnm"}
    assert expected < set(om.state_names) if kind == "paper" else expected == set(om.state_names)
    assert om._inplace_states == expected
    dec = om.decoder()
    rng = np.random.default_rng(9)
    ids = rng.integers(0, 256, (3, 6))
    (lr, sr), (ld, sd) = om.run(ids), dec(ids)
    for step in range(3):
        before = {k: v.ctypes.data for k, v in sd.items()}
        tok = rng.integers(0, 256, (3, 1))
        (lr, sr), (ld, sd) = om.run(tok, sr), dec(tok, sd)
        assert np.array_equal(ld, lr) and all(np.array_equal(sd[k], sr[k]) for k in sr), step
        moved = {k for k in sd if sd[k].ctypes.data != before[k]}
        assert moved == set(om.state_names) - expected, step


def test_native_model_reads_an_external_data_export(exported, tmp_path):
    """The native rewrite packs weights read from OUTPUT.data (what every export over 2 GB has,
    its sibling MatMuls fused there): the same numbers, to the bit, as from the inline export."""
    model, path = exported["large"]
    ext = export_onnx(model, tmp_path / "ext.onnx", progress=False, external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 0
    inline, external = (OrtModel(p, intra_op_threads=1, native_ops=True) for p in (path, ext))
    ids = np.random.default_rng(11).integers(0, 256, (2, 9))
    (la, sa), (lb, sb) = inline.run(ids), external.run(ids)
    tok = np.random.default_rng(12).integers(0, 256, (2, 1))
    (la, sa), (lb, sb) = inline.run(tok, sa), external.run(tok, sb)
    assert np.array_equal(la, lb) and all(np.array_equal(sa[k], sb[k]) for k in sa)


def test_native_model_greedy_generation_equals_torch(exported):
    from xlstm_export.generate import torch_runner

    model, path = exported["large"]
    prompt = np.array([list(b"xLSTM on CPU")], np.int64)
    ref = generate(torch_runner(model), prompt, 12)
    got = generate(OrtModel(path, native_ops=True).run, prompt, 12)
    assert np.array_equal(got.tokens, ref.tokens)


def test_cli_generate_and_validate_with_native_ops(exported, capsys):
    _, path = exported["paper"]
    assert cli(["generate", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--quiet"]) == 0
    body_tokens = capsys.readouterr().out.splitlines()[0]
    assert cli(["generate", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--native-ops"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == body_tokens
    assert "onnxruntime (native kernels): prefill 3 tokens" in captured.err  # the timing line
    assert cli(["generate", "tiny", "--max-new-tokens", "2", "--native-ops"]) == 2  # not an .onnx target
    assert "--native-ops applies to an .onnx target" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_native_ops_serve_low_precision_exports(dtype, tmp_path):
    """The bodies cast to float32 before the native nodes, so fp16 / bf16 graphs use them unchanged
    (bf16 on the CPU provider after OrtModel's float32 upcast of the graph)."""
    torch.manual_seed(2)
    path = export_onnx(xLSTMLM(preset("tiny-large")).eval(), tmp_path / f"{dtype}.onnx", dtype=dtype,
                       progress=False)
    body, native = OrtModel(path), OrtModel(path, native_ops=True)
    ids = np.random.default_rng(3).integers(0, 256, (2, 5))
    (lb, sb), (ln, sn) = body.run(ids), native.run(ids)
    tok = np.array([[1], [2]])
    (lb, sb), (ln, sn) = body.run(tok, sb), native.run(tok, sn)
    # the cells compute in float32 either way; h then passes one T rounding -> the dtype's limit
    limit = C.MAX_RELATIVE_ERROR[C.canonical_dtype(dtype)]
    assert _rel(ln, lb) < limit
    for key in sb:
        assert _rel(sn[key], sb[key]) < limit


def test_bf16_export_packs_its_weights_as_bfloat16_with_the_same_results(tmp_path, monkeypatch):
    """A bf16 export on the CPU provider: every packed weight is held as bfloat16 (half the bytes a
    decode step streams), and prefill and decode give what the float32 packing gives, to the bit."""
    monkeypatch.setattr(ort_native, "BF16_MIN_BYTES", 0)  # tiny-large's weights are small
    torch.manual_seed(4)
    path = export_onnx(xLSTMLM(preset("tiny-large")).eval(), tmp_path / "bf16.onnx", dtype="bf16", progress=False)
    fast = OrtModel(path, native_ops=True)
    with monkeypatch.context() as m:
        m.setattr(ort_native, "bfloat16_bits", lambda _: None)
        wide = OrtModel(path, native_ops=True)
    rewritten = ort_native.with_native_ops(upcast_bfloat16(onnx.load(path)))  # what OrtModel runs
    products = [nd.op_type for nd in rewritten.graph.node if nd.op_type.startswith("Packed")]
    assert products and all(op.endswith("Bf16") for op in products)
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 256, (2, 9))
    (la, sa), (lb, sb) = fast.run(ids), wide.run(ids)
    for _ in range(3):
        assert np.array_equal(la, lb) and all(np.array_equal(sa[k], sb[k]) for k in sa)
        tok = rng.integers(0, 256, (2, 1))
        (la, sa), (lb, sb) = fast.run(tok, sa), wide.run(tok, sb)


@pytest.mark.parametrize("name", ["tiny-large", "tiny"])
def test_bf16_export_is_fused_as_a_float32_one(name, tmp_path, monkeypatch):
    """A bf16 export on the CPU provider (ort.upcast_bfloat16: its Casts to float32 of widened values
    gone, its value types float32) gets the float32 export's folds: the same native nodes, those
    whose input or output the graph rounds to bfloat16 rounding there (round_bf16 = 1: the norms
    before the products, the mLSTM and sLSTM layers, the paper blocks' convolution states; the
    rounding itself is checked op by op above), the GeGLU dividing by bfloat16's sqrt 2. Prefill and decode against
    the same graph with the rounding points left as standard nodes, within a tenth of bfloat16's
    limit: a value within float32 rounding of a tie between two bfloat16 values may round the other
    way (2^-8 of it), and all that follows in its row moves with it (seen: up to 7e-4 of the
    largest logit). Its decoder, the mLSTM states bound in place, gives run()'s numbers to the bit."""
    torch.manual_seed(4)
    model = xLSTMLM(preset(name)).eval()
    paths = {dtype: export_onnx(model, tmp_path / f"{dtype}.onnx", dtype=dtype, progress=False)
             for dtype in ("fp32", "bf16")}
    upcast = upcast_bfloat16(onnx.load(paths["bf16"]))
    assert not any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in upcast.graph.value_info)
    fused = {"bf16": ort_native.with_native_ops(upcast),
             "fp32": ort_native.with_native_ops(onnx.load(paths["fp32"]))}
    assert _op_counts(fused["bf16"]) == _op_counts(fused["fp32"])
    for dtype, rounded, sqrt2 in (("bf16", 1, ort_native.SQRT2_BF16), ("fp32", 0, ort_native.SQRT2)):
        for nd in fused[dtype].graph.node:
            if nd.op_type in ("PackedNormMatMul", "mLSTMLayer", "mLSTMPaperLayer", "sLSTMPaperLayer", "CausalConv"):
                assert attrs(nd)["round_bf16"] == rounded, (dtype, nd.name)
            if nd.op_type == "PackedGluMatMulAdd" and attrs(nd)["gelu"]:
                assert attrs(nd)["gelu_div"] == sqrt2, (dtype, nd.name)
    fast = OrtModel(paths["bf16"], native_ops=True)
    with monkeypatch.context() as m:
        m.setattr(ort_native, "_bf16_round_trip", lambda *_: None)
        plain = OrtModel(paths["bf16"], native_ops=True)
    rng = np.random.default_rng(8)
    ids = rng.integers(0, 256, (3, 9))
    (la, sa), (lb, sb) = fast.run(ids), plain.run(ids)
    limit = C.MAX_RELATIVE_ERROR["bfloat16"] / 10
    dec = fast.decoder()  # its mLSTM states bound in place, as the fused layers allow
    assert fast._inplace_states and fast._inplace_states <= set(fast.state_names)
    ld, sd = dec(ids)
    for step in range(4):
        assert _rel(la, lb) < limit, step
        for k in sa:
            assert _rel(sa[k], sb[k]) < limit, (step, k)
        assert all(np.array_equal(sd[k], sa[k]) for k in sa), step
        tok = rng.integers(0, 256, (3, 1))
        (la, sa), (lb, sb), (ld, sd) = fast.run(tok, sa), plain.run(tok, sb), dec(tok, sd)
        assert np.array_equal(ld, la), step  # a decode step's logits: the decoder's last position
