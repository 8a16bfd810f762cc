"""Saving and loading without executing code: config.json + safetensors.

Our directories hold ``config.json`` (``"model_type": "xlstm_export"`` plus the xLSTMConfig
fields) and ``model.safetensors``, plus the tokenizer files of the model's source (see
``tokenizer.py``). ``read_pretrained`` (under ``xLSTMLM.from_pretrained``) also reads transformers xLSTM directories
(``"model_type": "xlstm"``, single or sharded safetensors) without transformers installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fsio import atomic_dir
from ..tokenizer import read_tokenizer_files, write_tokenizer_files
from .config import xLSTMConfig
from .errors import CheckpointError
from .hf import config_from_transformers_dict, state_dict_from_transformers

MODEL_TYPE = "xlstm_export"
WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"


def save_pretrained(model, directory) -> Path:
    """Write config.json + model.safetensors into ``directory`` (created; replaced atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(directory) as tmp:
        write_pretrained(model, tmp)
    return directory


def write_pretrained(model, folder: Path) -> None:
    """The files of a model directory (config.json, model.safetensors, the tokenizer files it carries)
    written into the existing ``folder``, not atomically: :func:`save_pretrained` stages them."""
    config = {"model_type": MODEL_TYPE, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Tied weights are stored once (safetensors refuses shared storage).
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.architecture == "paper" and model.config.tie_weights:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    write_tokenizer_files(getattr(model, "tokenizer_files", None), folder)  # read at load, carried along


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
    state_dict = with_tied_head(model.config, state_dict)
    check_tensor_shapes({k: tuple(v.shape) for k, v in expected.items()},
                        {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    # A model built on the meta device (xLSTMLM.from_state_dict) takes the tensors themselves
    # (cast only where the dtype differs): no second copy of the weights.
    assign = any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        model.load_state_dict({k: state_dict[k].to(ref.dtype) for k, ref in expected.items()}, assign=assign)
    if assign:
        model.tie_weights()


def with_tied_head(config: xLSTMConfig, tensors: dict) -> dict:
    """A paper model with tied weights stores its embedding once: ``lm_head.weight`` is it again."""
    if config.architecture == "paper" and config.tie_weights and "embedding.weight" in tensors:
        tensors = dict(tensors)
        tensors.setdefault("lm_head.weight", tensors["embedding.weight"])
    return tensors


def check_tensor_shapes(expected: dict[str, tuple[int, ...]], got: dict[str, tuple[int, ...]], source: str) -> None:
    """Name any tensor (name -> shape) that ``got`` misses, has in excess, or has in another shape."""
    missing = [k for k in expected if k not in got]
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise CheckpointError(f"{source}: tensor {k!r} has shape {got[k]}, the model expects {shape}")


def read_config(directory, **overrides) -> tuple[xLSTMConfig, str]:
    """(config, model_type) of our directory or a transformers xLSTM directory, from config.json
    alone (no weights read). ``overrides`` replace config fields (see :meth:`xLSTMLM.from_pretrained`)."""
    directory = Path(directory)
    raw = read_config_json(directory)
    model_type = raw.get("model_type")
    if model_type == "xlstm":
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


def read_pretrained(directory, **overrides) -> tuple[xLSTMConfig, dict[str, torch.Tensor], dict[str, bytes]]:
    """(config, state dict in our names, tokenizer files) of our directory or a transformers xLSTM
    directory, every tensor read (``xLSTMLM.from_pretrained`` builds the model of them)."""
    directory = Path(directory)
    config, model_type = read_config(directory, **overrides)
    state_dict = read_safetensors_dir(directory)
    if model_type == "xlstm":
        state_dict = state_dict_from_transformers(state_dict, config)
    return config, state_dict, read_tokenizer_files(directory)
