"""`xlstm-export build` with TensorRT-RTX: real engines built on CPU, no GPU.

TensorRT-RTX (``pip install "xlstm-export[tensorrt-rtx]"``, the test extra brings it) parses the
exported file with TensorRT's ONNX parser, inlines the xlstm function bodies and builds an engine
ahead of time without a GPU. Each build here covers decode (S = 1) and prefill in one dynamic
profile, and its build record (``<engine>.json``) is checked against the ONNX file read
independently: I/O names, dtypes and shape ranges (from the network and the optimization profile
the engine was built from, and each I/O tensor's dtype in the builder's layer report of the built
engine), each cell compiled as a loop, the ONNX file's sha256. Running the engines needs an RTX GPU
(the ``gpu`` test at the end). The bad-input tests run the real CLI: one error line, exit 2, no file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import onnx
import pytest
import torch

from xlstm_export import onnx_functions
from xlstm_export.cli import main
from xlstm_export.engine import RTX_INSTALL_HINT, build_engine, build_info_path, read_build_info, runtime_available
from xlstm_export.tokenizer import TOKENIZER_FILES

needs_rtx = pytest.mark.skipif(not runtime_available("tensorrt-rtx"),
                               reason=f"tensorrt_rtx cannot be imported here. {RTX_INSTALL_HINT}")
BATCH, SEQ = (1, 2, 4), (1, 16, 64)  # one profile: decode (S = 1) through prefill
PROFILE = {"batch": BATCH, "sequence": SEQ}
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(preset, dtype, inline=False) -> path; each file exported once per module."""
    from xlstm_export.export import export_onnx
    from xlstm_export.models import load

    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(preset: str, dtype: str, inline: bool = False):
        key = (preset, dtype, inline)
        if key not in cache:
            path = root / f"{preset}_{dtype}{'_inline' if inline else ''}.onnx"
            cache[key] = export_onnx(load(preset, seed=0), path, dtype=dtype, progress=False,
                                     **({"inline": True} if inline else {}))
        return cache[key]

    return get


def _timed_build(onnx_path, engine_path, capsys, label: str) -> dict:
    t0 = time.perf_counter()
    build_engine(onnx_path, engine_path, runtime="tensorrt-rtx", batch=BATCH, seq=SEQ)
    seconds = time.perf_counter() - t0
    info = read_build_info(engine_path)
    with capsys.disabled():  # the build time in the test log
        print(f"\n[tensorrt-rtx build] {label}: {seconds:.1f} s (builder {info['build_seconds']:.1f} s), "
              f"engine {info['engine']['bytes'] / 2**20:.1f} MiB, {info['engine_report']['layers']} engine layers")
    return info


def _onnx_io(path):
    """(inputs, outputs) as [(name, dtype, dims with dim_param strings)] read straight from the file."""
    g = onnx.load(str(path), load_external_data=False).graph

    def rows(values):
        return [(v.name, ONNX_DTYPES[v.type.tensor_type.elem_type],
                 [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim])
                for v in values]

    return rows(g.input), rows(g.output)


def assert_engine_matches_onnx(info: dict, onnx_path) -> None:
    inputs, outputs = _onnx_io(onnx_path)
    assert [t["name"] for t in info["inputs"]] == [n for n, _, _ in inputs]
    assert [t["name"] for t in info["outputs"]] == [n for n, _, _ in outputs]
    for rec, (name, dtype, dims) in zip(info["inputs"], inputs):
        assert rec["dtype"] == dtype, name
        assert rec["dims"] == [d if isinstance(d, int) else -1 for d in dims], name
        for j, which in enumerate(("min", "opt", "max")):  # the profile's shapes: batch and sequence ranges
            want = [d if isinstance(d, int) else PROFILE[d][j] for d in dims]
            assert rec[which] == want, (name, which)
    for rec, (name, dtype, dims) in zip(info["outputs"], outputs):
        assert rec["dtype"] == dtype, name
        assert rec["dims"] == [d if isinstance(d, int) else -1 for d in dims], name
        assert all(d in PROFILE for d in dims if isinstance(d, str)), (name, dims)
    # the built engine's own layers read / write every I/O tensor with the same dtype
    assert info["engine_report"]["io_dtypes"] == {n: dt for n, dt, _ in inputs + outputs}


@needs_rtx
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("preset, ops", [("tiny", {"mLSTM", "sLSTM"}), ("tiny-large", {"mLSTM"})],
                         ids=["paper", "7b-style"])
def test_rtx_engine_has_the_onnx_interface_and_loops(exported, tmp_path, capsys, preset, ops, dtype):
    onnx_path = exported(preset, dtype)
    engine = tmp_path / f"{preset}.engine"
    info = _timed_build(onnx_path, engine, capsys, f"{preset} {dtype}")

    carried = [n for n in TOKENIZER_FILES if (onnx_path.parent / n).is_file()]  # the export's tokenizer too
    assert "tokenizer.json" in carried
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([engine.name, build_info_path(engine).name, *carried])
    assert info["engine"]["bytes"] == engine.stat().st_size > 0
    assert info["runtime"] == "tensorrt-rtx" and info["runtime_version"].startswith("1.")
    assert info["precision"] == {"fp32": "float32", "fp16": "float16"}[dtype]
    assert info["plugins"] is False and info["profiles"] == [{"batch": list(BATCH), "sequence": list(SEQ)}]
    assert info["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert info["model_config"] == json.loads(meta["xlstm_export.config"])
    assert_engine_matches_onnx(info, onnx_path)

    nodes = [(n.name, n.op_type) for n in onnx.load(str(onnx_path), load_external_data=False).graph.node
             if n.domain == "xlstm"]
    assert [(c["node"], c["op"]) for c in info["cells"]] == nodes and {op for _, op in nodes} == ops
    for cell in info["cells"]:  # every cell a TensorRT loop, none left out, no plugin
        assert cell["compiled_as"] == "loop" and cell["loops"], cell


@needs_rtx
def test_rtx_builds_the_inline_export(exported, tmp_path, capsys):
    """The --inline file (standard ops only) parses and builds; same interface, one loop per cell."""
    onnx_path = exported("tiny", "fp32", inline=True)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    assert not any(n.domain for n in graph.node)
    info = _timed_build(onnx_path, tmp_path / "inline.engine", capsys, "tiny fp32 --inline")
    assert info["cells"] == []
    assert_engine_matches_onnx(info, onnx_path)
    assert _onnx_io(onnx_path) == _onnx_io(exported("tiny", "fp32"))
    loops = sorted(n.name for n in graph.node if n.op_type in ("Loop", "Scan"))
    assert len(loops) == 3  # the paper stack: mLSTM, sLSTM, mLSTM
    assert len(info["network"]["loop_names"]) == len(loops)


# ---------------------------------------------------------------------------------------------
# bad input: the real CLI, one error line, exit 2, no engine and no record left
# ---------------------------------------------------------------------------------------------


def _cell_onnx(tmp_path):
    path = tmp_path / "slstm.onnx"
    onnx.save(onnx_functions.cell_model("sLSTM", "float32", dims={"NH": 2, "DH": 4}), str(path))
    return path


def _run_build(capsys, *args) -> tuple[int, str, list[str]]:
    """(exit code, stdout, stderr lines) of `xlstm-export build ARGS`."""
    capsys.readouterr()
    code = main(["build", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


def assert_refused(capsys, args, fragment: str, folder) -> None:
    code, _, err = _run_build(capsys, *args)
    assert code == 2 and len(err) == 1 and fragment in err[0], (code, err)
    assert not [p for p in os.listdir(folder) if ".engine" in p], os.listdir(folder)


def test_build_refuses_a_file_that_is_not_ours(tmp_path, capsys):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(g), str(foreign))
    assert_refused(capsys, [foreign, "-o", tmp_path / "m.engine"], "not an xlstm-export model", tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("not a protobuf")
    assert_refused(capsys, [text, "-o", tmp_path / "m.engine"], "not an ONNX model", tmp_path)


def test_build_refuses_a_profile_without_decode(tmp_path, capsys):
    args = [_cell_onnx(tmp_path), "-o", tmp_path / "m.engine", "--seq", "2", "16", "64"]
    assert_refused(capsys, args, "excludes 1", tmp_path)


@pytest.mark.parametrize("option", ["--batch", "--seq"])
def test_build_refuses_a_profile_past_int32(tmp_path, capsys, option):
    """TensorRT's profile shapes are int32: a larger maximum wrapped around (--batch 1 1 99999999999
    built, its record saying 99999999999) or failed inside the builder (--seq 1 1 3000000000)."""
    args = [_cell_onnx(tmp_path), "-o", tmp_path / "m.engine", option, "1", "1", str(2**31)]
    assert_refused(capsys, args, "TensorRT's profile dims are int32, at most 2147483647", tmp_path)


def test_build_refuses_a_folder_in_place_of_its_record(tmp_path, capsys):
    """A folder named <engine>.json: refused before the build ('[Errno 21] Is a directory' after it)."""
    (tmp_path / "m.engine.json").mkdir()
    assert_refused(capsys, [_cell_onnx(tmp_path), "-o", tmp_path / "m.engine"],
                   "cannot write " + str(tmp_path / "m.engine.json") + ": it is a directory", tmp_path / "m.engine.json")
    assert sorted(os.listdir(tmp_path)) == ["m.engine.json", "slstm.onnx"]


def test_build_refuses_a_bad_workspace(tmp_path):
    for bad in (-1, 0, float("nan"), "1"):
        with pytest.raises(ValueError, match="workspace_gib must be a number of GiB > 0"):
            build_engine(_cell_onnx(tmp_path), tmp_path / "m.engine", runtime="tensorrt-rtx", workspace_gib=bad)


def test_build_names_a_missing_or_short_data_file(exported, tmp_path, capsys):
    """An export whose weights lie in <name>.data: that file missing or cut short is named before the
    build (TensorRT's parser said only that it failed to import the first initializer)."""
    model = onnx.load(str(exported("tiny-large", "fp32")))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    assert_refused(capsys, [path, "-o", tmp_path / "m.engine"], "m.onnx.data holds 1000 bytes, but tensor", tmp_path)
    data.unlink()
    assert_refused(capsys, [path, "-o", tmp_path / "m.engine"], "m.onnx.data, which is missing", tmp_path)


def test_trt_model_names_what_is_wrong_with_its_file(tmp_path):
    """TrtModel of a missing file, a folder or an .onnx said 'TensorRT is not available: pip install
    tensorrt'; an engine without its build record now says that it was taken for a TensorRT one."""
    from xlstm_export.tensorrt import TrtModel

    if runtime_available("tensorrt-rtx"):
        with pytest.raises(FileNotFoundError, match="no such engine file"):
            TrtModel(tmp_path / "missing.engine", runtime="tensorrt-rtx")
    with pytest.raises(IsADirectoryError, match="is a directory, expected an engine file"):
        TrtModel(tmp_path)
    with pytest.raises(ValueError, match="an ONNX file, not an engine"):
        TrtModel(_cell_onnx(tmp_path))
    if runtime_available("tensorrt"):
        return
    plan = tmp_path / "bare.engine"
    plan.write_bytes(b"\0" * 64)
    with pytest.raises(RuntimeError, match=r"has no build record \(bare\.engine\.json\), so it is taken for a "
                                           r"TensorRT engine: .*runtime='tensorrt-rtx'"):
        TrtModel(plan)


def test_build_with_missing_tensorrt_says_what_to_install(tmp_path, capsys):
    if runtime_available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    args = [_cell_onnx(tmp_path), "-o", tmp_path / "m.engine", "--runtime", "tensorrt"]
    assert_refused(capsys, args, "pip install tensorrt", tmp_path)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder this process cannot create files in: read-only permissions, or (as root, who ignores
    them) sysfs."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, "/sys"):
        try:
            fd, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            yield candidate
            break
        os.close(fd)
        os.unlink(probe)
    else:
        pytest.skip("found no folder this process cannot write")
    folder.chmod(0o755)


@needs_rtx
def test_build_into_an_unwritable_folder_leaves_nothing(tmp_path, capsys, unwritable_dir):
    args = [_cell_onnx(tmp_path), "-o", os.path.join(unwritable_dir, "m.engine")]
    assert_refused(capsys, args, "not writable", unwritable_dir)
    assert_refused(capsys, [args[0], "-o", tmp_path / "missing" / "m.engine"], "does not exist", tmp_path)


@needs_rtx
def test_build_carries_the_tokenizer_beside_the_engine(tmp_path, capsys):
    """An engine built into another folder takes its ONNX file's tokenizer files along (generate
    --prompt and serve read them beside the engine); a folder holding another model's tokenizer,
    which the engine would be read with, is refused before the build."""
    from xlstm_export.tokenizer import byte_tokenizer_files, load_tokenizer, write_tokenizer_files

    src, out, other = (tmp_path / d for d in ("src", "out", "other"))
    for d in (src, out, other):
        d.mkdir()
    cell = _cell_onnx(src)
    files = byte_tokenizer_files()
    write_tokenizer_files(files, src)
    code, _, err = _run_build(capsys, cell, "-o", out / "m.engine", "--seq", 1, 4, 8, "--batch", 1, 1, 2)
    assert code == 0, err
    assert {n: (out / n).read_bytes() for n in files} == files
    assert load_tokenizer(out / "m.engine").encode("hi") == [104, 105]
    code, _, err = _run_build(capsys, cell, "-o", out / "m2.engine", "--seq", 1, 4, 8, "--batch", 1, 1, 2)
    assert code == 0, err  # the same tokenizer there already: fine
    (other / "tokenizer.json").write_bytes(files["tokenizer.json"].replace(b'"a"', b'"A"', 1))
    assert_refused(capsys, [cell, "-o", other / "m.engine"], "holds tokenizer files (tokenizer.json)", other)
    (src / "tokenizer.json").unlink()  # a model without one, into a folder with one
    assert_refused(capsys, [cell, "-o", other / "m.engine"], "and slstm.onnx has none", other)


@needs_rtx
def test_record_follows_its_engine_and_its_onnx(tmp_path, capsys):
    """A rebuild replaces engine and record together; a record that does not describe the engine
    beside it, or an engine compared with another ONNX file, is one clear error."""
    cell = _cell_onnx(tmp_path)
    engine = tmp_path / "m.engine"
    for seq in ((1, 4, 8), (1, 16, 64)):
        code, out, err = _run_build(capsys, cell, "-o", engine, "--seq", *seq, "--batch", 1, 1, 2)
        assert code == 0, err
        assert "TensorRT-RTX" in out and "xlstm::sLSTM  loop" in out and f"sequence 1/{seq[1]}/{seq[2]}" in out, out
        assert read_build_info(engine)["profiles"][0]["sequence"] == list(seq)
    other = tmp_path / "other.onnx"
    onnx.save(onnx_functions.cell_model("sLSTM", "float32", dims={"NH": 2, "DH": 8}), str(other))
    capsys.readouterr()
    assert main(["validate", str(other), "--engine", str(engine)]) == 2
    assert "built from another ONNX file" in capsys.readouterr().err
    if not torch.cuda.is_available():  # generate reads the record, then needs the GPU it names
        assert main(["generate", str(engine), "--prompt-ids", "1,2"]) == 2
        assert "needs an RTX GPU" in capsys.readouterr().err
    with open(engine, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ValueError, match="rebuild"):
        read_build_info(engine)


# ---------------------------------------------------------------------------------------------
# GPU tier: an RTX engine run against onnxruntime (needs an RTX GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_rtx
@pytest.mark.parametrize("preset", ["tiny", "tiny-large"])
def test_rtx_engine_matches_onnxruntime(exported, tmp_path, preset):
    from xlstm_export.tensorrt import validate_engine

    if not torch.cuda.is_available():
        pytest.skip("running a TensorRT-RTX engine needs an RTX GPU")
    onnx_path = exported(preset, "fp32")
    engine = build_engine(onnx_path, tmp_path / "m.engine", runtime="tensorrt-rtx", batch=BATCH, seq=SEQ)
    report = validate_engine(onnx_path, engine, batch=2, seq=11, decode_steps=3)
    assert report.ok, str(report)
