"""Rewrite a graph's external-data file after a pass changed its initializers, in bounded memory.

An export over 2 GB keeps its weights in ``<name>.onnx.data``; a pass that fuses initializers (the
export's sibling-MatMul fusion: weights concatenated along N) cannot hold them in memory at 7B
scale. It records each new tensor as a :func:`pending` external tensor with the parts it is made
of, and :func:`rewrite` then writes the data file anew, in initializer order::

    fused = pending("w__fused2", [w_q, w_k])          # (K, N_q + N_k), its bytes not yet written
    graph.initializer.append(fused)
    rewrite(graph, folder, {"w__fused2": [w_q, w_k]})  # folder/<location> rewritten, offsets set

Every external tensor keeps its bytes (copied as they were); a pending one gets its parts' rows
side by side (row k = part 1's row k, then part 2's, ...: ``np.concatenate(parts, axis=1)``).
Tensors the graph no longer holds leave the file. Bytes move through one buffer of at most
:data:`BLOCK_BYTES` (plain reads, no memory map: the pages of a 13 GB file read through a map
would count toward the process's resident memory), into a new file that replaces the old one once
complete, so the disk holds the data twice for a moment. Offsets are contiguous, as onnx_ir's
writer leaves them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

__all__ = ["BLOCK_BYTES", "pending", "rewrite"]

BLOCK_BYTES = 64 << 20  # the most bytes read or concatenated at once
_PENDING = ""  # the location of a pending tensor until rewrite() writes it


def _external(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _nbytes(t: TensorProto) -> int:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def pending(name: str, parts: list[TensorProto]) -> TensorProto:
    """An external tensor for ``parts`` (2-D, same rows and type) concatenated along their columns;
    :func:`rewrite` writes its bytes and sets its place."""
    rows, dtype = parts[0].dims[0], parts[0].data_type
    if any(len(p.dims) != 2 or p.dims[0] != rows or p.data_type != dtype for p in parts):
        raise ValueError(f"{name}: parts of different rows or types: {[(list(p.dims), p.data_type) for p in parts]}")
    t = TensorProto(name=name, dims=[rows, sum(p.dims[1] for p in parts)], data_type=dtype,
                    data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=_PENDING)
    return t


class _Source:
    """The bytes of external or inline tensors, read by range from the data files of ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._files: dict[str, tuple[int, int]] = {}  # location -> (fd, size)

    def _file(self, location: str) -> tuple[int, int]:
        if location not in self._files:
            path = self.folder / location
            if Path(location).is_absolute() or ".." in Path(location).parts or not path.is_file():
                raise ValueError(f"external data {location!r} is not a file in {self.folder}")
            fd = os.open(path, os.O_RDONLY)
            self._files[location] = (fd, os.fstat(fd).st_size)
        return self._files[location]

    def span(self, t: TensorProto) -> tuple[str, int, int]:
        """(location, offset, length) of an external tensor's bytes, checked against its file."""
        e = _external(t)
        location, offset = e.get("location", ""), int(e.get("offset", 0))
        length = int(e.get("length", _nbytes(t)))
        size = self._file(location)[1]
        if length != _nbytes(t) or offset < 0 or offset + length > size:
            raise ValueError(f"tensor {t.name}: bytes {offset}..{offset + length} of {location} ({size} bytes) "
                             f"do not hold its {_nbytes(t)}")
        return location, offset, length

    def read(self, t: TensorProto, start: int, length: int) -> bytes:
        """``length`` bytes of tensor ``t`` from byte ``start`` of its data (external or inline)."""
        if t.data_location != TensorProto.EXTERNAL:
            if not t.HasField("raw_data"):  # typed fields: small tensors only
                return onnx.numpy_helper.to_array(t).tobytes()[start:start + length]
            return t.raw_data[start:start + length]
        location, offset, _ = self.span(t)
        fd = self._file(location)[0]
        data = os.pread(fd, length, offset + start)
        if len(data) != length:
            raise OSError(f"short read of {location} at {offset + start}")
        return data

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def _blocks(source: _Source, t: TensorProto) -> Iterator[bytes]:
    """An external tensor's bytes, at most BLOCK_BYTES at a time."""
    n = _nbytes(t)
    for start in range(0, n, BLOCK_BYTES):
        yield source.read(t, start, min(BLOCK_BYTES, n - start))


def _concatenated(source: _Source, parts: list[TensorProto]) -> Iterator[bytes]:
    """The bytes of ``np.concatenate(parts, axis=1)``, a block of rows at a time."""
    rows = parts[0].dims[0]
    row_bytes = [_nbytes(p) // rows for p in parts]
    step = max(1, BLOCK_BYTES // max(1, sum(row_bytes)))
    for r in range(0, rows, step):
        k = min(step, rows - r)
        pieces = [np.frombuffer(source.read(p, r * b, k * b), np.uint8).reshape(k, b) for p, b in zip(parts, row_bytes)]
        yield np.concatenate(pieces, axis=1).tobytes()


def rewrite(graph: onnx.GraphProto, folder: str | os.PathLike, parts: dict[str, list[TensorProto]]) -> None:
    """Write the external data of ``graph``'s initializers anew (see the module doc): ``parts``
    names each :func:`pending` tensor's parts (copies of the tensors they were, external or
    inline). The external tensors of ``graph`` must share one data file (the one written for it);
    it is replaced, and every tensor's offset and length set."""
    folder = Path(folder)
    external = [t for t in graph.initializer if t.data_location == TensorProto.EXTERNAL]
    missing = sorted(t.name for t in external if _external(t).get("location") == _PENDING and t.name not in parts)
    if missing:
        raise ValueError(f"pending tensors without parts: {missing}")
    locations = {_external(t)["location"] for t in external if _external(t).get("location") != _PENDING}
    locations |= {_external(p)["location"] for ps in parts.values() for p in ps if p.data_location == TensorProto.EXTERNAL}
    if len(locations) != 1:
        raise ValueError(f"expected the external tensors in one data file, found {sorted(locations) or 'none'}")
    location = locations.pop()
    tmp = folder / (location + ".rewrite")
    source = _Source(folder)
    try:
        with open(tmp, "wb") as out:
            offset = 0
            for t in external:
                chunks = _concatenated(source, parts[t.name]) if t.name in parts else _blocks(source, t)
                length = 0
                for chunk in chunks:
                    out.write(chunk)
                    length += len(chunk)
                if length != _nbytes(t):
                    raise ValueError(f"tensor {t.name}: wrote {length} bytes, expected {_nbytes(t)}")
                del t.external_data[:]
                for key, value in (("location", location), ("offset", offset), ("length", length)):
                    t.external_data.add(key=key, value=str(value))
                offset += length
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    os.replace(tmp, folder / location)
