"""The transformers xLSTM layout, read without transformers: config.json fields and tensor names.

transformers ``xLSTMForCausalLM`` (and NX-AI ``xLSTMLarge``, the xLSTM-7B code, whose fields and
tensors it names alike) as our 'large' xLSTMConfig and our state-dict names, weight modes
``"single"`` and ``"fused"``. ``models/io.py`` reads transformers directories through it,
``models/convert.py`` official instances and configs, ``models/lazy.py`` tensor locations.
A field or tensor that cannot be mapped raises :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import torch

from .config import round_up, xLSTMConfig
from .errors import CheckpointError

Tensors = dict[str, torch.Tensor]

# transformers ``xLSTMConfig`` defaults (transformers 5.x), used for fields a config.json omits.
TRANSFORMERS_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_heads": 8,
    "use_bias": False,
    "norm_eps": 1e-6,
    "qk_dim_factor": 0.5,
    "v_dim_factor": 1.0,
    "chunkwise_kernel": "chunkwise--native_autograd",
    "eps": 1e-6,
    "ffn_proj_factor": 2.667,
    "ffn_round_up_to_multiple_of": 64,
    "gate_soft_cap": 15.0,
    "output_logit_soft_cap": 30.0,
    "weight_mode": "single",
}


def config_from_transformers_dict(raw: dict[str, Any], **overrides) -> xLSTMConfig:
    """Our config for a transformers xLSTM ``config.json`` dict (no transformers needed).

    ``overrides`` replace fields of the resulting :class:`xLSTMConfig` (e.g. ``backend``).
    """
    if raw.get("model_type", "xlstm") != "xlstm":
        raise CheckpointError(f"transformers config: model_type {raw.get('model_type')!r} is not 'xlstm'")

    def get(name: str):
        value = raw.get(name)
        return TRANSFORMERS_DEFAULTS[name] if value is None else value

    E = _one_of(raw, "hidden_size", "embedding_dim")  # both widths must agree for the model to run
    # transformers' xLSTMModel builds ``num_blocks`` blocks; num_hidden_layers only fills it when it is
    # unset (xLSTMConfig(num_blocks=2) keeps num_hidden_layers=32, its default, beside it)
    blocks = raw.get("num_blocks")
    if blocks is None:
        blocks = raw.get("num_hidden_layers")
    fields = dict(
        embedding_dim=E if E is not None else TRANSFORMERS_DEFAULTS["hidden_size"],
        num_blocks=blocks if blocks is not None else TRANSFORMERS_DEFAULTS["num_hidden_layers"],
        vocab_size=get("vocab_size"),
        num_heads=get("num_heads"),
        use_bias=get("use_bias"),
        norm_eps=get("norm_eps"),
        # transformers' xLSTMModel always applies out_norm, whatever add_out_norm says.
        add_out_norm=True,
        qk_dim_factor=get("qk_dim_factor"),
        v_dim_factor=get("v_dim_factor"),
        chunkwise_kernel=get("chunkwise_kernel"),
        eps=get("eps"),
        ffn_proj_factor=get("ffn_proj_factor"),
        ffn_round_up_to_multiple_of=get("ffn_round_up_to_multiple_of"),
        gate_soft_cap=raw.get("gate_soft_cap", TRANSFORMERS_DEFAULTS["gate_soft_cap"]),
        output_logit_soft_cap=raw.get("output_logit_soft_cap", TRANSFORMERS_DEFAULTS["output_logit_soft_cap"]),
        weight_mode=get("weight_mode"),
    )
    try:
        config = large_config(fields, source="transformers xLSTMConfig")
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:  # a malformed value in config.json
        raise CheckpointError(f"transformers xLSTMConfig: {e}") from None
    return _apply_overrides(config, overrides)


def state_dict_from_transformers(tensors: Tensors, config: xLSTMConfig) -> Tensors:
    """Our state dict from transformers ``xLSTMForCausalLM`` tensors (weight_mode single or fused;
    NX-AI ``xLSTMLarge`` names are accepted too: ``embedding.weight`` for the embeddings).

    Missing, unexpected or mis-shaped fused tensors raise :class:`CheckpointError`; the shapes of
    the rest are checked when loading (``io.load_state_dict_checked``).
    """
    if config.architecture != "large":
        raise CheckpointError(f"transformers xLSTM checkpoints are 'large' models, config says {config.architecture!r}")
    src = dict(tensors)
    out: Tensors = {}

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise CheckpointError(f"transformers checkpoint: missing tensor {name!r}")
        return src.pop(name)

    emb_name = "backbone.embeddings.weight" if "backbone.embeddings.weight" in src else "embedding.weight"
    out["embedding.weight"] = take(emb_name)
    NH, qk, v, ffn = config.num_heads, config.qk_dim, config.v_dim, config.ffn_dim
    for i in range(config.num_blocks):
        p, q = f"backbone.blocks.{i}.", f"blocks.{i}."
        m = p + "mlstm_layer."
        out[q + "norm_mlstm.weight"] = take(p + "norm_mlstm.weight")
        if m + "qkv_opreact.weight" in src:  # fused: rows [q | k | v | o]
            w = _split_rows(take(m + "qkv_opreact.weight"), m + "qkv_opreact.weight", [qk, qk, v, v])
            for name, part in zip(("q", "k", "v", "ogate_preact"), w):
                out[q + f"{name}.weight"] = part
            for kind in ("weight", "bias"):  # rows [i | f]
                name = m + f"ifgate_preact.{kind}"
                ig, fg = _split_rows(take(name), name, [NH, NH])
                out[q + f"igate_preact.{kind}"], out[q + f"fgate_preact.{kind}"] = ig, fg
        else:
            for name in ("q", "k", "v", "ogate_preact"):
                out[q + f"{name}.weight"] = take(m + f"{name}.weight")
            for name in ("igate_preact", "fgate_preact"):
                for kind in ("weight", "bias"):
                    out[q + f"{name}.{kind}"] = take(m + f"{name}.{kind}")
        out[q + "multihead_norm.weight"] = take(m + "multihead_norm.weight")
        out[q + "out_proj.weight"] = take(m + "out_proj.weight")
        out[q + "norm_ffn.weight"] = take(p + "norm_ffn.weight")
        if p + "ffn.proj_up_gate_z.weight" in src:  # fused: rows [gate | up]
            name = p + "ffn.proj_up_gate_z.weight"
            gate, up = _split_rows(take(name), name, [ffn, ffn])
            out[q + "ffn.proj_up_gate.weight"], out[q + "ffn.proj_up.weight"] = gate, up
        else:
            out[q + "ffn.proj_up_gate.weight"] = take(p + "ffn.proj_up_gate.weight")
            out[q + "ffn.proj_up.weight"] = take(p + "ffn.proj_up.weight")
        out[q + "ffn.proj_down.weight"] = take(p + "ffn.proj_down.weight")
    if config.add_out_norm:
        out["out_norm.weight"] = take("backbone.out_norm.weight")
    # transformers 5 does not tie xLSTM heads (tie_word_embeddings notwithstanding): always saved
    out["lm_head.weight"] = take("lm_head.weight")
    if src:
        raise CheckpointError(
            f"transformers checkpoint: unexpected tensor(s) {sorted(src)[:5]} "
            f"for a {config.num_blocks}-block model without biases"
        )
    return out


def _integer(f: dict[str, Any], name: str, source: str) -> int:
    """``f[name]`` as an int: an int, or a float without a fraction (4.0); else CheckpointError (int()
    took 4.5 heads as 4)."""
    v = f[name]
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
        alias = {"embedding_dim": " (hidden_size)", "num_blocks": " (num_hidden_layers)"}.get(name, "")
        raise CheckpointError(f"{source}: {name}{alias} must be an integer, got {v!r}")
    return int(v)


def _flag(f: dict[str, Any], name: str, source: str) -> bool:
    """``f[name]`` as a bool: true / false only (the string "false" is truthy)."""
    v = f[name]
    if not isinstance(v, bool):
        raise CheckpointError(f"{source}: {name} must be true or false, got {v!r}")
    return v


def large_config(f: dict[str, Any], *, source: str) -> xLSTMConfig:
    """Our 'large' config from the xLSTMLargeConfig / transformers xLSTMConfig fields in ``f``.
    Integer fields must hold integers and flags booleans (CheckpointError naming the field)."""
    ints = {n: _integer(f, n, source) for n in ("vocab_size", "embedding_dim", "num_blocks", "num_heads",
                                                 "ffn_round_up_to_multiple_of")}
    if _flag(f, "use_bias", source):
        raise CheckpointError(f"{source}: use_bias=True (biases on the RMS/multi-head norms) is not supported")
    if "siging" in str(f["chunkwise_kernel"]):
        raise CheckpointError(
            f"{source}: chunkwise_kernel {f['chunkwise_kernel']!r} uses a sigmoid input gate; only the "
            "exponential input gate is supported"
        )
    if f["weight_mode"] not in ("single", "fused"):
        raise CheckpointError(f"{source}: weight_mode {f['weight_mode']!r} (expected 'single' or 'fused')")
    E = ints["embedding_dim"]
    x, m = E * float(f["ffn_proj_factor"]), ints["ffn_round_up_to_multiple_of"]
    ffn_dim = int(((x + m - 1) // m) * m)  # the official rounding (differs from ceil for x just above a multiple)
    factor, multiple = ffn_factor(ffn_dim, E, float(f["ffn_proj_factor"]), m)
    fields = dict(
        architecture="large", vocab_size=ints["vocab_size"], embedding_dim=E,
        num_blocks=ints["num_blocks"], num_heads=ints["num_heads"],
        qk_dim_factor=float(f["qk_dim_factor"]), v_dim_factor=float(f["v_dim_factor"]),
        gate_soft_cap=_cap(f, "gate_soft_cap", source),
        output_logit_soft_cap=_cap(f, "output_logit_soft_cap", source),
        add_out_norm=_flag(f, "add_out_norm", source), bias=False, ffn_proj_factor=factor, ffn_round_up_to=multiple,
        norm_eps=float(f["norm_eps"]), cell_eps=float(f["eps"]),
    )
    config = make_config(fields, source)
    if config.ffn_dim != ffn_dim:  # defensive: ffn_factor guarantees it
        raise CheckpointError(f"{source}: feedforward width {ffn_dim} cannot be expressed (ours {config.ffn_dim})")
    return config


def _one_of(raw: dict[str, Any], name: str, alias: str):
    a, b = raw.get(name), raw.get(alias)
    if a is not None and b is not None and a != b:
        raise CheckpointError(f"transformers config: {name}={a} and {alias}={b} disagree")
    return a if a is not None else b


def _cap(f: dict[str, Any], name: str, source: str) -> float | None:
    """A soft cap as the official ``cap * tanh(x / cap)`` computes it: None (no cap) stays None; a
    negative cap is its absolute value there (tanh is odd), so -15 gives 15 (ours would take <= 0
    for no cap at all); 0, inf and nan compute nan / 0 there, not a model: CheckpointError."""
    v = f[name]
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise CheckpointError(f"{source}: {name} must be a number or null, got {v!r}")
    if not math.isfinite(v) or v == 0:
        raise CheckpointError(f"{source}: {name}={v!r} makes the official cap * tanh(x / cap) nan or 0; "
                              "give a finite nonzero cap, or null for none")
    return abs(float(v))


def _split_rows(t: torch.Tensor, name: str, sizes: list[int]) -> list[torch.Tensor]:
    if t.shape[0] != sum(sizes):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(t.shape)}, expected {sum(sizes)} rows (fused {sizes})"
        )
    return list(torch.split(t, sizes, dim=0))


def ffn_factor(width: int, E: int, factor: float, multiple: int) -> tuple[float, int]:
    """(factor, multiple) that give ``width`` under our round_up(factor * E, multiple): the official
    pair where it does (it rounds up), else one that gives the width the official rounding (down, or
    up after float error) made; the last pair gives any width >= 1."""
    for f, m in ((factor, multiple), (width / E, multiple), (width / E, 1), ((width - 0.5) / E, width)):
        if m >= 1 and round_up(f * E, m) == width:
            return f, m
    raise CheckpointError(f"feedforward width {width} cannot be expressed as round_up(factor * {E}, multiple)")


def make_config(fields: dict[str, Any], source: str) -> xLSTMConfig:
    try:
        return xLSTMConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot be expressed as an xLSTMConfig: {e}") from None


def _apply_overrides(config: xLSTMConfig, overrides: dict[str, Any]) -> xLSTMConfig:
    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(xLSTMConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise CheckpointError(f"unknown xLSTMConfig fields in overrides: {unknown}")
    try:
        return dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"overrides {overrides}: {e}") from None


__all__ = [
    "TRANSFORMERS_DEFAULTS", "config_from_transformers_dict", "ffn_factor", "large_config", "make_config",
    "state_dict_from_transformers",
]
