"""`xlstm-export serve`: an OpenAI-compatible completions server with continuous batching over the
recurrent state.

Layers, each usable alone:
- :mod:`.slots`: the state slot pool a runner reads and writes in place (onnxruntime IOBinding, or
  torch tensors for TensorRT / PyTorch);
- :mod:`.sampling`: greedy / temperature / top-p choice with a per-request seed;
- :mod:`.scheduler`: the serving loop (admission, chunked prefill, one batched decode step per
  iteration), pure Python + numpy, no HTTP;
- :mod:`.protocol` and :mod:`.text`: the OpenAI request checks and response shapes, incremental
  detokenization with stop strings;
- :mod:`.app`: the Starlette app run by uvicorn;
- :mod:`.backend`: what a target (.onnx, engine, model source) becomes.

    from xlstm_export.serve import run_server
    run_server("model.onnx", port=8000, max_batch=32)
"""

from __future__ import annotations

import socket

from .backend import Backend, load_backend, slot_capacity
from .sampling import SamplingParams
from .scheduler import QueueFullError, Scheduler, Sequence
from .slots import OrtSlots, TorchSlots

__all__ = ["Backend", "OrtSlots", "QueueFullError", "SamplingParams", "Scheduler", "Sequence", "TorchSlots",
           "build_app", "load_backend", "run_server", "slot_capacity"]


def build_app(target: str, *, max_batch: int = 32, max_state_mb: float = 2048, max_queue: int = 256,
              prefill_chunk: int = 64, prefill_tokens: int = 256, name: str | None = None,
              native_ops: bool = True, threads: int | None = None, stream_interval: float = 0.0):
    """(Starlette app, Backend) for ``target``; the app starts its scheduler thread on startup.
    ``stream_interval``: seconds between hand-offs of running streams' tokens (see :class:`Scheduler`)."""
    from .app import create_app

    backend = load_backend(target, max_batch=max_batch, max_state_mb=max_state_mb, name=name,
                           native_ops=native_ops, threads=threads)
    scheduler = Scheduler(backend.pool, max_batch=max_batch, max_queue=max_queue,
                          prefill_chunk=prefill_chunk, prefill_tokens=max(prefill_tokens, prefill_chunk),
                          stream_interval=stream_interval)
    app = create_app(scheduler, model_name=backend.name, tokenizer=backend.tokenizer, label=backend.label)
    return app, backend


def check_port(host: str, port: int) -> None:
    """Raise OSError with a clear message when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run_server(target: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               **options) -> None:
    from .app import serve

    check_port(host, port)
    app, backend = build_app(target, **options)
    tok = "no tokenizer: prompts as token ids" if backend.tokenizer is None else \
        f"tokenizer with {backend.tokenizer.vocab_size} tokens"
    print(f"serving {backend.name} ({backend.label}; {backend.capacity} sequence slots, "
          f"{backend.pool.state_bytes / 2**20:.2f} MiB state each; {tok}) on http://{host}:{port}/v1",
          flush=True)
    serve(app, host, port, log_level)
