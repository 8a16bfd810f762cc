"""`xlstm-export triton-repo`: a Triton Inference Server model repository for an exported model.

    write_triton_repo("model.onnx", "repo")           # repo/xlstm/config.pbtxt, repo/xlstm/1/model.onnx
    write_triton_repo("model.engine", "repo")         # repo/xlstm/1/model.plan (TensorRT, GPU)

The recurrent state lives in Triton (implicit state management): every ``past.<k>`` input /
``present.<k>`` output pair of the export is one ``sequence_batching.state`` entry whose
``initial_state`` is zeros, so a sequence starts from a fresh state and each request carries only
``input_ids``; Triton feeds request i's ``present.<k>`` back as request i+1's ``past.<k>``. The
"oldest" strategy batches the next requests of up to ``max_batch`` live sequences into one run, so
it needs none of the READY / START control tensors (the model has no such inputs, and Triton's
onnxruntime backend refuses controls the model does not take): the zero ``initial_state`` is the
start, and a client's ``sequence_end`` frees the slot.

Triton pairs each output state with an input state by rank in two name-sorted maps
(triton-inference-server/server#8586), not by the configured pair: states whose names order
differently as inputs and as outputs (``x`` / ``x_len`` with outputs ``x_next`` / ``x_len_next``)
are swapped. Our names are one prefix plus the same key (``past.0.c`` / ``present.0.c``), and a
common prefix keeps the order, so ``state_order_safe`` holds for every export; it is checked before
anything is written, as is each ``present.<k>``'s dtype and dims against its ``past.<k>``.

Tensor types per backend: Triton's onnxruntime backend maps no BF16 tensor
(``ModelConfigDataTypeToOnnxDataType``; triton-inference-server/server#8464) and refuses such a
model at load, so a bfloat16 .onnx export is refused here (export with ``--dtype fp16`` or
``fp32``); the tensorrt backend takes BF16 (triton-inference-server/tensorrt_backend#90).

An engine's optimization profile bounds the batches Triton may run: its maximum caps
``max_batch_size``, and its minimum must be 1, since the sequence batcher runs what is ready (one
live sequence is a batch of 1) and the tensorrt backend fails a batch outside the profile.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .fsio import atomic_dir
from .interface import model_file_kind

__all__ = ["ModelInterface", "config_pbtxt", "model_interface", "state_order_safe", "write_triton_repo"]

DEFAULT_MAX_BATCH = 32
IDLE_MICROSECONDS = 60_000_000  # a sequence with no request for this long is dropped (Triton's default: 1 s)
QUEUE_DELAY_MICROSECONDS = 100  # how long the oldest strategy waits to fill a batch

_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32"}
# the Triton types each backend maps to its framework's tensors (onnxruntime_backend has no BF16: server#8464)
_BACKEND_TYPES = {"onnxruntime": {"TYPE_FP32", "TYPE_FP16", "TYPE_INT64", "TYPE_INT32"},
                  "tensorrt": {"TYPE_FP32", "TYPE_FP16", "TYPE_BF16", "TYPE_INT64", "TYPE_INT32"}}
_KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}  # --device -> instance_group kind
# a model name is a folder name and a quoted string in config.pbtxt: nothing that needs escaping
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_PAST, _PRESENT = "past.", "present."


@dataclass
class ModelInterface:
    kind: str  # "onnx" | "plan"
    path: Path
    ids_dtype: str  # input_ids
    logits_dtype: str
    vocab_size: int
    states: list[tuple[str, str, tuple[int, ...], str]]  # (input name, output name, dims after batch, dtype)
    max_batch: int | None  # an engine's profile maximum; None for ONNX (any batch)
    files: list[Path]  # what goes into the version folder (the model, its external data)


def state_order_safe(pairs: list[tuple[str, str]]) -> bool:
    """True when Triton's pairing by sorted rank (server#8586) gives every (input, output) pair."""
    ins = sorted(i for i, _ in pairs)
    outs = sorted(o for _, o in pairs)
    return all(ins.index(i) == outs.index(o) for i, o in pairs)


