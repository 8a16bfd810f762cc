"""The command line: each subcommand end to end on small models, and one clear error per bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xlstm_export.cli import main
from xlstm_export.models import load, xLSTMLM


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (exit code, stdout, stderr as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "xlstm_export.cli", *args], capture_output=True, text=True, timeout=600,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = [line for line in proc.stderr.strip().splitlines() if "error:" in line]
    assert len(err) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in err[0], err[0]


def test_help_lists_every_subcommand():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("convert", "info", "export", "validate", "generate", "build", "train", "run"):
        assert cmd in proc.stdout


def test_convert_and_info(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["convert", "tiny", "-o", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    a, b = load("tiny"), xLSTMLM.from_pretrained(out)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(a(ids)[0], b(ids)[0], rtol=0, atol=0)
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == a.num_params()
    assert info["state_bytes_per_sequence"] == a.state_bytes(1)
    assert info["block_types"] == ["mlstm", "slstm", "mlstm"]


def test_unknown_preset_is_one_clear_error():
    assert_one_line_error(run_cli("info", "no-such-model"), "no such preset or directory")


def test_convert_into_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert_one_line_error(run_cli("convert", "tiny", "-o", str(f)), "not a directory")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny preset exported once for the CLI tests that need an .onnx file."""
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    assert main(["export", "tiny", "-o", str(path), "--quiet"]) == 0
    return path


def test_export_external_data_from_a_preset_and_a_directory(tmp_path, capsys):
    """--external-data puts the weights in OUTPUT.data beside the .onnx at any size, streamed from a
    directory too; the model is the one the default (inline) export writes."""
    import onnx
    from onnx import numpy_helper

    from xlstm_export.models import load

    load("tiny-large", seed=3).save_pretrained(tmp_path / "dir")
    for src in ("tiny-large", str(tmp_path / "dir")):
        out = tmp_path / ("from-" + Path(src).name)
        out.mkdir()
        assert main(["export", src, "-o", str(out / "inline.onnx"), "--quiet"]) == 0
        assert main(["export", src, "-o", str(out / "ext.onnx"), "--quiet", "--external-data"]) == 0
        assert not (out / "inline.onnx.data").exists() and (out / "ext.onnx.data").stat().st_size > 0
        inline, ext = (onnx.load(str(out / f"{n}.onnx")) for n in ("inline", "ext"))
        assert [n.op_type for n in ext.graph.node] == [n.op_type for n in inline.graph.node]
        weights = {t.name: numpy_helper.to_array(t).tobytes() for t in inline.graph.initializer}
        assert {t.name: numpy_helper.to_array(t).tobytes() for t in ext.graph.initializer} == weights
    capsys.readouterr()


