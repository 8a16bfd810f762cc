"""Saving and loading without executing code: config.json + safetensors.

Our directories hold ``config.json`` (``"model_type": "xlstm_export"`` plus the xLSTMConfig
fields) and ``model.safetensors``, plus the tokenizer files of the model's source (see
``tokenizer.py``). ``from_pretrained`` also reads transformers xLSTM directories
(``"model_type": "xlstm"``, single or sharded safetensors) without transformers installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..tokenizer import read_tokenizer_files, write_tokenizer_files
from .config import xLSTMConfig

MODEL_TYPE = "xlstm_export"
WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message says which file or tensor and why."""


def save_pretrained(model, directory) -> Path:
    """Write config.json + model.safetensors into ``directory`` (created; replaced atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        config = {"model_type": MODEL_TYPE, **model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Tied weights are stored once (safetensors refuses shared storage).
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.architecture == "paper" and model.config.tie_weights:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_tokenizer_files(getattr(model, "tokenizer_files", None), tmp)  # read at load, carried along
        _default_permissions(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes 0700 folders: give the folder and its files the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o666 & ~umask)


def read_config_json(directory) -> dict:
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def safetensors_files(directory) -> list[Path]:
    """The weight files of a directory: model.safetensors, or the shards its index names."""
    directory = Path(directory)
    index = directory / SHARD_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights ({WEIGHTS_NAME} or {SHARD_INDEX_NAME})")
    for name in files:
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: shard {name} named in the index is missing")
    return [directory / name for name in files]


def read_safetensors_dir(directory) -> dict[str, torch.Tensor]:
    """All tensors of a directory: model.safetensors, or the shards its index names."""
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        try:
            tensors.update(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors


def load_state_dict_checked(model, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load every tensor of the model from ``state_dict``; name any missing, extra or mis-shaped one."""
    expected = model.state_dict()
    if model.config.architecture == "paper" and model.config.tie_weights:
        state_dict = dict(state_dict)
        state_dict.setdefault("lm_head.weight", state_dict.get("embedding.weight"))
    missing = [k for k in expected if state_dict.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}")
    for k, ref in expected.items():
        got = tuple(state_dict[k].shape)
        if got != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {got}, the model expects {tuple(ref.shape)}")
    # A model built on the meta device (xLSTMLM.from_state_dict) takes the tensors themselves
    # (cast only where the dtype differs): no second copy of the weights.
    assign = any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        model.load_state_dict({k: state_dict[k].to(ref.dtype) for k, ref in expected.items()}, assign=assign)
    if assign:
        model.tie_weights()


def read_config(directory, **overrides) -> tuple[xLSTMConfig, str]:
    """(config, model_type) of our directory or a transformers xLSTM directory, from config.json
    alone (no weights read). ``overrides`` replace config fields (see :func:`from_pretrained`)."""
    directory = Path(directory)
    raw = read_config_json(directory)
    model_type = raw.get("model_type")
    if model_type == "xlstm":
        from .convert import config_from_transformers_dict

        return config_from_transformers_dict(raw, **overrides), model_type
    if model_type == MODEL_TYPE:
        fields = {k: v for k, v in raw.items() if k != "model_type"}
        try:
            return xLSTMConfig.from_dict({**fields, **overrides}), model_type
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
    raise CheckpointError(
        f"{directory / 'config.json'}: model_type {model_type!r} is neither {MODEL_TYPE!r} "
        "(this project) nor 'xlstm' (transformers)"
    )


def from_pretrained(directory, dtype=None, **overrides):
    """Load our directory or a transformers xLSTM directory. ``overrides`` replace config fields
    that do not change the weights (e.g. ``backend``, ``chunk_size``). ``dtype`` None keeps the
    checkpoint's dtype (a bfloat16 checkpoint loads as a bfloat16 model), else converts."""
    from .model import xLSTMLM

    directory = Path(directory)
    config, model_type = read_config(directory, **overrides)
    if model_type == "xlstm":
        from .convert import state_dict_from_transformers

        state_dict = state_dict_from_transformers(read_safetensors_dir(directory), config)
    else:
        state_dict = read_safetensors_dir(directory)
    model = xLSTMLM.from_state_dict(config, state_dict, dtype, source=str(directory))
    model.tokenizer_files = read_tokenizer_files(directory)  # written again by save_pretrained / export
    return model.eval()
