"""Streamed export (xlstm_export/export_stream.py, models/lazy.py): a checkpoint directory exported
without building the model equals the normal export of the same directory (same graph bytes, weights
bit for bit); lazy reads; atomic writes; `info` / `export` from the CLI without loading weights."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

from xlstm_export import cli
from xlstm_export.export import export_onnx
from xlstm_export.export_stream import StreamedWeights, export_checkpoint
from xlstm_export.models import CheckpointError, from_pretrained, load
from xlstm_export.models.lazy import lazy_state_dict, read_safetensors_header

STAND_IN_LIMIT = 8192  # the lowest real_limit: every 2-D weight of the small models becomes a stand-in


def _split_graph(path) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the model without its initializer data, serialised deterministically; name -> array)."""
    proto = onnx.load(str(path))  # external data loaded
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for t in proto.graph.initializer:
        t.ClearField("raw_data")
        for f in ("float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(f)
        del t.external_data[:]
        t.ClearField("data_location")
    return proto.SerializeToString(deterministic=True), weights


def _assert_same_export(a, b) -> None:
    graph_a, weights_a = _split_graph(a)
    graph_b, weights_b = _split_graph(b)
    assert list(weights_a) == list(weights_b)
    for name, wa in weights_a.items():
        wb = weights_b[name]
        assert wa.dtype == wb.dtype and wa.shape == wb.shape, name
        assert wa.tobytes() == wb.tobytes(), f"initializer {name} differs"
    assert graph_a == graph_b  # nodes, function bodies, names, metadata, initializer order and dims


def _write_fused_transformers_dir(model, d) -> None:
    """A transformers xLSTM directory with weight_mode "fused" (rows [q|k|v|o], [i|f], [gate|up])."""
    cfg, sd = model.config, model.state_dict()
    out = {"backbone.embeddings.weight": sd["embedding.weight"], "lm_head.weight": sd["lm_head.weight"],
           "backbone.out_norm.weight": sd["out_norm.weight"]}
    for i in range(cfg.num_blocks):
        p, m, q = f"backbone.blocks.{i}.", f"backbone.blocks.{i}.mlstm_layer.", f"blocks.{i}."
        out[p + "norm_mlstm.weight"] = sd[q + "norm_mlstm.weight"]
        out[m + "qkv_opreact.weight"] = torch.cat([sd[q + f"{n}.weight"] for n in ("q", "k", "v", "ogate_preact")])
        for kind in ("weight", "bias"):
            out[m + f"ifgate_preact.{kind}"] = torch.cat([sd[q + f"igate_preact.{kind}"], sd[q + f"fgate_preact.{kind}"]])
        out[m + "multihead_norm.weight"] = sd[q + "multihead_norm.weight"]
        out[m + "out_proj.weight"] = sd[q + "out_proj.weight"]
        out[p + "norm_ffn.weight"] = sd[q + "norm_ffn.weight"]
        out[p + "ffn.proj_up_gate_z.weight"] = torch.cat([sd[q + "ffn.proj_up_gate.weight"], sd[q + "ffn.proj_up.weight"]])
        out[p + "ffn.proj_down.weight"] = sd[q + "ffn.proj_down.weight"]
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "xlstm", "vocab_size": cfg.vocab_size, "hidden_size": cfg.embedding_dim,
        "num_hidden_layers": cfg.num_blocks, "num_heads": cfg.num_heads, "use_bias": False,
        "norm_eps": cfg.norm_eps, "qk_dim_factor": cfg.qk_dim_factor, "v_dim_factor": cfg.v_dim_factor,
        "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64, "gate_soft_cap": cfg.gate_soft_cap,
        "output_logit_soft_cap": cfg.output_logit_soft_cap, "weight_mode": "fused", "eps": cfg.cell_eps,
    }))
    names = sorted(out)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in halves.items():
        save_file({k: out[k].contiguous() for k in part}, str(d / fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, part in halves.items() for k in part}}))


