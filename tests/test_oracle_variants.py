"""Config variants the official packages accept, converted and checked against them in float64.

Found by fuzzing the official configs (xlstm_large, transformers xLSTMConfig, the paper
xLSTMLMModelConfig) against models/convert.py and models/hf.py; each test here failed before its fix:

- soft caps of None (no cap) were refused, and a negative cap (the official cap * tanh(x / cap) is
  |cap| * tanh(x / |cap|)) was taken for "no cap" (logits off by up to 46%);
- a transformers xLSTMConfig(num_blocks=2) keeps num_hidden_layers=32 (its default) beside it and
  builds 2 blocks; it was refused as a disagreement;
- a paper mLSTM layer whose inner width is rounded to another multiple than 64 (or rounded down)
  was refused.

Tolerances: 1e-9 relative (float64 end to end; measured ~1e-15) against the official recurrent form;
transformers returns float32 logits (``.float()``), so 1e-6 there.
"""

from __future__ import annotations

import math

import pytest
import torch

from xlstm_export.models import CheckpointError, from_official, load
from xlstm_export.testing import randomize_

RTOL_F64 = 1e-9


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _ids(vocab: int, S: int, seed: int, B: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (B, S), generator=torch.Generator().manual_seed(seed))


def _prefill_then_decode(model, ids: torch.Tensor, split: int) -> torch.Tensor:
    with torch.no_grad():
        logits, state = model(ids[:, :split])
        parts = [logits]
        for t in range(split, ids.shape[1]):
            logits, state = model(ids[:, t : t + 1], state)
            parts.append(logits)
    return torch.cat(parts, dim=1)


# ================================================================================================
# xlstm_large soft caps
# ================================================================================================
def _large_config(**kw):
    pytest.importorskip("mlstm_kernels")
    pytest.importorskip("xlstm")
    from xlstm.xlstm_large.model import xLSTMLargeConfig

    return xLSTMLargeConfig(
        embedding_dim=32, num_heads=2, num_blocks=2, vocab_size=51,
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", mode="inference", chunk_size=16, return_last_states=True,
        norm_reduction_force_float32=False, inference_state_dtype="float64", **kw,
    )


@pytest.mark.parametrize("gate_cap, logit_cap, ours", [
    (None, None, (None, None)),  # no caps at all (was refused: "must be a number, got NoneType")
    (-5.0, -3.0, (5.0, 3.0)),  # the official cap * tanh(x / cap) is |cap| * tanh(x / |cap|)
    (None, 4, (None, 4.0)),
], ids=["none", "negative", "none-int"])
def test_xlstm_large_soft_caps_as_the_official_model_applies_them(gate_cap, logit_cap, ours):
    from xlstm.xlstm_large.model import xLSTMLarge

    torch.manual_seed(0)
    official = xLSTMLarge(_large_config(gate_soft_cap=gate_cap, output_logit_soft_cap=logit_cap)).eval()
    randomize_(official, 1)
    official = official.double()
    model = from_official(official)
    assert (model.config.gate_soft_cap, model.config.output_logit_soft_cap) == ours
    ids = _ids(51, 9, seed=2)
    with torch.no_grad():
        ref, _ = official(ids)
        got, _ = model(ids)
    assert _rel_err(got, ref) < RTOL_F64
    assert _rel_err(_prefill_then_decode(model, ids, 4), ref) < RTOL_F64


@pytest.mark.parametrize("field", ["gate_soft_cap", "output_logit_soft_cap"])
@pytest.mark.parametrize("value", [0.0, math.inf, math.nan])
def test_soft_caps_the_official_model_computes_nan_with_are_refused(field, value):
    """cap 0 gives 0 * tanh(x / 0) (nan at x = 0), inf gives inf * 0: not a model, one clear error."""
    from xlstm_export.models.convert import config_from_transformers_dict

    with pytest.raises(CheckpointError, match=rf"xLSTMLargeConfig: {field}={value!r}"):
        from_official(_large_config(**{field: value}), {})
    raw = {"model_type": "xlstm", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2, field: value}
    with pytest.raises(CheckpointError, match=rf"transformers xLSTMConfig: {field}={value!r}"):
        config_from_transformers_dict(raw)
    with pytest.raises(CheckpointError, match=f"{field} must be a number or null"):
        config_from_transformers_dict({**raw, field: "15"})


