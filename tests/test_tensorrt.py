"""TensorRT stage: build engines with the xlstm plugins (or from the function bodies), run them,
compare with onnxruntime.

The ``tensorrt`` tier (``pytest -m tensorrt``) needs TensorRT >= 10.9 and a GPU and skips with the
reason otherwise. The unmarked tests run everywhere (CI): ONNX inspection, the onnxruntime side of
the comparison, and the one clear error where TensorRT is missing. TensorRT-RTX builds (no GPU) are
in tests/test_build_rtx.py.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import onnx
import pytest
import torch

from xlstm_export import contract, onnx_functions
from xlstm_export import tensorrt as xtrt

SEED = 0


def _cell_onnx(tmp_path, op: str, dtype: str, **dims) -> str:
    path = tmp_path / f"{op}_{dtype}.onnx"
    onnx.save(onnx_functions.cell_model(op, dtype, dims=dims), str(path))
    return str(path)


def _mlstm_feeds(B, NH, S, DQK, DV, dtype, gen):
    t = getattr(torch, dtype)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {"q": rnd(B, NH, S, DQK).to(t), "k": rnd(B, NH, S, DQK).to(t),  # (B, NH, S, DQK)
            "v": rnd(B, NH, S, DV).to(t),  # (B, NH, S, DV)
            "i": rnd(B, NH, S).to(t), "f": (rnd(B, NH, S) + 3).to(t),  # (B, NH, S)
            "c0": 0.5 * rnd(B, NH, DQK, DV), "n0": 0.5 * rnd(B, NH, DQK), "m0": rnd(B, NH)}


def _slstm_feeds(B, NH, S, DH, dtype, gen):
    t = getattr(torch, dtype)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {"x": rnd(B, NH, S, 4 * DH).to(t),  # (B, NH, S, 4*DH)
            "r": (rnd(NH, DH, 4 * DH) / DH**0.5).to(t), "b": (0.5 * rnd(NH, 4 * DH)).to(t),
            "h0": 0.5 * rnd(B, NH, DH), "c0": rnd(B, NH, DH),  # (B, NH, DH)
            "n0": 1 + torch.rand(B, NH, DH, generator=gen), "m0": 0.5 * rnd(B, NH, DH)}


# ---------------------------------------------------------------------------------------------
# everywhere (CPU)
# ---------------------------------------------------------------------------------------------


def test_onnx_inspection_reads_dynamic_dims_and_dtype(tmp_path):
    path = _cell_onnx(tmp_path, "mLSTM", "bfloat16", NH=2, DQK=8, DV=16)
    dims = xtrt.onnx_dynamic_dims(path)
    assert dims["q"] == ["B", 2, "S", 8] and dims["c0"] == ["B", 2, 8, 16] and dims["m0"] == ["B", 2]
    assert xtrt.onnx_model_dtype(path) == "bfloat16"
    assert xtrt.onnx_model_dtype(_cell_onnx(tmp_path, "sLSTM", "float16", NH=2, DH=4)) == "float16"


def test_onnxruntime_side_matches_reference_in_bfloat16(tmp_path):
    """The oracle half of validate_engine: ORT on torch tensors (bf16 via IO binding)."""
    from xlstm_export.kernels.mlstm.naive import naive_chunk_mlstm

    path = _cell_onnx(tmp_path, "mLSTM", "bfloat16", NH=2, DQK=8, DV=16)
    feeds = _mlstm_feeds(2, 2, 7, 8, 16, "bfloat16", torch.Generator().manual_seed(SEED))
    out = xtrt._ort_run(xtrt._ort_session(path), feeds)
    h, (c, n, m) = naive_chunk_mlstm(*(feeds[k] for k in "qkvif"), (feeds["c0"], feeds["n0"], feeds["m0"]))
    tol = contract.tolerance("bfloat16")
    assert out["h"].dtype == torch.bfloat16
    torch.testing.assert_close(out["h"].float(), h.float(), rtol=tol.outputs.rtol, atol=tol.outputs.atol)
    for name, ref in (("c", c), ("n", n), ("m", m)):
        torch.testing.assert_close(out[name], ref, rtol=tol.states.rtol, atol=tol.states.atol)


def test_default_feeds_cover_every_input(tmp_path):
    path = _cell_onnx(tmp_path, "sLSTM", "float16", NH=2, DH=4)
    feeds = xtrt._default_feeds(xtrt._ort_session(path), 3, 5, torch.Generator().manual_seed(SEED))
    assert feeds["x"].shape == (3, 2, 5, 16) and feeds["x"].dtype == torch.float16
    assert feeds["r"].shape == (2, 4, 16) and feeds["h0"].dtype == torch.float32
    with pytest.raises(ValueError, match="neither batch"):
        xtrt._dim_kind("x", "tokens")


@pytest.mark.parametrize("scale", [1.0, 1.01], ids=["same", "h-off-by-1%"])
def test_validate_engine_report_with_onnxruntime_standing_in_for_the_engine(tmp_path, monkeypatch, scale):
    """validate_engine's comparison where no GPU is: an onnxruntime session in TrtModel's place (h
    scaled by ``scale``). One validate.Report row per output at the dtype's fixed limit; 1% off fails."""
    path = _cell_onnx(tmp_path, "mLSTM", "float32", NH=2, DQK=8, DV=16)

    class OrtEngine:
        state_keys = ()  # a cell model: one call, no state carried

        def __init__(self, plan):
            self.session = xtrt._ort_session(path)

        def infer(self, feeds):
            out = xtrt._ort_run(self.session, feeds)
            return {**out, "h": out["h"] * scale}

    monkeypatch.setattr(xtrt, "TrtModel", OrtEngine)
    feeds = _mlstm_feeds(2, 2, 7, 8, 16, "float32", torch.Generator().manual_seed(SEED))
    report = xtrt.validate_engine(path, tmp_path / "unused.plan", feeds=feeds)
    assert isinstance(report, xtrt.ValidationReport)
    assert [(r.case, r.name) for r in report.rows] == [("call 0", n) for n in ("h", "c", "n", "m")]
    assert all(r.limit == contract.MAX_RELATIVE_ERROR["float32"] for r in report.rows)
    assert report.ok == (scale == 1.0), str(report)
    assert {r.name for r in report.rows if not r.ok} == (set() if scale == 1.0 else {"h"})


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_is_one_clear_error(tmp_path):
    path = _cell_onnx(tmp_path, "mLSTM", "float32", NH=1, DQK=8, DV=8)
    with pytest.raises(RuntimeError, match=r"pip install tensorrt.*GPU"):
        xtrt.build_engine(path, tmp_path / "m.plan", runtime="tensorrt")
    with pytest.raises(RuntimeError, match=r"pip install tensorrt"):
        xtrt.TrtModel(tmp_path / "m.plan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mLSTM_float32.onnx"]  # no engine, record or temp file


