"""onnxruntime session wrapper for models written by :func:`xlstm_export.export.export_onnx`.

    m = OrtModel("model.onnx")
    state = m.init_state(batch=2)                     # {"0.c": zeros (2, NH, DQK, DV), ...} float32
    logits, state = m.run(input_ids, state)           # prefill: input_ids (2, S) int64
    logits, state = m.run(next_ids, state)            # decode: (2, 1)

State names are the model's own ("{block}.{tensor}"), read from the graph (``past.*`` inputs paired
with ``present.*`` outputs), so the dicts are interchangeable with ``xLSTMLM``'s state (numpy here).
Logits come back as float32 numpy (float16 / bfloat16 graphs are upcast exactly); states are float32.
``m.run(ids, state, logits="last")`` returns the last position's logits alone, (B, 1, vocab): the
session feeds the graph's ``logits_from`` (a constant 0 in the file, an input in memory), so the
vocabulary product runs for that row only (a prefill's full logits are S x vocab x 4 bytes).
onnxruntime's CPU provider has no bfloat16 kernels, so a bfloat16 graph runs there as float32
arithmetic over its bfloat16 weights (:func:`upcast_bfloat16`; ``OrtModel.upcast`` says so).
A file that is not an ONNX model, or an ONNX model without this interface, raises
:class:`NotAnXLSTMModelError` naming what is wrong.

``OrtModel(path, native_ops=True)`` runs the mLSTM decode step, the sLSTM time loop and the float32
weight products with the native CPU kernels of :mod:`xlstm_export.ort_native` instead of standard
ops (same results within float32 rounding; faster decode). Without them, the mLSTM body still
gets onnxruntime's decode fast path in memory (``decode_step=True``, the default: at S == 1 a
single recurrent step instead of the file's portable chunkwise body, ~25% faster decode on the
small models; :func:`xlstm_export.onnx_functions.with_decode_step`); ``decode_step=False`` runs
the file exactly as exported.

For a stream of decode steps, ``m.decoder()`` is the same (input_ids, state) -> (logits, state)
runner with the state kept in buffers bound to the session (:class:`OrtDecoder`): each step writes
the new state into preallocated memory instead of fresh output arrays. Its prefill returns the last
position's logits only (``logits="last"``, what generation reads; ``m.decoder(logits="all")`` for
every position's).
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .interface import LOGITS_FROM, METADATA_PREFIX, state_input_name, state_output_name

__all__ = ["BoundState", "ExportedModel", "NotAnXLSTMModelError", "OrtDecoder", "OrtModel", "inspect_model",
           "upcast_bfloat16"]

_PAST, _PRESENT = "past.", "present."


class NotAnXLSTMModelError(ValueError):
    """The file is not an ONNX model, or not one with the xlstm-export interface."""


def inspect_model(path: str | os.PathLike) -> dict[str, Any]:
    """Read the interface of an exported file without loading weights.

    Returns {"state_names": [...], "state_shapes": {name: dims after batch}, "dtype": str,
    "vocab_size": int|None, "metadata": {...}, "xlstm_ops": [...]}. Raises FileNotFoundError for a
    missing file and NotAnXLSTMModelError for anything that is not one of ours.
    """
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise NotAnXLSTMModelError(f"{p}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise NotAnXLSTMModelError(f"{p}: not an ONNX model ({type(e).__name__}: {e})") from None
    g = model.graph
    if not g.input and not g.output:
        raise NotAnXLSTMModelError(f"{p}: not an ONNX model (no graph inputs or outputs)")
    ins = {v.name: v for v in g.input}
    outs = {v.name: v for v in g.output}
    problems = []
    if "input_ids" not in ins:
        problems.append("no input 'input_ids'")
    if "logits" not in outs:
        problems.append("no output 'logits'")
    past = [n[len(_PAST):] for n in ins if n.startswith(_PAST)]
    present = [n[len(_PRESENT):] for n in outs if n.startswith(_PRESENT)]
    if sorted(past) != sorted(present):
        problems.append(f"past.* inputs {sorted(past)} do not pair with present.* outputs {sorted(present)}")
    if not past:
        problems.append("no recurrent state inputs 'past.*'")
    xlstm_ops = sorted({n.op_type for n in g.node if n.domain == "xlstm"})
    inlined = any(q.key == METADATA_PREFIX + "bodies" and q.value == "inline" for q in model.metadata_props)
    if not xlstm_ops and not inlined:
        problems.append("no xlstm::mLSTM / xlstm::sLSTM node (nor an --inline export's metadata)")
    if problems:
        raise NotAnXLSTMModelError(f"{p}: an ONNX model, but not an xlstm-export model: " + "; ".join(problems))

    meta = {q.key[len(METADATA_PREFIX):]: q.value for q in model.metadata_props
            if q.key.startswith(METADATA_PREFIX)}
    names = json.loads(meta["state_names"]) if "state_names" in meta else past
    if sorted(names) != sorted(past):
        raise NotAnXLSTMModelError(f"{p}: metadata state names {names} differ from the graph's {sorted(past)}")
    shapes = {}
    for k in names:
        dims = ins[state_input_name(k)].type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims[1:]):
            raise NotAnXLSTMModelError(f"{p}: state input {state_input_name(k)} has a non-static dim "
                                       f"after the batch dim")
        shapes[k] = tuple(int(d.dim_value) for d in dims[1:])
    ldims = outs["logits"].type.tensor_type.shape.dim
    vocab = int(ldims[-1].dim_value) if ldims and ldims[-1].HasField("dim_value") else None
    elem = outs["logits"].type.tensor_type.elem_type
    dtype = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16"}.get(elem, onnx.TensorProto.DataType.Name(elem).lower())
    logits_from = any(t.name == LOGITS_FROM for t in g.initializer)  # files since logits="last"
    return {"state_names": names, "state_shapes": shapes, "dtype": dtype, "vocab_size": vocab,
            "metadata": meta, "xlstm_ops": xlstm_ops, "logits_from": logits_from}


def _check_integer(ids) -> None:
    """TypeError unless ``ids`` (numpy, torch or nested lists) holds integers."""
    dtype = ids.dtype if hasattr(ids, "dtype") else np.asarray(ids).dtype
    if hasattr(dtype, "is_floating_point"):  # torch
        ok = not (dtype.is_floating_point or dtype.is_complex or str(dtype) == "torch.bool")
    else:
        ok = np.dtype(dtype).kind in "iu" or np.asarray(ids).size == 0  # [[]]: its shape is refused
    if not ok:
        raise TypeError(f"input_ids must be integer token ids, got {str(dtype).replace('torch.', '')}")


def _to_numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _as_array(x, dtype) -> np.ndarray:
    """``x`` as a C-contiguous numpy array of ``dtype``; no copy when it already is one (decode
    feeds the previous step's outputs back every step)."""
    if type(x) is np.ndarray and x.dtype == dtype and x.flags.c_contiguous:
        return x
    return _to_numpy(x, dtype)


def _ortvalue_to_numpy(v) -> np.ndarray:
    """OrtValue -> numpy; bfloat16 (no numpy type in ORT) is read raw and upcast to float32."""
    if v.data_type() == "tensor(bfloat16)":
        raw = np.empty(v.shape(), dtype=np.uint16)
        if raw.nbytes:
            ctypes.memmove(raw.ctypes.data, v.data_ptr(), raw.nbytes)
        return bf16_bits_to_float32(raw)
    return v.numpy()


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as their raw 16 bits (any 16-bit array) -> float32, exactly: bf16 is
    the top half of a float32."""
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def upcast_bfloat16(model):
    """A bfloat16 graph as float32 arithmetic over the same bfloat16-rounded weights.

    onnxruntime's CPU provider has no bfloat16 kernels (not even Add), so a bfloat16 export is run
    on CPU like this: initializers and constants are widened exactly, graph inputs / outputs become
    float32, and every explicit ``Cast(to=bfloat16)`` is kept and followed by a Cast back to float32
    (so the graph's own rounding points stay). A ``Cast(to=float32)`` of a value that was bfloat16
    is float32 to float32 then, and goes (its readers read its input; where it wrote a graph
    output, the node that made its input writes that output), and the graph's value types
    say float32 where they said bfloat16, so that the native CPU kernels' folds see the same graph
    around those rounding points as in a float32 export (ort_native). The per-op rounding of
    bfloat16 arithmetic is what is not reproduced; the comparison tolerance for bfloat16 covers it.
    Modifies ``model`` in place.
    """
    from .graph_rewrite import graphs

    for g in reversed(list(graphs(model.graph))):  # subgraphs before the graphs that hold them
        _upcast_graph(g)
    return model


def _widened(t):
    """A bfloat16 TensorProto as float32, exactly (bf16 is the top half of fp32)."""
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)


def _upcast_graph(g) -> None:
    """:func:`upcast_bfloat16` on one graph (its subgraphs are separate graphs)."""
    import onnx
    from onnx import TensorProto

    from .graph_rewrite import Edit, GraphIndex, all_nodes, attrs

    BF, F = TensorProto.BFLOAT16, TensorProto.FLOAT
    was_bf16 = {t.name for t in g.initializer if t.data_type == BF}
    for j, init in enumerate(g.initializer):
        if init.data_type == BF:
            g.initializer[j].CopyFrom(_widened(init))
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type == BF:
            was_bf16.add(v.name)
            v.type.tensor_type.elem_type = F
    index = GraphIndex(g)
    edit = Edit(index)
    widened = {}  # the output of each Cast to float32 of a value that was bfloat16 -> that value
    renamed = {}  # ... where the output is a graph output (a state): that value -> the output
    for node in index.nodes:
        if node.op_type == "Cast" and attrs(node).get("to") == F and node.input[0] in was_bf16:
            x, y = node.input[0], node.output[0]
            if y not in index.outputs:
                widened[y] = x
            elif x in index.producer and x not in index.outputs and x not in renamed:
                renamed[x] = y  # the value's node writes the graph output itself
            else:
                continue
            edit.replace([node], [])
            continue
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == BF:
                a.t.CopyFrom(_widened(a.t))
            elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == BF:
                if node.op_type != "Cast":
                    a.i = F
                    continue
                out = node.output[0]  # keep the rounding, hand float32 on
                node.output[0] = f"{out}__bf16"
                edit.replace([node], [node, onnx.helper.make_node("Cast", [node.output[0]], [out], to=F,
                                                                   name=f"{node.name}_widen")])
    edit.apply()
    if widened or renamed:
        for node in all_nodes(g):  # nested graphs read the outer values by name too
            for j, x in enumerate(node.input):
                x = widened.get(x, x)
                node.input[j] = renamed.get(x, x)
            for j, y in enumerate(node.output):
                node.output[j] = renamed.get(y, y)
        keep = [v for v in g.value_info if v.name not in widened and v.name not in renamed]
        del g.value_info[:]
        g.value_info.extend(keep)


class ExportedModel:
    """What every runner of an exported file shares: the interface read by :func:`inspect_model`
    (``metadata``, ``state_shapes``), the stored config and a fresh state."""

    def _read_interface(self, path) -> dict[str, Any]:
        """Sets path, state_names, state_shapes, dtype, vocab_size, metadata from the file
        (:func:`inspect_model`: raises for a missing file or one not ours); returns the whole info."""
        info = inspect_model(path)
        self.path = Path(path)
        self.state_names: list[str] = info["state_names"]
        self.state_shapes: dict[str, tuple[int, ...]] = info["state_shapes"]  # dims after batch
        self.dtype: str = info["dtype"]  # logits dtype of the graph
        self.vocab_size: int | None = info["vocab_size"]
        self.metadata: dict[str, str] = info["metadata"]
        self._state_key_set = set(self.state_names)
        self._state_feeds = [(k, state_input_name(k), self.state_shapes[k]) for k in self.state_names]
        return info

    @property
    def config(self) -> dict | None:
        """The model config stored at export (a dict), or None."""
        c = self.metadata.get("config")
        return json.loads(c) if c else None

    def init_state(self, batch: int) -> dict[str, np.ndarray]:
        """All-zero float32 state (a fresh sequence) for ``batch`` sequences."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return {k: np.zeros((batch, *s), dtype=np.float32) for k, s in self.state_shapes.items()}

    def _token_ids(self, input_ids) -> np.ndarray:
        """input_ids as int64 (B, S), checked against the vocabulary: integers only (float ids were
        truncated: 2.7 ran as token 2)."""
        if not (type(input_ids) is np.ndarray and input_ids.dtype == np.int64):
            _check_integer(input_ids)
        ids = _as_array(input_ids, np.int64)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise ValueError(f"input_ids must have shape (B, S) with B, S >= 1, got {ids.shape}")
        if self.vocab_size is not None and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in "
                             f"[{ids.min()}, {ids.max()}]")
        return ids

    def _feeds(self, input_ids, state: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        """The run's inputs: input_ids (``_token_ids``) and the state (None: fresh sequences),
        checked key by key and shape by shape, as float32 arrays under the graph's input names."""
        ids = self._token_ids(input_ids)
        B = ids.shape[0]
        if state is None:
            state = self.init_state(B)
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of state name -> array (None: fresh sequences), got "
                            f"{type(state).__name__}")
        if state.keys() != self._state_key_set:
            missing = sorted(self._state_key_set - set(state))
            extra = sorted(set(state) - self._state_key_set)
            raise ValueError(f"state keys do not match the model: missing {missing}, unexpected {extra}")
        feeds = {"input_ids": ids}
        for k, name, dims in self._state_feeds:
            a = _as_array(state[k], np.float32)  # (B, *dims)
            if a.shape[1:] != dims or a.shape[0] != B:
                raise ValueError(f"state {k!r} has shape {a.shape}, expected {(B, *dims)}")
            feeds[name] = a
        return feeds


class OrtModel(ExportedModel):
    """An exported xLSTM LM in an onnxruntime InferenceSession (see the module docstring).

    providers: onnxruntime execution providers in order of preference (default
    ``["CPUExecutionProvider"]``). intra_op_threads: the session's intra-op thread count (None:
    onnxruntime's default, one per physical core). session_options: an
    ``onnxruntime.SessionOptions`` to start from (``intra_op_threads`` and ``native_ops`` set their
    parts on it). native_ops, decode_step: see the module docstring.
    """

    def __init__(self, path: str | os.PathLike, *, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, session_options=None, native_ops: bool = False,
                 decode_step: bool = True):
        import onnxruntime as ort

        if providers is not None and (isinstance(providers, str) or not all(isinstance(p, str) for p in providers)):
            raise TypeError(f"providers must be a list of provider names, e.g. ['CPUExecutionProvider'], "
                            f"got {providers!r}")  # a str was taken letter by letter
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool)
                                             or not isinstance(intra_op_threads, int) or intra_op_threads < 1):
            raise ValueError(f"intra_op_threads must be an int >= 1 (None: onnxruntime's default), "
                             f"got {intra_op_threads!r}")
        info = self._read_interface(path)
        opts = session_options or ort.SessionOptions()
        if intra_op_threads is not None:
            opts.intra_op_num_threads = intra_op_threads
        providers = list(providers or ["CPUExecutionProvider"])
        # bfloat16 on the CPU provider: float32 arithmetic over the bf16 weights (see upcast_bfloat16)
        self.upcast = self.dtype == "bfloat16" and providers[0] == "CPUExecutionProvider"
        self.native_ops = native_ops
        self._inplace_states: set[str] = set()  # states a decode step may update in place (OrtDecoder)
        rewrites = []
        # logits="last": the file's constant logits_from becomes an input of the session
        self._logits_from = info["logits_from"]
        if self._logits_from:
            rewrites.append(_expose_logits_from)
        if self.upcast:
            rewrites.append(upcast_bfloat16)
        if decode_step and not native_ops:  # native_ops puts its own kernel there
            from .onnx_functions import with_decode_step

            rewrites.append(with_decode_step)
        if native_ops:
            if providers[0] != "CPUExecutionProvider":
                raise ValueError(f"native_ops are CPU kernels; the first provider is {providers[0]}")
            if not info["xlstm_ops"]:  # an --inline export: nothing for the kernels to replace
                raise ValueError(f"{self.path}: native ops replace the xlstm::mLSTM / xlstm::sLSTM nodes, and this "
                                 "--inline export has none (standard ops only): run it without native ops, or "
                                 "export without --inline")
            from . import ort_native

            ort_native.register(opts)  # builds the library on first use (a C++ compiler is needed)

            def native(model):
                model = ort_native.with_native_ops(model, inplace=True)
                pairs = ort_native.inplace_states(model)
                self._inplace_states = {k for k in self.state_names
                                        if pairs.get(state_input_name(k)) == state_output_name(k)}
                return model

            rewrites.append(native)
        try:
            if rewrites:
                self.session = self._rewritten_session(rewrites, opts, providers)
            else:
                self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:
            raise NotAnXLSTMModelError(f"{self.path}: onnxruntime cannot load it: {e}") from e
        self._output_names = ["logits", *(state_output_name(k) for k in self.state_names)]
        # bfloat16 outputs (a non-CPU provider running a bf16 graph) have no numpy type: OrtValues
        self._numpy_outputs = self.dtype != "bfloat16" or self.upcast

    def _rewritten_session(self, rewrites, opts, providers):
        """A session on the model after the in-memory ``rewrites`` (the file stays as it is)."""
        import tempfile

        import onnx
        import onnxruntime as ort

        model = onnx.load(str(self.path))  # loads external data too
        for rewrite in rewrites:
            model = rewrite(model)
        # the weights are nearly all of it (ByteSize() would cost one more full serialisation)
        if sum(len(t.raw_data) for t in model.graph.initializer) < 1_900_000_000:
            return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
        with tempfile.TemporaryDirectory() as d:  # over protobuf's 2 GB: go through a file
            p = Path(d) / "upcast.onnx"
            onnx.save_model(model, p, save_as_external_data=True, location="upcast.onnx.data")
            return ort.InferenceSession(str(p), opts, providers=providers)

    def run(self, input_ids, state: Mapping[str, Any] | None = None, *, logits: str = "all"
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """input_ids (B, S) int -> logits (B, S, vocab) float32, new state {name: float32 array}.

        ``state`` None starts fresh sequences; torch tensors are accepted anywhere numpy is.
        ``logits="last"``: logits (B, 1, vocab) of the last position only; the graph computes the
        vocabulary product for that row alone (a long prefill's logits are S x vocab x 4 bytes).
        Files exported before the graph had ``logits_from`` compute every row and return the last.
        """
        import onnxruntime as ort

        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
        feeds = self._feeds(input_ids, state)
        if self._logits_from:
            feeds[LOGITS_FROM] = _LOGITS_FROM_VALUES[logits]
        elif logits == "last":  # an older file: every row is computed, the last one returned
            out_logits, new_state = self.run(input_ids, state)
            return np.ascontiguousarray(out_logits[:, -1:]), new_state
        if self._numpy_outputs:
            # numpy in and out: onnxruntime's plain run() path, measurably cheaper per call than
            # wrapping every feed in an OrtValue (it matters at decode, ~20 tensors per step)
            outs = self.session.run(self._output_names, feeds)
            logits = outs[0].astype(np.float32, copy=False)
            return logits, dict(zip(self.state_names, outs[1:]))
        outs = self.session.run_with_ort_values(
            self._output_names, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()})
        logits = _ortvalue_to_numpy(outs[0]).astype(np.float32, copy=False)
        new_state = {k: _ortvalue_to_numpy(v) for k, v in zip(self.state_names, outs[1:])}
        return logits, new_state

    def decoder(self, logits: str = "last") -> OrtDecoder:
        """A runner like :meth:`run` that keeps a decode stream's state in session-bound buffers;
        by default a prefill returns the last position's logits only (B, 1, vocab): what
        generation reads. ``logits="all"``: every position's, as :meth:`run` does."""
        return OrtDecoder(self, logits=logits)


