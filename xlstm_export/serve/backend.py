"""What `serve` runs: an .onnx file (onnxruntime, with the native CPU kernels), a TensorRT engine
(on a GPU), or a model source (a preset or model directory, run in PyTorch), as a slot pool sized
by ``--max-batch`` and ``--max-state-mb``, with the model's tokenizer when it has one.

    backend = load_backend("model.onnx", max_batch=32, max_state_mb=1024)
    backend.pool, backend.capacity, backend.tokenizer, backend.name, backend.label
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..interface import model_file_kind
from .slots import OrtSlots, TorchSlots

__all__ = ["Backend", "check_threads", "load_backend", "model_id", "session_options", "slot_capacity"]

log = logging.getLogger("xlstm_export.serve")


@dataclass
class Backend:
    pool: Any  # OrtSlots | TorchSlots
    capacity: int  # sequences with a slot at once
    tokenizer: Any  # xlstm_export.tokenizer.Tokenizer | None
    name: str  # the model id of /v1/models
    label: str  # what runs it, for the start-up line
    vocab_size: int


def slot_capacity(max_batch: int, max_state_mb: float, slot_bytes: int) -> int:
    """Slots that fit: at most ``max_batch``, and their state memory within ``max_state_mb`` MiB."""
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if not max_state_mb > 0:  # also nan
        raise ValueError(f"--max-state-mb must be > 0, got {max_state_mb}")
    fit = int(max_state_mb * 2**20 // slot_bytes)
    if fit < 1:
        raise ValueError(f"--max-state-mb {max_state_mb:g} holds no sequence: one takes "
                         f"{slot_bytes / 2**20:.2f} MiB of state buffers")
    return min(max_batch, fit)


def check_threads(threads: int | None) -> None:
    """``--threads``: None (all cores) or >= 1, for every target (only an .onnx file uses it)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be >= 1, got {threads}")


def load_backend(target: str, *, max_batch: int, max_state_mb: float, name: str | None = None,
                 native_ops: bool = True, threads: int | None = None) -> Backend:
    """``threads``: onnxruntime intra-op threads for an .onnx target (None: all cores)."""
    from ..tokenizer import load_tokenizer

    check_threads(threads)
    p = Path(target)
    kind = model_file_kind(target)
    if kind == "onnx":
        pool, label = _onnx_pool(p, max_batch, max_state_mb, native_ops, threads)
        tokenizer = load_tokenizer(p)
    elif kind == "engine":
        pool, label = _engine_pool(p, max_batch, max_state_mb)
        tokenizer = load_tokenizer(p)
    else:
        pool, label, files = _torch_pool(target, max_batch, max_state_mb)
        tokenizer = _tokenizer_from_files(files)
    if tokenizer is not None and tokenizer.vocab_size > pool.vocab_size:
        log.warning("the tokenizer has %d tokens, the model %d: ids beyond the model's are refused",
                    tokenizer.vocab_size, pool.vocab_size)
    return Backend(pool, pool.capacity, tokenizer, name or model_id(target), label, pool.vocab_size)


def model_id(target: str) -> str:
    """The default id of /v1/models: a file's name without its suffix (model.onnx: "model"), a
    preset's or directory's whole name (xlstm-1.3b stays "xlstm-1.3b")."""
    p = Path(target)
    if model_file_kind(target):
        return p.stem
    return p.name or target


def session_options(threads: int | None):
    """onnxruntime options for serving: worker threads sleep between runs instead of spinning,
    because the HTTP layer and the scheduler need the same cores between decode steps. (The native
    kernels read this setting and split only work that pays for waking a sleeping worker.)"""
    import onnxruntime as ort

    check_threads(threads)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = threads
    return opts