def test_build_arguments_are_checked_before_tensorrt(tmp_path):
    path = _cell_onnx(tmp_path, "mLSTM", "bfloat16", NH=1, DQK=8, DV=8)
    with pytest.raises(ValueError, match="strongly typed.*re-export with --dtype fp16"):
        xtrt.build_engine(path, tmp_path / "m.plan", precision="fp16")
    with pytest.raises(ValueError, match="seq range"):
        xtrt.build_engine(path, tmp_path / "m.plan", seq=(4, 2, 8))
    with pytest.raises(ValueError, match="excludes 1"):
        xtrt.build_engine(path, tmp_path / "m.plan", seq=(2, 4, 8))
    with pytest.raises(ValueError, match="unknown runtime"):
        xtrt.build_engine(path, tmp_path / "m.plan", runtime="onnxruntime")
    with pytest.raises(ValueError, match="supports no plugins"):
        xtrt.build_engine(path, tmp_path / "m.plan", runtime="tensorrt-rtx", plugins=True)
    with pytest.raises(FileNotFoundError):
        xtrt.build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan")


# ---------------------------------------------------------------------------------------------
# TensorRT tier
# ---------------------------------------------------------------------------------------------


def _require_tensorrt_gpu():
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed (pip install tensorrt>=10.9 on a machine with a GPU)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    pytest.importorskip("tensorrt.plugin", reason="TensorRT without tensorrt.plugin (needs >= 10.9)")


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_mlstm_cell_engine_matches_onnxruntime(tmp_path, dtype, caplog):
    _require_tensorrt_gpu()
    NH, DQK, DV = 2, 16, 32
    path = _cell_onnx(tmp_path, "mLSTM", dtype, NH=NH, DQK=DQK, DV=DV)
    with caplog.at_level(logging.INFO, logger="xlstm_export.tensorrt"):
        plan = xtrt.build_engine(path, tmp_path / "mlstm.plan", batch=(1, 2, 4), seq=(1, 37, 64))
    assert "1 xlstm plugin layers" in caplog.text  # the plugin, not the inlined function body
    info = xtrt.read_build_info(plan)
    assert info["runtime"] == "tensorrt" and info["plugins"] and info["cells"][0]["compiled_as"] == "plugin"
    gen = torch.Generator().manual_seed(SEED)
    for S in (37, 1):  # chunk path (odd S, partial chunk) and decode step
        report = xtrt.validate_engine(path, plan, feeds=_mlstm_feeds(2, NH, S, DQK, DV, dtype, gen))
        assert report.ok, str(report)


