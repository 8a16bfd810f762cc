"""The PyTorch model: pieces equal the whole, gradients reach every parameter, clear input errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from xlstm_export.models import PRESETS, CheckpointError, load, preset, xLSTMConfig, xLSTMLM
from xlstm_export.testing import randomize_

# Small configs covering both architectures and the paper model's options.
CONFIGS = {
    "paper-m-s-m": preset("tiny", backend="torch"),
    "paper-s-first-tied": xLSTMConfig(
        architecture="paper", vocab_size=97, embedding_dim=64, num_blocks=3, num_heads=2,
        slstm_at=[0, 2], slstm_num_heads=2, tie_weights=True, backend="torch", chunk_size=16,
    ),
    "paper-mlstm-only-noconv": xLSTMConfig(
        architecture="paper", vocab_size=97, embedding_dim=64, num_blocks=2, num_heads=1,
        conv1d_kernel_size=0, backend="torch", chunk_size=8,
    ),
    "large": preset("tiny-large", backend="torch", chunk_size=16),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("splits", [(1,), (17, 1, 21), (40,)], ids=["S1", "S17-1-21", "S40"])
def test_pieces_equal_whole(name, splits):
    torch.manual_seed(0)
    model = xLSTMLM(CONFIGS[name]).eval()
    randomize_(model, seed=1)
    S = sum(splits)
    ids = torch.randint(0, model.config.vocab_size, (2, S))
    with torch.no_grad():
        whole, final = model(ids)
        pieces, state, start = [], None, 0
        for n in splits:
            logits, state = model(ids[:, start : start + n], state)
            pieces.append(logits)
            start += n
    pieces = torch.cat(pieces, dim=1)
    assert _rel_err(pieces, whole) < 1e-5
    assert set(state) == set(final) == set(model.state_spec(2))
    for k in final:
        assert state[k].dtype == torch.float32
        assert _rel_err(state[k], final[k]) < 1e-5, k


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max abs error over max abs value (the project's relative error)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_zero_state_is_fresh_sequence(name):
    model = xLSTMLM(CONFIGS[name]).eval()
    randomize_(model, seed=2)
    ids = torch.randint(0, model.config.vocab_size, (3, 9))
    with torch.no_grad():
        a, _ = model(ids)
        b, _ = model(ids, model.init_state(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_every_parameter(name):
    model = xLSTMLM(CONFIGS[name]).train()
    randomize_(model, seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    logits, state = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss = loss + sum(v.square().mean() for v in state.values()) * 1e-3
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {n}"
        assert p.grad.abs().max() > 0, f"zero gradient for {n}"


def test_state_spec_shapes_and_bytes():
    model = xLSTMLM(preset("tiny"))
    cfg = model.config
    spec = model.state_spec(5)
    DH = cfg.mlstm_inner_dim // cfg.num_heads
    assert spec["0.c"] == (5, cfg.num_heads, DH, DH)
    assert spec["0.conv"] == (5, cfg.conv1d_kernel_size - 1, cfg.mlstm_inner_dim)
    assert spec["1.h"] == (5, cfg.slstm_num_heads, cfg.embedding_dim // cfg.slstm_num_heads)
    assert model.state_bytes(5) == 5 * model.state_bytes(1)


def test_presets_shapes():
    """The big presets have the published shapes (checked on the config, not instantiated)."""
    c7 = preset("xlstm-7b")
    assert (c7.qk_dim // c7.num_heads, c7.v_dim // c7.num_heads, c7.ffn_dim) == (256, 512, 10944)
    assert 2e5 < xLSTMLM(preset("tiny")).num_params() < 1e6
    assert set(PRESETS) >= {"tiny", "xlstm-125m", "xlstm-1.3b", "xlstm-7b"}


def test_backend_switch_keeps_function():
    model = xLSTMLM(preset("tiny", backend="torch")).eval()
    other = xLSTMLM(dataclasses.replace(model.config, backend="auto")).eval()
    other.load_state_dict(model.state_dict())
    ids = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], other(ids)[0], rtol=0, atol=0)


def test_bad_inputs_have_clear_errors():
    model = xLSTMLM(preset("tiny"))
    with pytest.raises(TypeError, match="integer"):
        model(torch.rand(1, 4))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(torch.full((1, 3), 300))
    with pytest.raises(ValueError, match="missing"):
        model(torch.zeros(1, 3, dtype=torch.long), {"0.c": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown preset"):
        preset("no-such-preset")
    with pytest.raises(CheckpointError, match="no such preset or directory"):
        load("no-such-preset-or-dir")
    with pytest.raises(TypeError, match="preset name or a directory path, got int"):
        load(5)
    with pytest.raises(ValueError, match="slstm_at"):
        xLSTMConfig(num_blocks=2, slstm_at=[5])
    with pytest.raises(ValueError, match="backend"):
        xLSTMConfig(backend="cuda")


def test_config_field_of_the_wrong_type_is_named(tmp_path, capsys):
    """A hand-written config.json with `"embedding_dim": "128"`: one error naming the field (the
    library's TypeError, from_pretrained's CheckpointError, the CLI's one line and exit 2)."""
    import json

    from xlstm_export.cli import main

    with pytest.raises(TypeError, match=r"config field 'embedding_dim' must be an integer, got str '128'"):
        xLSTMConfig(embedding_dim="128")
    for field, value, expected in (("num_blocks", True, "an integer"), ("slstm_at", [1, "2"], "a list of integers"),
                                   ("norm_eps", "1e-5", "a number or null"), ("tie_weights", 1, "true/false"),
                                   ("architecture", 3, "one of 'paper', 'large'")):
        with pytest.raises(TypeError, match=f"config field '{field}' must be {expected}"):
            xLSTMConfig(**{field: value})
    assert xLSTMConfig(mlstm_proj_factor=2).mlstm_inner_dim == 256  # an integer is a number
    xLSTMLM(preset("tiny")).save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw["embedding_dim"] = "128"
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="config.json: config field 'embedding_dim' must be an integer"):
        xLSTMLM.from_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "'embedding_dim' must be an integer, got str '128'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_model_computes_in_its_dtype():
    """float64: every state float64 (8 bytes an element), norms reduce in float64; bf16 / fp16:
    float32 states and float32 norm reductions, as the float32 model rounded once."""
    model = xLSTMLM(preset("tiny-large")).eval()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    m64 = xLSTMLM(preset("tiny-large")).eval().to(torch.float64)
    m64.load_state_dict(model.state_dict())
    assert m64.state_dtype == torch.float64 and m64.state_bytes(1) == 2 * model.state_bytes(1)
    with torch.no_grad():
        logits64, state64 = m64(ids)
        norm = m64.blocks[0].norm_mlstm
        x = torch.randn(3, norm.weight.shape[0], dtype=torch.float64)
        ref = x / x.pow(2).mean(-1, keepdim=True).add(norm.eps).sqrt() * norm.weight  # float64 RMSNorm
        assert (norm(x) - ref).abs().max() < 1e-14  # not rounded through float32 (~1e-7)
    assert logits64.dtype == torch.float64 and {v.dtype for v in state64.values()} == {torch.float64}
    for dtype in (torch.bfloat16, torch.float16):
        low = xLSTMLM(preset("tiny")).eval().to(dtype)
        assert low.state_dtype == torch.float32
        with torch.no_grad():
            logits, state = low(ids)
        assert logits.dtype == dtype and {v.dtype for v in state.values()} == {torch.float32}


