"""`serve model.engine` without a GPU: the engine path (load_backend -> TrtModel -> TorchSlots ->
Scheduler) over a CPU stand-in for TensorRT.

The stand-in has the parts of the TensorRT Python API that :class:`~xlstm_export.tensorrt.TrtModel`
calls (Runtime.deserialize_cuda_engine; ICudaEngine's tensor names, modes, dtypes, shapes and
get_tensor_profile_shape; IExecutionContext's set_input_shape, get_tensor_shape,
set_tensor_address, execute_async_v3) and behaves as they are documented: an input shape outside
the optimization profile is refused (set_input_shape returns False: "a runtime error will be raised
if the input tensor dimensions fall outside the valid range for this profile", TensorRT's
IOptimizationProfile docs), the engine reads and writes the memory at the addresses it was
given. It also fails a run on the CUDA default stream, where TensorRT runs but warns that it adds
synchronization. The network behind it is the PyTorch model, so every completion is checked against the same
scheduler over the PyTorch model itself.
"""

from __future__ import annotations

import ctypes
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from xlstm_export import tensorrt as xtrt
from xlstm_export.models import preset, xLSTMLM
from xlstm_export.serve import SamplingParams, Scheduler, TorchSlots, load_backend


def _tensor_at(ptr: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """The memory at ``ptr`` as a tensor (what TensorRT does with an address it is given)."""
    n = math.prod(shape) * dtype.itemsize
    return torch.frombuffer((ctypes.c_uint8 * n).from_address(ptr), dtype=dtype).view(shape)


class _Context:
    def __init__(self, engine):
        self.engine = engine
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name, shape) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        if len(shape) != len(lo) or any(not a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        B, S = self.shapes["input_ids"]
        if name == "logits":
            return (B, S, self.engine.vocab)
        return (B, *self.engine.state_dims[name[len("present."):]])

    def set_tensor_address(self, name, ptr) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream) -> bool:
        # TensorRT on the default stream (handle 0): "Using default stream in enqueueV3() may lead to
        # performance issues due to additional calls to cudaStreamSynchronize()" (pytorch/TensorRT#3190)
        assert stream != 0, "enqueued on the CUDA default stream"
        e = self.engine
        ins = [n for n in e.names if e.get_tensor_mode(n) == "INPUT"]
        outs = [n for n in e.names if e.get_tensor_mode(n) == "OUTPUT"]
        # TensorRT forbids an output at an input's address (no aliasing of I/O without a declared alias)
        assert not {self.addresses[n] for n in ins} & {self.addresses[n] for n in outs}, "aliased I/O"
        ids = _tensor_at(self.addresses["input_ids"], self.shapes["input_ids"], torch.int64).clone()
        state = {k: _tensor_at(self.addresses[f"past.{k}"], self.shapes[f"past.{k}"], torch.float32).clone()
                 for k in e.state_dims}
        with torch.no_grad():
            logits, new = e.model(ids, state)  # (B, S, V)
        _tensor_at(self.addresses["logits"], self.get_tensor_shape("logits"), e.logits_dtype).copy_(logits)
        for k in e.state_dims:
            name = f"present.{k}"
            _tensor_at(self.addresses[name], self.get_tensor_shape(name), torch.float32).copy_(new[k])
        e.calls.append(tuple(ids.shape))
        return True


class _Engine:
    """An engine of ``model`` with one optimization profile: batch and seq (min, opt, max)."""

    def __init__(self, model, batch, seq, logits_dtype=torch.float32):
        self.model, self.batch, self.seq, self.logits_dtype = model, batch, seq, logits_dtype
        self.vocab = model.config.vocab_size
        self.state_dims = {k: tuple(s[1:]) for k, s in model.state_spec(1).items()}
        keys = list(self.state_dims)
        self.names = ["input_ids", *(f"past.{k}" for k in keys), "logits", *(f"present.{k}" for k in keys)]
        self.num_io_tensors = len(self.names)
        self.calls: list[tuple[int, int]] = []  # (B, S) of each execution

    def get_tensor_name(self, j):
        return self.names[j]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "input_ids" or name.startswith("past.") else "OUTPUT"

    def get_tensor_dtype(self, name):
        if name == "input_ids":
            return "int64"
        return "bfloat16" if name == "logits" and self.logits_dtype == torch.bfloat16 else "float32"

    def get_tensor_shape(self, name):
        if name == "input_ids":
            return (-1, -1)
        if name == "logits":
            return (-1, -1, self.vocab)
        return (-1, *self.state_dims[name.split(".", 1)[1]])

    def get_tensor_profile_shape(self, name, profile):
        assert profile == 0 and self.get_tensor_mode(name) == "INPUT"
        if name == "input_ids":
            return [(b, s) for b, s in zip(self.batch, self.seq)]
        return [(b, *self.state_dims[name[len("past."):]]) for b in self.batch]

    def create_execution_context(self):
        return _Context(self)


