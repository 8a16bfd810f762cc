"""`validate`: the export against PyTorch in float64, judged by what PyTorch achieves in the export's
dtype. Honest exports pass (fp32 / fp16 / bf16, function bodies and native kernels); an export whose
largest weight is off by 1% fails (fp32, fp16), on a 12-block model too; the stabilizer m may be
represented differently; the CLI's limits and exit codes.

The preset checks up to 160M (xlstm-125m, xlstm-large-160m) take minutes each and are run by hand:
    xlstm-export export xlstm-large-160m -o m.onnx --dtype fp16
    xlstm-export validate m.onnx --source xlstm-large-160m [--native-ops]
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from xlstm_export import validate as V
from xlstm_export.cli import main
from xlstm_export.export import export_onnx
from xlstm_export.models import preset, xLSTMConfig, xLSTMLM
from model_makers import perturbed_model

# small cases: S = 1 decode, odd prefills, one over the 64-long chunk; two decode steps each. Six
# prompts in three cases: the medians need independent prompts (xlstm_export.validate, "Cases")
CASES = ((1, 5), (2, 67), (3, 9))
DECODE = 2

CONFIGS = {
    "paper": lambda: preset("tiny"),  # mLSTM + sLSTM blocks, conv states
    "large": lambda: preset("tiny-large"),  # 7B-style blocks
    # deep: 12 7B-style blocks at a small width, where rounding grows through the stack
    "deep": lambda: xLSTMConfig(architecture="large", vocab_size=256, embedding_dim=64, num_blocks=12,
                                num_heads=4),
}


def make_model(kind: str, seed: int = 0) -> xLSTMLM:
    return perturbed_model(CONFIGS[kind](), seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(kind, dtype) -> (model, path), exported on first use."""
    cache = {}
    root = tmp_path_factory.mktemp("validate")

    def get(kind: str, dtype: str):
        if (kind, dtype) not in cache:
            model = make_model(kind)
            cache[kind, dtype] = model, export_onnx(model, root / f"{kind}-{dtype}.onnx", dtype=dtype, progress=False)
        return cache[kind, dtype]

    return get


def scaled_copy(path, out, factor: float = 1.01) -> str:
    """The file with its largest weight (initializer by element count) multiplied by ``factor``."""
    m = onnx.load(str(path))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init)
    scaled = (arr.astype(np.float64) * factor).astype(arr.dtype)
    init.CopyFrom(numpy_helper.from_array(scaled, init.name))
    onnx.save(m, str(out))
    return str(out)


def check(path, model, **kwargs) -> V.Report:
    return V.validate_onnx(path, model, cases=CASES, decode_steps=DECODE, **kwargs)


# --- honest exports pass, broken ones fail --------------------------------------------------------


@pytest.mark.parametrize("kind,dtype", [(k, d) for k in ("paper", "large") for d in ("fp32", "fp16", "bf16")]
                         + [("deep", "fp32"), ("deep", "fp16")])
def test_honest_export_passes_and_a_one_percent_weight_fails(kind, dtype, exported, tmp_path):
    model, path = exported(kind, dtype)
    report = check(path, model)
    assert report.ok, report.table()
    # the baseline is PyTorch in the export's dtype, against float64
    assert all(r.base is not None and r.base > 0 for r in report.rows)
    assert {r.name for r in report.rows} == {"logits"} | {k for k in model.state_spec(1) if not k.endswith(".m")}
    if dtype == "bf16":  # bfloat16 rounds at 0.4%: a 1% weight is within its noise on some rows
        return
    report = check(scaled_copy(path, tmp_path / "scaled.onnx"), model)
    assert not report.ok, report.table()


@pytest.mark.parametrize("kind", ["paper", "large", "deep"])
def test_native_kernels_pass(kind, exported):
    model, path = exported(kind, "fp32")
    report = check(path, model, native_ops=True)
    assert report.ok, report.table()


# --- the comparison itself (PyTorch runners only: no export) --------------------------------------


def _shift_stabilizer(runner, delta: float):
    """A runner whose states carry m + delta (c and n scaled by exp(-delta)): the same cell state in
    another representation, fed back to the model as such."""

    def run(ids, state):
        logits, st = runner(ids, state)
        out = {}
        for k, v in st.items():
            block, _, t = k.rpartition(".")
            if t == "m":
                out[k] = v + delta
            elif t in ("c", "n") and f"{block}.m" in st:
                out[k] = v * np.exp(-delta)
            else:
                out[k] = v
        return logits, out

    return run


@pytest.mark.parametrize("kind", ["paper", "large"])
def test_states_compared_independently_of_the_stabilizer(kind):
    model = make_model(kind)
    ref, base = V.torch_reference(model), V.torch_runner(model, "fp32")
    shifted = _shift_stabilizer(V.torch_runner(model, "fp32"), -3.0)
    kw = dict(vocab_size=256, dtype="fp32", cases=CASES, decode_steps=DECODE)
    report = V.compare_runners(shifted, ref, baseline=base, **kw)
    assert report.ok, report.table()
    # m itself, compared as a plain tensor, is off by the whole shift
    _, st = shifted(np.ones((1, 3), np.int64), None)
    _, st_ref = ref(np.ones((1, 3), np.int64), None)
    m_key = next(k for k in st if k.endswith(".m"))
    assert np.allclose(np.asarray(st[m_key]) - st_ref[m_key].numpy(), -3.0, atol=1e-4)

    def corrupt_c(ids, state):  # c off by 1% with m unchanged: a real defect
        logits, st = base(ids, state)
        return logits, {k: v * 1.01 if k.endswith(".c") else v for k, v in st.items()}

    report = V.compare_runners(corrupt_c, ref, baseline=base, **kw)
    failed = {r.name for r in report.rows if not r.ok and r.case.startswith("prefill")}
    assert failed and all(name.endswith(".c") for name in failed)  # later steps inherit it


def test_limits_factor_floor_and_table_order():
    model = make_model("large")
    ref, base = V.torch_reference(model), V.torch_runner(model, "fp16")
    kw = dict(vocab_size=256, dtype="fp16", cases=((1, 3),), decode_steps=1)
    report = V.compare_runners(base, ref, baseline=base, factor=1.0, atol=0.0, **kw)
    # the baseline against itself: every row's error equals its limit
    assert report.ok and all(r.err == r.base == r.limit for r in report.rows)
    report = V.compare_runners(V.torch_runner(model, "fp32"), ref, baseline=base, factor=1.5, atol=0.25, **kw)
    assert all(r.limit == max(1.5 * r.base, 0.25) for r in report.rows)
    lines = report.table(all_rows=True).splitlines()
    assert "1.5 x the PyTorch float16 error, 0.25" in lines[-2] and lines[-1].startswith("PASS")
    assert "median typical ratio" in lines[-1]
    assert len(lines) == len(report.rows) + 3
    bad = V.compare_runners(V.torch_runner(make_model("large", seed=1), "fp16"), ref, baseline=base, **kw)
    table = bad.table(all_rows=True).splitlines()
    w, n = max(len(r.case) for r in bad.rows), max(len(r.name) for r in bad.rows)
    by_key = {f"{r.case:<{w}}  {r.name:<{n}}": r.badness for r in bad.rows}
    badness = [by_key[line[: w + 2 + n]] for line in table[1:-2]]  # in the order the table lists them
    assert len(badness) == len(bad.rows) and badness == sorted(badness, reverse=True) and "NO" in table[1].split()
    assert table[-1].startswith("FAIL")
    with pytest.raises(ValueError, match="factor and median must be >= 1"):
        V.compare_runners(base, ref, baseline=base, factor=0.5, **kw)
    with pytest.raises(ValueError, match="baseline"):
        V.compare_runners(base, ref, atol=1e-3, **kw)


# --- command line ---------------------------------------------------------------------------------


