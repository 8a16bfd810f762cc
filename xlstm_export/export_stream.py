"""Export a checkpoint directory to ONNX without materialising the model: the weights stream from the
safetensors files into the ONNX file, one tensor at a time, in the export dtype.

    from xlstm_export.export_stream import export_checkpoint
    export_checkpoint("xlstm-7b/", "model.onnx", dtype="bf16")   # peak memory ~ a few tensors

The graph is the one :func:`xlstm_export.export.export_onnx` writes for the same weights (same
function bodies, names, metadata, external-data layout); only the way the weights get there differs:

1. The model is built on the ``meta`` device (shapes, no storage) in the export dtype and traced by
   the same ``torch.export`` + ``torch.onnx`` path, without the ONNX optimiser.
2. The optimiser (the pass list ``torch.onnx`` runs) then runs on the traced graph with every
   initializer given a value: the real tensor (read from the checkpoint) when it is small, else a
   zero-storage stand-in of the right shape and dtype (one random row broadcast, distinct per
   tensor). The optimiser's decisions depend on shapes, dtypes, consumer counts and small values
   only: large weights are folded by ``Transpose`` (always folded), never by value.
3. Every initializer of the optimised graph is traced back, through the un-optimised graph, to a
   recipe of ONNX ops over checkpoint tensors (``Transpose(q.weight)``, ``Concat(i.bias, f.bias)``);
   it becomes an ``onnx_ir.LazyTensor`` that reads its tensors and evaluates the recipe with the
   optimiser's own evaluator when the file is written, and frees them afterwards. Small recipes are
   checked bit for bit against the value the optimiser folded.
4. ``export_onnx`` then saves (external data through onnx_ir's writer, into a temporary folder
   renamed into place), post-processes and checks the file as for any model.

Sources: our directories and transformers xLSTM directories (:func:`models.lazy.lazy_state_dict`).
Presets (random weights) and in-memory models go through ``export_onnx`` directly.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .export import DEFAULT_OPSET, ExportError, export_onnx
from .models.lazy import TensorLocation, lazy_state_dict
from .models.model import checkpoint_dtype, resolve_dtype

__all__ = ["REAL_VALUE_LIMIT", "StreamedWeights", "export_checkpoint", "meta_model", "default_export_dtype"]

# Initializers with at most this many elements get their real values while the optimiser runs
# (above every size the optimiser decides by: constant-fold input limit 8192, dedup limit 1024).
REAL_VALUE_LIMIT = 1 << 16
_PREFIX = "model."  # the traced module (_FlatLM) holds the xLSTMLM as ``model``
_EXPORT_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def default_export_dtype(stored: torch.dtype) -> str:
    """The export dtype that keeps a checkpoint's dtype ("fp32" / "fp16" / "bf16")."""
    if stored not in _EXPORT_DTYPES:
        raise ValueError(f"the checkpoint is stored in {str(stored).replace('torch.', '')}, which an ONNX "
                         "export cannot keep (fp32, fp16 or bf16): choose one with --dtype (dtype=)")
    return _EXPORT_DTYPES[stored]


def meta_model(config, dtype: torch.dtype = torch.float32):
    """An xLSTMLM on the meta device (shapes and dtypes, no storage) in ``dtype``, eval mode."""
    from .models import xLSTMLM

    with torch.device("meta"):
        model = xLSTMLM(config)
    return model.to(dtype).eval()


def export_checkpoint(
    directory: str | os.PathLike,
    path: str | os.PathLike,
    *,
    dtype: str | None = None,
    opset: int = DEFAULT_OPSET,
    progress: bool = True,
    external_data: bool | None = None,
    real_limit: int = REAL_VALUE_LIMIT,
    **export_options: Any,
) -> Path:
    """Export the model in ``directory`` (ours or transformers) to ``path`` streaming its weights.

    dtype: "fp32" | "fp16" | "bf16", None = the checkpoint's own dtype. Other options as
    :func:`xlstm_export.export.export_onnx`; ``real_limit`` as :class:`StreamedWeights`. Raises CheckpointError for an unreadable checkpoint,
    ValueError / OSError / ExportError as ``export_onnx``; nothing is left at ``path`` on failure.
    """
    from . import contract

    config, locations = lazy_state_dict(directory)
    if dtype is None:
        dtype = default_export_dtype(checkpoint_dtype(locations, str(directory)))
    dt = contract.canonical_dtype(dtype)
    model = meta_model(config, resolve_dtype(dt))
    model.tokenizer_files = _tokenizer_files(directory)
    weights = StreamedWeights(locations, resolve_dtype(dt), real_limit=real_limit)
    return export_onnx(model, path, dtype=dt, opset=opset, progress=progress, external_data=external_data,
                       weights=weights, **export_options)