def _randomised(name: str, seed: int, **overrides):
    """A preset with every tensor random (norm scales too: fresh ones are all ones, which would
    let equal-valued tensors be merged by the optimiser in one export and not the other)."""
    model = load(name, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model


# --- equality with the normal export -------------------------------------------------------------
def test_paper_dir_streamed_equals_normal_fp16_inline(tmp_path):
    """Our directory (paper model: an mLSTM and an sLSTM block, tied head), float32 weights exported in fp16, inline: the
    graph (incl. the fused sibling MatMuls built from the streamed weights) equals the normal one."""
    model = _randomised("tiny", seed=3, num_blocks=2, slstm_at=[1], tie_weights=True)  # one block of each kind
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    a = export_onnx(from_pretrained(d), tmp_path / "a.onnx", dtype="fp16", progress=False)
    b = export_checkpoint(d, tmp_path / "b.onnx", dtype="fp16", progress=False, real_limit=STAND_IN_LIMIT)
    assert not (tmp_path / "b.onnx.data").exists()
    _assert_same_export(a, b)


def test_fused_transformers_dir_streamed_equals_normal_bf16_external(tmp_path):
    """A sharded transformers directory in bfloat16 with fused rows: streamed in its own dtype
    (dtype=None) into external data equals export_onnx of the loaded model."""
    model = _randomised("tiny-large", seed=4, num_blocks=1).to(torch.bfloat16)
    d = tmp_path / "hf"
    _write_fused_transformers_dir(model, d)
    loaded = from_pretrained(d).to(torch.bfloat16)
    a = export_onnx(loaded, tmp_path / "a.onnx", dtype="bf16", progress=False, external_data=True)
    b = export_checkpoint(d, tmp_path / "b.onnx", progress=False, external_data=True, real_limit=STAND_IN_LIMIT)
    assert (tmp_path / "b.onnx.data").stat().st_size == (tmp_path / "a.onnx.data").stat().st_size
    onnx.checker.check_model(str(b), full_check=True)
    _assert_same_export(a, b)


@pytest.mark.parametrize("arch, dtype", [("tiny-large", "fp32"), ("tiny", "bf16")])
def test_external_data_export_equals_the_inline_one(tmp_path, arch, dtype):
    """Weights in external data (what a 7B export always gets) go through the same fusions as
    inline ones: the same graph (the sibling MatMuls fused), the same weights bit for bit, and a
    data file holding exactly the external tensors, end to end."""
    model = _randomised(arch, seed=6)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = export_onnx(model, tmp_path / "a" / "m.onnx", dtype=dtype, progress=False)
    b = export_onnx(model, tmp_path / "b" / "m.onnx", dtype=dtype, progress=False, external_data=True)
    assert not (tmp_path / "a" / "m.onnx.data").exists()
    _assert_same_export(a, b)
    proto = onnx.load(str(b), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert any("__fused" in t.name for t in external)
    spans = [(int(e["offset"]), int(e["length"])) for e in ({x.key: x.value for x in t.external_data} for t in external)]
    assert [o for o, _ in spans] == [sum(n for _, n in spans[:j]) for j in range(len(spans))]  # contiguous from 0
    assert sum(n for _, n in spans) == (tmp_path / "b" / "m.onnx.data").stat().st_size
    assert sorted(os.listdir(tmp_path / "b")) == ["m.onnx", "m.onnx.data", "tokenizer.json"]


# --- atomic writes -------------------------------------------------------------------------------
def test_failed_stream_leaves_target_untouched(tmp_path, monkeypatch):
    """A read failing in the middle of writing the external data: no new .onnx or .data at the
    target, the previous files unchanged, no temporary folder left behind."""
    model = load("tiny-large", seed=5, num_blocks=1)
    d = tmp_path / "m"
    model.save_pretrained(d)
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    target.write_bytes(b"old model")
    (target.parent / "model.onnx.data").write_bytes(b"old data")
    calls = {"n": 0}
    real = StreamedWeights._materialise

    def failing(self, recipe, name):  # called by the external-data writer, one tensor at a time
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError("disk went away")
        return real(self, recipe, name)

    monkeypatch.setattr(StreamedWeights, "_materialise", failing)
    with pytest.raises(OSError, match="disk went away"):
        export_checkpoint(d, target, dtype="fp32", progress=False, external_data=True, real_limit=STAND_IN_LIMIT)
    assert calls["n"] > 3
    assert sorted(os.listdir(target.parent)) == ["model.onnx", "model.onnx.data"]
    assert target.read_bytes() == b"old model"
    assert (target.parent / "model.onnx.data").read_bytes() == b"old data"


# --- lazy reads ----------------------------------------------------------------------------------
def test_lazy_state_dict_reads_the_same_tensors(tmp_path):
    model = load("tiny-large", seed=6).to(torch.bfloat16)
    d = tmp_path / "hf"
    _write_fused_transformers_dir(model, d)
    config, locations = lazy_state_dict(d)
    assert config == from_pretrained(d).config
    want = from_pretrained(d).to(torch.bfloat16).state_dict()
    assert list(locations) == list(want)
    for k, loc in locations.items():
        got = loc.read()
        assert got.dtype == torch.bfloat16 and torch.equal(got, want[k]), k
        assert torch.equal(loc.read(torch.float32), want[k].float()), k


def test_truncated_safetensors_named(tmp_path):
    d = tmp_path / "m"
    load("tiny-large").save_pretrained(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="does not fit its shape or the file"):
        read_safetensors_header(f)
    f.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        lazy_state_dict(d)


def _rewrite_header(f, edit) -> None:
    """The safetensors file with its JSON header changed by ``edit`` (padded to its old length)."""
    import struct

    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    f.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n:])


