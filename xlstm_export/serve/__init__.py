"""`xlstm-export serve`: an OpenAI-compatible completions server with continuous batching over the
recurrent state.

Layers, each usable alone:
- :mod:`.slots`: the state slot pool a runner reads and writes in place (onnxruntime IOBinding, or
  torch tensors for TensorRT / PyTorch);
- :mod:`.sampling`: greedy / temperature / top-p choice with a per-request seed;
- :mod:`.scheduler`: the serving loop (admission, chunked prefill, one batched decode step per
  iteration), pure Python + numpy, no HTTP;
- :mod:`.protocol`: the OpenAI request checks and response shapes (the text of each completion,
  stop strings included, is ``tokenizer.TextStream``'s, as in ``generate``);
- :mod:`.app`: the Starlette app run by uvicorn;
- :mod:`.engine`: the scheduler in a child process, so that it and the HTTP layer do not share a GIL;
- :mod:`.backend`: what a target (.onnx, engine, model source) becomes.

    from xlstm_export.serve import run_server
    run_server("model.onnx", port=8000, max_batch=32)
"""

from __future__ import annotations

import socket

from .backend import Backend, check_threads, load_backend, slot_capacity
from .engine import EngineProcess, ServedModel
from .sampling import SamplingParams
from .scheduler import QueueFullError, Scheduler, Sequence
from .slots import OrtSlots, TorchSlots

__all__ = ["Backend", "EngineProcess", "OrtSlots", "QueueFullError", "SamplingParams", "Scheduler", "Sequence",
           "ServedModel", "TorchSlots", "build_app", "listen_socket", "load_backend", "run_server", "slot_capacity"]

LISTEN_BACKLOG = 2048  # connections the socket holds before they are accepted (uvicorn's default)


def build_app(target: str, *, max_batch: int = 32, max_state_mb: float = 2048, max_queue: int = 256,
              prefill_chunk: int = 64, prefill_tokens: int = 256, name: str | None = None,
              native_ops: bool = True, threads: int | None = None, stream_interval: float = 0.0,
              engine_process: bool = True):
    """(Starlette app, ServedModel) for ``target``; the app starts its scheduler on startup.
    ``stream_interval``: seconds between hand-offs of running streams' tokens (see :class:`Scheduler`);
    ``engine_process``: run the scheduler and the model in a child process (:mod:`.engine`; the
    default, as for `xlstm-export serve`: call it under ``if __name__ == "__main__":``), or in a
    thread of this one (False)."""
    from .app import create_app

    check_threads(threads)  # here too, before an engine process is spawned to load the target
    backend_options = dict(max_batch=max_batch, max_state_mb=max_state_mb, name=name, native_ops=native_ops,
                           threads=threads)
    scheduler_options = dict(max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk,
                             prefill_tokens=max(prefill_tokens, prefill_chunk), stream_interval=stream_interval)
    if engine_process:
        scheduler = EngineProcess(target, backend_options, scheduler_options)
        info = scheduler.info
    else:
        backend = load_backend(target, **backend_options)
        scheduler = Scheduler(backend.pool, **scheduler_options)
        info = ServedModel.of(backend, scheduler)
    app = create_app(scheduler, model_name=info.name, tokenizer=info.tokenizer, label=info.label)
    return app, info


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: a free one), or OSError with a clear message.
    It listens at once: of two servers started on one port, the second fails here, before it loads
    its model (two sockets that are only bound with SO_REUSEADDR may share a port on Linux)."""
    if not 0 <= port <= 65535:  # bind() would raise OverflowError
        raise OSError(f"cannot listen on {host}:{port}: a port lies in 0..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run_server(target: str, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               **options) -> None:
    """Serve ``target`` on ``host:port`` until SIGINT or SIGTERM (see :func:`build_app` for ``options``).
    The port is taken before the model loads: a busy one raises OSError at once. Connections that
    arrive while the model loads wait in the socket's backlog."""
    from .app import serve

    sock = listen_socket(host, port)
    try:
        app, info = build_app(target, **options)
        tok = "no tokenizer: prompts as token ids" if info.tokenizer is None else \
            f"tokenizer with {info.tokenizer.vocab_size} tokens"
        where = "an engine process" if options.get("engine_process", True) else "a scheduler thread"
        print(f"serving {info.name} ({info.label} in {where}; {info.capacity} sequence slots, "
              f"{info.state_bytes / 2**20:.2f} MiB state each; {tok}) on http://{host}:{sock.getsockname()[1]}/v1",
              flush=True)
        serve(app, sock, log_level)
    finally:
        sock.close()
