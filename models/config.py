"""Model configuration: one dataclass for both xLSTM families, plus named presets.

Two architectures share :class:`xLSTMConfig`:

- ``"paper"``: the NX-AI ``xLSTMLMModel`` of Beck et al. 2024 ("xLSTM[a:b]"): mLSTM blocks with
  pre-up-projection and sLSTM blocks with a gated FFN, sLSTM at the indices in ``slstm_at``.
- ``"large"``: the xLSTM-7B architecture (NX-AI ``xlstm_large``, transformers ``xLSTMForCausalLM``):
  post-up-projection mLSTM blocks with RMSNorm, SwiGLU FFN and soft-capped gates and logits.

Fields that only one architecture reads say so in their comment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Architecture = Literal["paper", "large"]
# the cell backends (kernels.MLSTM_BACKENDS): "custom_op" runs the cells as torch.ops.xlstm.*
# (kernels/custom_op.py), the single nodes the ONNX exporter traces
Backend = Literal["auto", "torch", "triton", "custom_op"]


def round_up(x: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= x (the official width rounding)."""
    return int(math.ceil(x / multiple) * multiple)


@dataclass
class xLSTMConfig:
    """The shape and options of an xLSTM language model (the comment on each field gives its
    default's meaning; ``__post_init__`` checks them and fills the architecture's defaults).

    - Both architectures: ``architecture`` ("paper" | "large"), ``vocab_size``, ``embedding_dim``
      (E), ``num_blocks``, ``num_heads`` (mLSTM heads).
    - "paper" only: ``slstm_at`` (the sLSTM block indices), ``slstm_num_heads``,
      ``mlstm_proj_factor`` / ``mlstm_round_up_to`` (mLSTM inner width), ``qkv_proj_blocksize``,
      ``conv1d_kernel_size``, ``slstm_conv1d_kernel_size``, ``tie_weights``, ``add_post_blocks_norm``.
    - "large" only: ``qk_dim_factor``, ``v_dim_factor``, ``gate_soft_cap``,
      ``output_logit_soft_cap``, ``add_out_norm``.
    - Shared details: ``bias``, ``ffn_proj_factor`` / ``ffn_round_up_to`` (FFN width),
      ``norm_eps``, ``cell_eps``.
    - Execution only (the weights compute the same function whatever they are): ``backend`` (the
      cell kernels) and ``chunk_size`` (the chunkwise mLSTM's chunk length).

    ``preset(name)`` gives the named configurations; ``to_dict`` / ``from_dict`` round-trip
    config.json.
    """

    architecture: Architecture = "paper"  # "paper" (mixed mLSTM/sLSTM stack) or "large" (xLSTM-7B)
    vocab_size: int = 256  # byte-level by default
    embedding_dim: int = 128  # E, the residual stream width
    num_blocks: int = 3  # residual blocks in the stack
    num_heads: int = 4  # mLSTM heads

    # --- paper architecture --------------------------------------------------------------------
    slstm_at: list[int] = field(default_factory=list)  # block indices that are sLSTM blocks
    slstm_num_heads: int = 4  # sLSTM heads (block-diagonal recurrence)
    mlstm_proj_factor: float = 2.0  # mLSTM inner width = round_up(factor * E, mlstm_round_up_to)
    mlstm_round_up_to: int = 64  # the mLSTM inner width is rounded up to a multiple of this
    qkv_proj_blocksize: int = 4  # q/k/v are block-diagonal projections with blocks of this size
    conv1d_kernel_size: int = 4  # causal depthwise conv in mLSTM blocks (0 = none)
    slstm_conv1d_kernel_size: int = 4  # causal depthwise conv feeding sLSTM i/f gates (0 = none)
    tie_weights: bool = False  # lm_head shares the embedding matrix
    add_post_blocks_norm: bool = True  # final LayerNorm before the head

    # --- large (7B) architecture ---------------------------------------------------------------
    qk_dim_factor: float = 0.5  # q/k width = qk_dim_factor * E
    v_dim_factor: float = 1.0  # v width = v_dim_factor * E
    gate_soft_cap: float | None = 15.0  # i/f pre-activations soft-capped: cap * tanh(x / cap); None (or <= 0): none
    output_logit_soft_cap: float | None = 30.0  # logits soft-capped the same way; None (or <= 0): none
    add_out_norm: bool = True  # final RMSNorm

    # --- shared --------------------------------------------------------------------------------
    bias: bool = False  # biases on the block linears (gate linears always have one)
    ffn_proj_factor: float | None = None  # FFN width factor: None -> 1.3 (paper) / 2.6667 (large)
    ffn_round_up_to: int = 64  # FFN width is rounded up to a multiple of this
    norm_eps: float | None = None  # None -> 1e-5 (paper LayerNorm) / 1e-6 (large RMSNorm)
    cell_eps: float = 1e-6  # eps in the mLSTM denominator

    # --- execution (not part of the function the weights compute) ------------------------------
    backend: Backend = "auto"  # cell kernels: "auto" = Triton on CUDA, PyTorch reference elsewhere
    chunk_size: int = 64  # mLSTM chunk length for the chunkwise forms

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.architecture not in ("paper", "large"):
            raise ValueError(f"architecture must be 'paper' or 'large', got {self.architecture!r}")
        if self.backend not in typing.get_args(Backend):
            *rest, last = (repr(b) for b in typing.get_args(Backend))
            raise ValueError(f"backend must be {', '.join(rest)} or {last}, got {self.backend!r}")
        if self.ffn_proj_factor is None:
            self.ffn_proj_factor = 1.3 if self.architecture == "paper" else 2.6667
        if self.norm_eps is None:
            self.norm_eps = 1e-5 if self.architecture == "paper" else 1e-6
        self.slstm_at = sorted(int(i) for i in self.slstm_at)
        for name in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "chunk_size", "mlstm_round_up_to",
                     "ffn_round_up_to"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.architecture == "large" and self.slstm_at:
            raise ValueError("the 'large' architecture has mLSTM blocks only; slstm_at must be empty")
        bad = [i for i in self.slstm_at if not 0 <= i < self.num_blocks]
        if bad:
            raise ValueError(f"slstm_at {bad} outside the {self.num_blocks} blocks")
        for name, width, heads in self._head_splits():
            if width % heads:
                raise ValueError(f"{name} width {width} is not divisible by {heads} heads")
        if self.architecture == "paper" and self.mlstm_inner_dim % self.qkv_proj_blocksize:
            raise ValueError(
                f"mLSTM inner width {self.mlstm_inner_dim} is not divisible by "
                f"qkv_proj_blocksize {self.qkv_proj_blocksize}"
            )

    # --- derived widths (one place, read by the model, converters and exporters) ---------------
    @property
    def mlstm_inner_dim(self) -> int:
        """paper: width of the mLSTM branch after the up-projection."""
        return round_up(self.mlstm_proj_factor * self.embedding_dim, self.mlstm_round_up_to)

    @property
    def qk_dim(self) -> int:
        if self.architecture == "paper":
            return self.mlstm_inner_dim
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        if self.architecture == "paper":
            return self.mlstm_inner_dim
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.ffn_proj_factor * self.embedding_dim, self.ffn_round_up_to)

    def block_types(self) -> list[str]:
        """'mlstm' or 'slstm' per block."""
        return ["slstm" if i in self.slstm_at else "mlstm" for i in range(self.num_blocks)]

    def _head_splits(self) -> list[tuple[str, int, int]]:
        splits = [("mLSTM q/k", self.qk_dim, self.num_heads), ("mLSTM v", self.v_dim, self.num_heads)]
        if self.slstm_at:
            splits.append(("sLSTM", self.embedding_dim, self.slstm_num_heads))
        return splits

    def function_fields(self) -> dict[str, Any]:
        """What fixes the function the weights compute, to tell whether two configs describe the same
        model: the fields of this architecture and the widths the factors give (not the factors:
        2.667 and 2.6667 give one FFN width), without ``backend`` / ``chunk_size`` (execution only)
        or ``tie_weights`` (tied or not, equal weights compute the same)."""
        names = ["architecture", "vocab_size", "embedding_dim", "num_blocks", "num_heads", "bias", "norm_eps",
                 "cell_eps"]
        if self.architecture == "paper":
            names += ["slstm_at", "slstm_num_heads", "qkv_proj_blocksize", "conv1d_kernel_size",
                      "slstm_conv1d_kernel_size", "add_post_blocks_norm"]
        else:
            names += ["gate_soft_cap", "output_logit_soft_cap", "add_out_norm"]
        return {**{n: getattr(self, n) for n in names}, "qk_dim": self.qk_dim, "v_dim": self.v_dim,
                "ffn_dim": self.ffn_dim}

    # --- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "xLSTMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown xLSTMConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (int, float, bool, str, list[int], X | None,
    Literal[...]). bool is not an int here, and an int is a float."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:  # the type here; the value is checked (ValueError) in __post_init__
        return isinstance(value, type(args[0]))
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)  # e.g. "one of 'paper', 'large'"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return "a list of " + {int: "integers", float: "numbers"}.get(args[0], _type_name(args[0]))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _check_field_types(config: "xLSTMConfig") -> None:
    """One clear TypeError naming the first field whose value has the wrong type (a config.json
    written by hand: ``"embedding_dim": "128"``), before any comparison trips over it."""
    hints = typing.get_type_hints(type(config), globalns={**globals(), "Architecture": Architecture,
                                                          "Backend": Backend})
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _type_ok(value, hints[f.name]):
            raise TypeError(
                f"config field {f.name!r} must be {_type_name(hints[f.name])}, got "
                f"{type(value).__name__} {value!r}"
            )


