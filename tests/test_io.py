"""Saving and loading (models/io.py): round trips, transformers directories without transformers,
and one clear error per kind of bad checkpoint."""

from __future__ import annotations

import json
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
