"""Saving and loading without executing code: config.json + safetensors.

Our directories hold ``config.json`` (``"model_type": "xlstm_export"`` plus the xLSTMConfig
fields) and ``model.safetensors``, plus the tokenizer files of the model's source (see
``tokenizer.py``). ``read_pretrained`` (under ``xLSTMLM.from_pretrained``) also reads transformers xLSTM directories
(``"model_type": "xlstm"``, single or sharded safetensors) without transformers installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..fsio import atomic_dir
from ..tokenizer import TOKENIZER_FILES, read_tokenizer_files, write_tokenizer_files
from .config import xLSTMConfig
from .errors import CheckpointError
from .hf import config_from_transformers_dict, state_dict_from_transformers

MODEL_TYPE = "xlstm_export"
WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"
_MODEL_DIR_NAMES = {"config.json", SHARD_INDEX_NAME, *TOKENIZER_FILES}


def save_pretrained(model, directory) -> Path:
    """Write config.json + model.safetensors into ``directory`` (created; replaced atomically).

    An existing ``directory`` is replaced whole, so it must be empty or hold only what a model
    directory holds (:func:`check_replaceable`): anything else raises OSError, nothing deleted."""
    if not all(hasattr(model, a) for a in ("config", "state_dict")):
        raise TypeError(f"save_pretrained takes an xLSTMLM (xlstm_export.load(source) gives one), got "
                        f"{type(model).__name__}")
    directory = Path(directory)
    check_replaceable(directory)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OSError(f"cannot write {directory}: a part of its path is a file, not a directory") from None
    with atomic_dir(directory) as tmp:
        try:
            write_pretrained(model, tmp)
        except OSError as e:  # a full disk: name the directory, not the temporary beside it
            raise OSError(f"cannot write {directory}: {e.strerror or e}") from None
    return directory


def check_replaceable(directory: Path) -> None:
    """Refuse (OSError) to replace ``directory`` when that would delete anything but a model
    directory's own files (config.json, the safetensors weights, their shard index, the tokenizer
    files): ``convert -o DIR`` into a folder of other work. Also refuse the working directory or
    one that holds it (the rename cannot move it)."""
    if not os.path.lexists(directory):
        return
    if not directory.is_dir():
        raise OSError(f"cannot write {directory}: it exists and is not a directory")
    if Path.cwd().resolve().is_relative_to(directory.resolve()):
        raise OSError(f"cannot write {directory}: it is (or holds) the working directory; "
                      "give a new or empty directory")
    shown = foreign_entries(directory)
    if shown:
        raise OSError(f"cannot write {directory}: it holds what a model directory does not ({shown}), which "
                      "replacing it would delete; give a new or empty directory, or a model directory")


def foreign_entries(directory: Path, also: tuple[str, ...] = ()) -> str:
    """What in ``directory`` a model directory does not hold (anything but config.json, safetensors
    weights, their shard index, the tokenizer files and the names in ``also``), shown as "a, b/ and
    N more" (folders with a "/"); "" when there is nothing else."""
    own = {*_MODEL_DIR_NAMES, *also}
    others = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir()
                    if not (p.is_file() and (p.name in own or p.suffix == ".safetensors")))
    return ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")


def write_pretrained(model, folder: Path) -> None:
    """The files of a model directory (config.json, model.safetensors, the tokenizer files it carries)
    written into the existing ``folder``, not atomically: :func:`save_pretrained` stages them."""
    config = {"model_type": MODEL_TYPE, **model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Tied weights are stored once (safetensors refuses shared storage).
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.architecture == "paper" and model.config.tie_weights:
        sd.pop("lm_head.weight", None)
    try:
        save_file(sd, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    except Exception as e:  # safetensors raises its own error type (a full disk, for one)
        raise OSError(f"cannot write the weights: {e}") from None
    write_tokenizer_files(getattr(model, "tokenizer_files", None), folder)  # read at load, carried along


def read_config_json(directory) -> dict:
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def safetensors_files(directory) -> list[Path]:
    """The weight files of a directory: model.safetensors, or the shards its index names."""
    directory = Path(directory)
    index = directory / SHARD_INDEX_NAME
    if index.is_file():
        files = _shard_names(index)
        for name in files:
            if not (directory / name).is_file():
                raise CheckpointError(f"{index}: shard {name} named in the index is missing")
    elif os.path.lexists(directory / WEIGHTS_NAME):
        if not (directory / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{directory / WEIGHTS_NAME}: not a file")
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{directory}: no safetensors weights ({WEIGHTS_NAME} or {SHARD_INDEX_NAME})")
    return [directory / name for name in files]


def _shard_names(index: Path) -> list[str]:
    """The shard files a ``model.safetensors.index.json`` names: plain file names in its own
    folder (a path elsewhere, absolute or through "..", is refused: an index names no other files)."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a valid shard index (no \"weight_map\" object of tensor -> file)")
    names = set(weight_map.values())
    for name in sorted(names, key=str):
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{index}: shard {name!r} is not a file name in the index's own folder")
    return sorted(names)


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
    check_floating({k: state_dict[k].dtype for k in expected}, source)
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


def check_floating(dtypes: dict[str, torch.dtype], source: str) -> None:
    """Name a weight stored as integers (a quantized checkpoint, or a header that lies): a cast to the
    model's dtype (``--dtype``) would make numbers of the raw integers, not the weights."""
    for k, dt in dtypes.items():
        if not dt.is_floating_point:
            raise CheckpointError(f"{source}: tensor {k!r} is {str(dt).replace('torch.', '')}: not a floating-point "
                                  "weight (quantized checkpoints are not supported)")


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
