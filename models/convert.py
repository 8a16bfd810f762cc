"""Converters from the official xLSTM implementations to :class:`xLSTMLM`.

Sources (read their installed code; nothing is imported from them at module import time):

- NX-AI ``xlstm.xLSTMLMModel`` (the paper model) — an instance, or its ``xLSTMLMModelConfig`` plus
  a saved state dict. The config route is the only way to load, without CUDA, a model trained
  with the default sLSTM backend ``"cuda"``: such an instance cannot be built on a CPU machine.
- NX-AI ``xlstm.xlstm_large.model.xLSTMLarge`` (the xLSTM-7B code), weight modes ``"single"`` and
  ``"fused"`` — an instance, or its ``xLSTMLargeConfig`` plus a state dict.
- transformers ``xLSTMForCausalLM`` — an instance, its ``xLSTMConfig`` plus a state dict, or (via
  ``models/io.py``) a saved directory read WITHOUT transformers: :func:`config_from_transformers_dict`
  and :func:`state_dict_from_transformers` (in ``models/hf.py``, the transformers layout).

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

import math
from typing import Any

import torch

from .config import xLSTMConfig
from .errors import CheckpointError
from .hf import (
    Tensors,
    config_from_transformers_dict,
    ffn_factor,
    large_config,
    make_config,
    state_dict_from_transformers,
)
from .layers import compute_dtype
from .model import checkpoint_dtype, resolve_dtype, xLSTMLM


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
        factor, multiple = ffn_factor(inner, E, float(layer.proj_factor), int(layer.round_proj_up_to_multiple_of))
        fields.update(
            num_heads=int(layer.num_heads), qkv_proj_blocksize=int(layer.qkv_proj_blocksize),
            conv1d_kernel_size=int(layer.conv1d_kernel_size), mlstm_proj_factor=factor, mlstm_round_up_to=multiple,
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
        factor, multiple = ffn_factor(ffn_dim, E, float(ff.proj_factor), int(ff.round_proj_up_to_multiple_of))
        fields.update(ffn_proj_factor=factor, ffn_round_up_to=multiple)
        biases["feedforward bias"] = bool(ff.bias)
    if len(set(biases.values())) > 1:
        raise CheckpointError(f"{src}: {biases}: one bias setting for both is supported")
    fields["bias"] = next(iter(biases.values()), False)
    config = make_config(fields, src)
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
    config = large_config(fields, source="xLSTMLargeConfig")
    return _load(config, state_dict_from_transformers(state_dict, config), "NX-AI xLSTMLarge", dtype)


def _from_transformers(raw: dict[str, Any], state_dict: Tensors, dtype=None) -> xLSTMLM:
    config = config_from_transformers_dict(raw)
    return _load(config, state_dict_from_transformers(state_dict, config), "transformers xLSTMForCausalLM", dtype)


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


def _load(config: xLSTMConfig, state_dict: Tensors, source: str, dtype=None) -> xLSTMLM:
    """The model holding ``state_dict`` (our names), in ``dtype`` (None: the tensors' own).
    Tensors are copied off the official model (``clone``), so ours never aliases its parameters."""
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}
    return xLSTMLM.from_state_dict(config, tensors, dtype, source=source)


__all__ = [
    "config_from_transformers_dict", "from_official", "state_dict_from_transformers",
]