LOGITS_MODES = ("all", "last")
_LOGITS_FROM_VALUES = {"all": np.zeros(1, np.int64), "last": np.full(1, -1, np.int64)}


def _expose_logits_from(model):
    """The file's ``logits_from`` initializer (0: logits for every position) as an int64 (1,) graph
    input, so that :meth:`OrtModel.run` can ask for the last position's logits alone."""
    import onnx

    from .graph_rewrite import delete_initializers

    g = model.graph
    delete_initializers(g, lambda t: t.name == LOGITS_FROM)  # in place: the weights are not copied
    g.input.append(onnx.helper.make_tensor_value_info(LOGITS_FROM, onnx.TensorProto.INT64, [1]))
    return model


class BoundState(dict):
    """A state returned by :class:`OrtDecoder`: the arrays are the decoder's own buffers, which the
    next steps overwrite. Pass it straight back to the decoder, or copy what you keep
    (``{k: v.copy() for k, v in state.items()}``)."""

    __slots__ = ("decoder", "serial")


class OrtDecoder:
    """(input_ids, state) -> (logits, state), like :meth:`OrtModel.run`, for generation loops.

    Decode steps (S == 1) fed the state this decoder returned last run through onnxruntime
    IOBinding over two preallocated sets of state buffers, read from one and written to the other
    by turns, so a step allocates no state memory and copies no state (at B = 8 on the 160M model
    the state is 27 MiB per step). The mLSTM states that a native kernel alone reads and
    overwrites at a decode step (``mLSTMLayer``, or the paper blocks' ``mLSTMStep``:
    :func:`xlstm_export.ort_native.inplace_states`) have one buffer, updated in place. Anything else
    (a prefill, a fresh or foreign state, another batch size) goes through :meth:`OrtModel.run` and
    its result is copied into the buffers once.
    Logits are returned as a new float32 array: (B, 1, vocab) at every call with ``logits="last"``
    (the default of :meth:`OrtModel.decoder`: a prefill computes the last position's row only),
    (B, S, vocab) with ``logits="all"``.
    """

    def __init__(self, model: OrtModel, logits: str = "last"):
        if logits not in LOGITS_MODES:
            raise ValueError(f"logits must be one of {LOGITS_MODES}, got {logits!r}")
        self.logits = logits
        if not model._numpy_outputs:
            raise ValueError("OrtDecoder needs a graph with numpy outputs (a bfloat16 graph on a "
                             "non-CPU provider returns OrtValues): use OrtModel.run")
        self.model = model
        logits_type = model.session.get_outputs()[0].type
        self._logits_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(logits_type)
        if self._logits_dtype is None:
            raise ValueError(f"OrtDecoder binds float32 or float16 logits, the graph gives {logits_type}")
        self._batch = None  # the batch size the buffers are for
        self._serial = 0  # steps taken; the serial of the last returned state

    def _allocate(self, batch: int) -> None:
        m = self.model
        self._bufs = [{k: np.empty((batch, *m.state_shapes[k]), np.float32) for k in m.state_names}
                      for _ in range(2)]
        for k in m._inplace_states:  # one buffer, read and overwritten by the same kernel
            self._bufs[1][k] = self._bufs[0][k]
        self._ids = np.zeros((batch, 1), np.int64)
        self._logits = np.empty((batch, 1, m.vocab_size), self._logits_dtype)
        self._bindings = []
        for src, dst in ((0, 1), (1, 0)):  # binding j reads buffer set j, writes the other one
            b = m.session.io_binding()
            b.bind_cpu_input("input_ids", self._ids)
            if m._logits_from:  # S == 1: every mode is the one row
                b.bind_cpu_input(LOGITS_FROM, _LOGITS_FROM_VALUES[self.logits])
            for k in m.state_names:
                b.bind_cpu_input(state_input_name(k), self._bufs[src][k])
                out = self._bufs[dst][k]
                b.bind_output(state_output_name(k), "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            b.bind_output("logits", "cpu", 0, self._logits_dtype, list(self._logits.shape),
                          self._logits.ctypes.data)
            self._bindings.append(b)
        self._batch = batch

    def _returned(self, current: int) -> BoundState:
        self._serial += 1
        self._current = current
        state = BoundState(self._bufs[current])
        state.decoder, state.serial = self, self._serial
        return state

    def __call__(self, input_ids, state: Mapping[str, Any] | None = None) -> tuple[np.ndarray, BoundState]:
        if isinstance(state, BoundState) and state.decoder is self:
            if state.serial != self._serial:
                raise ValueError("this state is not the last one the decoder returned, and later steps reuse "
                                 "its buffers: pass the last one, or copy the states you keep")
            ids = self.model._token_ids(input_ids)
            if ids.shape == self._ids.shape:  # a decode step on the bound buffers
                self._ids[...] = ids
                self.model.session.run_with_iobinding(self._bindings[self._current])
                return self._logits.astype(np.float32), self._returned(1 - self._current)
            state = {k: v.copy() for k, v in state.items()}  # the buffers may be reallocated below
        logits, new_state = self.model.run(input_ids, state, logits=self.logits)
        batch = logits.shape[0]
        if batch != self._batch:
            self._allocate(batch)
        for k, v in new_state.items():
            self._bufs[0][k][...] = v
        return logits, self._returned(0)