def test_cli_exit_codes_and_limits(exported, tmp_path, capsys):
    model, path = exported("large", "fp16")
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert main(["validate", str(path), "--source", str(src), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "PyTorch float16" in out
    broken = scaled_copy(path, tmp_path / "broken.onnx")
    assert main(["validate", broken, "--source", str(src), "--quiet"]) == 1
    assert "FAIL" in capsys.readouterr().out
    # a loose enough limit lets it through: the options reach the comparison
    assert main(["validate", broken, "--source", str(src), "--quiet", "--factor", "1000", "--atol", "0.5",
                 "--median", "1000"]) == 0
    for bad in (["--factor", "0.5"], ["--factor", "x"], ["--atol", "-1"], ["--median", "nan"]):
        with pytest.raises(SystemExit) as e:
            main(["validate", str(path), "--source", str(src), *bad])
        assert e.value.code == 2


# --- the source must be the exported model ----------------------------------------------------------


def _without_config(path, out) -> str:
    """The file without the config it records (as a file of an older version): only its interface tells."""
    m = onnx.load(str(path))
    kept = [p for p in m.metadata_props if p.key != "xlstm_export.config"]
    del m.metadata_props[:]
    m.metadata_props.extend(kept)
    onnx.save(m, str(out))
    return str(out)


def test_source_of_another_model_refused_before_anything_runs(exported, tmp_path, monkeypatch):
    """A source of another config is one ValueError naming the differences, before a session is made
    (it was compared state by state, then ended on 'state keys differ' or on a token id outside the
    file's vocabulary); a config that computes the same function (another FFN factor giving the same
    width, another backend) is the same model."""
    from xlstm_export import ort

    model, path = exported("large", "fp16")
    bare = _without_config(path, tmp_path / "bare.onnx")

    def no_session(*a, **k):
        raise AssertionError("a session was made")

    monkeypatch.setattr(ort.OrtModel, "__init__", no_session)
    with pytest.raises(ValueError, match=r"not exported from this source model: architecture 'large' in the "
                                         r"file, 'paper' in the source"):
        V.validate_onnx(path, make_model("paper"))
    for p in (path, bare):
        with pytest.raises(ValueError, match=r"not exported from this source model: vocab_size 256 in the file, "
                                             r"512 in the source"):
            V.validate_onnx(p, xLSTMLM(preset("tiny-large", vocab_size=512)))
    with pytest.raises(ValueError, match=r"state tensors .* in the file, .* in the source"):
        V.validate_onnx(bare, xLSTMLM(preset("tiny-large", num_blocks=1)))
    with pytest.raises(TypeError, match="expected the xLSTMLM the file was exported from .* got str"):
        V.validate_onnx(path, "tiny-large")
    same = xLSTMLM(preset("tiny-large", ffn_proj_factor=2.667, backend="torch"))
    assert same.config.ffn_dim == model.config.ffn_dim
    V.check_exported_from(path, same)  # no error


def test_cli_source_of_another_model(exported, capsys):
    _, path = exported("large", "fp16")
    assert main(["validate", str(path), "--source", "tiny", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xlstm-export validate: error: ") and "not exported from this source model" in err
    assert len(err.splitlines()) == 1


def test_limits_and_cases_checked():
    """An infinite limit passes any export and no case compares nothing: both refused (an empty
    case list gave a report that failed with no rows and whose table raised)."""
    model = make_model("large")
    ref, base = V.torch_reference(model), V.torch_runner(model, "fp32")
    kw = dict(vocab_size=256, dtype="fp32")
    for limits in ({"factor": float("inf")}, {"atol": float("inf")}, {"median": float("inf")}):
        with pytest.raises(ValueError, match="all finite"):
            V.compare_runners(base, ref, baseline=base, cases=CASES, **limits, **kw)
    with pytest.raises(ValueError, match=r"cases must be one or more \(B, S\) pairs"):
        V.compare_runners(base, ref, baseline=base, cases=(), **kw)
    with pytest.raises(ValueError, match="decode_steps must be an int >= 0"):
        V.compare_runners(base, ref, baseline=base, cases=CASES, decode_steps=-1, **kw)


@pytest.mark.parametrize("bad", [["--factor", "inf"], ["--atol", "inf"], ["--median", "Infinity"]])
def test_cli_infinite_limits_refused(bad, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"unused: the option is refused first")
    with pytest.raises(SystemExit) as e:
        main(["validate", str(path), "--source", "tiny", *bad])
    assert e.value.code == 2 and "must be a finite number" in capsys.readouterr().err


def test_cli_engine_must_be_an_engine(exported, capsys):
    """--engine model.onnx: one line saying an engine is expected (it asked to install TensorRT)."""
    _, path = exported("large", "fp16")
    assert main(["validate", str(path), "--engine", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "expected a TensorRT engine (.engine or .plan" in err and "pip install" not in err


def test_cli_file_checked_before_the_source_loads(tmp_path, capsys, monkeypatch):
    """A file that is not an export is said before the source model is loaded (for a 7B source,
    minutes of loading came first)."""
    from xlstm_export import cli

    def no_load(*a, **k):
        raise AssertionError("the source was loaded")

    monkeypatch.setattr(cli, "_load_model", no_load)
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a protobuf")
    assert main(["validate", str(bad), "--source", "tiny", "--quiet"]) == 2
    assert "not an ONNX model" in capsys.readouterr().err


def test_a_baseline_that_overflows_judges_nothing():
    """Where PyTorch in the export's dtype overflows (inf), a row's limit was factor x inf and its
    typical ratio x / inf = 0: logits off by 50% passed. Such rows are held to the floor (atol)."""
    model = perturbed_model(preset("tiny-large", num_blocks=1), 0)
    ref, base = V.torch_reference(model), V.torch_runner(model, "fp16")

    def overflowing(ids, state):
        logits, st = base(ids, state)
        return logits.index_fill(-1, torch.tensor([0]), float("inf")), st

    def wrong(ids, state):
        logits, st = base(ids, state)
        return logits * 1.5, st

    kw = dict(vocab_size=256, dtype="fp16", cases=CASES, decode_steps=1)
    report = V.compare_runners(wrong, ref, baseline=overflowing, **kw)
    assert not report.ok and all(not r.ok and r.limit == V.DEFAULT_ATOL["float16"]
                                 for r in report.rows if r.name == "logits")
    assert V.compare_runners(base, ref, baseline=overflowing, **kw).ok  # honest rows stay within the floor


def test_report_without_typical_ratios_says_why():
    """A baseline that is exact everywhere (here the reference itself) leaves no row a typical ratio:
    the report fails, and its table says why (it raised 'cannot unpack non-iterable NoneType')."""
    model = perturbed_model(preset("tiny-large", num_blocks=1), 0)
    ref = V.torch_reference(model)
    report = V.compare_runners(V.torch_runner(model, "fp32"), ref, baseline=ref, vocab_size=256, dtype="fp32",
                               cases=((1, 3),), decode_steps=1)
    assert not report.ok
    assert report.table().splitlines()[-1].endswith("median typical ratio: none (no row has a finite, nonzero "
                                                    "baseline error to divide by) NO")