def test_validate_passes_and_generate_matches_pytorch(exported, capsys):
    assert main(["validate", str(exported), "--source", "tiny", "--quiet"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["generate", str(exported), "--prompt-ids", "5,17,99", "--max-new-tokens", "6", "--quiet"]) == 0
    ort_tokens = capsys.readouterr().out.splitlines()[0]
    assert main(["generate", "tiny", "--prompt-ids", "5,17,99", "--max-new-tokens", "6", "--quiet"]) == 0
    torch_tokens = capsys.readouterr().out.splitlines()[0]
    assert ort_tokens == torch_tokens and ort_tokens.startswith("tokens:")


@pytest.mark.parametrize("name, kind", [("m.onnx", "onnx"), ("d/M.ONNX", "onnx"), ("m.plan", "engine"),
                                        ("m.Engine", "engine"), ("tiny", None), ("xlstm-1.3b", None),
                                        ("m.onnx.data", None)])
def test_model_file_kind(name, kind):
    from xlstm_export.interface import model_file_kind

    assert model_file_kind(name) == kind


def test_model_file_suffixes_are_case_insensitive(exported, tmp_path, capsys):
    """A file copied from another system as TINY.ONNX is still an ONNX file to every command that
    reads one (generate, validate); before, generate took it for a checkpoint directory."""
    import shutil

    for f in exported.parent.iterdir():  # the .onnx and what lies beside it (tokenizer, any .data)
        shutil.copy(f, tmp_path / f.name)
    upper = tmp_path / "TINY.ONNX"
    (tmp_path / exported.name).rename(upper)
    args = ["--prompt-ids", "5,17,99", "--max-new-tokens", "6", "--quiet"]
    assert main(["generate", str(exported), *args]) == 0
    lower = capsys.readouterr().out
    assert main(["generate", str(upper), *args]) == 0
    assert capsys.readouterr().out == lower
    assert main(["validate", str(upper), "--source", "tiny", "--quiet"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_validate_fails_against_another_model(exported, tmp_path, capsys):
    """A different model (other seed) must fail validation with exit code 1."""
    other = tmp_path / "other"
    torch.manual_seed(123)
    xLSTMLM(load("tiny").config).save_pretrained(other)
    assert main(["validate", str(exported), "--source", str(other), "--quiet"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_sampling_is_seeded(exported, capsys):
    args = ["generate", str(exported), "--prompt", "ab", "--max-new-tokens", "8", "--temperature", "1.0", "--quiet"]
    main([*args, "--seed", "3"])
    first = capsys.readouterr().out.splitlines()[0]
    main([*args, "--seed", "3"])
    assert capsys.readouterr().out.splitlines()[0] == first


def test_export_bad_inputs_leave_no_file(tmp_path):
    missing = tmp_path / "nope"
    assert_one_line_error(run_cli("export", str(missing), "-o", str(tmp_path / "m.onnx")), "no such preset or directory")
    unwritable = tmp_path / "no-such-dir" / "m.onnx"
    assert_one_line_error(run_cli("export", "tiny", "-o", str(unwritable)), "does not exist")
    assert not unwritable.parent.exists()
    assert list(tmp_path.iterdir()) == []


def test_validate_rejects_files_that_are_not_our_models(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a protobuf")
    assert_one_line_error(run_cli("validate", str(text), "--source", "tiny"), "not an ONNX model")
    assert_one_line_error(run_cli("validate", str(tmp_path / "missing.onnx"), "--source", "tiny"), "no such file")
    # A valid ONNX model that is not one of ours.
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(g), foreign)
    assert_one_line_error(run_cli("validate", str(foreign), "--source", "tiny"), "foreign.onnx")


def test_generate_rejects_bad_prompts(exported):
    assert_one_line_error(run_cli("generate", str(exported), "--prompt-ids", "1,x"), "integers")
    assert_one_line_error(run_cli("generate", str(exported), "--prompt-ids", "1,999"), "[0, 256)")


@pytest.mark.parametrize("args, message", [
    (["--prompt-ids", "1,,2"], "--prompt-ids must be integers separated by commas or spaces, got '1,,2'"),
    (["--prompt", "ab", "--stop", ""], "--stop is empty"),
    (["--prompt", "ab", "--temperature", "1", "--seed", str(2**64)], "--seed must lie in [0, 2**63)"),
    (["--prompt", "ab", "--seed", "-1"], "--seed must lie in [0, 2**63)"),
    (["--prompt", "ab", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_option_errors(exported, capsys, args, message):
    """Each bad option: exit 2 and one line naming it, before any model is loaded."""
    assert main(["generate", str(exported), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("xlstm-export generate: error: ") and message in err and "\n" not in err


def test_generate_ids_output_and_notes(exported, capsys):
    """--prompt-ids: stdout holds the tokens alone (the timing line goes to stderr), the ids may be
    spaced; sampling options without a temperature are named as not applying."""
    assert main(["generate", str(exported), "--prompt-ids", "5, 17 99", "--max-new-tokens", "4",
                 "--top-k", "3"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("tokens: ") and len(out.splitlines()[0].split()) == 5
    assert "onnxruntime: prefill 3 tokens" in err and "onnxruntime" not in out
    assert "note: --top-k applies to sampling (--temperature > 0); generating greedily" in err


def test_generate_into_a_closed_pipe_exits_quietly(exported):
    """`generate ... | head -c 1`: the reader leaves early; no error message, exit 141 (SIGPIPE's)."""
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_export.cli", "generate", str(exported), "--prompt",
                             "ab", "--max-new-tokens", "2000", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(proc.stdout.read(1)) == 1
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 141, err
    assert err == ""


def test_convert_refuses_a_folder_of_other_work(tmp_path, capsys):
    work = tmp_path / "models"
    (work / "my_run").mkdir(parents=True)
    assert main(["convert", "tiny", "-o", str(work)]) == 2
    assert "holds what a model directory does not (my_run/)" in capsys.readouterr().err
    assert [p.name for p in work.iterdir()] == ["my_run"]


def test_build_refuses_an_output_that_is_no_engine(exported, capsys):
    """`build m.onnx -o m.onnx` would overwrite its own input: the output must be .engine / .plan."""
    before = exported.read_bytes()
    assert main(["build", str(exported), "-o", str(exported), "--runtime", "tensorrt-rtx"]) == 2
    assert "engine path must end in .engine or .plan" in capsys.readouterr().err
    assert exported.read_bytes() == before


def test_build_without_tensorrt_says_what_to_install(exported):
    from xlstm_export.tensorrt import tensorrt_available

    if tensorrt_available():
        pytest.skip("TensorRT is installed here; the build itself is tested in tests/test_tensorrt.py")
    assert_one_line_error(run_cli("build", str(exported), "-o", str(exported.with_suffix(".plan")), "--runtime", "tensorrt"),
                          "pip install tensorrt")
    assert not exported.with_suffix(".plan").exists()


# --- run: the pipeline in the library, the summary in the CLI ------------------------------------
def test_run_into_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", "tiny", "-o", str(f), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"xlstm-export run: error: {f}: exists and is not a directory"
    assert f.read_text() == "x"
    assert main(["run", "tiny", "-o", str(tmp_path / "out"), "--max-new-tokens", "0", "--quiet"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ok, code", [(True, 0), (False, 1)], ids=["pass", "fail"])
def test_run_prints_the_pipeline_summary(tmp_path, capsys, monkeypatch, ok, code):
    """`run` prints run_pipeline's stages, aligned, and exits 1 when a comparison failed."""
    from xlstm_export import pipeline

    def fake_run(source, output, *, max_new_tokens, progress):
        assert (source, output, max_new_tokens, progress) == ("tiny", str(tmp_path), 5, False)
        result = pipeline.RunResult()
        result.add("convert", "c-line")
        result.add("native kernels", "n-line", ok)
        return result

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    assert main(["run", "tiny", "-o", str(tmp_path), "--max-new-tokens", "5", "--quiet"]) == code
    assert capsys.readouterr().out.splitlines() == ["", "summary", "  convert         c-line",
                                                    "  native kernels  n-line"]


def test_build_seq_default_is_build_engines():
    """`build` without --seq builds the profile build_engine() builds by default (one constant)."""
    import inspect

    from xlstm_export.cli import build_parser
    from xlstm_export.engine import DEFAULT_SEQ, build_engine

    args = build_parser().parse_args(["build", "m.onnx", "-o", "m.engine"])
    assert tuple(args.seq) == DEFAULT_SEQ == inspect.signature(build_engine).parameters["seq"].default