@pytest.mark.tensorrt
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_slstm_cell_engine_matches_onnxruntime(tmp_path, dtype, caplog):
    _require_tensorrt_gpu()
    NH, DH = 2, 16
    path = _cell_onnx(tmp_path, "sLSTM", dtype, NH=NH, DH=DH)
    with caplog.at_level(logging.INFO, logger="xlstm_export.tensorrt"):
        plan = xtrt.build_engine(path, tmp_path / "slstm.plan", batch=(1, 2, 4), seq=(1, 33, 64))
    assert "1 xlstm plugin layers" in caplog.text
    gen = torch.Generator().manual_seed(SEED)
    for S in (33, 1):
        report = xtrt.validate_engine(path, plan, feeds=_slstm_feeds(2, NH, S, DH, dtype, gen))
        assert report.ok, str(report)


@pytest.mark.tensorrt
@pytest.mark.parametrize("plugins", [True, False], ids=["plugins", "bodies"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-large"])
def test_exported_model_engine_matches_onnxruntime_and_carries_state(tmp_path, preset, plugins):
    _require_tensorrt_gpu()
    from xlstm_export.export import export_onnx
    from xlstm_export.models import load

    model = load(preset, seed=SEED)
    path = export_onnx(model, tmp_path / f"{preset}.onnx", dtype="fp32", progress=False)
    plan = tmp_path / f"{preset}.plan"
    if plugins:
        xtrt.build_engine(path, plan, runtime="tensorrt", batch=(1, 2, 4), seq=(1, 16, 64))
    else:  # a fresh process: once this one has registered the plugins, the parser prefers them
        proc = subprocess.run([sys.executable, "-m", "xlstm_export.cli", "build", str(path), "-o", str(plan),
                               "--runtime", "tensorrt", "--no-plugins", "--batch", "1", "2", "4",
                               "--seq", "1", "16", "64"], capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr
    cells = xtrt.read_build_info(plan)["cells"]
    assert cells and all(c["compiled_as"] == ("plugin" if plugins else "loop") for c in cells), cells
    report = xtrt.validate_engine(path, plan, batch=2, seq=11, decode_steps=3)
    assert report.ok, str(report)

    trt_model = xtrt.TrtModel(plan)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(SEED))
    logits_all, _ = trt_model.run(ids.cuda())
    logits, state = trt_model.run(ids[:, :5].cuda())  # prefill
    parts = [logits]
    for t in range(5, 9):  # decode, state carried between calls
        logits, state = trt_model.run(ids[:, t:t + 1].cuda(), state)
        parts.append(logits)
    stitched = torch.cat(parts, dim=1)  # (B, 9, vocab)
    err = contract.relative_error(stitched.float().cpu(), logits_all.float().cpu())
    assert err <= contract.MAX_RELATIVE_ERROR["float32"], err