def _tokenizer_files(directory):
    try:
        from .tokenizer import read_tokenizer_files
    except ImportError:  # the tokenizer module is optional here
        return None
    return read_tokenizer_files(Path(directory))


# ---------------------------------------------------------------------------------------------
# the weights: stand-ins while optimising, recipes when writing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    key: str  # our state-dict name


@dataclass(frozen=True)
class _Const:
    value: Any  # numpy array (a Constant node's value or a constant initializer)


@dataclass(frozen=True)
class _Unknown:
    name: str  # a value that is neither a weight nor computed from constants (a graph input)


@dataclass(frozen=True)
class _Op:
    domain: str
    op_type: str
    version: int
    attrs: tuple  # ((name, value), ...) as the optimiser passes them to its evaluator
    inputs: tuple  # recipes (None for an omitted optional input)


class StreamedWeights:
    """The ``weights`` argument of ``export_onnx`` for a meta model: binds checkpoint tensors to the
    traced program (see the module docstring). ``real_limit``: initializers up to this many
    elements get their real values while optimising, larger ones stand-ins (at least the
    optimiser's constant-folding input limit: it folds smaller inputs by value)."""

    def __init__(self, locations: dict[str, TensorLocation], dtype: torch.dtype, *,
                 real_limit: int = REAL_VALUE_LIMIT):
        from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT

        if real_limit < DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT:  # below it the optimiser folds by value
            raise ValueError(f"real_limit must be >= {DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT}, got {real_limit}")
        self.locations = locations
        self.dtype = dtype
        self.real_limit = real_limit

    # --- called by export_onnx -------------------------------------------------------------
    def bind(self, program) -> None:
        """Optimise ``program`` (traced without optimisation) and give every initializer a lazily
        computed value read from the checkpoint."""
        import onnx_ir as ir
        from onnxscript.optimizer._constant_folding import FOLDED_FROM_KEY

        graph = program.model.graph
        producers = _producers(graph, program.model.opset_imports)
        given: dict[int, str] = {}  # id(value bound before optimising) -> initializer name
        params: dict[str, str] = {}  # initializer name -> our state-dict name
        consts: dict[str, _Const] = {}  # constants of the trace that are initializers
        stand_ins: dict[str, np.ndarray] = {}  # our name -> its stand-in (large tensors)
        for i, (name, value) in enumerate(graph.initializers.items()):
            key = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            loc = self.locations.get(key)
            if loc is None:
                if value.const_value is not None and _is_real(value.const_value):
                    consts[name] = _Const(value.const_value.numpy())
                    continue  # a constant of the trace (not a weight): keeps its value
                raise ExportError(f"traced initializer {name!r} is no tensor of the checkpoint")
            if tuple(value.shape) != loc.shape:
                raise ExportError(f"traced initializer {name!r} has shape {tuple(value.shape)}, "
                                  f"the checkpoint {loc.shape}")
            params[name] = key
            if math.prod(loc.shape) <= self.real_limit:
                value.const_value = self._tensor(key, name)
            else:
                stand_ins[key] = _stand_in(value.dtype.numpy(), loc.shape, i)
                value.const_value = ir.Tensor(stand_ins[key], dtype=value.dtype, name=name)
            given[id(value.const_value)] = name
        program.optimize()

        for name, value in list(program.model.graph.initializers.items()):
            if id(value.const_value) in given:
                recipe = _Param(params[given[id(value.const_value)]])
            elif set(value.meta.get(FOLDED_FROM_KEY, ())) & set(params):
                recipe = _recipe(name, producers, params, consts)  # folded from weights: how
                if _unknowns(recipe) or not _leaves(recipe):
                    raise ExportError(f"optimised initializer {name!r} (folded from weights) cannot be traced "
                                      f"back to the checkpoint's tensors through the traced graph")
                self._check(name, recipe, value.const_value, stand_ins)
            else:
                if any(np.may_share_memory(value.const_value.numpy(), a) for a in stand_ins.values()):
                    raise ExportError(f"optimised initializer {name!r} is computed from a weight in a way "
                                      "that cannot be traced back to the checkpoint")
                continue  # a constant of the graph (no weight in it): the optimiser's value is exact
            value.const_value = ir.LazyTensor(functools.partial(self._materialise, recipe, name),
                                              dtype=value.dtype, shape=value.shape, name=name, cache=False)

    # --- values ------------------------------------------------------------------------------
    def _tensor(self, key: str, name: str):
        from torch.onnx._internal.exporter._core import TorchTensor  # the tensor type export_onnx saves

        return TorchTensor(self.locations[key].read(self.dtype), name=name)

    def _evaluate(self, recipe, leaf=None) -> np.ndarray:
        """The recipe's value; ``leaf(key)`` gives a weight's array (default: read it)."""
        if isinstance(recipe, _Param):
            return leaf(recipe.key) if leaf is not None else self._tensor(recipe.key, recipe.key).numpy()
        if isinstance(recipe, _Const):
            return recipe.value
        from onnxscript.optimizer._constant_folding import _reference_evaluator  # the optimiser's evaluator

        inputs = [None if r is None else self._evaluate(r, leaf) for r in recipe.inputs]
        out = _reference_evaluator.evaluate(recipe.domain, recipe.op_type, recipe.version, *inputs,
                                            **dict(recipe.attrs))
        if isinstance(out, (tuple, list)):
            raise ExportError(f"recipe op {recipe.op_type} has several outputs")
        return out

    def _materialise(self, recipe, name: str):
        import onnx_ir as ir

        if isinstance(recipe, _Param):
            return self._tensor(recipe.key, name)
        return ir.tensor(np.ascontiguousarray(self._evaluate(recipe)), name=name)

    def _check(self, name: str, recipe, folded, stand_ins: dict[str, np.ndarray]) -> None:
        """The recipe, evaluated on the values the optimiser saw (stand-ins for large weights, real
        values for the rest), must give the optimiser's value bit for bit."""
        want = folded.numpy()
        got = self._evaluate(recipe, leaf=lambda k: stand_ins[k] if k in stand_ins else self._tensor(k, k).numpy())
        if not _same_bits(got, want):
            raise ExportError(f"initializer {name!r}: the recipe traced back through the graph does not "
                              f"reproduce the optimiser's value")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.__array_interface__["data"][0] == b.__array_interface__["data"][0] and a.strides == b.strides:
        return True  # the same view of the same memory (a Transpose of a stand-in): nothing to compare
    as_int = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(as_int), b.view(as_int)))