def test_from_state_dict_takes_the_tensors_in_their_dtype():
    """Built on the meta device, the model holds the given tensors themselves (no second copy, no
    float32 detour for bfloat16), tied weights stay tied; another dtype on request; and a
    checkpoint dtype that cannot be kept is refused with the reason."""
    src = xLSTMLM(preset("tiny", tie_weights=True)).to(torch.bfloat16)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    model = xLSTMLM.from_state_dict(src.config, sd)
    assert model.dtype == torch.bfloat16 and not model.training
    assert all(p.data_ptr() == sd[k].data_ptr() for k, p in model.named_parameters())
    assert model.lm_head.weight is model.embedding.weight
    assert all(p.requires_grad for p in model.parameters())
    assert xLSTMLM.from_state_dict(src.config, sd, "fp64").dtype == torch.float64
    with pytest.raises(CheckpointError, match="float8_e5m2 cannot be kept"):
        xLSTMLM.from_state_dict(src.config, {k: v.to(torch.float8_e5m2) for k, v in sd.items()})
    with pytest.raises(ValueError, match="unknown model dtype 'int8'"):
        xLSTMLM.from_state_dict(src.config, sd, "int8")


def test_generate_greedy_matches_argmax_loop():
    torch.manual_seed(0)
    model = xLSTMLM(preset("tiny", backend="torch")).eval()
    randomize_(model, seed=4)
    prompt = torch.randint(0, 256, (2, 5))
    new, _ = model.generate(prompt, 6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
    torch.testing.assert_close(new, ids[:, 5:])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    s1, _ = model.generate(prompt, 6, temperature=1.0, generator=g1)
    s2, _ = model.generate(prompt, 6, temperature=1.0, generator=g2)
    torch.testing.assert_close(s1, s2)


def test_load_seeds_presets_and_refuses_a_seed_for_a_directory(tmp_path):
    """A preset's weights come from ``seed`` (0 by default); a directory's are read, so a seed given
    with one is refused instead of silently ignored. A path object is taken like its string."""
    a, b = load("tiny-large", seed=3), load("tiny-large", seed=4)
    assert not torch.equal(a.embedding.weight, b.embedding.weight)
    assert torch.equal(load("tiny-large").embedding.weight, load("tiny-large", seed=0).embedding.weight)
    a.save_pretrained(tmp_path / "m")
    assert torch.equal(load(tmp_path / "m").embedding.weight, a.embedding.weight)
    with pytest.raises(ValueError, match="seed=3 applies to presets"):
        load(str(tmp_path / "m"), seed=3)
