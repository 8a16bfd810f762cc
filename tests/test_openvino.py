"""OpenVINO runs the exported models (issue 11): the ``--inline`` file on OpenVINO's CPU plugin
against onnxruntime on the default file, output by output and state by state, prefill then decode
carrying the state; greedy generation; the CLI's ``--runtime openvino``; bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

openvino = pytest.importorskip("openvino", reason="the OpenVINO runner needs the openvino package "
                                                   "(the test extra brings it)")

from xlstm_export import contract as C  # noqa: E402
from xlstm_export.cli import main  # noqa: E402
from xlstm_export.export import export_onnx, inline_xlstm  # noqa: E402
from xlstm_export.generate import generate  # noqa: E402
from xlstm_export.models import preset, xLSTMLM  # noqa: E402
from xlstm_export.openvino_runner import OpenVinoModel  # noqa: E402
from xlstm_export.ort import NotAnXLSTMModelError, OrtModel  # noqa: E402
from model_makers import perturbed_model  # noqa: E402

MODELS = {"paper": "tiny", "large": "tiny-large"}  # paper: mLSTM + sLSTM stack; large: 7B-style

# Relative error (contract.relative_error: max |a - e| / max |e|) of OpenVINO against onnxruntime:
# - fp32: issue 11's 1e-4, the project's float32 limit (contract.MAX_RELATIVE_ERROR["float32"]);
#   OpenVINO runs with INFERENCE_PRECISION_HINT f32 (measured <= 7e-6; its bf16 default: ~3e-2).
# - fp16: the project's documented float16 limit for a whole fp16 export, contract.MAX_RELATIVE_ERROR
#   ["float16"] (its comment in contract.py: every weight and activation rounded to fp16, measured
#   up to ~1e-2 vs float32). OpenVINO's own documentation gives no numeric tolerance for f16
#   inference, only that f16/bf16 precision may cost accuracy. Here both sides run the fp16 graph,
#   OpenVINO with f16 inference precision where the CPU reports FP16 (measured <= 7.5e-3).
TOL = {"fp32": C.MAX_RELATIVE_ERROR["float32"], "fp16": C.MAX_RELATIVE_ERROR["float16"]}
CASES = [(B, S) for B in (1, 3) for S in (1, 7, 64, 129)]  # prefill (B, S): odd lengths, S = 1, > chunk
DECODE_STEPS = 3


def make_model(kind: str, seed: int = 0) -> xLSTMLM:
    return perturbed_model(preset(MODELS[kind]), seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, dtype) -> (model, default file, --inline file, OrtModel, OpenVinoModel), built on first use.

    The --inline file is the default export through export.inline_xlstm, the step `export --inline`
    ends with (one trace per model instead of two)."""
    cache = {}
    root = tmp_path_factory.mktemp("openvino")

    def get(kind: str, dtype: str = "fp32"):
        if (kind, dtype) not in cache:
            model = make_model(kind)
            path = export_onnx(model, root / f"{kind}-{dtype}.onnx", dtype=dtype, progress=False)
            inline = root / f"{kind}-{dtype}-inline.onnx"
            onnx.save(inline_xlstm(onnx.load(path)), inline)
            cache[kind, dtype] = (model, path, inline, OrtModel(path, intra_op_threads=2),
                                  OpenVinoModel(inline, num_threads=2))
        return cache[kind, dtype]

    return get


def worst_error(actual, expected) -> tuple[float, str]:
    """The largest relative error over logits and every state, and which one it is."""
    (a_logits, a_state), (e_logits, e_state) = actual, expected
    assert a_logits.dtype == np.float32 and a_logits.shape == e_logits.shape
    assert a_state.keys() == e_state.keys()
    errs = [(C.relative_error(a_logits, e_logits), "logits")]
    for k in e_state:
        assert a_state[k].dtype == np.float32 and a_state[k].shape == e_state[k].shape, k
        errs.append((C.relative_error(a_state[k], e_state[k]), k))
    return max(errs)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("kind", ["paper", "large"])
def test_openvino_matches_onnxruntime_prefill_then_decode(kind, dtype, exported):
    model, _, inline, om, ov = exported(kind, dtype)
    assert ov.dtype == om.dtype == C.canonical_dtype(dtype)
    assert ov.state_names == om.state_names and ov.vocab_size == om.vocab_size == model.config.vocab_size
    assert ov.config == om.config
    if dtype == "fp32":
        assert ov.inference_precision == "f32"  # not the CPU plugin's bf16 default
    else:  # f16 arithmetic where the CPU has it; otherwise the plugin computes the fp16 graph in f32
        native = "FP16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        assert ov.inference_precision == ("f16" if native else "f32")
    tol = TOL[dtype]
    rng = np.random.default_rng(0)
    for B, S in CASES:
        ids = rng.integers(0, model.config.vocab_size, (B, S))
        a, e = ov.run(ids), om.run(ids)
        err, name = worst_error(a, e)
        assert err <= tol, f"prefill B{B} S{S}: {name} rel err {err:.2e} > {tol:.0e}"
        for step in range(DECODE_STEPS):  # each side carries its own state
            tok = rng.integers(0, model.config.vocab_size, (B, 1))
            a, e = ov.run(tok, a[1]), om.run(tok, e[1])
            err, name = worst_error(a, e)
            assert err <= tol, f"decode B{B} S{S}+{step + 1}: {name} rel err {err:.2e} > {tol:.0e}"


def test_openvino_bf16_logits_are_widened_from_their_bits(exported):
    """A bf16 export's logits: OpenVINO's Python API hands bf16 out as float16 over the raw bits;
    the runner widens them. Against onnxruntime (both float32 arithmetic over the bf16 weights,
    within the project's bfloat16 limit; measured <= 2.5e-2 on these cases). Only prefills of
    moderate length: this random 7B-style model amplifies bf16 rounding chaotically further on
    (at B3 S129 PyTorch bf16 itself is 0.2 off float64, onnxruntime and OpenVINO 0.5)."""
    model, _, _, om, ov = exported("large", "bf16")
    assert ov.dtype == "bfloat16" and ov.inference_precision == "f32"
    rng = np.random.default_rng(3)
    for B, S in ((1, 7), (3, 64)):
        ids = rng.integers(0, model.config.vocab_size, (B, S))
        logits = ov.run(ids)[0]
        assert logits.dtype == np.float32
        err = C.relative_error(logits, om.run(ids)[0])
        assert err <= C.MAX_RELATIVE_ERROR["bfloat16"], (B, S, err)


def test_openvino_bf16_export_passes_validate(exported):
    """A bf16 export runs as float32 arithmetic over its bf16 weights, the graph's own Casts to
    bfloat16 kept (as onnxruntime runs it): OpenVINO's CPU plugin computes ops a graph declares
    bf16 in bf16 whatever the hint, which put this honest export's mLSTM states 3-5x further from
    float64 than PyTorch's bf16 at S = 129 (median typical ratio 1.64, worst output 4.3: validate
    failed it). Widened: 0.91 and 1.18. The weights stay bf16 (read through a Cast)."""
    from xlstm_export.validate import validate_onnx

    model, path, _, _, ov = exported("large", "bf16")
    report = validate_onnx(path, model, runtime="openvino", cases=((1, 7), (3, 64), (3, 129)), decode_steps=2)
    assert report.ok and report.median_ratio <= 1.25, report.table()
    assert ov.upcast


def test_openvino_bf16_widening_keeps_the_weights_bf16(exported):
    from xlstm_export.openvino_runner import _upcast_keeping_bf16_weights

    _, path, _, _, _ = exported("large", "bf16")
    m = _upcast_keeping_bf16_weights(inline_xlstm(onnx.load(path)))
    bf16 = {t.name for t in m.graph.initializer if t.data_type == onnx.TensorProto.BFLOAT16}
    assert bf16 and all(n.endswith("__bf16") for n in bf16)
    widen = {n.input[0] for n in m.graph.node if n.op_type == "Cast" and n.input[0] in bf16}
    assert widen == bf16
    io = [*m.graph.input, *m.graph.output, *m.graph.value_info]
    assert all(v.type.tensor_type.elem_type != onnx.TensorProto.BFLOAT16 for v in io)
    onnx.checker.check_model(m)


