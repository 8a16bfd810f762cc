"""`triton-repo`: the generated config parses as Triton's ModelConfig and its implicit state is
exactly the exported model's past.* / present.* interface (paper and 7B-style exports)."""

from __future__ import annotations

import dataclasses
import json

import onnx
import pytest
import torch

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

from xlstm_export.export import export_onnx  # noqa: E402
from xlstm_export.models import preset, xLSTMLM  # noqa: E402
from xlstm_export.ort import inspect_model  # noqa: E402
from xlstm_export.triton_repo import config_pbtxt, model_interface, state_order_safe, write_triton_repo  # noqa: E402

TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
         onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """preset name -> its export, each made once per module."""
    done = {}

    def get(name):
        if name not in done:
            torch.manual_seed(0)
            model = xLSTMLM(preset(name)).eval()
            done[name] = export_onnx(model, tmp_path_factory.mktemp(name) / "model.onnx", progress=False)
        return done[name]

    return get


@pytest.fixture(scope="module", params=["tiny", "tiny-large"])
def exported(request, exports):
    return exports(request.param)


@pytest.fixture(scope="module")
def tiny_onnx(exports):
    return exports("tiny")


def parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def graph_io(path):
    g = onnx.load(str(path), load_external_data=False).graph
    dims = lambda v: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return ({v.name: (TYPES[v.type.tensor_type.elem_type], dims(v)) for v in g.input},
            {v.name: (TYPES[v.type.tensor_type.elem_type], dims(v)) for v in g.output})


def test_config_states_match_the_onnx_interface(exported, tmp_path):
    folder = write_triton_repo(exported, tmp_path / "repo", name="xlstm", max_batch=16)
    cfg = parse(folder / "config.pbtxt")
    ins, outs = graph_io(exported)
    T = model_config_pb2.DataType.Name

    assert cfg.name == "xlstm" and cfg.backend == "onnxruntime" and cfg.max_batch_size == 16
    assert [(i.name, T(i.data_type), list(i.dims)) for i in cfg.input] == [("input_ids", "TYPE_INT64", [-1])]
    assert [(o.name, T(o.data_type), list(o.dims)) for o in cfg.output] == \
        [("logits", outs["logits"][0], outs["logits"][1][1:])]
    sb = cfg.sequence_batching
    assert sb.WhichOneof("strategy_choice") == "oldest" and sb.oldest.max_candidate_sequences == 16
    assert len(sb.control_input) == 0  # the model takes no control tensors; initial_state starts a sequence
    past = sorted(n for n in ins if n.startswith("past."))
    assert sorted(s.input_name for s in sb.state) == past  # every state, once
    for s in sb.state:
        key = s.input_name[len("past."):]
        assert s.output_name == "present." + key
        dtype, dims = ins[s.input_name]
        assert (T(s.data_type), list(s.dims)) == (dtype, dims[1:])  # the batch dim is Triton's
        assert outs[s.output_name] == ins[s.input_name]
        init = s.initial_state[0]
        assert init.zero_data and list(init.dims) == list(s.dims) and init.data_type == s.data_type
    assert set(ins) == {"input_ids", *past} and set(outs) == {"logits", *(s.output_name for s in sb.state)}
    assert state_order_safe([(s.input_name, s.output_name) for s in sb.state])
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    copied = inspect_model(folder / "1" / "model.onnx")
    assert copied["state_shapes"] == inspect_model(exported)["state_shapes"]


def test_gpu_and_engine_configs_parse(exported, tmp_path):
    gpu = parse(write_triton_repo(exported, tmp_path / "r", device="gpu") / "config.pbtxt")
    assert gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and gpu.max_batch_size == 32
    plan = dataclasses.replace(model_interface(exported), kind="plan", max_batch=8)  # an engine's record, as read
    cfg = text_format.Parse(config_pbtxt(plan, name="m", max_batch=8, device="gpu"), model_config_pb2.ModelConfig())
    assert cfg.backend == "tensorrt" and cfg.default_model_filename == "model.plan"
    assert len(cfg.sequence_batching.state) == len(inspect_model(exported)["state_names"])