def _is_real(tensor) -> bool:
    raw = getattr(tensor, "raw", None)
    return not (isinstance(raw, torch.Tensor) and raw.device.type == "meta")


def _stand_in(np_dtype, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A read-only array of ``shape`` with no storage beyond one row: distinct per ``seed``."""
    row = np.random.default_rng(seed).uniform(0.5, 1.5, size=shape[-1] if shape else ()).astype(np_dtype)
    return np.broadcast_to(row, shape)


def _producers(graph, opset_imports) -> dict[str, tuple]:
    """Value name -> (domain, op_type, version, attrs, input names) of the node producing it, for
    the graph before optimisation (the optimiser replaces the nodes it folds)."""
    import onnx_ir as ir

    out: dict[str, tuple] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        attrs = tuple((k, ir.serde.serialize_tensor(a.value) if a.type == ir.AttributeType.TENSOR else a.value)
                      for k, a in node.attributes.items())
        version = node.version if node.version is not None else opset_imports.get(node.domain, 1)
        inputs = tuple(None if v is None else v.name for v in node.inputs)
        for v in node.outputs:
            out[v.name] = (node.domain, node.op_type, version, attrs, inputs)
    return out


def _recipe(name: str, producers: dict[str, tuple], params: dict[str, str], consts: dict[str, _Const]):
    """How the optimiser computed value ``name``: ops over checkpoint tensors and constants."""
    if name in params:
        return _Param(params[name])
    if name in consts:
        return consts[name]
    if name not in producers:
        return _Unknown(name)  # a graph input (folded through Shape and the like): no weight
    domain, op_type, version, attrs, inputs = producers[name]
    rec = tuple(None if i is None else _recipe(i, producers, params, consts) for i in inputs)
    return _Op(domain, op_type, version, attrs, rec)


def _unknowns(recipe) -> set[str]:
    return _gather(recipe, lambda r: r.name if isinstance(r, _Unknown) else None)


def _leaves(recipe) -> set[str]:
    return _gather(recipe, lambda r: r.key if isinstance(r, _Param) else None)


def _gather(recipe, pick) -> set[str]:
    """The names ``pick`` gives the leaves of ``recipe`` (an op's inputs searched recursively)."""
    if isinstance(recipe, _Op):
        return set().union(*(_gather(r, pick) for r in recipe.inputs if r is not None))
    name = pick(recipe)
    return set() if name is None else {name}