PRESETS: dict[str, xLSTMConfig] = {
    # The embedded default of the main job: ~0.4M parameters, byte vocabulary, xLSTM[2:1].
    "tiny": xLSTMConfig(
        architecture="paper", vocab_size=256, embedding_dim=128, num_blocks=3, num_heads=4,
        slstm_at=[1], slstm_num_heads=4,
    ),
    # A 7B-shaped model small enough for CPU tests (~0.3M parameters).
    "tiny-large": xLSTMConfig(
        architecture="large", vocab_size=256, embedding_dim=128, num_blocks=2, num_heads=4,
    ),
    # Paper xLSTM[7:1] 125M: 24 blocks, 3 of them sLSTM.
    "xlstm-125m": xLSTMConfig(
        architecture="paper", vocab_size=50304, embedding_dim=768, num_blocks=24, num_heads=4,
        slstm_at=[3, 11, 19], slstm_num_heads=4, tie_weights=False,
    ),
    # Paper xLSTM[7:1] 1.3B: 48 blocks, 6 of them sLSTM.
    "xlstm-1.3b": xLSTMConfig(
        architecture="paper", vocab_size=50304, embedding_dim=2048, num_blocks=48, num_heads=4,
        slstm_at=[3, 11, 19, 27, 35, 43], slstm_num_heads=4,
    ),
    # A ~160M-parameter 7B-style model (the ONNX benchmarks' mid-size model).
    "xlstm-large-160m": xLSTMConfig(
        architecture="large", vocab_size=50304, embedding_dim=768, num_blocks=12, num_heads=4,
    ),
    # xLSTM-7B: E=4096, 8 heads, 32 blocks (DHQK=256, DHV=512, FFN 10944).
    "xlstm-7b": xLSTMConfig(
        architecture="large", vocab_size=50304, embedding_dim=4096, num_blocks=32, num_heads=8,
    ),
}


def preset(name: str, **overrides: Any) -> xLSTMConfig:
    """A fresh copy of a named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