def test_transformers_config_json_with_null_caps():
    from xlstm_export.models.convert import config_from_transformers_dict

    raw = {"model_type": "xlstm", "hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2,
           "gate_soft_cap": None, "output_logit_soft_cap": -30.0}
    cfg = config_from_transformers_dict(raw)
    assert (cfg.gate_soft_cap, cfg.output_logit_soft_cap) == (None, 30.0)


# ================================================================================================
# transformers: num_blocks given, num_hidden_layers left at its default
# ================================================================================================
def test_transformers_num_blocks_beside_the_default_num_hidden_layers(tmp_path):
    """transformers' xLSTMModel builds config.num_blocks blocks; xLSTMConfig(num_blocks=2) keeps
    num_hidden_layers=32 (its default) and saves both. The model and its directory load."""
    pytest.importorskip("transformers")
    from transformers import xLSTMConfig as HFConfig
    from transformers import xLSTMForCausalLM

    cfg = HFConfig(vocab_size=51, hidden_size=32, num_blocks=2, num_heads=2, chunk_size=16, use_cache=False)
    assert (cfg.num_blocks, cfg.num_hidden_layers) == (2, 32)
    torch.manual_seed(0)
    hf = xLSTMForCausalLM(cfg).eval()
    randomize_(hf, 1)
    hf = hf.double()
    assert len(hf.backbone.blocks) == 2
    hf.save_pretrained(tmp_path)
    ids = _ids(51, 7, seed=3)
    with torch.no_grad():
        ref = hf(ids, use_cache=False).logits  # float32 logits (transformers casts them)
    for model in (from_official(hf), load(tmp_path)):
        assert model.config.num_blocks == 2 and model.dtype == torch.float64
        with torch.no_grad():
            assert _rel_err(model(ids)[0], ref) < 1e-6


# ================================================================================================
# paper mLSTM inner width: other multiples, rounded down
# ================================================================================================
def _paper_model(mlstm: dict, E: int = 48, seed: int = 0):
    pytest.importorskip("xlstm")
    from xlstm import (
        FeedForwardConfig, mLSTMBlockConfig, mLSTMLayerConfig, sLSTMBlockConfig, sLSTMLayerConfig,
        xLSTMLMModel, xLSTMLMModelConfig,
    )

    cfg = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(num_heads=2, **mlstm)),
        slstm_block=sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(backend="vanilla", num_heads=2),
            feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu", round_proj_up_to_multiple_of=16,
                                          round_proj_up_dim_up=False),
        ),
        context_length=32, num_blocks=2, embedding_dim=E, slstm_at=[1], vocab_size=51,
    )
    torch.manual_seed(seed)
    model = xLSTMLMModel(cfg).eval()
    randomize_(model, seed + 1, norm_offset=True)
    return model.double()


@pytest.mark.parametrize("mlstm, inner", [
    (dict(proj_factor=2.0, round_proj_up_to_multiple_of=32), 96),  # 2 * 48 = 96: no multiple of 64
    (dict(proj_factor=1.5, round_proj_up_to_multiple_of=24, round_proj_up_dim_up=False), 72),
    (dict(proj_factor=1.3, round_proj_up_to_multiple_of=8, round_proj_up_dim_up=False), 56),  # 62.4 down
], ids=["x32", "x24-down", "x8-down"])
def test_paper_mlstm_inner_width_rounded_to_another_multiple(mlstm, inner, tmp_path):
    official = _paper_model(mlstm)
    assert official.xlstm_block_stack.blocks[0].xlstm.config._inner_embedding_dim == inner
    model = from_official(official)
    assert model.config.mlstm_inner_dim == inner
    ids = _ids(51, 7, seed=4)
    with torch.no_grad():
        state, steps = None, []
        for t in range(ids.shape[1]):  # the official recurrent form (the formula we implement)
            logits, state = official.step(ids[:, t : t + 1], state)
            steps.append(logits)
        ref = torch.cat(steps, dim=1)
        got, _ = model(ids)
    assert _rel_err(got, ref) < RTOL_F64
    assert _rel_err(_prefill_then_decode(model, ids, 3), ref) < RTOL_F64
    model.save_pretrained(tmp_path / "m")  # the width survives config.json
    again = load(tmp_path / "m")
    assert again.config.mlstm_inner_dim == inner
    for a, b in zip(again.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():  # equal weights; the sums may round apart with the buffers' alignment
        assert _rel_err(again(ids)[0], got) < 1e-14