def _fake_tensorrt(engine):
    """The parts of the ``tensorrt`` module TrtModel uses, deserializing every plan as ``engine``."""
    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return engine

    return SimpleNamespace(Logger=Logger, Runtime=Runtime, TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
                           float32="float32", float16="float16", bfloat16="bfloat16", int32="int32", int64="int64",
                           bool="bool", int8="int8")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return xLSTMLM(preset("tiny-large", embedding_dim=64, num_heads=2)).eval()


@pytest.fixture
def engine_file(tmp_path, monkeypatch):
    """engine_file(engine) -> the path of an engine file that TrtModel runs on the CPU stand-in."""
    class CpuTrtModel(xtrt.TrtModel):
        def __init__(self, plan_path, **kw):
            super().__init__(plan_path, device="cpu", **kw)

    class Stream:  # torch.cuda.Stream: a stream of its own (not the default stream, handle 0)
        def __init__(self, device=None):
            self.cuda_stream = id(self)

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    default = SimpleNamespace(cuda_stream=0, synchronize=lambda: None)  # torch's current stream unless set
    monkeypatch.setattr(xtrt, "TrtModel", CpuTrtModel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: default)

    def make(engine):
        monkeypatch.setattr(xtrt, "import_runtime", lambda name: _fake_tensorrt(engine))
        path = tmp_path / "model.engine"  # no build record: an engine built elsewhere
        path.write_bytes(b"plan")
        return str(path)

    return make


def _serve(pool, prompts, max_tokens=6, **options):
    sched = Scheduler(pool, max_batch=pool.capacity, **options)
    seqs = [sched.submit(p, SamplingParams(max_tokens=max_tokens + j, temperature=0)) for j, p in enumerate(prompts)]
    while any(s.finish_reason is None for s in seqs):
        sched.step()
    return [(s.finish_reason, s.error, s.tokens) for s in seqs]


def _reference(model, prompts, logits_dtype=torch.float32, **options):
    """The same scheduler over the PyTorch model (logits rounded as the engine rounds them)."""
    shapes = {k: tuple(s[1:]) for k, s in model.state_spec(1).items()}

    def run(ids, state):
        logits, new = model(ids, state)
        return logits.to(logits_dtype), new

    return _serve(TorchSlots(run, shapes, model.config.vocab_size, 4), prompts, **options)


PROMPTS = [np.random.default_rng(3).integers(0, 256, n) for n in (1, 17, 40, 5)]


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
def test_engine_is_served_as_the_pytorch_model(model, engine_file, logits_dtype):
    """The engine's pool: its profile's maximum batch caps the slots, prefill and decode steps read
    and write the state where the engine was told it lies, bfloat16 logits included."""
    engine = _Engine(model, batch=(1, 2, 4), seq=(1, 16, 2048), logits_dtype=logits_dtype)
    backend = load_backend(engine_file(engine), max_batch=32, max_state_mb=1024)
    assert backend.capacity == 4 and backend.vocab_size == 256 and "TensorRT" in backend.label
    got = _serve(backend.pool, PROMPTS, prefill_chunk=16, prefill_tokens=32)
    assert all(reason == "length" for reason, _, _ in got), got
    assert got == _reference(model, PROMPTS, logits_dtype, prefill_chunk=16, prefill_tokens=32)
    assert (1, 1) in engine.calls  # a decode step of one sequence


def test_prompt_chunks_longer_than_the_engine_profile_are_split(model, engine_file):
    """An engine built with --seq 1 8 16 serves prompts longer than 16 tokens with the default
    64-token prefill chunks: the pool runs each chunk in pieces the profile takes, the state carried."""
    engine = _Engine(model, batch=(1, 4, 4), seq=(1, 8, 16))
    backend = load_backend(engine_file(engine), max_batch=4, max_state_mb=1024)
    got = _serve(backend.pool, PROMPTS, prefill_chunk=64, prefill_tokens=256)
    assert all(reason == "length" for reason, _, _ in got), got
    assert got == _reference(model, PROMPTS, prefill_chunk=64, prefill_tokens=256)
    assert max(s for _, s in engine.calls) == 16


@pytest.mark.parametrize("batch, seq, match", [((2, 4, 8), (1, 16, 64), "batch range starts at 2"),
                                               ((1, 4, 8), (4, 16, 64), "sequence range starts at 4")])
def test_engine_whose_profile_cannot_run_a_decode_step_of_one_sequence_is_refused(model, engine_file, batch, seq,
                                                                                   match):
    """A decode step runs however many sequences are running (one, too) at S = 1: an engine whose
    profile excludes that is refused at load, not failed at every request's first decode step."""
    with pytest.raises(ValueError, match=match):
        load_backend(engine_file(_Engine(model, batch=batch, seq=seq)), max_batch=4, max_state_mb=1024)
