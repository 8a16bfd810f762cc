"""Build TensorRT and TensorRT-RTX engines of exported xLSTM models, each with a build record.

    from xlstm_export.engine import build_engine, read_build_info
    build_engine("model.onnx", "model.engine", batch=(1, 1, 8), seq=(1, 128, 2048))  # runtime: auto
    info = read_build_info("model.engine")  # model.engine.json: runtime, precision, profile, cells...

Both runtimes import the file with TensorRT's ONNX parser into a strongly typed network (the
precision is the one the model was exported in); they differ in how the ``xlstm::mLSTM`` /
``xlstm::sLSTM`` nodes are compiled:
  * ``tensorrt`` (>= 10.9, builds and runs on an NVIDIA GPU): each node becomes the AOT plugin of
    :mod:`xlstm_export.plugins.tensorrt_plugins` (CUDA kernels in the plan), or with
    ``plugins=False`` the parser inlines the node's function body;
  * ``tensorrt-rtx`` (TensorRT for RTX; builds on any Linux x86-64 machine, no GPU needed; its
    engines run on RTX GPUs): no plugins, the parser always inlines the bodies.
An inlined body's Loop / Scan become TensorRT loops. The default runtime is ``tensorrt`` where it
imports and a CUDA GPU is present, else ``tensorrt-rtx``.

The build writes the engine and ``<engine>.json`` (the build record, :func:`read_build_info`):
runtime and version, precision, the optimization profile, the engine's I/O (names, dtypes, dims,
profile shapes), how each xlstm node was compiled (plugin / loop, from the parsed network's layers
and their ONNX metadata), a summary of the builder's layer report (ProfilingVerbosity DETAILED:
TensorRT-RTX prints it without a GPU), the model config and the ONNX file's sha256. Both are
written under temporary names in the destination folder and renamed into place: a failed build
leaves neither. The ONNX file's tokenizer files (``tokenizer.json`` and its companions beside it)
go beside the engine too, so that ``generate --prompt`` and ``serve`` find them there; a
destination folder holding another model's tokenizer is refused. Every argument, the file and
the destination are checked before the build starts; each problem is one ValueError /
RuntimeError / OSError naming the fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from . import contract
from .fsio import staged_files
from .interface import ENGINE_SUFFIXES  # noqa: F401  (re-exported: engine.ENGINE_SUFFIXES)
from .tokenizer import read_tokenizer_files, same_tokenizer_files, tokenizer_files_in, write_tokenizer_files

__all__ = ["RUNTIMES", "INSTALL_HINT", "RTX_INSTALL_HINT", "build_engine", "build_info_path",
           "default_runtime", "import_runtime", "inspect_onnx", "read_build_info", "runtime_available",
           "OnnxInterface", "file_sha256"]

log = logging.getLogger("xlstm_export.tensorrt")

INSTALL_HINT = (
    "TensorRT is not available: `pip install tensorrt` (>= 10.9, it brings the Python bindings with "
    "tensorrt.plugin) on a Linux machine with an NVIDIA GPU and driver, then retry. The ONNX file runs "
    "without TensorRT in onnxruntime (`xlstm-export validate` without --engine)."
)
RTX_INSTALL_HINT = (
    "TensorRT-RTX is not available: `pip install \"xlstm-export[tensorrt-rtx]\"` (the wheels "
    "tensorrt_rtx_cu13_libs and tensorrt_rtx_cu13_bindings, Linux x86-64; building needs no GPU)."
)

BATCH_NAMES = ("batch", "B")  # dim_params of the dynamic batch dim (export / cell models)
SEQUENCE_NAMES = ("sequence", "S")  # dim_params of the dynamic sequence dim
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
RECORD_FORMAT = 1  # version of the <engine>.json layout
DEFAULT_SEQ = (1, 128, 2048)  # (min, opt, max) sequence length of a profile: build_engine's and `build --seq`'s


@dataclass(frozen=True)
class Runtime:
    name: str  # "tensorrt" | "tensorrt-rtx"
    label: str  # for messages
    modules: tuple[str, ...]  # import names, the first that imports wins
    plugins: bool  # takes our AOT plugins
    hint: str  # how to install it


RUNTIMES = {
    "tensorrt": Runtime("tensorrt", "TensorRT", ("tensorrt",), True, INSTALL_HINT),
    # the tensorrt-rtx-cu13 metapackage adds `import tensorrt_rtx`; the wheels alone give tensorrt_rtx_bindings
    "tensorrt-rtx": Runtime("tensorrt-rtx", "TensorRT-RTX", ("tensorrt_rtx", "tensorrt_rtx_bindings"), False,
                            RTX_INSTALL_HINT),
}


def _runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}: choose one of {sorted(RUNTIMES)}")
    return RUNTIMES[name]


def import_runtime(name: str):
    """The bindings module of runtime ``name``, or one RuntimeError saying what to install."""
    rt = _runtime(name)
    for module in rt.modules:
        try:
            return __import__(module)
        except ImportError:
            continue
    raise RuntimeError(rt.hint)


def runtime_available(name: str) -> bool:
    try:
        import_runtime(name)
    except RuntimeError:
        return False
    return True


def _cuda_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def default_runtime() -> str:
    """``tensorrt`` where it imports and a CUDA GPU is present, else ``tensorrt-rtx``."""
    if runtime_available("tensorrt") and _cuda_gpu():
        return "tensorrt"
    if runtime_available("tensorrt-rtx"):
        return "tensorrt-rtx"
    raise RuntimeError("no engine builder here: TensorRT with a GPU or TensorRT-RTX is needed. "
                       f"{RTX_INSTALL_HINT} Or: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# the ONNX side (no TensorRT needed)
# ---------------------------------------------------------------------------------------------


def _onnx_dtype_name(elem: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem != onnx.TensorProto.BFLOAT16 else "bfloat16"


@dataclass
class OnnxInterface:
    """What an exported file declares: the graph I/O, the compute dtype, its xlstm nodes."""

    inputs: dict[str, tuple[str, list[int | str]]]  # name -> (dtype, dims: int or dim_param)
    outputs: dict[str, tuple[str, list[int | str]]]
    dtype: str  # "float32" | "float16" | "bfloat16"
    xlstm_nodes: list[tuple[str, str]]  # (node name, op type) in graph order
    config: dict | None  # the model config (metadata xlstm_export.config), None for a cell model
    metadata: dict[str, str]  # the xlstm_export.* metadata, prefix removed


def inspect_onnx(onnx_path: str | os.PathLike) -> OnnxInterface:
    """Read an exported file's interface without its weights' external data.

    Raises FileNotFoundError for a missing file and ValueError for a file that is not ONNX or not
    an xlstm-export file (neither an ``xlstm`` node nor ``xlstm_export.*`` metadata: an ``--inline``
    export keeps the metadata).
    """
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(onnx_path)
    if not p.is_file():
        raise FileNotFoundError(f"ONNX model not found: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise ValueError(f"{p}: not an ONNX model ({type(e).__name__}: {e})") from None
    meta = {q.key[len("xlstm_export."):]: q.value for q in model.metadata_props
            if q.key.startswith("xlstm_export.")}
    nodes = [(n.name, n.op_type) for n in model.graph.node if n.domain == contract.DOMAIN]
    if not nodes and "format" not in meta:
        raise ValueError(f"{p}: not an xlstm-export model (no {contract.DOMAIN}:: node and no xlstm_export "
                         "metadata); build engines from files written by `xlstm-export export`")

    def io(values):
        out = {}
        for vi in values:
            dims = [int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in vi.type.tensor_type.shape.dim]
            out[vi.name] = (_onnx_dtype_name(vi.type.tensor_type.elem_type), dims)
        return out

    _check_external_data(p, model)
    inputs, outputs = io(model.graph.input), io(model.graph.output)
    if "dtype" in meta:
        dtype = contract.canonical_dtype(meta["dtype"])
    else:  # cell models: the first output's element type
        dtype = next(iter(outputs.values()))[0]
        if dtype not in PRECISIONS.values():
            raise ValueError(f"{p}: first output has element type {dtype}; expected float32/float16/bfloat16")
    for name, (_, dims) in inputs.items():
        for d in dims:
            if isinstance(d, str):
                _dim_kind(name, d)
    config = json.loads(meta["config"]) if "config" in meta else None
    return OnnxInterface(inputs, outputs, dtype, nodes, config, meta)


def _check_external_data(path: Path, model) -> None:
    """Every initializer stored outside ``path`` (``<name>.data``) lies whole in its file beside it:
    else one FileNotFoundError / ValueError naming the file (TensorRT's parser only says that it
    failed to import the first such initializer)."""
    import onnx

    sizes: dict[str, int | None] = {}
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entry = {e.key: e.value for e in t.external_data}
        location = entry.get("location", "")
        data = path.parent / location
        if location not in sizes:
            sizes[location] = data.stat().st_size if location and data.is_file() else None
        if sizes[location] is None:
            raise FileNotFoundError(f"{path}: its weights are stored in {data}, which is missing: keep the "
                                    f"{Path(location).name or '.data'} file beside the .onnx file (or export again)")
        end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
        if end > sizes[location]:
            raise ValueError(f"{path}: {data} holds {sizes[location]} bytes, but tensor {t.name} ends at byte {end}: "
                             "the data file is truncated or belongs to another export")


def _dim_kind(input_name: str, dim: int | str) -> str:
    if dim in BATCH_NAMES:
        return "batch"
    if dim in SEQUENCE_NAMES:
        return "sequence"
    raise ValueError(f"input {input_name}: dynamic dim {dim!r} is neither batch {BATCH_NAMES} nor sequence "
                     f"{SEQUENCE_NAMES}; export with static dims except batch and sequence")


MAX_PROFILE_DIM = 2**31 - 1  # TensorRT's profile shapes are int32: a larger value wraps around (no error)


def _check_range(name: str, r: Sequence[int]) -> tuple[int, int, int]:
    if (len(r) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)
            or not 1 <= r[0] <= r[1] <= r[2]):
        raise ValueError(f"{name} range must be (min, opt, max) ints with 1 <= min <= opt <= max, got {r!r}")
    if r[2] > MAX_PROFILE_DIM:
        raise ValueError(f"{name} range {tuple(r)}: TensorRT's profile dims are int32, at most {MAX_PROFILE_DIM}")
    return tuple(r)  # type: ignore[return-value]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the destination: two temporary files renamed into place
# ---------------------------------------------------------------------------------------------


def build_info_path(engine_path: str | os.PathLike) -> Path:
    """``model.engine`` -> ``model.engine.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def _tokenizer_to_carry(onnx_path: Path, engine_path: Path) -> dict[str, bytes]:
    """The tokenizer files (``read_tokenizer_files``) of ``onnx_path`` to write beside the engine:
    none when they are there already (the same folder, or the same bytes). ValueError when the
    engine's folder holds other tokenizer files, which would then be read as the engine's; a
    TokenizerError (a ValueError) when the ONNX file's own are unusable."""
    if engine_path.parent.resolve() == onnx_path.parent.resolve():
        return {}
    files = read_tokenizer_files(onnx_path.parent)
    present = tokenizer_files_in(engine_path.parent)
    if not present:
        return files
    if same_tokenizer_files(present, files):
        return {}
    theirs = "has none" if not files else "has other ones"
    raise ValueError(f"cannot build {engine_path}: {engine_path.parent} holds tokenizer files "
                     f"({', '.join(sorted(present))}) that the engine would be read with, and {onnx_path.name} "
                     f"{theirs}; build the engine into a folder of its own, or beside {onnx_path.name}")