def test_overlapping_or_gapped_byte_ranges_refused(tmp_path):
    """A header whose byte ranges overlap (two tensors of one shape on the same bytes) or leave
    bytes over: safetensors (so load / convert) refuses it; `info` and the streamed `export` took
    it and wrote the second tensor's values in place of the first."""
    d = tmp_path / "m"
    load("tiny-large").save_pretrained(d)
    f = d / "model.safetensors"
    good = f.read_bytes()

    def share(h):
        h["blocks.0.igate_preact.weight"]["data_offsets"] = h["blocks.0.fgate_preact.weight"]["data_offsets"]

    _rewrite_header(f, share)
    with pytest.raises(CheckpointError, match="overlapping or gapped byte ranges"):
        lazy_state_dict(d)
    assert cli.main(["export", str(d), "-o", str(tmp_path / "m.onnx"), "--quiet"]) == 2
    assert not (tmp_path / "m.onnx").exists()
    f.write_bytes(good + b"\0" * 16)  # bytes no tensor holds
    with pytest.raises(CheckpointError, match="the tensors cover .* data bytes, the file holds"):
        read_safetensors_header(f)


def test_float8_and_integer_checkpoints(tmp_path, capsys):
    """float8 weights: `info` says so (it raised "choose one with --dtype", an option info has not)
    and the lazy reads convert them as loading does (the header's F8_E4M3 was 'an unreadable header
    entry', so `export --dtype` failed where `convert --dtype` worked). Integer weights with a
    --dtype were cast to garbage floats by convert and export alike: refused by both."""
    from safetensors.torch import load_file

    d = tmp_path / "f8"
    load("tiny-large", num_blocks=1).save_pretrained(d)
    f = d / "model.safetensors"
    sd = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(str(f)).items()}
    save_file(sd, str(f))
    _, locations = lazy_state_dict(d)
    want = from_pretrained(d, dtype="fp16").state_dict()
    for k, loc in locations.items():
        assert loc.dtype == torch.float8_e4m3fn and torch.equal(loc.read(torch.float16), want[k]), k
    assert cli.main(["info", str(d)]) == 0
    assert "stored as float8_e4m3fn: convert or export it with --dtype" in capsys.readouterr().out
    # --json: a dtype name, not prose ("float32 (random weights)" for a preset)
    for src, dtype, random in ((str(d), "float8_e4m3fn", False), ("tiny", "float32", True)):
        assert cli.main(["info", src, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert (info["checkpoint_dtype"], info["random_weights"]) == (dtype, random)
    save_file({**sd, "embedding.weight": torch.zeros(sd["embedding.weight"].shape, dtype=torch.int8)}, str(f))
    with pytest.raises(CheckpointError, match="'embedding.weight' is int8: not a floating-point weight"):
        lazy_state_dict(d)
    with pytest.raises(CheckpointError, match="'embedding.weight' is int8: not a floating-point weight"):
        from_pretrained(d, dtype="fp32")


def test_real_limit_below_the_optimiser_folding_limit_refused():
    with pytest.raises(ValueError, match="real_limit"):
        StreamedWeights({}, torch.float32, real_limit=16)


# --- CLI -----------------------------------------------------------------------------------------
def test_info_reads_no_weights(tmp_path, monkeypatch, capsys):
    """`info` on a directory gives the model's counts from config.json and the headers alone."""
    model = load("tiny", seed=7)
    d = tmp_path / "m"
    model.save_pretrained(d)
    import xlstm_export.models.io as io

    monkeypatch.setattr(io, "load_file", lambda *a, **k: pytest.fail("info read the weights"))
    assert cli.main(["info", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == model.num_params()
    assert info["state_bytes_per_sequence"] == model.state_bytes(1)
    assert info["state_tensors"] == {k: list(s) for k, s in model.state_spec(1).items()}
    assert info["checkpoint_dtype"] == "float32"


def test_info_7b_preset_without_building_it(capsys):
    assert cli.main(["info", "xlstm-7b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 6.8e9 < info["parameters"] < 7.0e9 and len(info["state_tensors"]) == 96


def test_cli_export_float64_checkpoint_needs_dtype(tmp_path, capsys):
    d = tmp_path / "m"
    load("tiny-large").save_pretrained(d)
    f = d / "model.safetensors"
    save_file({k: v.double() for k, v in load_file(str(f)).items()}, str(f))
    assert cli.main(["export", str(d), "-o", str(tmp_path / "x.onnx"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "float64" in err and "--dtype" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()
