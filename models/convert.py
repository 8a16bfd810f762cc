"""Converters from the official xLSTM implementations to :class:`xLSTMLM`.

Sources (read their installed code; nothing is imported from them at module import time):

- NX-AI ``xlstm.xLSTMLMModel`` (the paper model) — an instance, or its ``xLSTMLMModelConfig`` plus
  a saved state dict. The config route is the only way to load, without CUDA, a model trained
  with the default sLSTM backend ``"cuda"``: such an instance cannot be built on a CPU machine.
- NX-AI ``xlstm.xlstm_large.model.xLSTMLarge`` (the xLSTM-7B code), weight modes ``"single"`` and
  ``"fused"`` — an instance, or its ``xLSTMLargeConfig`` plus a state dict.
- transformers ``xLSTMForCausalLM`` — an instance, its ``xLSTMConfig`` plus a state dict, or (via
  ``models/io.py``) a saved directory read WITHOUT transformers: :func:`config_from_transformers_dict`
  and :func:`state_dict_from_transformers`.

Every config field that changes the function the weights compute is checked; what we cannot map
(norm biases in the 7B code, another FFN activation, sigmoid-input-gate kernels, ...) raises a
:class:`CheckpointError` naming the field. Fields that only change how it is computed (kernel
choice, chunk size, dtypes of the official kernels, dropout in eval, context_length) are ignored.

Layout facts (see shared/XLSTM_MATH.md):

- paper LayerNorm / MultiHeadLayerNorm weights are stored as an offset: ours = 1 + theirs;
- the paper ``sLSTMLayer`` computes ``i, f, z, o = fgate(x_conv), igate(x_conv), zgate(x), ogate(x)``:
  its module ``fgate`` holds the INPUT-gate weights, ``igate`` the forget-gate weights;
- ``slstm_cell._recurrent_kernel_`` / ``_bias_`` storage depends on the cell backend:
  vanilla R (NH, 4*DH, DH) = [head, gate*DH + out, in], bias flat (G, NH, DH);
  cuda    R (NH, DH, 4*DH) = [head, in, gate*DH + out], bias flat (NH, G, DH) — our own layout;
- the paper mLSTM cell scales k by 1/sqrt(DH), mlstm_kernels / ours scale q: logits are identical,
  only the state tensors differ by that factor (not part of the weights).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .config import round_up, xLSTMConfig
from .io import CheckpointError
from .layers import compute_dtype
from .model import checkpoint_dtype, resolve_dtype, xLSTMLM

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


# ================================================================================================
# public entry points
# ================================================================================================
def from_official(obj, state_dict: dict[str, torch.Tensor] | None = None, *, dtype=None) -> xLSTMLM:
    """An :class:`xLSTMLM` (CPU, eval mode) computing the same function as ``obj``.

    The model keeps the dtype of the official weights (float64 stays float64, bfloat16 stays
    bfloat16; see ``model.checkpoint_dtype``) unless ``dtype`` (a torch dtype or "fp32", "bf16",
    ...) says otherwise. ``obj`` is an official model instance (``state_dict`` then defaults to its
    own), or an official config object together with ``state_dict``::

        model = from_official(xlstm_lm_model)                        # NX-AI paper model
        model = from_official(paper_config, torch.load("ckpt.pt"))   # e.g. trained with sLSTM "cuda"
        model = from_official(xlstm_large_model)                     # weight_mode single or fused
        model = from_official(hf_xlstm_for_causal_lm)                # transformers
    """
    if dtype is not None:
        dtype = resolve_dtype(dtype)
    if _is_instance(obj, "xlstm", "xLSTMLMModel"):
        layouts = _paper_instance_slstm_layouts(obj)
        return _from_paper(obj.config, _sd(obj, state_dict), layouts, dtype)
    if _is_instance(obj, "xlstm", "xLSTMLMModelConfig"):
        return _from_paper(obj, _required_sd(obj, state_dict), None, dtype)
    if _is_instance(obj, "xlstm", "xLSTMLarge"):
        return _from_large(obj.config, _sd(obj, state_dict), dtype)
    if _is_instance(obj, "xlstm", "xLSTMLargeConfig"):
        return _from_large(obj, _required_sd(obj, state_dict), dtype)
    if _is_instance(obj, "transformers", "xLSTMForCausalLM"):
        return _from_transformers(obj.config.to_dict(), _sd(obj, state_dict), dtype)
    if _is_instance(obj, "transformers", "xLSTMConfig"):
        return _from_transformers(obj.to_dict(), _required_sd(obj, state_dict), dtype)
    raise TypeError(
        "from_official takes an NX-AI xLSTMLMModel / xLSTMLarge, a transformers xLSTMForCausalLM, "
        f"or one of their config objects with a state_dict; got {type(obj).__module__}.{type(obj).__name__}"
    )


def config_from_transformers_dict(raw: dict[str, Any], **overrides) -> xLSTMConfig:
    """Our config for a transformers xLSTM ``config.json`` dict (no transformers needed).

    ``overrides`` replace fields of the resulting :class:`xLSTMConfig` (e.g. ``backend``).
    """
    if raw.get("model_type", "xlstm") != "xlstm":
        raise CheckpointError(f"transformers config: model_type {raw.get('model_type')!r} is not 'xlstm'")

    def get(name: str):
        value = raw.get(name)
        return TRANSFORMERS_DEFAULTS[name] if value is None else value

    E = _one_of(raw, "hidden_size", "embedding_dim")  # transformers keeps both names in sync
    blocks = _one_of(raw, "num_hidden_layers", "num_blocks")
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
        config = _large_config(fields, source="transformers xLSTMConfig")
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


# ================================================================================================
# paper model (NX-AI xLSTMLMModel)
# ================================================================================================
def _from_paper(cfg, state_dict: Tensors, layouts: dict[int, str] | None, dtype=None) -> xLSTMLM:
    config, slstm_backend = _paper_config(cfg)
    if layouts is None:  # from a config: every sLSTM block stores the config's backend layout
        layouts = {i: slstm_backend for i in config.slstm_at}
    source = "NX-AI xLSTMLMModel"
    dtype = dtype or checkpoint_dtype(state_dict, source)  # of the official tensors, before any offset
    ours = _paper_state_dict(state_dict, config, layouts, group_norm_weight=_slstm_group_norm_weight(cfg))
    return _load(config, ours, source, dtype)


def _paper_config(cfg) -> tuple[xLSTMConfig, str | None]:
    """(our config, the sLSTM cell backend named in the config) for an ``xLSTMLMModelConfig``."""
    src = "xLSTMLMModelConfig"
    E, num_blocks = int(cfg.embedding_dim), int(cfg.num_blocks)
    slstm_at = cfg.slstm_at
    if slstm_at == "all" or cfg.mlstm_block is None:
        slstm_at = list(range(num_blocks))
    slstm_at = sorted(int(i) for i in slstm_at)
    if not 0 < int(cfg.vocab_size):
        raise CheckpointError(f"{src}: vocab_size must be set, got {cfg.vocab_size}")
    fields: dict[str, Any] = dict(
        architecture="paper", vocab_size=int(cfg.vocab_size), embedding_dim=E, num_blocks=num_blocks,
        slstm_at=slstm_at, tie_weights=bool(cfg.tie_weights),
        add_post_blocks_norm=bool(cfg.add_post_blocks_norm), norm_eps=1e-5,  # the paper LayerNorm eps
    )
    biases: dict[str, bool] = {}
    has_mlstm = len(slstm_at) < num_blocks
    if has_mlstm:
        layer = cfg.mlstm_block.mlstm
        inner = _official_proj_up_dim(layer, E)
        if layer.conv1d_kernel_size < 1:
            raise CheckpointError(
                f"{src}: mLSTM conv1d_kernel_size {layer.conv1d_kernel_size} (the official layer needs >= 1)"
            )
        fields.update(
            num_heads=int(layer.num_heads), qkv_proj_blocksize=int(layer.qkv_proj_blocksize),
            conv1d_kernel_size=int(layer.conv1d_kernel_size),
            mlstm_proj_factor=_factor_for(inner, E, 64, float(layer.proj_factor), f"{src}: mLSTM inner width"),
        )
        biases["mLSTM layer bias"] = bool(layer.bias)
    else:
        fields.update(num_heads=1)  # unused: no mLSTM block; 1 divides every width
    slstm_backend = None
    if slstm_at:
        if cfg.slstm_block is None:
            raise CheckpointError(f"{src}: slstm_at {slstm_at} but no slstm_block config")
        layer = cfg.slstm_block.slstm
        slstm_backend = _check_slstm_layer(layer, src)
        fields.update(
            slstm_num_heads=max(int(layer.num_heads), 1),
            slstm_conv1d_kernel_size=int(layer.conv1d_kernel_size),
        )
        ff = cfg.slstm_block.feedforward
        if ff is None:
            raise CheckpointError(f"{src}: sLSTM blocks without a feedforward are not supported")
        if getattr(ff, "ff_type", "ffn_gated") != "ffn_gated":
            raise CheckpointError(f"{src}: feedforward ff_type {ff.ff_type!r} is not supported (only 'ffn_gated')")
        if ff.act_fn != "gelu":
            raise CheckpointError(f"{src}: feedforward act_fn {ff.act_fn!r} is not supported (only 'gelu')")
        ffn_dim = _official_proj_up_dim(ff, E)
        factor, multiple = _ffn_factor(ffn_dim, E, float(ff.proj_factor), int(ff.round_proj_up_to_multiple_of))
        fields.update(ffn_proj_factor=factor, ffn_round_up_to=multiple)
        biases["feedforward bias"] = bool(ff.bias)
    if len(set(biases.values())) > 1:
        raise CheckpointError(f"{src}: {biases}: one bias setting for both is supported")
    fields["bias"] = next(iter(biases.values()), False)
    config = _make_config(fields, src)
    if has_mlstm and config.mlstm_inner_dim != inner:
        raise CheckpointError(f"{src}: mLSTM inner width {inner} cannot be expressed (ours {config.mlstm_inner_dim})")
    if slstm_at and config.ffn_dim != ffn_dim:
        raise CheckpointError(f"{src}: feedforward width {ffn_dim} cannot be expressed (ours {config.ffn_dim})")
    return config, slstm_backend


def _check_slstm_layer(layer, src: str) -> str:
    """Refuse sLSTM options we do not compute; return the cell backend ("vanilla" or "cuda")."""
    if layer.function != "slstm":
        raise CheckpointError(f"{src}: sLSTM cell function {layer.function!r} is not supported (only 'slstm')")
    if int(layer.num_gates) != 4:
        raise CheckpointError(f"{src}: sLSTM num_gates {layer.num_gates} (expected 4)")
    if layer.input_shape != "BSGNH" or layer.output_shape != "BNSH":
        raise CheckpointError(
            f"{src}: sLSTM input_shape/output_shape {layer.input_shape!r}/{layer.output_shape!r} "
            "(the sLSTM layer needs 'BSGNH'/'BNSH')"
        )
    if layer.backend not in ("vanilla", "cuda"):
        raise CheckpointError(f"{src}: sLSTM backend {layer.backend!r} (expected 'vanilla' or 'cuda')")
    if layer.backend == "cuda" and layer.gradient_recurrent_clipval is not None:
        # the CUDA kernel then also clips the forward output y (SLSTM_FORWARD_CLIPVAL)
        raise CheckpointError(
            f"{src}: sLSTM backend 'cuda' with gradient_recurrent_clipval="
            f"{layer.gradient_recurrent_clipval} clips the forward output; not supported"
        )
    return layer.backend


def _slstm_group_norm_weight(cfg) -> bool:
    return cfg.slstm_block is None or bool(getattr(cfg.slstm_block.slstm, "group_norm_weight", True))


def _paper_instance_slstm_layouts(model) -> dict[int, str]:
    """The storage layout of each sLSTM block of an instance, read from its cell class."""
    layouts = {}
    for i, block in enumerate(model.xlstm_block_stack.blocks):
        cell = getattr(block.xlstm, "slstm_cell", None)
        if cell is not None:
            name = type(cell).__name__
            if name not in ("sLSTMCell_vanilla", "sLSTMCell_cuda"):
                raise CheckpointError(f"block {i}: unknown sLSTM cell class {name}")
            layouts[i] = "vanilla" if name == "sLSTMCell_vanilla" else "cuda"
    return layouts


def _paper_state_dict(sd: Tensors, config: xLSTMConfig, layouts: dict[int, str], *, group_norm_weight: bool) -> Tensors:
    src = dict(sd)
    out: Tensors = {}
    # offset-stored norm weight -> effective scale, exact: 1 + w in float32 (float64 for float64);
    # the load rounds it once to the model's dtype (bfloat16: as the official model's 1 + w)
    one = lambda t: t.to(compute_dtype(t.dtype)) + 1.0  # noqa: E731

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise CheckpointError(f"NX-AI xLSTMLMModel state dict: missing tensor {name!r}")
        return src.pop(name)

    def take_linear(name: str, ours: str, bias: bool) -> None:
        out[ours + ".weight"] = take(name + ".weight")
        if bias:
            out[ours + ".bias"] = take(name + ".bias")

    out["embedding.weight"] = take("token_embedding.weight")
    E = config.embedding_dim
    for i, kind in enumerate(config.block_types()):
        p, q = f"xlstm_block_stack.blocks.{i}.", f"blocks.{i}."
        out[q + "norm.weight"] = one(take(p + "xlstm_norm.weight"))
        x = p + "xlstm."
        if kind == "mlstm":
            take_linear(x + "proj_up", q + "proj_up", config.bias)
            for name in ("q_proj", "k_proj", "v_proj"):
                take_linear(x + name, q + name, config.bias)
            take_linear(x + "conv1d.conv", q + "conv", True)
            take_linear(x + "mlstm_cell.igate", q + "igate", True)
            take_linear(x + "mlstm_cell.fgate", q + "fgate", True)
            out[q + "outnorm.weight"] = one(take(x + "mlstm_cell.outnorm.weight"))
            out[q + "learnable_skip"] = take(x + "learnable_skip")
            take_linear(x + "proj_down", q + "proj_down", config.bias)
        else:
            NH = config.slstm_num_heads
            DH = E // NH
            if config.slstm_conv1d_kernel_size > 0:
                take_linear(x + "conv1d.conv", q + "conv", True)
            # PITFALL: the official `fgate` module yields the input-gate pre-activation and `igate`
            # the forget gate (sLSTMLayer: i, f, z, o = fgate(x_conv), igate(x_conv), ...).
            out[q + "igate.weight"] = take(x + "fgate.weight")
            out[q + "fgate.weight"] = take(x + "igate.weight")
            out[q + "zgate.weight"] = take(x + "zgate.weight")
            out[q + "ogate.weight"] = take(x + "ogate.weight")
            r_name, b_name = x + "slstm_cell._recurrent_kernel_", x + "slstm_cell._bias_"
            out[q + "r"], out[q + "b"] = _slstm_r_b(take(r_name), take(b_name), NH, DH, layouts[i], r_name, b_name)
            if group_norm_weight:
                out[q + "group_norm.weight"] = one(take(x + "group_norm.weight"))
            else:  # group_norm_weight=False: the official norm has no weight, i.e. scale 1
                out[q + "group_norm.weight"] = torch.ones(E)
            out[q + "ffn_norm.weight"] = one(take(p + "ffn_norm.weight"))
            take_linear(p + "ffn.proj_up", q + "ffn.proj_up", config.bias)
            take_linear(p + "ffn.proj_down", q + "ffn.proj_down", config.bias)
    if config.add_post_blocks_norm:
        out["out_norm.weight"] = one(take("xlstm_block_stack.post_blocks_norm.weight"))
    if "lm_head.weight" in src:
        out["lm_head.weight"] = src.pop("lm_head.weight")
    elif not config.tie_weights:
        raise CheckpointError("NX-AI xLSTMLMModel state dict: missing tensor 'lm_head.weight'")
    if src:
        raise CheckpointError(f"NX-AI xLSTMLMModel state dict: unexpected tensor(s) {sorted(src)[:5]}")
    return out


def _slstm_r_b(
    R: torch.Tensor, bias: torch.Tensor, NH: int, DH: int, layout: str, r_name: str, b_name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Official sLSTM recurrent kernel and bias -> ours: r (NH, DH, 4*DH) [head, in, gate*DH+out],
    b (NH, 4*DH) [head, gate*DH+d]."""
    G = 4
    vanilla_shape, cuda_shape = (NH, G * DH, DH), (NH, DH, G * DH)
    expected = vanilla_shape if layout == "vanilla" else cuda_shape
    if tuple(R.shape) != expected:
        other = "cuda" if layout == "vanilla" else "vanilla"
        hint = ""
        if tuple(R.shape) in (vanilla_shape, cuda_shape):
            hint = f" (that is the {other!r} layout: is the config's sLSTM backend right?)"
        raise CheckpointError(
            f"tensor {r_name!r} has shape {tuple(R.shape)}, the {layout!r} sLSTM backend stores "
            f"{expected}{hint}"
        )
    if bias.numel() != G * NH * DH:
        raise CheckpointError(f"tensor {b_name!r} has shape {tuple(bias.shape)}, expected ({G * NH * DH},)")
    if layout == "vanilla":
        r = R.permute(0, 2, 1)  # (NH, 4*DH, DH) [h, g*DH+out, in] -> (NH, DH, 4*DH) [h, in, g*DH+out]
        b = bias.reshape(G, NH, DH).permute(1, 0, 2).reshape(NH, G * DH)  # (G, NH, DH) -> (NH, G*DH)
    else:
        r = R  # already (NH, DH, 4*DH)
        b = bias.reshape(NH, G * DH)  # (NH, G, DH) -> (NH, G*DH)
    return r.contiguous(), b.contiguous()