def _stage(stack: contextlib.ExitStack, engine_path: Path) -> Path:
    """A staging folder beside the engine, made up front (so an unwritable folder fails before the
    build); the engine and its record written there move in at the end, the record last."""
    parent = engine_path.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise OSError(f"cannot write {engine_path}: {parent} {why}")
    if engine_path.is_dir():
        raise OSError(f"cannot write {engine_path}: it is a directory")
    try:
        return stack.enter_context(staged_files(parent, last=build_info_path(engine_path).name))
    except OSError as e:
        raise OSError(f"cannot write {engine_path}: directory {parent} is not writable "
                      f"({e.strerror or e})") from None


# ---------------------------------------------------------------------------------------------
# reading the network and the builder's log
# ---------------------------------------------------------------------------------------------


REPORT_HEADS = ("Layers:", "Engine Layer Information:")  # the builder's layer report (VERBOSE)


def _make_logger(trt, verbose: bool):
    """A TensorRT ILogger: errors to this module's logger, everything else to debug when
    ``verbose`` (inlining a function twice alone draws one warning per body node: "a node named ...
    already exists"); keeps the errors, counts the warnings, keeps the builder's layer report."""

    class Capture(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.layer_report: str | None = None
            self.errors: list[str] = []
            self.warnings = 0

        def log(self, severity, msg):
            if msg.lstrip().startswith(REPORT_HEADS):
                self.layer_report = msg
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("[%s] %s", trt.__name__, msg)
            elif severity == trt.ILogger.WARNING:
                self.warnings += 1
                if verbose:
                    log.warning("[%s] %s", trt.__name__, msg)
            elif verbose:
                log.debug("[%s] %s", trt.__name__, msg)

    return Capture()


_META_RE = re.compile(r"^\[ONNX Layer: (?P<node>[^|\]]*?)(?: \| (?P<chain>.*))?\]$")
_CHAIN_RE = re.compile(r"(\S+) \((\w+)\)")


def _layer_nodes(metadata: str) -> set[str]:
    """ONNX node names in a layer's metadata: the node and the function call sites around it
    (``[ONNX Layer: sb_n_Add_12 | sLSTM_1 (sLSTM)]``)."""
    m = _META_RE.match(metadata or "")
    if not m:
        return set()
    return {m["node"].strip(), *(name for name, _ in _CHAIN_RE.findall(m["chain"] or ""))}


def _loop_name(trt, layer) -> str:
    cls = {trt.LayerType.TRIP_LIMIT: trt.ITripLimitLayer, trt.LayerType.RECURRENCE: trt.IRecurrenceLayer,
           trt.LayerType.ITERATOR: trt.IIteratorLayer, trt.LayerType.LOOP_OUTPUT: trt.ILoopOutputLayer}
    layer.__class__ = cls[layer.type]  # the bindings' documented downcast
    return layer.loop.name


def _compiled_cells(trt, network, nodes: list[tuple[str, str]]) -> tuple[list[dict], list[str]]:
    """How each xlstm node was compiled, read from the parsed network.

    The parser imports nodes in order and a function body contiguously, each layer's metadata
    naming its node and call site: a node's layers span from its first to its last tagged layer
    (untagged helpers and loop boundaries in between included). A plugin layer there: "plugin";
    loop boundary layers: "loop" (the loops named after the body's Loop / Scan nodes); else
    "inline"; "unknown" where no layer names the node. Returns (one dict per node, the distinct
    loop names in the network: a body inlined twice gives its loops the same names, so their count
    is a lower bound of the loop count).
    """
    loop_types = {trt.LayerType.TRIP_LIMIT, trt.LayerType.RECURRENCE, trt.LayerType.ITERATOR,
                  trt.LayerType.LOOP_OUTPUT}
    plugin_types = {getattr(trt.LayerType, t) for t in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
                    if hasattr(trt.LayerType, t)}
    layers = [network.get_layer(j) for j in range(network.num_layers)]
    names = {name for name, _ in nodes}
    span: dict[str, list[int]] = {}
    for j, layer in enumerate(layers):  # a plugin layer also carries its node's name
        for name in (_layer_nodes(getattr(layer, "metadata", "")) | {layer.name}) & names:
            span.setdefault(name, [j, j])[1] = j
    all_loops = sorted({_loop_name(trt, layer) for layer in layers if layer.type in loop_types})
    cells = []
    for name, op in nodes:
        if name not in span:  # a parser that tags layers otherwise: say so, do not guess
            log.warning("no network layer names node %s (%s) in its metadata: its compilation is unknown", name, op)
            cells.append({"node": name, "op": op, "compiled_as": "unknown", "layers": 0, "loops": []})
            continue
        first, last = span[name]
        own = layers[first:last + 1]
        loops = sorted({_loop_name(trt, lay) for lay in own if lay.type in loop_types})
        plugin = any(lay.type in plugin_types for lay in own)
        cells.append({"node": name, "op": op, "compiled_as": "plugin" if plugin else "loop" if loops else "inline",
                      "layers": len(own), "loops": loops})
    return cells, all_loops


_REPORT_LAYER_RE = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),", re.M)
_REPORT_TENSOR_RE = re.compile(r"\{ Name: (?P<name>[^,]*), [^{}]*?Datatype: (?P<dtype>\w+)")
_REPORT_DTYPES = {"Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Int64": "int64",
                  "Int32": "int32", "Bool": "bool", "Int8": "int8"}


def _engine_report(text: str | None, io_names: set[str]) -> dict | None:
    """Summary of the builder's layer report (the built engine's layers, one ``Name: ...,
    LayerType: ..., Inputs: [...], Outputs: [...]`` line each): the layer count, the layer types,
    and the dtype of each graph input / output as the engine's layers read or write it. (The dims
    there are the layers' views, e.g. logits flattened to (B*S, vocab), not the I/O dims.)"""
    if not text:
        return None
    types = Counter(m["type"].strip() for m in _REPORT_LAYER_RE.finditer(text))
    io_dtypes: dict[str, str] = {}
    for m in _REPORT_TENSOR_RE.finditer(text):
        if m["name"] in io_names:
            io_dtypes.setdefault(m["name"], _REPORT_DTYPES.get(m["dtype"], m["dtype"]))
    return {"layers": sum(types.values()), "layer_types": dict(types.most_common()), "io_dtypes": io_dtypes}


def _trt_dtype(trt, dtype) -> str:
    table = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int64: "int64",
             trt.int32: "int32", trt.bool: "bool", trt.int8: "int8"}
    return table.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    runtime: str | None = None,  # "tensorrt" | "tensorrt-rtx"; None: default_runtime()
    plugins: bool | None = None,  # our AOT plugins (TensorRT only); None: where the runtime takes them
    precision: str | None = None,  # "fp32" | "fp16" | "bf16": must match the export (strongly typed)
    batch: Sequence[int] = (1, 1, 8),  # (min, opt, max) batch size of the profile
    seq: Sequence[int] = DEFAULT_SEQ,  # (min, opt, max) sequence length; min 1 (decode steps)
    workspace_gib: float | None = None,  # builder workspace limit; None: the runtime's default
    verbose: bool = False,  # every builder message to this module's logger (debug)
) -> Path:
    """Build an engine and its record ``<engine>.json`` from an exported ONNX model; returns
    ``engine_path``. See the module docstring for what is checked and recorded.

    workspace_gib: the builder's workspace memory limit in GiB (None: the runtime's default).
    verbose: every TensorRT message to the ``xlstm_export.tensorrt`` logger (warnings as warnings,
    the rest as debug); errors are logged either way."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if engine_path.suffix not in ENGINE_SUFFIXES:
        raise ValueError(f"engine path must end in {' or '.join(ENGINE_SUFFIXES)}, got {str(engine_path)!r}")
    if engine_path.resolve() == onnx_path.resolve():
        raise ValueError(f"{engine_path}: the engine would overwrite the ONNX file it is built from")
    for target in (engine_path, build_info_path(engine_path)):  # before the build, not after it
        if target.is_dir():
            raise OSError(f"cannot write {target}: it is a directory")
    iface = inspect_onnx(onnx_path)
    batch, seq = _check_range("batch", batch), _check_range("seq", seq)
    if workspace_gib is not None and not (isinstance(workspace_gib, (int, float)) and 0 < workspace_gib < math.inf):
        raise ValueError(f"workspace_gib must be a number of GiB > 0 (None: the runtime's default), got {workspace_gib!r}")
    if seq[0] != 1:
        raise ValueError(f"the sequence range {seq} excludes 1: decode steps run at S = 1, so the profile's "
                         f"minimum sequence length must be 1 (e.g. --seq {' '.join(map(str, DEFAULT_SEQ))})")
    if precision is not None:
        want = PRECISIONS.get(precision, precision)
        if contract.canonical_dtype(want) != iface.dtype:
            raise ValueError(
                f"--{precision} asked, but {onnx_path.name} was exported in {iface.dtype}. TensorRT "
                "networks are strongly typed (the precision is the ONNX model's): re-export with "
                f"--dtype {precision}, or build without a precision flag")
    tokenizer = _tokenizer_to_carry(onnx_path, engine_path)
    rt = _runtime(runtime or default_runtime())
    if rt.name == "tensorrt" and runtime_available("tensorrt") and not _cuda_gpu():
        raise RuntimeError("TensorRT builds engines on a CUDA GPU and none is available here; --runtime "
                           "tensorrt-rtx builds from the function bodies without one")
    if plugins is None:
        plugins = rt.plugins
    if plugins and not rt.plugins:
        raise ValueError(f"{rt.label} supports no plugins: it builds the xlstm nodes from their function bodies")
    try:
        trt = import_runtime(rt.name)
    except RuntimeError as exc:
        if rt.name == "tensorrt" and runtime_available("tensorrt-rtx"):
            raise RuntimeError(f"{exc} TensorRT-RTX is installed here: --runtime tensorrt-rtx builds from the "
                               "function bodies without a GPU.") from None
        raise
    if plugins:
        try:
            from .plugins import tensorrt_plugins  # noqa: F401  registers xlstm::mLSTM / xlstm::sLSTM
        except ImportError as exc:
            raise RuntimeError(f"{exc}. {INSTALL_HINT}") from exc
    record_path = build_info_path(engine_path)
    with contextlib.ExitStack() as stack:
        stage = _stage(stack, engine_path)
        record, serialized = _build(trt, rt, plugins, onnx_path, iface, batch, seq, workspace_gib, verbose)
        t_write = time.perf_counter()
        record["engine"] = {"file": engine_path.name, "bytes": serialized.nbytes}
        (stage / engine_path.name).write_bytes(memoryview(serialized))
        write_tokenizer_files(tokenizer, stage)
        (stage / record_path.name).write_text(json.dumps(record, indent=2) + "\n")
        # never an engine beside another build's record: old record out, engine in, record in
        record_path.unlink(missing_ok=True)
    log.info("[%s] wrote %s (%.1f MiB) and %s in %.1f s", rt.name, engine_path, engine_path.stat().st_size / 2**20,
             record_path.name, record["build_seconds"] + time.perf_counter() - t_write)
    return engine_path


def _build(trt, rt: Runtime, plugins: bool, onnx_path: Path, iface: OnnxInterface, batch, seq,
           workspace_gib, verbose) -> tuple[dict, Any]:
    """Parse, read the network, build: (the build record, the serialized engine)."""
    t0 = time.perf_counter()
    logger = _make_logger(trt, verbose)
    builder = trt.Builder(logger)
    flags = 0
    for flag in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):  # STRONGLY_TYPED: implicit in TRT 11
        if (flag == "STRONGLY_TYPED" or plugins) and hasattr(trt.NetworkDefinitionCreationFlag, flag):
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log.info("[%s] parsing %s (%s, %s %s)", rt.name, onnx_path, iface.dtype, rt.label, trt.__version__)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{rt.label} could not parse {onnx_path}:\n{errors}")
    cells, loops = _compiled_cells(trt, network, iface.xlstm_nodes)
    n_plugins = sum(c["compiled_as"] == "plugin" for c in cells)
    if not plugins and n_plugins:
        raise RuntimeError(f"{n_plugins} xlstm node(s) became plugins although plugins were not asked for: the "
                           "xlstm plugins are registered in this process; build without plugins in a fresh one")
    log.info("[%s] network: %d layers, %d xlstm plugin layers, %d inputs, %d outputs", rt.name,
             network.num_layers, n_plugins, network.num_inputs, network.num_outputs)
    for c in cells:
        log.info("[%s]   %s (xlstm::%s): %s, %d layers%s", rt.name, c["node"], c["op"], c["compiled_as"],
                 c["layers"], f", loops {', '.join(c['loops'])}" if c["loops"] else "")

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the layer report in the log
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    ranges = {"batch": batch, "sequence": seq}
    inputs, outputs = [], []
    for j in range(network.num_inputs):
        tensor = network.get_input(j)
        if tensor.name not in iface.inputs:
            raise RuntimeError(f"network input {tensor.name} is not a graph input of {onnx_path}")
        onnx_dims = iface.inputs[tensor.name][1]
        shapes: list[list[int]] = [[], [], []]
        for d_trt, d_onnx in zip(tensor.shape, onnx_dims):
            r = (int(d_trt),) * 3 if d_trt >= 0 else ranges[_dim_kind(tensor.name, d_onnx)]
            for s, v in zip(shapes, r):
                s.append(int(v))
        profile.set_shape(tensor.name, *shapes)
        got = [list(s) for s in profile.get_shape(tensor.name)]  # what the profile holds
        inputs.append({"name": tensor.name, "dtype": _trt_dtype(trt, tensor.dtype), "dims": list(tensor.shape),
                       "min": got[0], "opt": got[1], "max": got[2]})
    for j in range(network.num_outputs):
        tensor = network.get_output(j)
        outputs.append({"name": tensor.name, "dtype": _trt_dtype(trt, tensor.dtype), "dims": list(tensor.shape)})
    config.add_optimization_profile(profile)
    log.info("[%s] building: batch %s, sequence %s (min, opt, max)", rt.name, batch, seq)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "\n".join(logger.errors[-5:])
        raise RuntimeError(f"{rt.label} failed to build an engine from {onnx_path}" + (f":\n{detail}" if detail else ""))
    seconds = time.perf_counter() - t0
    record = {
        "format": RECORD_FORMAT,
        "runtime": rt.name,
        "runtime_version": trt.__version__,
        "precision": iface.dtype,
        "plugins": bool(plugins),  # False: the xlstm nodes run their function bodies
        "profiles": [{"batch": list(batch), "sequence": list(seq)}],
        "inputs": inputs,
        "outputs": outputs,
        "cells": cells,
        "network": {"layers": network.num_layers, "loop_names": loops},
        "warnings": logger.warnings,
        "engine_report": _engine_report(logger.layer_report, {t["name"] for t in inputs + outputs}),
        "build_seconds": round(seconds, 3),
        "onnx": {"file": str(onnx_path.resolve()), "sha256": file_sha256(onnx_path),
                 "metadata": {k: v for k, v in iface.metadata.items() if k != "config"}},
        "model_config": iface.config,
    }
    return record, serialized


# ---------------------------------------------------------------------------------------------
# reading the record
# ---------------------------------------------------------------------------------------------


def read_build_info(engine_path: str | os.PathLike) -> dict[str, Any] | None:
    """The build record of ``engine_path`` (``<engine>.json``), or None if there is none (an engine
    built elsewhere). Raises ValueError when the record is unreadable or describes another engine."""
    engine_path = Path(engine_path)
    path = build_info_path(engine_path)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable build record ({e})") from None
    if not isinstance(info, dict) or info.get("format") != RECORD_FORMAT or info.get("runtime") not in RUNTIMES:
        raise ValueError(f"{path}: not a build record of this version (format {RECORD_FORMAT})")
    size = engine_path.stat().st_size if engine_path.is_file() else None
    if size != info.get("engine", {}).get("bytes"):
        raise ValueError(f"{path} describes an engine of {info.get('engine', {}).get('bytes')} bytes, "
                         f"{engine_path} has {size}: rebuild with `xlstm-export build`")
    return info
