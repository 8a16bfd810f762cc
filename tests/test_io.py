"""Saving and loading (models/io.py): round trips, transformers directories without transformers,
and one clear error per kind of bad checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from xlstm_export.models import CheckpointError, xLSTMConfig, xLSTMLM, preset

CONFIGS = {
    "paper-untied": xLSTMConfig(
        architecture="paper", vocab_size=97, embedding_dim=32, num_blocks=2, num_heads=2,
        slstm_at=[1], slstm_num_heads=2, tie_weights=False,
    ),
    "paper-tied": xLSTMConfig(
        architecture="paper", vocab_size=97, embedding_dim=32, num_blocks=2, num_heads=2,
        slstm_at=[0], slstm_num_heads=2, tie_weights=True,
    ),
    "large": xLSTMConfig(architecture="large", vocab_size=97, embedding_dim=64, num_blocks=2, num_heads=2),
}


def _model(name: str, seed: int = 0) -> xLSTMLM:
    torch.manual_seed(seed)
    model = xLSTMLM(CONFIGS[name]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every parameter random, so a dropped or swapped tensor shows
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * max(p.shape[-1], 1) ** -0.5)
    return model


def _ids(vocab: int, S: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (2, S), generator=torch.Generator().manual_seed(S))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_identical(tmp_path, name):
    model = _model(name)
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"config.json", "model.safetensors"}
    loaded = xLSTMLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert not loaded.training
    if model.config.tie_weights:
        assert "lm_head.weight" not in load_file(str(tmp_path / "m" / "model.safetensors"))
        assert loaded.lm_head.weight is loaded.embedding.weight
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    ids = _ids(97)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)
    # saving again over an existing directory replaces it
    _model(name, seed=5).save_pretrained(tmp_path / "m")
    again = xLSTMLM.from_pretrained(tmp_path / "m")
    assert not torch.equal(again.embedding.weight, model.embedding.weight)


def test_overrides_change_execution_only(tmp_path):
    model = _model("paper-untied")
    model.save_pretrained(tmp_path / "m")
    loaded = xLSTMLM.from_pretrained(tmp_path / "m", chunk_size=8, backend="torch")
    assert (loaded.config.chunk_size, loaded.config.backend) == (8, "torch")
    ids = _ids(97, 21)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)


# --- bad checkpoints: one clear error each ------------------------------------------------------
def _saved(tmp_path, name="paper-untied"):
    d = tmp_path / "m"
    _model(name).save_pretrained(d)
    return d


def test_missing_tensor(tmp_path):
    d = _saved(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["blocks.1.r"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*'blocks\.1\.r'"):
        xLSTMLM.from_pretrained(d)


def test_misshaped_tensor(tmp_path):
    d = _saved(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["blocks.0.proj_up.weight"] = torch.zeros(128, 31)
    save_file(sd, str(d / "model.safetensors"))
    expected = r"'blocks\.0\.proj_up\.weight' has shape \(128, 31\).*expects \(128, 32\)"
    with pytest.raises(CheckpointError, match=expected):
        xLSTMLM.from_pretrained(d)


def test_unexpected_tensor(tmp_path):
    d = _saved(tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["blocks.7.extra"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*blocks\.7\.extra"):
        xLSTMLM.from_pretrained(d)


def test_no_config_json(tmp_path):
    d = _saved(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        xLSTMLM.from_pretrained(d)


def test_unknown_model_type(tmp_path):
    d = _saved(tmp_path)
    raw = json.loads((d / "config.json").read_text())
    raw["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type 'mamba'"):
        xLSTMLM.from_pretrained(d)


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        xLSTMLM.from_pretrained(tmp_path / "nope")
    d = _saved(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        xLSTMLM.from_pretrained(d)


MALFORMED = [  # (case, files written over a saved directory (None: a folder), the error's words)
    ("config-not-object", {"config.json": "[1]"}, "config.json: expected a JSON object, got list"),
    ("config-not-utf8", {"config.json": b"\xff\xfe"}, "config.json: not valid JSON"),
    ("index-not-map", {"model.safetensors.index.json": '{"weight_map": [1, 2]}'}, "not a valid shard index"),
    ("index-absolute", {"model.safetensors.index.json": '{"weight_map": {"a": "/etc/hostname"}}'},
     "not a file name in the index's own folder"),
    ("index-parent", {"model.safetensors.index.json": '{"weight_map": {"a": "../model.safetensors"}}'},
     "not a file name in the index's own folder"),
    ("index-int", {"model.safetensors.index.json": '{"weight_map": {"a": 5}}'}, "shard 5 is not a file name"),
    ("weights-dir", {"model.safetensors": None}, "model.safetensors: not a file"),
]


@pytest.mark.parametrize("name, files, message", MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_directory_is_one_clear_error(tmp_path, name, files, message):
    """What a hand-edited or damaged directory holds gets a CheckpointError naming the file (the
    index may name files in its own folder only: an index never makes the loader read elsewhere)."""
    d = _saved(tmp_path)
    for fname, content in files.items():
        (d / fname).unlink(missing_ok=True)
        if content is None:
            (d / fname).mkdir()
        else:
            (d / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=re.escape(message)):
        xLSTMLM.from_pretrained(d)


def test_save_refuses_a_folder_of_other_work(tmp_path, monkeypatch):
    """Saving replaces the directory whole: over a folder holding more than a model's files it is
    refused and nothing is deleted; over a model directory it replaces it; never the working
    directory; a failed write (a full disk) names the directory and leaves the old one."""
    model = _model("large")
    work = tmp_path / "work"
    (work / "my_run").mkdir(parents=True)
    (work / "README.txt").write_text("notes")
    with pytest.raises(OSError, match=r"README\.txt, my_run/\), which replacing it would delete"):
        model.save_pretrained(work)
    assert sorted(p.name for p in work.iterdir()) == ["README.txt", "my_run"]

    d = _saved(tmp_path)
    (d / "trainer_state.pt").write_bytes(b"x")  # a training checkpoint: its state would be lost
    with pytest.raises(OSError, match="trainer_state.pt"):
        model.save_pretrained(d)
    (d / "trainer_state.pt").unlink()
    model.save_pretrained(d)  # a model directory is replaced
    torch.testing.assert_close(xLSTMLM.from_pretrained(d).embedding.weight, model.embedding.weight)

    monkeypatch.chdir(d)
    with pytest.raises(OSError, match="working directory"):
        model.save_pretrained(".")
    monkeypatch.chdir(tmp_path)

    import xlstm_export.models.io as io

    def full_disk(*args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    before = (d / "model.safetensors").read_bytes()
    monkeypatch.setattr(io, "save_file", full_disk)
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(d))}: .*No space left"):
        _model("large", seed=1).save_pretrained(d)
    assert (d / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["work", d.name])  # no temporary left


# --- transformers directories, read without transformers ---------------------------------------
def _write_transformers_dir(model: xLSTMLM, d, *, shards: int = 1) -> None:
    """A transformers xLSTM directory written by hand from our 'large' model (the key names and
    config fields of transformers 5 ``xLSTMForCausalLM.save_pretrained``)."""
    cfg = model.config
    sd = model.state_dict()
    out = {"backbone.embeddings.weight": sd["embedding.weight"], "lm_head.weight": sd["lm_head.weight"]}
    out["backbone.out_norm.weight"] = sd["out_norm.weight"]
    for i in range(cfg.num_blocks):
        for k, v in sd.items():
            if k.startswith(f"blocks.{i}."):
                rest = k[len(f"blocks.{i}.") :]
                in_layer = not rest.startswith(("norm_mlstm", "norm_ffn", "ffn."))
                out[f"backbone.blocks.{i}." + ("mlstm_layer." if in_layer else "") + rest] = v
    d.mkdir()
    config = {
        "model_type": "xlstm", "architectures": ["xLSTMForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embedding_dim, "embedding_dim": cfg.embedding_dim,
        "num_hidden_layers": cfg.num_blocks, "num_blocks": cfg.num_blocks, "num_heads": cfg.num_heads,
        "use_bias": False, "norm_eps": cfg.norm_eps, "qk_dim_factor": cfg.qk_dim_factor,
        "v_dim_factor": cfg.v_dim_factor, "ffn_proj_factor": 2.667, "ffn_round_up_to_multiple_of": 64,
        "gate_soft_cap": cfg.gate_soft_cap, "output_logit_soft_cap": cfg.output_logit_soft_cap,
        "weight_mode": "single", "eps": cfg.cell_eps, "mode": "inference", "chunk_size": 64,
    }
    (d / "config.json").write_text(json.dumps(config))
    names = sorted(out)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        save_file({k: out[k].contiguous() for k in part}, str(d / fname))
        weight_map.update({k: fname for k in part})
    if shards > 1:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_transformers_dir_without_transformers(tmp_path):
    """from_pretrained reads transformers directories (single file and sharded) in a process where
    importing transformers (and xlstm) fails."""
    model = _model("large")
    dirs = [tmp_path / "hf1", tmp_path / "hf3"]
    _write_transformers_dir(model, dirs[0], shards=1)
    _write_transformers_dir(model, dirs[1], shards=3)
    ids = _ids(97)
    with torch.no_grad():
        torch.save({"ids": ids, "ref": model(ids)[0]}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["transformers"] = None  # any import of transformers / xlstm now fails
        sys.modules["xlstm"] = None
        import torch
        from xlstm_export.models import xLSTMLM
        data = torch.load({str(tmp_path / "ref.pt")!r})
        for d in {[str(d) for d in dirs]!r}:
            m = xLSTMLM.from_pretrained(d)
            with torch.no_grad():
                torch.testing.assert_close(m(data["ids"])[0], data["ref"], rtol=0, atol=0)
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    assert (dirs[1] / "model.safetensors.index.json").is_file()


def test_transformers_dir_missing_and_misshaped(tmp_path):
    model = _model("large")
    d = tmp_path / "hf"
    _write_transformers_dir(model, d)
    sd = load_file(str(d / "model.safetensors"))
    good = dict(sd)
    del sd["backbone.blocks.1.mlstm_layer.fgate_preact.bias"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone\.blocks\.1\.mlstm_layer\.fgate_preact\.bias'"):
        xLSTMLM.from_pretrained(d)
    sd = dict(good)
    sd["backbone.blocks.0.mlstm_layer.q.weight"] = torch.zeros(16, 64)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.q\.weight' has shape \(16, 64\).*expects \(32, 64\)"):
        xLSTMLM.from_pretrained(d)


def test_preset_round_trip(tmp_path):
    model = xLSTMLM(preset("tiny")).eval()
    model.save_pretrained(tmp_path / "tiny")
    loaded = xLSTMLM.from_pretrained(tmp_path / "tiny")
    ids = _ids(256, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_save_pretrained_takes_a_model(tmp_path):
    """save_pretrained("tiny", DIR) was an AttributeError ('str' object has no attribute 'config')."""
    from xlstm_export.models import save_pretrained

    with pytest.raises(TypeError, match="save_pretrained takes an xLSTMLM .* got str"):
        save_pretrained("tiny", tmp_path / "m")
    assert not (tmp_path / "m").exists()