def test_instances_are_the_instance_group_count(tiny_onnx, tmp_path):
    from xlstm_export.cli import main

    assert parse(write_triton_repo(tiny_onnx, tmp_path / "one") / "config.pbtxt").instance_group[0].count == 1
    assert main(["triton-repo", str(tiny_onnx), "-o", str(tmp_path / "r"), "--instances", "3"]) == 0
    cfg = parse(tmp_path / "r" / "xlstm" / "config.pbtxt")
    assert len(cfg.instance_group) == 1 and cfg.instance_group[0].count == 3
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="--instances must be an integer >= 1"):
            config_pbtxt(model_interface(tiny_onnx), name="m", max_batch=4, device="cpu", instances=bad)


def test_triton_pairing_hazard_is_detected():
    # server#8586: the outputs sort in another order than the inputs, Triton swaps the states
    assert not state_order_safe([("cache_last_channel", "cache_last_channel_next"),
                                 ("cache_last_channel_len", "cache_last_channel_len_next")])
    # our naming: a name extending another ("0.c" / "0.conv") keeps its order under a common prefix
    assert state_order_safe([("past.0.c", "present.0.c"), ("past.0.conv", "present.0.conv"),
                             ("past.10.c", "present.10.c"), ("past.1.c", "present.1.c")])


