"""PyTorch xLSTM: configs and presets, the model, converters from official checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import PRESETS, xLSTMConfig, preset
from .io import CheckpointError, from_pretrained, save_pretrained
from .model import State, sample_next, xLSTMLM


def load(source: str, *, seed: int = 0, **overrides) -> xLSTMLM:
    """A model from a preset name (randomly initialised with ``seed``), one of our directories or a
    transformers xLSTM directory."""
    if source in PRESETS:
        torch.manual_seed(seed)
        return xLSTMLM(preset(source, **overrides)).eval()
    path = Path(source)
    if path.is_dir():
        return from_pretrained(path, **overrides)
    if path.exists():
        raise CheckpointError(f"{source}: expected a model directory (config.json + safetensors), got a file")
    raise CheckpointError(
        f"{source}: no such preset or directory; presets: {', '.join(PRESETS)}"
    )


def from_official(obj, state_dict=None) -> xLSTMLM:
    """An xLSTMLM computing the same function as an official model (see models/convert.py)."""
    from .convert import from_official as _from_official

    return _from_official(obj, state_dict)


__all__ = [
    "PRESETS", "CheckpointError", "State", "xLSTMConfig", "xLSTMLM",
    "from_official", "from_pretrained", "load", "preset", "sample_next", "save_pretrained",
]
