"""A checkpoint's tensors located, not loaded: where each of the model's tensors lies on disk.

    config, locations = lazy_state_dict("path/to/xlstm-7b")   # reads config.json and the headers only
    w = locations["blocks.0.q.weight"].read(torch.bfloat16)    # one tensor, memory-mapped, copied out

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte range) and the raw little-endian data. :func:`lazy_state_dict` parses the headers and maps
every tensor of OUR state dict to a byte range of one file. For transformers directories the
layout conversion is the converter itself (:func:`models.hf.state_dict_from_transformers`,
one owner of the layout) run on meta tensors: its fused-row splits come back as views, whose
storage offset names the rows. Nothing is read until ``TensorLocation.read``, which maps just the
tensor's pages and unmaps them again, so reading every tensor in turn keeps one tensor resident.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import xLSTMConfig
from .errors import CheckpointError
from .hf import state_dict_from_transformers
from .io import check_floating, check_tensor_shapes, read_config, safetensors_files, with_tied_head
from .model import xLSTMLM

# safetensors dtype names -> torch dtypes (the float and integer types a checkpoint may hold)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_HEADER_LIMIT = 100 * 1024**2  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TensorLocation:
    """One tensor in a file: ``numel * itemsize`` bytes at ``offset``, row-major, little-endian."""

    path: Path
    offset: int  # absolute byte offset in the file
    shape: tuple[int, ...]
    dtype: torch.dtype  # as stored

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor (a fresh CPU tensor, converted to ``dtype`` when given). Maps only the pages
        that hold it and unmaps them before returning."""
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        length = self.offset + self.nbytes - start
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype or self.dtype)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=start) as mm:
            with warnings.catch_warnings():  # read-only mapping: nothing writes through the view
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(mm, dtype=torch.uint8, count=self.nbytes, offset=self.offset - start)
            t = raw.view(self.dtype).reshape(self.shape)
            out = t.to(dtype) if dtype is not None and dtype != self.dtype else t.clone()
            del raw, t  # no view of the mapping may outlive it
        return out


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Name -> location of every tensor in one safetensors file (reads the header only)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} exceeds the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    base = 8 + n
    out: dict[str, TensorLocation] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, which this project does not "
                                  f"read (one of {', '.join(SAFETENSORS_DTYPES)})")
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry ({e!r})") from None
        loc = TensorLocation(path, base + begin, shape, dtype)
        if end - begin != loc.nbytes or begin < 0 or base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) has byte range "
                                  f"[{begin}, {end}) that does not fit its shape or the file")
        out[name] = loc
    # as safetensors itself (and so load / convert) requires: the byte ranges tile the data exactly,
    # no two tensors sharing bytes (which would read one tensor's values as another's)
    at = 0
    for name, loc in sorted(out.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if loc.offset - base != at:
            raise CheckpointError(f"{path}: tensor {name!r} starts at data byte {loc.offset - base}, expected {at}: "
                                  "overlapping or gapped byte ranges (not a valid safetensors file)")
        at += loc.nbytes
    if base + at != size:
        raise CheckpointError(f"{path}: the tensors cover {at} data bytes, the file holds {size - base}: "
                              "not a valid safetensors file")
    return out


def lazy_state_dict(directory, **overrides) -> tuple[xLSTMConfig, dict[str, TensorLocation]]:
    """(config, our state-dict name -> location) for our directory or a transformers xLSTM
    directory; reads config.json and the safetensors headers only. Missing, unexpected and
    mis-shaped tensors raise :class:`CheckpointError` as :func:`xLSTMLM.from_pretrained` does."""
    directory = Path(directory)
    config, model_type = read_config(directory, **overrides)
    source: dict[str, TensorLocation] = {}
    for path in safetensors_files(directory):
        source.update(read_safetensors_header(path))
    if model_type == "xlstm":
        locations = _through_converter(source, config)
    else:
        locations = dict(source)
    with torch.device("meta"):
        expected = xLSTMLM(config).state_dict()
    locations = with_tied_head(config, locations)
    check_tensor_shapes({k: tuple(v.shape) for k, v in expected.items()},
                        {k: loc.shape for k, loc in locations.items()}, str(directory))
    check_floating({k: locations[k].dtype for k in expected}, str(directory))
    return config, {k: locations[k] for k in expected}


def _through_converter(source: dict[str, TensorLocation], config: xLSTMConfig) -> dict[str, TensorLocation]:
    """Our names -> locations for transformers tensors: the converter run on meta tensors; each
    result must be a contiguous slice of one source tensor (a fused-row split)."""
    metas = {k: torch.empty(loc.shape, dtype=loc.dtype, device="meta") for k, loc in source.items()}
    owner = {id(t): k for k, t in metas.items()}
    converted = state_dict_from_transformers(metas, config)
    out: dict[str, TensorLocation] = {}
    for name, t in converted.items():
        base = t if id(t) in owner else t._base
        src = owner.get(id(base)) if base is not None else None
        if src is None or not t.is_contiguous() or t.dtype != base.dtype:
            raise CheckpointError(f"tensor {name!r} is computed from the checkpoint, not a slice of one of its "
                                  "tensors: this checkpoint cannot be read lazily (load it whole instead)")
        loc = source[src]
        out[name] = TensorLocation(loc.path, loc.offset + t.storage_offset() * loc.dtype.itemsize,
                                   tuple(t.shape), loc.dtype)
    return out
