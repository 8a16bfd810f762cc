"""PyTorch xLSTM: configs and presets, the model, converters from official checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..tokenizer import BYTE_VOCAB, byte_tokenizer_files
from .config import PRESETS, xLSTMConfig, preset
from .convert import from_official
from .errors import CheckpointError
from .io import save_pretrained
from .model import State, resolve_dtype, sample_next, xLSTMLM


def load(source: str | os.PathLike, *, seed: int | None = None, dtype=None, **overrides) -> xLSTMLM:
    """A model from a preset name (randomly initialised with ``seed``, default 0), one of our
    directories or a transformers xLSTM directory. ``dtype`` (a torch dtype or a name: "fp32",
    "bf16", "float64", ...) converts; None keeps the checkpoint's dtype (float32 for presets).
    ``seed`` applies to presets only: a directory's weights are read, and a seed given with one is
    refused (ValueError) rather than ignored."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a preset name or a directory path, got {type(source).__name__}")
    source = os.fspath(source)
    if source in PRESETS:
        torch.manual_seed(0 if seed is None else seed)
        model = xLSTMLM(preset(source, **overrides)).eval()
        if dtype is not None:
            model = model.to(resolve_dtype(dtype))
        if model.config.vocab_size == BYTE_VOCAB:  # byte-level presets carry the byte tokenizer
            model.tokenizer_files = byte_tokenizer_files()
        return model
    path = Path(source)
    if path.is_dir():
        if seed is not None:
            raise ValueError(f"seed={seed} applies to presets (random weights); {source} is a directory, "
                             "whose weights are loaded")
        return from_pretrained(path, dtype=dtype, **overrides)
    if path.exists():
        raise CheckpointError(f"{source}: expected a model directory (config.json + safetensors), got a file")
    raise CheckpointError(
        f"{source}: no such preset or directory; presets: {', '.join(PRESETS)}"
    )


def from_pretrained(directory, dtype=None, **overrides) -> xLSTMLM:
    """Load our directory or a transformers xLSTM directory (see :meth:`xLSTMLM.from_pretrained`)."""
    return xLSTMLM.from_pretrained(directory, dtype=dtype, **overrides)


__all__ = [
    "PRESETS", "CheckpointError", "State", "xLSTMConfig", "xLSTMLM",
    "from_official", "from_pretrained", "load", "preset", "sample_next", "save_pretrained",
]