def _official_proj_up_dim(layer, E: int) -> int:
    """The NX-AI UpProjConfigMixin width: proj_factor * E rounded (up or down) to a multiple."""
    x = float(layer.proj_factor) * E / int(layer.round_proj_up_to_multiple_of)
    x = math.ceil(x) if layer.round_proj_up_dim_up else math.floor(x)
    return int(x * int(layer.round_proj_up_to_multiple_of))


def _factor_for(width: int, E: int, multiple: int, factor: float, what: str) -> float:
    """A proj factor that gives ``width`` under our round_up(factor * E, multiple)."""
    for f in (factor, width / E):
        if round_up(f * E, multiple) == width:
            return f
    raise CheckpointError(f"{what} {width} is not reachable by rounding factor * {E} up to a multiple of {multiple}")


def _ffn_factor(width: int, E: int, factor: float, multiple: int) -> tuple[float, int]:
    """(factor, multiple) that give ``width`` under our round_up(factor * E, multiple)."""
    for f, m in ((factor, multiple), (width / E, multiple), (width / E, 1)):
        if m >= 1 and round_up(f * E, m) == width:
            return f, m
    raise CheckpointError(f"feedforward width {width} cannot be expressed as round_up(factor * {E}, multiple)")


# ================================================================================================
# xLSTM-7B architecture (NX-AI xLSTMLarge, transformers xLSTMForCausalLM)
# ================================================================================================
def _from_large(cfg, state_dict: Tensors, dtype=None) -> xLSTMLM:
    fields = {
        name: getattr(cfg, name)
        for name in (
            "embedding_dim", "num_blocks", "vocab_size", "num_heads", "use_bias", "norm_eps",
            "add_out_norm", "qk_dim_factor", "v_dim_factor", "chunkwise_kernel", "eps",
            "ffn_proj_factor", "ffn_round_up_to_multiple_of", "gate_soft_cap",
            "output_logit_soft_cap", "weight_mode",
        )
    }
    config = _large_config(fields, source="xLSTMLargeConfig")
    return _load(config, state_dict_from_transformers(state_dict, config), "NX-AI xLSTMLarge", dtype)