@pytest.mark.parametrize("kind", ["paper", "large"])
def test_openvino_greedy_generation_equals_onnxruntime(kind, exported):
    model, _, _, om, ov = exported(kind)
    prompt = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 11))
    got = generate(ov.run, prompt, 12).tokens
    want = generate(om.decoder(), prompt, 12).tokens
    np.testing.assert_array_equal(got, want)


def test_openvino_inlines_a_default_export_in_memory(exported):
    """Given the default file (xlstm nodes + local functions), the runner inlines it in memory:
    the same results as the --inline file, and the file on disk is unchanged."""
    model, path, _, _, ov_inline = exported("paper")
    before = path.read_bytes()
    ov = OpenVinoModel(path, num_threads=2)
    assert path.read_bytes() == before
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 9))
    state = ov_inline.run(ids[:, :4])[1]
    err, name = worst_error(ov.run(ids[:, 4:], state), ov_inline.run(ids[:, 4:], state))
    assert err <= 1e-6, (name, err)


def test_openvino_bad_input(exported, tmp_path):
    model, _, _, _, ov = exported("large")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model")
    with pytest.raises(NotAnXLSTMModelError, match="not an ONNX model"):
        OpenVinoModel(text)
    with pytest.raises(FileNotFoundError):
        OpenVinoModel(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="token ids must lie in"):
        ov.run(np.array([[model.config.vocab_size]]))
    with pytest.raises(ValueError, match="shape"):
        ov.run(np.zeros((2,), np.int64))
    state = ov.init_state(2)
    with pytest.raises(ValueError, match="missing"):
        ov.run(np.zeros((2, 1), np.int64), {k: v for k, v in list(state.items())[1:]})
    k = ov.state_names[0]
    with pytest.raises(ValueError, match=f"state '{k}' has shape"):
        ov.run(np.zeros((3, 1), np.int64), state)  # a batch-2 state for 3 sequences


@pytest.mark.parametrize("version", ["2024.2.0-15519-5c0f38f83f6-releases/2024/2", "2024.6.0"])
def test_openvino_older_than_2025_is_refused(version, exported, monkeypatch, capsys):
    """Releases before 2025.0 refuse the graphs, compute the 7B-style ones wrong (2024.1-2024.2) or
    cannot compile float16 ones (2024.3; measured, bench/RESULTS.md): one clear error, also at the CLI."""
    import openvino

    _, _, path, _, _ = exported("large")
    monkeypatch.setattr(openvino, "__version__", version)
    with pytest.raises(RuntimeError, match=r"OpenVINO 2024\.\d\.0 is too old .* needs OpenVINO >= 2025\.0"):
        OpenVinoModel(path)
    capsys.readouterr()
    assert main(["generate", str(path), "--runtime", "openvino", "--prompt-ids", "1,2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "too old for these models" in err[0], err


# --- the command line ----------------------------------------------------------------------------


def test_cli_validate_and_generate_with_openvino(exported, tmp_path, capsys):
    model, path, inline, om, _ = exported("large")
    source = tmp_path / "source"
    model.save_pretrained(source)
    assert main(["validate", str(inline), "--runtime", "openvino", "--source", str(source), "--quiet"]) == 0
    assert "PASS" in capsys.readouterr().out
    args = ["--prompt-ids", "5,17,99", "--max-new-tokens", "6"]
    assert main(["generate", str(inline), "--runtime", "openvino", *args]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert any(line.startswith("OpenVINO (CPU, f32)") for line in captured.err.splitlines())  # the timing line
    assert main(["generate", str(path), *args, "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == out[0]  # the same tokens as onnxruntime


@pytest.mark.parametrize("argv, message", [
    (["validate", "{model}", "--runtime", "openvino", "--engine", "{model}"], "--engine and --native-ops do not apply"),
    (["validate", "{model}", "--runtime", "openvino", "--native-ops", "--source", "tiny"], "do not apply"),
    (["generate", "tiny", "--runtime", "openvino"], "runs an .onnx file"),
    (["generate", "{missing}", "--runtime", "openvino"], "no such file"),
])
def test_cli_openvino_bad_input_is_one_clear_error(argv, message, exported, tmp_path, capsys):
    _, path, _, _, _ = exported("large")
    argv = [a.format(model=path, missing=tmp_path / "missing.onnx") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
