"""Run and validate TensorRT / TensorRT-RTX engines of exported xLSTM models (the build lives in
:mod:`xlstm_export.engine`, re-exported here).

    from xlstm_export.tensorrt import build_engine, TrtModel, validate_engine
    build_engine("model.onnx", "model.engine", batch=(1, 1, 8), seq=(1, 128, 2048))
    report = validate_engine("model.onnx", "model.engine")      # engine vs onnxruntime
    model = TrtModel("model.engine")
    logits, state = model.run(input_ids)                         # prefill, fresh state
    logits, state = model.run(next_ids, state)                   # decode, state carried
    logits_np, state_np = model(ids_np, None)                    # the numpy Runner protocol of
                                                                 # generate.generate / validate.compare_runners

Running an engine needs a CUDA GPU (an RTX GPU for TensorRT-RTX engines) and the runtime that
built it, which :class:`TrtModel` reads from the engine's build record (``<engine>.json``). With
our AOT plugins the CUDA kernels are in the plan, which then runs in any TensorRT runtime without
Python.

TensorRT is optional: importing this module never needs it; each function that does raises one
RuntimeError saying what to install.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .engine import (  # noqa: F401  INSTALL_HINT, build_engine, read_build_info: re-exported
    INSTALL_HINT,
    _dim_kind,
    build_engine,
    build_info_path,
    import_runtime,
    inspect_onnx,
    read_build_info,
)
from .interface import model_file_kind
from .validate import Report as ValidationReport  # the one report type (validate_engine's rows: "call j")

__all__ = ["INSTALL_HINT", "tensorrt_available", "build_engine", "TrtModel", "validate_engine",
           "ValidationReport", "onnx_dynamic_dims", "onnx_model_dtype", "read_build_info"]

log = logging.getLogger("xlstm_export.tensorrt")


def tensorrt_available() -> bool:
    """True when the ``tensorrt`` package imports (says nothing of a GPU, nor of TensorRT-RTX)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_dynamic_dims(onnx_path: str | os.PathLike) -> dict[str, list[int | str]]:
    """Graph input name -> dims (int when static, the dim_param string when dynamic)."""
    return {name: dims for name, (_, dims) in inspect_onnx(onnx_path).inputs.items()}


def onnx_model_dtype(onnx_path: str | os.PathLike) -> str:
    """The compute dtype of an exported model: metadata ``xlstm_export.dtype``, else the first
    graph output's element type ("float32" / "float16" / "bfloat16")."""
    return inspect_onnx(onnx_path).dtype


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
    """A deserialized TensorRT / TensorRT-RTX engine with named tensors; ``run`` carries the
    recurrent state. ``build_info`` is the engine's build record (None for an engine built elsewhere).

    Inputs/outputs follow the export: ``input_ids`` -> ``logits`` and ``past.{key}`` ->
    ``present.{key}`` for every state key (``"{block}.{c|n|m|h|conv}"``). :meth:`infer` runs any
    plan (e.g. a one-node cell model) on a dict of tensors.
    """

    def __init__(self, plan_path: str | os.PathLike, *, device: str = "cuda", runtime: str | None = None):
        import torch

        p = Path(plan_path)
        if model_file_kind(p) == "onnx":
            raise ValueError(f"{p}: an ONNX file, not an engine: build one with `xlstm-export build` (or run the "
                             "file with OrtModel)")
        if p.is_dir():
            raise IsADirectoryError(f"{p}: is a directory, expected an engine file")
        # the runtime that built it (its build record), else TensorRT; AOT plugins live in the plan
        self.build_info = read_build_info(plan_path)
        self.runtime = runtime or (self.build_info["runtime"] if self.build_info else "tensorrt")
        try:
            trt = import_runtime(self.runtime)
        except RuntimeError as e:
            if runtime or self.build_info or not p.is_file():
                raise
            raise RuntimeError(f"{p} has no build record ({build_info_path(p).name}), so it is taken for a TensorRT "
                               f"engine: {e} An engine built by TensorRT-RTX: TrtModel(..., runtime='tensorrt-rtx'), "
                               "or keep its record beside it.") from None
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such engine file")
        if not torch.cuda.is_available():
            gpu = "an RTX GPU" if self.runtime == "tensorrt-rtx" else "a CUDA GPU"
            raise RuntimeError(f"running a {self.runtime} engine needs {gpu} (torch.cuda.is_available() is False)")
        self._trt = trt
        self.device = torch.device(device)
        # the engine runs on a stream of its own: torch's current stream is the CUDA default stream
        # unless a caller set another, and TensorRT warns that enqueueV3 on the default stream adds
        # cudaStreamSynchronize calls ("Using default stream in enqueueV3() may lead to performance
        # issues", pytorch/TensorRT#3190; Torch-TensorRT's runtime runs on its own stream since #3191)
        self._stream = torch.cuda.Stream(device=self.device)
        self.plan_path = Path(plan_path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{self.runtime} could not deserialize {self.plan_path} (built with another "
                               "version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(j) for j in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.state_keys = [n[len("past."):] for n in self.input_names if n.startswith("past.")]
        config = (self.build_info or {}).get("model_config") or {}
        self.vocab_size: int | None = config.get("vocab_size")

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
        # the inputs were written, and the outputs allocated, on the caller's stream: the engine's
        # stream waits for that work; it is synchronized before the outputs are handed back, so they
        # are complete on every stream and the inputs can be freed
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log)")
        self._stream.synchronize()
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
    """Compare a TensorRT plan with onnxruntime on the same ONNX model, output by output: a
    :class:`xlstm_export.validate.Report` with one row per output and call (case ``"call j"``), each
    held to the dtype's fixed limit ``contract.MAX_RELATIVE_ERROR``.

    The first call runs ``feeds`` (a prefill); then, for exported LMs, ``decode_steps`` single-token
    calls feed both runtimes the same state (onnxruntime's ``present.*``) so errors do not compound.
    """
    import torch

    dtype = onnx_model_dtype(onnx_path)
    model = TrtModel(plan_path)
    session = _ort_session(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    feeds = dict(feeds) if feeds is not None else _default_feeds(session, batch, seq, gen)
    report = ValidationReport(dtype)
    n_calls = 1 + (decode_steps if "input_ids" in feeds and model.state_keys else 0)
    for call in range(n_calls):
        ort_out = _ort_run(session, feeds)
        rows = report.add(f"call {call}", model.infer(feeds), ort_out)
        log.info("[validate] call %d: max rel err %.3e (%s)", call, max((r.err for r in rows), default=0.0),
                 ", ".join(f"{r.name} {r.err:.2e}" for r in rows))
        if call + 1 < n_calls:
            b = feeds["input_ids"].shape[0]
            feeds = {"input_ids": torch.randint(0, max(2, int(ort_out["logits"].shape[-1])), (b, 1),
                                                generator=gen, dtype=torch.int64),
                     **{f"past.{k}": ort_out[f"present.{k}"] for k in model.state_keys}}
    log.info("%s", report)
    return report