def _from_transformers(raw: dict[str, Any], state_dict: Tensors, dtype=None) -> xLSTMLM:
    config = config_from_transformers_dict(raw)
    return _load(config, state_dict_from_transformers(state_dict, config), "transformers xLSTMForCausalLM", dtype)


def _large_config(f: dict[str, Any], *, source: str) -> xLSTMConfig:
    """Our 'large' config from the xLSTMLargeConfig / transformers xLSTMConfig fields in ``f``."""
    if f["use_bias"]:
        raise CheckpointError(f"{source}: use_bias=True (biases on the RMS/multi-head norms) is not supported")
    if "siging" in str(f["chunkwise_kernel"]):
        raise CheckpointError(
            f"{source}: chunkwise_kernel {f['chunkwise_kernel']!r} uses a sigmoid input gate; only the "
            "exponential input gate is supported"
        )
    if f["weight_mode"] not in ("single", "fused"):
        raise CheckpointError(f"{source}: weight_mode {f['weight_mode']!r} (expected 'single' or 'fused')")
    E = int(f["embedding_dim"])
    x, m = E * float(f["ffn_proj_factor"]), int(f["ffn_round_up_to_multiple_of"])
    ffn_dim = int(((x + m - 1) // m) * m)  # the official rounding (differs from ceil for x just above a multiple)
    factor, multiple = _ffn_factor(ffn_dim, E, float(f["ffn_proj_factor"]), m)
    fields = dict(
        architecture="large", vocab_size=int(f["vocab_size"]), embedding_dim=E,
        num_blocks=int(f["num_blocks"]), num_heads=int(f["num_heads"]),
        qk_dim_factor=float(f["qk_dim_factor"]), v_dim_factor=float(f["v_dim_factor"]),
        gate_soft_cap=_cap(f["gate_soft_cap"]), output_logit_soft_cap=_cap(f["output_logit_soft_cap"]),
        add_out_norm=bool(f["add_out_norm"]), bias=False, ffn_proj_factor=factor, ffn_round_up_to=multiple,
        norm_eps=float(f["norm_eps"]), cell_eps=float(f["eps"]),
    )
    config = _make_config(fields, source)
    if config.ffn_dim != ffn_dim:  # defensive: _ffn_factor guarantees it
        raise CheckpointError(f"{source}: feedforward width {ffn_dim} cannot be expressed (ours {config.ffn_dim})")
    return config


def _one_of(raw: dict[str, Any], name: str, alias: str):
    a, b = raw.get(name), raw.get(alias)
    if a is not None and b is not None and a != b:
        raise CheckpointError(f"transformers config: {name}={a} and {alias}={b} disagree")
    return a if a is not None else b


def _cap(value) -> float | None:
    """Soft caps: None (no cap) stays None; our soft_cap treats None and <= 0 as the identity."""
    return None if value is None else float(value)


def _split_rows(t: torch.Tensor, name: str, sizes: list[int]) -> list[torch.Tensor]:
    if t.shape[0] != sum(sizes):
        raise CheckpointError(
            f"tensor {name!r} has shape {tuple(t.shape)}, expected {sum(sizes)} rows (fused {sizes})"
        )
    return list(torch.split(t, sizes, dim=0))


# ================================================================================================
# helpers
# ================================================================================================
def _is_instance(obj, package: str, class_name: str) -> bool:
    """isinstance by name (no import of the official packages needed)."""
    return any(
        c.__name__ == class_name and (c.__module__ == package or c.__module__.startswith(package + "."))
        for c in type(obj).__mro__
    )


def _sd(model, state_dict: Tensors | None) -> Tensors:
    return dict(model.state_dict()) if state_dict is None else dict(state_dict)


def _required_sd(cfg, state_dict: Tensors | None) -> Tensors:
    if state_dict is None:
        raise TypeError(f"from_official({type(cfg).__name__}) needs the state_dict of the model too")
    return dict(state_dict)


def _make_config(fields: dict[str, Any], source: str) -> xLSTMConfig:
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


def _load(config: xLSTMConfig, state_dict: Tensors, source: str, dtype=None) -> xLSTMLM:
    """The model holding ``state_dict`` (our names), in ``dtype`` (None: the tensors' own).
    Tensors are copied off the official model (``clone``), so ours never aliases its parameters."""
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
    return xLSTMLM.from_state_dict(config, tensors, dtype, source=source)


__all__ = [
    "TRANSFORMERS_DEFAULTS", "config_from_transformers_dict", "from_official", "state_dict_from_transformers",
]