def _onnx_pool(path: Path, max_batch: int, max_state_mb: float, native_ops: bool, threads: int | None):
    from ..ort import OrtModel, inspect_model

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    label = "onnxruntime (native CPU kernels)"
    if native_ops and not inspect_model(path)["xlstm_ops"]:
        log.warning("%s is an --inline export (standard ops only, no xlstm nodes for the native CPU kernels "
                    "to replace): running it with onnxruntime's own ops", path)
        native_ops = False
    if native_ops:
        from ..plugins.cpu_build import CompilerNotFoundError

        try:
            model = OrtModel(path, native_ops=True, session_options=session_options(threads))
        except CompilerNotFoundError as e:
            log.warning("native CPU kernels unavailable (%s): running the standard-op bodies", e)
            model, label = OrtModel(path, session_options=session_options(threads)), "onnxruntime"
    else:
        model, label = OrtModel(path, session_options=session_options(threads)), "onnxruntime"
    capacity = slot_capacity(max_batch, max_state_mb, OrtSlots.bytes_per_slot(model))
    return OrtSlots(model, capacity), label


def _engine_pool(path: Path, max_batch: int, max_state_mb: float):
    from ..tensorrt import TrtModel

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    model = TrtModel(path)
    engine = model.engine
    shapes = {k: tuple(int(d) for d in engine.get_tensor_shape(f"past.{k}"))[1:] for k in model.state_keys}
    vocab = int(engine.get_tensor_shape("logits")[-1])
    if vocab < 0:
        raise ValueError(f"{path}: the engine's logits have no static vocabulary dim")
    # TensorRT runs only shapes inside the optimization profile ("a runtime error will be raised if the
    # input tensor dimensions fall outside the valid range for this profile", IOptimizationProfile).
    # A decode step runs however many sequences are running, one included, at S = 1, so both ranges
    # must start at 1 (`build` checks the sequence range; an engine built elsewhere may not have it);
    # the batch maximum caps the slots, and a prefill chunk longer than the sequence maximum runs in pieces.
    lo, _, hi = ([int(d) for d in dims] for dims in engine.get_tensor_profile_shape("input_ids", 0))  # (B, S) each
    batch_min = max([lo[0]] + [int(engine.get_tensor_profile_shape(f"past.{k}", 0)[0][0]) for k in model.state_keys])
    engine_max = min([hi[0]] + [int(engine.get_tensor_profile_shape(f"past.{k}", 0)[2][0]) for k in model.state_keys])
    if batch_min > 1:
        raise ValueError(f"{path}: its profile's batch range starts at {batch_min}, but serve runs a decode step "
                         "for however many sequences are running, one included: rebuild it with "
                         f"`xlstm-export build --batch 1 OPT {engine_max}`")
    if lo[1] > 1:
        raise ValueError(f"{path}: its profile's sequence range starts at {lo[1]}, but decode steps run at S = 1: "
                         f"rebuild it with `xlstm-export build --seq 1 OPT {hi[1]}`")
    capacity = min(slot_capacity(max_batch, max_state_mb, TorchSlots.bytes_per_slot(shapes)), engine_max)
    return TorchSlots(model.run, shapes, vocab, capacity, device=model.device, max_chunk=hi[1]), \
        f"TensorRT (engine batch <= {engine_max}, prompt pieces <= {hi[1]} tokens)"


def _torch_pool(source: str, max_batch: int, max_state_mb: float):
    from ..models import load

    model = load(source).eval()
    shapes = {k: tuple(s[1:]) for k, s in model.state_spec(1).items()}
    capacity = slot_capacity(max_batch, max_state_mb, TorchSlots.bytes_per_slot(shapes))
    return TorchSlots(model, shapes, model.config.vocab_size, capacity), \
        "PyTorch (export to .onnx and serve that for speed)", getattr(model, "tokenizer_files", None)


def _tokenizer_from_files(files: dict[str, bytes] | None):
    """The tokenizer a loaded model carries (its ``tokenizer_files``), or None."""
    import tempfile

    from ..tokenizer import load_tokenizer, write_tokenizer_files

    if not files:
        return None
    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(files, d)
        return load_tokenizer(d)