def model_interface(path: str | os.PathLike) -> ModelInterface:
    p = Path(path)
    kind = model_file_kind(p)
    if kind == "onnx":
        return _onnx_interface(p)
    if kind == "engine":
        return _engine_interface(p)
    raise ValueError(f"{p}: expected an .onnx file or a TensorRT .engine / .plan")


def _onnx_interface(p: Path) -> ModelInterface:
    import onnx

    from .ort import inspect_model

    info = inspect_model(p)  # raises for anything that is not one of ours
    model = onnx.load(str(p), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    name = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
            onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}
    if info["vocab_size"] is None:
        raise ValueError(f"{p}: the logits have no static vocabulary dim")
    states = [(_PAST + k, _PRESENT + k, tuple(info["state_shapes"][k]), name[types[_PAST + k]])
              for k in info["state_names"]]
    outs = {v.name: v.type.tensor_type for v in model.graph.output}
    for inp, out, dims, dt in states:
        t = outs[out]
        out_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
        out_dtype = name.get(t.elem_type) or onnx.TensorProto.DataType.Name(t.elem_type).lower()
        _check_state_pair(p, inp, out, dims, dt, out_dims, out_dtype)
    locations = sorted({e.value for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    files = [p, *(p.parent / loc for loc in locations)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{p}: its external data file {missing[0]} is missing")
    return ModelInterface("onnx", p, name[types["input_ids"]], info["dtype"], int(info["vocab_size"]), states,
                          None, files)


def _all_tensors(model):
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t


def _engine_interface(p: Path) -> ModelInterface:
    from .engine import read_build_info

    info = read_build_info(p)
    if info is None:
        raise ValueError(f"{p}: no build record ({p.name}.json) beside it, so its tensors are unknown here: "
                         "build the engine with `xlstm-export build`, or give the .onnx file")
    if info["runtime"] != "tensorrt":
        raise ValueError(f"{p} is a {info['runtime']} engine; Triton's tensorrt backend runs TensorRT plans only "
                         "(give the .onnx file for Triton's onnxruntime backend)")
    ins = {t["name"]: t for t in info["inputs"]}
    outs = {t["name"]: t for t in info["outputs"]}
    keys = [n[len(_PAST):] for n in ins if n.startswith(_PAST)]
    states = []
    for k in keys:
        dims = tuple(int(d) for d in ins[_PAST + k]["dims"][1:])
        if any(d < 0 for d in dims) or _PRESENT + k not in outs:
            raise ValueError(f"{p}: state {k!r} has dynamic dims after the batch or no present.{k} output")
        out = outs[_PRESENT + k]
        _check_state_pair(p, _PAST + k, _PRESENT + k, dims, ins[_PAST + k]["dtype"],
                          [int(d) for d in out["dims"][1:]], out["dtype"])
        states.append((_PAST + k, _PRESENT + k, dims, ins[_PAST + k]["dtype"]))
    vocab = int(outs["logits"]["dims"][-1])
    if vocab < 0:
        raise ValueError(f"{p}: the logits have no static vocabulary dim")
    min_batch, _, max_batch = (int(b) for b in info["profiles"][0]["batch"])
    if min_batch != 1:
        # the sequence batcher runs whatever is ready, down to one live sequence, and Triton's tensorrt
        # backend fails a batch below the profile's minimum ("request specifies invalid shape for
        # input": TRTv3Interface::SetBindingDimensions, tensorrt_backend src/instance_state.cc)
        raise ValueError(f"{p}: its profile's batch range starts at {min_batch}, but Triton's sequence batcher "
                         "runs batches of any size from 1 (a single live sequence is a batch of 1) and its "
                         f"tensorrt backend fails those below {min_batch}: rebuild with `xlstm-export build "
                         "--batch 1 OPT MAX`")
    return ModelInterface("plan", p, ins["input_ids"]["dtype"], outs["logits"]["dtype"], vocab, states, max_batch, [p])


def _check_state_pair(p: Path, inp: str, out: str, dims: tuple[int, ...], dtype: str,
                      out_dims: list[int], out_dtype: str) -> None:
    """Triton feeds ``out`` back as ``inp``: the same dtype and dims after the batch (-1: a dim the
    file leaves open, which Triton fixes from the input's)."""
    if out_dtype != dtype or len(out_dims) != len(dims) or any(o >= 0 and o != d for o, d in zip(out_dims, dims)):
        raise ValueError(f"{p}: state output {out} ({out_dtype}, dims after the batch {list(out_dims)}) does not "
                         f"match its input {inp} ({dtype}, {list(dims)}): Triton feeds each output back as its "
                         "input, so they must agree")


def _check_name(name: str) -> None:
    """A model name Triton takes as a folder and in config.pbtxt: letters, digits, ``_``, ``.``,
    ``-``, not starting with ``.``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"--name {name!r}: a model name here is letters, digits, '_', '.' and '-', not starting "
                         "with '.' (e.g. xlstm)")


def _check_device(device: str) -> None:
    if device not in _KINDS:
        raise ValueError(f"--device must be 'cpu' or 'gpu', got {device!r}")


def _dims(d) -> str:
    return "[ " + ", ".join(str(int(x)) for x in d) + " ]"


def _check_instances(instances: int) -> None:
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"--instances must be an integer >= 1, got {instances!r}")


def config_pbtxt(iface: ModelInterface, *, name: str, max_batch: int, device: str, instances: int = 1) -> str:
    """The model's config.pbtxt (Triton's ModelConfig in protobuf text format). ``device``: "cpu" |
    "gpu"; ``instances``: the instance group's count (model instances Triton runs side by side, each
    with its own sequence slots). Raises ValueError for a name, device, instance count or tensor
    type the backend does not take."""
    _check_name(name)
    _check_device(device)
    _check_instances(instances)
    backend = "onnxruntime" if iface.kind == "onnx" else "tensorrt"
    tensors = [("input_ids", iface.ids_dtype), ("logits", iface.logits_dtype), *((s[0], s[3]) for s in iface.states)]
    for tensor, dt in tensors:
        if dt not in _TRITON_TYPES:
            raise ValueError(f"{iface.path}: tensor type {dt} has no Triton type here")
        if _TRITON_TYPES[dt] not in _BACKEND_TYPES[backend]:
            fix = ("export with --dtype fp16 or --dtype fp32 (triton-inference-server/server#8464; Triton's "
                   "tensorrt backend takes BF16: an engine built from this export serves)") if dt == "bfloat16" \
                else f"it takes {', '.join(sorted(_BACKEND_TYPES[backend]))}"
            raise ValueError(f"{iface.path}: {tensor} is {dt}, and Triton's {backend} backend has no "
                             f"{_TRITON_TYPES[dt]} tensors, so it would refuse the model at load: {fix}")
    filename = "model.onnx" if iface.kind == "onnx" else "model.plan"
    kind = _KINDS[device]
    lines = [
        f'name: "{name}"',
        f'backend: "{backend}"',
        f'default_model_filename: "{filename}"',
        f"max_batch_size: {max_batch}",
        "input [",
        f'  {{ name: "input_ids" data_type: {_TRITON_TYPES[iface.ids_dtype]} dims: [ -1 ] }}',
        "]",
        "output [",
        f'  {{ name: "logits" data_type: {_TRITON_TYPES[iface.logits_dtype]} dims: [ -1, {iface.vocab_size} ] }}',
        "]",
        "sequence_batching {",
        f"  max_sequence_idle_microseconds: {IDLE_MICROSECONDS}",
        "  oldest {",
        f"    max_candidate_sequences: {max_batch}",
        f"    max_queue_delay_microseconds: {QUEUE_DELAY_MICROSECONDS}",
        "  }",
        "  state [",
    ]
    for j, (inp, out, dims, dt) in enumerate(iface.states):
        t = _TRITON_TYPES[dt]
        lines += [
            "    {",
            f'      input_name: "{inp}"',
            f'      output_name: "{out}"',
            f"      data_type: {t}",
            f"      dims: {_dims(dims)}",
            "      initial_state: {",
            f"        data_type: {t}",
            f"        dims: {_dims(dims)}",
            "        zero_data: true",
            f'        name: "zero {inp}"',
            "      }",
            "    }" + ("," if j + 1 < len(iface.states) else ""),
        ]
    lines += [
        "  ]",
        "}",
        "instance_group [",
        f"  {{ kind: {kind} count: {instances} }}",
        "]",
    ]
    return "\n".join(lines) + "\n"


def write_triton_repo(model: str | os.PathLike, repo: str | os.PathLike, *, name: str = "xlstm",
                      max_batch: int | None = None, device: str | None = None, instances: int = 1,
                      overwrite: bool = False) -> Path:
    """Write ``repo/<name>/config.pbtxt`` and ``repo/<name>/1/<model file>``; returns ``repo/<name>``.
    The folder is assembled under a temporary name and renamed into place; on failure nothing new
    is left behind (folders made for ``repo`` are removed again).

    name: the Triton model name (letters, digits, ``_ . -``; not starting with ``.``). max_batch:
    Triton's max_batch_size (default 32; an engine's profile maximum). device: "cpu" | "gpu" for
    an .onnx model (default "cpu"; an engine is "gpu"). instances: model instances Triton runs side
    by side (the instance group's count, default 1); the sequence batcher keeps each sequence on
    one instance, each instance batching up to ``max_batch`` of its own. Raises ValueError for what
    Triton would refuse (see the module docstring), FileNotFoundError for a missing external data
    file."""
    _check_name(name)
    _check_instances(instances)
    if device is not None:
        _check_device(device)
    iface = model_interface(model)
    pairs = [(i, o) for i, o, _, _ in iface.states]
    if not state_order_safe(pairs):
        raise ValueError(f"{model}: Triton would pair these states wrongly (server#8586: pairs are matched by "
                         f"sorted name rank): {pairs}")
    if iface.kind == "plan":
        if device == "cpu":
            raise ValueError("a TensorRT engine runs on a GPU: --device cpu applies to an .onnx model")
        device = "gpu"
        if max_batch is not None and max_batch > iface.max_batch:
            raise ValueError(f"--max-batch {max_batch} exceeds the engine's profile maximum {iface.max_batch}")
        max_batch = max_batch or iface.max_batch
    device = device or "cpu"
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    text = config_pbtxt(iface, name=name, max_batch=max_batch, device=device, instances=instances)

    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ValueError(f"{repo}: exists and is not a directory")
    final = repo / name
    if final.exists() and not overwrite:
        raise ValueError(f"{final} exists: pass --overwrite to replace it")
    made = _missing_folders(repo)  # made here, removed again if the write fails
    try:
        repo.mkdir(parents=True, exist_ok=True)
        with atomic_dir(final) as tmp:
            version = tmp / "1"
            version.mkdir()
            main_file = "model.onnx" if iface.kind == "onnx" else "model.plan"
            shutil.copyfile(iface.files[0], version / main_file)
            for f in iface.files[1:]:  # external data keeps its relative location
                (version / f.relative_to(iface.path.parent)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, version / f.relative_to(iface.path.parent))
            (tmp / "config.pbtxt").write_text(text)
    except BaseException:
        for d in made:  # innermost first; only while empty (never what someone else put there)
            try:
                d.rmdir()
            except FileNotFoundError:  # mkdir failed before making it
                continue
            except OSError:
                break
        raise
    return final


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing
