"""Build, run and validate TensorRT engines of exported xLSTM models.

    from xlstm_export.tensorrt import build_engine, TrtModel, validate_engine
    build_engine("model.onnx", "model.plan", batch=(1, 1, 8), seq=(1, 128, 4096))
    report = validate_engine("model.onnx", "model.plan")        # TensorRT vs onnxruntime
    model = TrtModel("model.plan")
    logits, state = model.run(input_ids)                         # prefill, fresh state
    logits, state = model.run(next_ids, state)                   # decode, state carried
    logits_np, state_np = model(ids_np, None)                    # the numpy Runner protocol of
                                                                 # generate.generate / validate.compare_runners

Engines are built from the exported ONNX with TensorRT's ONNX parser into a strongly typed
network (TensorRT 11 only has those; the precision is the one the model was exported in) whose
``xlstm::mLSTM`` / ``xlstm::sLSTM`` nodes become the AOT plugins of
:mod:`xlstm_export.plugins.tensorrt_plugins`: their CUDA kernels are baked into the plan, which
then runs in any TensorRT runtime without Python. One optimization profile covers the batch and
sequence ranges; every ``past.*`` state input follows the batch range.

TensorRT is optional: importing this module never needs it; each function that does raises one
RuntimeError saying what to install.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import contract

__all__ = ["INSTALL_HINT", "tensorrt_available", "build_engine", "TrtModel", "validate_engine",
           "ValidationReport", "onnx_dynamic_dims", "onnx_model_dtype"]

log = logging.getLogger("xlstm_export.tensorrt")

INSTALL_HINT = (
    "TensorRT is not available: `pip install tensorrt` (>= 10.9, it brings the Python bindings with "
    "tensorrt.plugin) on a Linux machine with an NVIDIA GPU and driver, then retry. The ONNX file runs "
    "without TensorRT in onnxruntime (`xlstm-export validate` without --engine)."
)

BATCH_NAMES = ("batch", "B")  # dim_params of the dynamic batch dim (export / cell models)
SEQUENCE_NAMES = ("sequence", "S")  # dim_params of the dynamic sequence dim

_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def _require_tensorrt(*, plugins: bool):
    """Import tensorrt (and register the xlstm plugins), or raise one RuntimeError with the fix."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(INSTALL_HINT) from exc
    if plugins:
        try:
            from .plugins import tensorrt_plugins  # noqa: F401  registers xlstm::mLSTM / xlstm::sLSTM
        except ImportError as exc:
            raise RuntimeError(f"{exc}. {INSTALL_HINT}") from exc
    return trt


# ---------------------------------------------------------------------------------------------
# ONNX inspection (no TensorRT needed)
# ---------------------------------------------------------------------------------------------


def _load_onnx_graph(onnx_path: str | os.PathLike):
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def onnx_dynamic_dims(onnx_path: str | os.PathLike) -> dict[str, list[int | str]]:
    """Graph input name -> dims (int when static, the dim_param string when dynamic)."""
    model = _load_onnx_graph(onnx_path)
    out: dict[str, list[int | str]] = {}
    for vi in model.graph.input:
        dims: list[int | str] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        out[vi.name] = dims
    return out


def onnx_model_dtype(onnx_path: str | os.PathLike) -> str:
    """The compute dtype of an exported model: metadata ``xlstm_export.dtype``, else the first
    graph output's element type ("float32" / "float16" / "bfloat16")."""
    import onnx

    model = _load_onnx_graph(onnx_path)
    for prop in model.metadata_props:
        if prop.key == "xlstm_export.dtype":
            return contract.canonical_dtype(prop.value)
    elem = model.graph.output[0].type.tensor_type.elem_type
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
             onnx.TensorProto.BFLOAT16: "bfloat16"}
    if elem not in names:
        raise ValueError(f"{onnx_path}: first output {model.graph.output[0].name} has element type "
                         f"{onnx.TensorProto.DataType.Name(elem)}; expected float32/float16/bfloat16")
    return names[elem]


def _dim_kind(input_name: str, dim: int | str) -> str:
    if dim in BATCH_NAMES:
        return "batch"
    if dim in SEQUENCE_NAMES:
        return "sequence"
    raise ValueError(f"input {input_name}: dynamic dim {dim!r} is neither batch {BATCH_NAMES} nor sequence "
                     f"{SEQUENCE_NAMES}; export with static dims except batch and sequence")


def _check_range(name: str, r: Sequence[int]) -> tuple[int, int, int]:
    if len(r) != 3 or not all(isinstance(x, int) for x in r) or not 1 <= r[0] <= r[1] <= r[2]:
        raise ValueError(f"{name} range must be (min, opt, max) ints with 1 <= min <= opt <= max, got {r!r}")
    return tuple(r)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------


def build_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    precision: str | None = None,  # "fp32" | "fp16" | "bf16": must match the export (strongly typed)
    batch: Sequence[int] = (1, 1, 8),  # (min, opt, max) batch size of the profile
    seq: Sequence[int] = (1, 128, 2048),  # (min, opt, max) sequence length of the profile
    workspace_gib: float | None = None,  # builder workspace limit; None: TensorRT's default
    verbose: bool = False,
) -> Path:
    """Build a TensorRT plan from an exported ONNX model; returns ``plan_path``.

    The plan is written to a temporary file beside ``plan_path`` and renamed into place, so a failed
    build never leaves a partial plan.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    batch, seq = _check_range("batch", batch), _check_range("seq", seq)
    model_dtype = onnx_model_dtype(onnx_path)
    if precision is not None:
        want = _PRECISIONS.get(precision, precision)
        if contract.canonical_dtype(want) != model_dtype:
            raise ValueError(
                f"--{precision} asked, but {onnx_path.name} was exported in {model_dtype}. TensorRT "
                "networks are strongly typed (the precision is the ONNX model's): re-export with "
                f"--dtype {precision}, or build without a precision flag")
    dims = onnx_dynamic_dims(onnx_path)
    trt = _require_tensorrt(plugins=True)

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    for flag in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):  # STRONGLY_TYPED: implicit in TRT 11
        if hasattr(trt.NetworkDefinitionCreationFlag, flag):
            flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log.info("[tensorrt] parsing %s (%s, TensorRT %s)", onnx_path, model_dtype, trt.__version__)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    n_plugins = sum(1 for j in range(network.num_layers)
                    if network.get_layer(j).type == trt.LayerType.PLUGIN_V3)
    log.info("[tensorrt] network: %d layers, %d xlstm plugin layers, %d inputs, %d outputs",
             network.num_layers, n_plugins, network.num_inputs, network.num_outputs)

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    ranges = {"batch": batch, "sequence": seq}
    for j in range(network.num_inputs):
        tensor = network.get_input(j)
        onnx_dims = dims.get(tensor.name)
        if onnx_dims is None:
            raise RuntimeError(f"network input {tensor.name} is not a graph input of {onnx_path}")
        shapes: list[list[int]] = [[], [], []]
        for d_trt, d_onnx in zip(tensor.shape, onnx_dims):
            if d_trt >= 0:
                for s in shapes:
                    s.append(int(d_trt))
            else:
                r = ranges[_dim_kind(tensor.name, d_onnx)]
                for s, v in zip(shapes, r):
                    s.append(v)
        profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)
    log.info("[tensorrt] building: batch %s, sequence %s (min, opt, max)", batch, seq)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log)")

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=plan_path.name + ".", suffix=".tmp", dir=plan_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(serialized))
        os.replace(tmp, plan_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("[tensorrt] wrote %s (%.1f MiB) in %.1f s", plan_path, plan_path.stat().st_size / 2**20,
             time.perf_counter() - t0)
    return plan_path


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if dtype not in table:
        raise TypeError(f"engine tensor dtype {dtype} has no torch equivalent here")
    return table[dtype]


class TrtModel:
    """A deserialized TensorRT plan with named tensors; ``run`` carries the recurrent state.

    Inputs/outputs follow the export: ``input_ids`` -> ``logits`` and ``past.{key}`` ->
    ``present.{key}`` for every state key (``"{block}.{c|n|m|h|conv}"``). :meth:`infer` runs any
    plan (e.g. a one-node cell model) on a dict of tensors.
    """

    def __init__(self, plan_path: str | os.PathLike, *, device: str = "cuda"):
        import torch

        trt = _require_tensorrt(plugins=False)  # AOT plugins live in the plan: no Python needed
        if not torch.cuda.is_available():
            raise RuntimeError("TrtModel needs a CUDA GPU (torch.cuda.is_available() is False)")
        self._trt = trt
        self.device = torch.device(device)
        self.plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self.engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.plan_path} (built with another "
                               "TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(j) for j in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.state_keys = [n[len("past."):] for n in self.input_names if n.startswith("past.")]

    def dtype(self, name: str):
        return _torch_dtype(self._trt, self.engine.get_tensor_dtype(name))

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the plan on ``feeds`` (name -> tensor, any device); returns name -> CUDA tensor."""
        import torch

        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(f"missing engine inputs {sorted(missing)}; the engine takes {self.input_names}")
        keep = []
        for name in self.input_names:
            t = feeds[name].to(self.device, self.dtype(name)).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise ValueError(f"input {name} shape {tuple(t.shape)} is outside the engine's profile "
                                 f"{self.engine.get_tensor_profile_shape(name, 0)}")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtype(name), device=self.device)
            outputs[name] = out
            self.context.set_tensor_address(name, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        stream.synchronize()
        del keep
        return outputs

    def init_state(self, batch_size: int) -> dict[str, Any]:
        """All-zero state (a fresh sequence) for ``batch_size`` sequences."""
        import torch

        state = {}
        for key in self.state_keys:
            shape = list(self.engine.get_tensor_shape(f"past.{key}"))
            shape[0] = batch_size
            if any(d < 0 for d in shape):
                raise RuntimeError(f"past.{key} has dynamic dims besides the batch: {shape}")
            state[key] = torch.zeros(shape, dtype=self.dtype(f"past.{key}"), device=self.device)
        return state

    def run(self, input_ids, state: dict[str, Any] | None = None):
        """(logits (B, S, vocab), new state) for ``input_ids`` (B, S) after ``state`` (None: fresh)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, S), got shape {tuple(input_ids.shape)}")
        if state is None:
            state = self.init_state(input_ids.shape[0])
        if set(state) != set(self.state_keys):
            raise ValueError(f"state keys {sorted(state)} differ from the engine's {sorted(self.state_keys)}")
        feeds = {"input_ids": input_ids, **{f"past.{k}": v for k, v in state.items()}}
        out = self.infer(feeds)
        return out["logits"], {k: out[f"present.{k}"] for k in self.state_keys}

    def __call__(self, input_ids, state: dict | None = None):
        """The Runner protocol of :mod:`xlstm_export.generate` / :mod:`xlstm_export.validate`:
        numpy (or torch) in; float32 numpy logits (B, S, vocab) and a numpy state out."""
        import numpy as np
        import torch

        ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))  # (B, S)
        st = None if state is None else {k: torch.as_tensor(np.asarray(v, dtype=np.float32))
                                         for k, v in state.items()}
        logits, new_state = self.run(ids, st)
        return logits.float().cpu().numpy(), {k: v.cpu().numpy() for k, v in new_state.items()}


# ---------------------------------------------------------------------------------------------
# validate against onnxruntime
# ---------------------------------------------------------------------------------------------


def _ort_session(onnx_path: str | os.PathLike):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def _ort_run(session, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run onnxruntime on CPU torch tensors (bfloat16 included, via IO binding + DLPack)."""
    import numpy as np
    import torch

    elem = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
            torch.int32: np.int32, torch.bool: np.bool_, torch.bfloat16: 16}  # 16: TensorProto.BFLOAT16
    io = session.io_binding()
    keep = []
    for inp in session.get_inputs():
        t = feeds[inp.name].detach().to("cpu").contiguous()
        keep.append(t)
        io.bind_input(inp.name, "cpu", 0, elem[t.dtype], list(t.shape), t.data_ptr())
    for out in session.get_outputs():
        io.bind_output(out.name, "cpu")
    session.run_with_iobinding(io)
    result = {o.name: torch.from_dlpack(v).clone() for o, v in zip(session.get_outputs(), io.get_outputs())}
    del keep
    return result


@dataclass
class ValidationReport:
    """Per-output relative errors (max |trt - ort| / max |ort|) of each call."""

    dtype: str
    tolerance: float  # contract.MAX_RELATIVE_ERROR[dtype]
    calls: list[dict[str, float]] = field(default_factory=list)  # one dict output -> error per call

    @property
    def max_error(self) -> float:
        return max((e for c in self.calls for e in c.values()), default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance

    def __str__(self) -> str:
        lines = [f"TensorRT vs onnxruntime ({self.dtype}, tolerance {self.tolerance:g}):"]
        for j, call in enumerate(self.calls):
            for name, err in call.items():
                verdict = "ok" if err <= self.tolerance else "FAIL"
                lines.append(f"  call {j} {name:<28} rel err {err:.3e} {verdict}")
        lines.append(f"  max {self.max_error:.3e}: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def _default_feeds(session, batch: int, seq: int, gen) -> dict[str, Any]:
    import torch

    feeds = {}
    vocab = None
    for out in session.get_outputs():
        if out.name == "logits" and isinstance(out.shape[-1], int):
            vocab = out.shape[-1]
    for inp in session.get_inputs():
        shape = []
        for d in inp.shape:
            if isinstance(d, int):
                shape.append(d)
            else:
                shape.append(batch if _dim_kind(inp.name, d) == "batch" else seq)
        if inp.name == "input_ids":
            feeds[inp.name] = torch.randint(0, vocab or 2, shape, generator=gen, dtype=torch.int64)
        elif inp.name.startswith("past."):
            feeds[inp.name] = torch.zeros(shape)  # a fresh sequence
        else:
            dt = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
                  "tensor(bfloat16)": torch.bfloat16}.get(inp.type)
            if dt is None:
                raise ValueError(f"no default feed for input {inp.name} of type {inp.type}; pass feeds=")
            feeds[inp.name] = (0.5 * torch.randn(shape, generator=gen)).to(dt)
    return feeds


def validate_engine(
    onnx_path: str | os.PathLike,
    plan_path: str | os.PathLike,
    *,
    batch: int = 2,
    seq: int = 7,  # odd on purpose: exercises a partial chunk
    decode_steps: int = 2,  # extra S = 1 calls with the state carried (models with past/present)
    feeds: dict[str, Any] | None = None,  # inputs of the first call; default: random ids, zero state
    seed: int = 0,
) -> ValidationReport:
    """Compare a TensorRT plan with onnxruntime on the same ONNX model, output by output.

    The first call runs ``feeds`` (a prefill); then, for exported LMs, ``decode_steps`` single-token
    calls feed both runtimes the same state (onnxruntime's ``present.*``) so errors do not compound.
    """
    import torch

    dtype = onnx_model_dtype(onnx_path)
    model = TrtModel(plan_path)
    session = _ort_session(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    feeds = dict(feeds) if feeds is not None else _default_feeds(session, batch, seq, gen)
    report = ValidationReport(dtype, contract.MAX_RELATIVE_ERROR[dtype])
    n_calls = 1 + (decode_steps if "input_ids" in feeds and model.state_keys else 0)
    for call in range(n_calls):
        ort_out = _ort_run(session, feeds)
        trt_out = model.infer(feeds)
        errs = {name: contract.relative_error(trt_out[name].float().cpu(), ort_out[name].float())
                for name in ort_out}
        report.calls.append(errs)
        log.info("[validate] call %d: max rel err %.3e (%s)", call, max(errs.values(), default=0.0),
                 ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        if call + 1 < n_calls:
            b = feeds["input_ids"].shape[0]
            feeds = {"input_ids": torch.randint(0, max(2, int(ort_out["logits"].shape[-1])), (b, 1),
                                                generator=gen, dtype=torch.int64),
                     **{f"past.{k}": ort_out[f"present.{k}"] for k in model.state_keys}}
    log.info("%s", report)
    return report