def test_bad_targets_are_one_clear_error(exported, tmp_path, capsys):
    from xlstm_export.cli import main

    write_triton_repo(exported, tmp_path / "repo")
    cases = [([str(exported), "-o", str(tmp_path / "repo")], "exists: pass --overwrite"),
             ([str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x")], "no such file"),
             ([str(exported), "-o", str(tmp_path / "y"), "--max-batch", "0"], "--max-batch"),
             ([str(exported), "-o", str(tmp_path / "v"), "--instances", "0"], "--instances must be an integer >= 1"),
             ([str(tmp_path / "e.engine"), "-o", str(tmp_path / "z")], "no such file")]
    eng = tmp_path / "e2.engine"
    eng.write_bytes(b"not a plan")
    cases.append(([str(eng), "-o", str(tmp_path / "w")], "no build record"))
    for args, fragment in cases:
        assert main(["triton-repo", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "w").exists() and not (tmp_path / "y").exists() and not (tmp_path / "v").exists()
    assert main(["triton-repo", str(exported), "-o", str(tmp_path / "repo"), "--overwrite"]) == 0


# --- what Triton would refuse is refused here, before anything is written ------------------------
def edited(src, dst, edit):
    """A copy of the export with its declared graph outputs edited (only the interface is read)."""
    m = onnx.load(str(src))
    edit({v.name: v.type.tensor_type for v in m.graph.output})
    onnx.save(m, str(dst))
    return dst


def fake_engine(onnx_path, dst, logits_dtype="float32", present_dims=None, batch=(1, 1, 8)):
    """A .engine with a build record as `xlstm-export build` writes it (read, never run here)."""
    from xlstm_export.engine import RECORD_FORMAT

    ins, outs = graph_io(onnx_path)
    dt = {"TYPE_FP32": "float32", "TYPE_INT64": "int64"}
    dst.write_bytes(b"plan")
    record = {"format": RECORD_FORMAT, "runtime": "tensorrt", "engine": {"file": dst.name, "bytes": 4},
              "profiles": [{"batch": list(batch), "sequence": [1, 128, 2048]}],
              "inputs": [{"name": n, "dtype": dt[t], "dims": d} for n, (t, d) in ins.items()],
              "outputs": [{"name": n, "dtype": logits_dtype if n == "logits" else dt[t],
                           "dims": present_dims if present_dims and n.startswith("present.") else d}
                          for n, (t, d) in outs.items()]}
    (dst.parent / (dst.name + ".json")).write_text(json.dumps(record))
    return dst


def test_bf16_onnx_is_refused_and_a_bf16_engine_is_not(tiny_onnx, tmp_path, capsys):
    """Triton's onnxruntime backend has no BF16 tensors (server#8464): refused, naming the fix; its
    tensorrt backend takes them (tensorrt_backend#90)."""
    from xlstm_export.cli import main

    bf16 = edited(tiny_onnx, tmp_path / "bf16.onnx",
                  lambda outs: setattr(outs["logits"], "elem_type", onnx.TensorProto.BFLOAT16))
    assert main(["triton-repo", str(bf16), "-o", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no TYPE_BF16" in err[0] and "--dtype fp16 or --dtype fp32" in err[0], err
    assert not (tmp_path / "repo").exists()
    engine = fake_engine(tiny_onnx, tmp_path / "bf16.engine", logits_dtype="bfloat16")
    cfg = parse(write_triton_repo(engine, tmp_path / "repo") / "config.pbtxt")
    assert cfg.backend == "tensorrt" and cfg.max_batch_size == 8
    assert model_config_pb2.DataType.Name(cfg.output[0].data_type) == "TYPE_BF16"


def test_engine_profile_must_take_a_batch_of_one(tiny_onnx, tmp_path, capsys):
    """The sequence batcher runs what is ready (one live sequence: a batch of 1); Triton's tensorrt
    backend fails a batch below the profile's minimum (tensorrt_backend src/instance_state.cc,
    TRTv3Interface::SetBindingDimensions), so such an engine is refused, naming the rebuild."""
    from xlstm_export.cli import main

    engine = fake_engine(tiny_onnx, tmp_path / "b4.engine", batch=(4, 8, 16))
    assert main(["triton-repo", str(engine), "-o", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch range starts at 4" in err[0] and "--batch 1 OPT MAX" in err[0], err
    assert not (tmp_path / "repo").exists()
    cfg = parse(write_triton_repo(fake_engine(tiny_onnx, tmp_path / "b1.engine", batch=(1, 8, 16)),
                                  tmp_path / "repo") / "config.pbtxt")
    assert cfg.max_batch_size == 16 and cfg.sequence_batching.oldest.max_candidate_sequences == 16


@pytest.mark.parametrize("name", ['a"b', "a\nb", "a\\b", "a/b", ".hidden", "..", "", "a b", "é"])
def test_unsafe_model_names_are_refused(tiny_onnx, tmp_path, name):
    with pytest.raises(ValueError, match="letters, digits"):
        write_triton_repo(tiny_onnx, tmp_path / "repo", name=name)
    assert not (tmp_path / "repo").exists()


def test_safe_model_names_parse_and_match_the_folder(tiny_onnx, tmp_path):
    for name in ("xlstm", "xlstm-7b_v1.2", "_m", "0"):
        folder = write_triton_repo(tiny_onnx, tmp_path / "repo", name=name)
        assert folder.name == name and parse(folder / "config.pbtxt").name == name


def test_unknown_device_is_refused(tiny_onnx, tmp_path):
    with pytest.raises(ValueError, match="--device must be 'cpu' or 'gpu', got 'tpu'"):
        write_triton_repo(tiny_onnx, tmp_path / "repo", device="tpu")
    with pytest.raises(ValueError, match="--device"):
        config_pbtxt(model_interface(tiny_onnx), name="m", max_batch=1, device="tpu")


def test_present_must_match_past(tiny_onnx, tmp_path):
    def wider(outs):
        outs["present.0.n"].shape.dim[1].dim_value += 1

    def float16(outs):
        outs["present.0.n"].elem_type = onnx.TensorProto.FLOAT16

    for edit in (wider, float16):
        bad = edited(tiny_onnx, tmp_path / f"{edit.__name__}.onnx", edit)
        with pytest.raises(ValueError, match=r"state output present\.0\.n .* does not match its input past\.0\.n"):
            model_interface(bad)
    engine = fake_engine(tiny_onnx, tmp_path / "m.engine", present_dims=[-1, 3])
    with pytest.raises(ValueError, match="does not match its input"):
        write_triton_repo(engine, tmp_path / "repo")


def test_a_failed_write_leaves_nothing_new(tiny_onnx, tmp_path, monkeypatch):
    import shutil

    def full_disk(*_):
        raise OSError(27, "File too large")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError, match="too large"):
        write_triton_repo(tiny_onnx, tmp_path / "new" / "repo")
    assert list(tmp_path.iterdir()) == []  # neither repo nor the folder made for it
    (tmp_path / "kept").mkdir()
    with pytest.raises(OSError, match="too large"):
        write_triton_repo(tiny_onnx, tmp_path / "kept" / "repo")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and list((tmp_path / "kept").iterdir()) == []
