"""The scheduler in a process of its own: the HTTP layer and the model do not share one GIL.

In one process, the event loop that streams tokens and the scheduler thread that runs the model
take turns holding Python's GIL: each decode step that leaves onnxruntime waits for the event
loop's Python, and the event loop waits for the scheduler's. With a small model at 32 streams that
waiting, not the cores, bounds the tokens per second (bench/RESULTS.md, "Serving"). Here the
:class:`~.scheduler.Scheduler` runs alone in a spawned child process (as vLLM's engine core
does), and :class:`EngineProcess` stands in for it in the server process: it has the methods and
fields the HTTP layer uses (``submit_many``, ``cancel``, ``on_events``, ``stats``, ...) and keeps
one mirror :class:`~.scheduler.Sequence` per request, updated from the child's messages.

    engine = EngineProcess("model.onnx", dict(max_batch=32, max_state_mb=1024),
                           dict(max_batch=32, max_queue=64))
    app = create_app(engine, model_name=engine.info.name, tokenizer=engine.info.tokenizer)

Messages, pickled into length-prefixed frames over one socket pair (:class:`_Frames`):

    server -> engine   ("submit", [(request id, prompt (S,) int64, SamplingParams)]), ("cancel", id, reason),
                       ("stop",)
    engine -> server   ("ready", ServedModel, (max_queue, max_prompt_tokens)) or
                       ("failed", error type, message, traceback), once at start;
                       ("events", (ids, tokens, [(id, new token ids, finish reason or None, error or None)]))
                       after each scheduler hand-off: request ids[j] got the one new token tokens[j]
                       and goes on (a decode step's news of a running stream, sent as two flat
                       lists: cheaper to pickle than a tuple per stream), the others are in the
                       list; ("stats", (Stats, active, prefilling, queued)) at
                       most every STATS_INTERVAL_S while busy, and when it falls idle

The child is spawned (a fresh interpreter that imports this module), so a script that starts an
engine process must do it under ``if __name__ == "__main__":``, as with any multiprocessing code.

The server never blocks on the socket: it reads on its event loop and writes without blocking,
keeping what the socket does not take until it can (so a large submit and a full socket from the
engine cannot wait on each other). The engine writes blocking and reads the server's messages
between its iterations (blocking only when it has nothing to do): no thread of its own waits on
the socket, so a submit sent while the engine runs a step wakes nobody (a wake-up across
processes costs tens of microseconds on a small VM).

The server admits a request only while fewer than ``capacity + max_queue`` of its requests are
unfinished, which the engine then holds too (it learns of finishes first), so the engine never
refuses one. If the engine process dies, every unfinished request ends with an error (counted
among the sequences finished by "error"), ``alive`` turns False (``/health`` says 503), and the
gauges say nothing is active, prefilling or queued (its last counters said what was, then).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import select
import struct
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from .scheduler import QueueFullError, Scheduler, Sequence, Stats, check_prompt

__all__ = ["EngineProcess", "ServedModel"]

log = logging.getLogger("xlstm_export.serve")

STATS_INTERVAL_S = 0.05  # the engine sends /metrics' counters at most this often while busy
START_TIMEOUT_S = 600.0  # loading a large model (and compiling the native kernels) can take minutes
STOP_TIMEOUT_S = 10.0  # then the engine process is killed
READ_BYTES = 1 << 20  # read at most this much of the other side's frames at once
# errors of loading a target that reach the user as themselves (one line at the CLI)
_LOAD_ERRORS = {e.__name__: e for e in (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError)}


class _Frames:
    """Messages over a byte stream: each one pickled behind its length (8 bytes, big-endian).
    ``frame(msg)`` -> bytes; ``feed(data)`` -> the messages that ``data`` completes (a frame may
    arrive in pieces). Only the two ends of one socket pair, the server and its own engine
    process, ever write to it."""

    _length = struct.Struct("!Q")

    def __init__(self):
        self._buffer = bytearray()

    @classmethod
    def frame(cls, msg) -> bytes:
        body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        return cls._length.pack(len(body)) + body

    def feed(self, data: bytes) -> list:
        buf = self._buffer
        buf += data
        out, pos, size = [], 0, self._length.size
        while len(buf) - pos >= size:
            (n,) = self._length.unpack_from(buf, pos)
            if len(buf) - pos - size < n:
                break
            out.append(pickle.loads(memoryview(buf)[pos + size : pos + size + n]))
            pos += size + n
        del buf[:pos]
        return out


def _read_blocking(fd: int, frames: _Frames, timeout: float | None) -> list:
    """Messages from ``fd`` once at least one is complete; [] after ``timeout`` seconds
    (None: no limit). EOFError at the end of the stream."""
    deadline = None if timeout is None else time.monotonic() + timeout
    poll = select.poll()  # not select.select: no limit on the descriptor's number
    poll.register(fd, select.POLLIN)
    while True:
        left = None if deadline is None else 1e3 * max(0.0, deadline - time.monotonic())
        if not poll.poll(left):
            return []
        data = os.read(fd, READ_BYTES)
        if not data:
            raise EOFError
        msgs = frames.feed(data)
        if msgs:
            return msgs


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking ``fd``."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _ServerEnd:
    """The server's end of the socket pair. Blocking at first (``recv(timeout)``, ``send``); after
    ``start`` on an event loop, ``send`` never blocks (what the socket does not take waits for
    room, written by the loop) and the loop hands what arrives to ``on_messages(list)``, or calls
    ``on_eof()`` once the engine's end is closed; ``close`` ends it."""

    def __init__(self, fd: int):
        self.fd = fd  # a socket: os.read / os.write on it
        self.frames = _Frames()
        self.unsent = bytearray()  # frames the socket has not taken yet
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_messages: Callable[[list], None] | None = None
        self.on_eof: Callable[[], None] | None = None

    def recv(self, timeout: float | None) -> list:
        """Blocking: the messages once one is complete, [] after ``timeout``; EOFError at the end."""
        return _read_blocking(self.fd, self.frames, timeout)

    def start(self, loop: asyncio.AbstractEventLoop, on_messages: Callable[[list], None],
              on_eof: Callable[[], None]) -> None:
        self.loop, self.on_messages, self.on_eof = loop, on_messages, on_eof
        os.set_blocking(self.fd, False)
        loop.add_reader(self.fd, self._readable)

    def close(self, last, done: Callable[[], bool], timeout: float) -> None:
        """Leave the event loop: drop what was unsent, send ``last``, and read (dropping it) what
        the engine still sends until ``done()``, its end closes, or ``timeout`` seconds pass,
        never blocking on either direction (the engine may be blocked sending to us)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
        self.loop = None
        self.unsent.clear()
        os.set_blocking(self.fd, False)
        pending = memoryview(_Frames.frame(last))
        poll = select.poll()
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            if pending:
                try:
                    pending = pending[os.write(self.fd, pending):]
                except BlockingIOError:
                    pass
            poll.register(self.fd, select.POLLIN | (select.POLLOUT if pending else 0))  # (re-registering modifies)
            if any(events & (select.POLLIN | select.POLLHUP) for _, events in poll.poll(50)):
                try:
                    if not os.read(self.fd, READ_BYTES):
                        return
                except BlockingIOError:
                    pass

    def send(self, msg) -> None:
        """Blocking before ``start`` (OSError when the engine's end is closed); on the loop it
        returns at once (a closed end: the reader sees the end of the stream)."""
        if self.loop is None:
            _write_all(self.fd, _Frames.frame(msg))
            return
        waiting = bool(self.unsent)  # then _flush waits for room already
        self.unsent += _Frames.frame(msg)
        if not waiting:
            self._flush()

    def _flush(self) -> None:  # the event loop: write what the socket takes, wait for room for the rest
        try:
            n = os.write(self.fd, self.unsent)
        except BlockingIOError:
            n = 0
        except OSError:  # the engine's end is closed: the reader sees it
            n = len(self.unsent)
        del self.unsent[:n]
        if self.unsent:
            self.loop.add_writer(self.fd, self._flush)
        else:
            self.loop.remove_writer(self.fd)

    def _readable(self) -> None:  # the event loop
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:  # nothing after all
            return
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.unsent.clear()
            self.on_eof()
            return
        msgs = self.frames.feed(data)
        if msgs:
            self.on_messages(msgs)


@dataclass(frozen=True)
class ServedModel:
    """What the server reports about its model (the start-up line, /v1/models, /metrics)."""

    name: str
    label: str  # what runs it
    capacity: int  # sequences with a slot at once
    vocab_size: int
    state_bytes: int  # one sequence's state
    tokenizer: Any  # xlstm_export.tokenizer.Tokenizer | None (picklable)

    @classmethod
    def of(cls, backend, scheduler: Scheduler) -> ServedModel:
        return cls(backend.name, backend.label, scheduler.capacity, backend.vocab_size, backend.pool.state_bytes,
                   backend.tokenizer)


class _Pool:
    """The one pool field the HTTP layer reads."""

    def __init__(self, state_bytes: int):
        self.state_bytes = state_bytes


class EngineProcess:
    """A :class:`Scheduler` over ``load_backend(target, **backend_options)`` in a spawned child
    process, behind the scheduler's interface (see the module doc). ``scheduler_options`` are
    :class:`Scheduler`'s keyword arguments; raises what loading the target raised."""

    def __init__(self, target: str, backend_options: dict, scheduler_options: dict,
                 start_timeout: float = START_TIMEOUT_S):
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        self._conn, child = ctx.Pipe()  # a socket pair the child gets one end of; both ends speak _Frames
        self._proc = ctx.Process(target=_engine_main, args=(child, target, backend_options, scheduler_options),
                                 name="xlstm-serve-engine", daemon=True)
        self._proc.start()
        child.close()
        self._end = _ServerEnd(self._conn.fileno())
        try:
            msgs = self._end.recv(start_timeout)
            if not msgs:
                raise RuntimeError(f"the engine process did not load {target} within {start_timeout:g} s")
            msg = msgs[0]
        except EOFError:
            self._proc.join(5)
            self._conn.close()
            raise RuntimeError(f"the engine process exited while loading {target} "
                               f"(exit code {self._proc.exitcode})") from None
        except BaseException:
            self._kill()
            self._conn.close()
            raise
        if msg[0] == "failed":
            _, kind, message, trace = msg
            self._proc.join(STOP_TIMEOUT_S)
            self._conn.close()
            if kind in _LOAD_ERRORS:  # a user's error: one line at the CLI
                raise _LOAD_ERRORS[kind](message)
            error = RuntimeError(f"loading {target} failed in the engine process: {kind}: {message}")
            error.add_note(f"in the engine process:\n{trace}")  # a bug: its traceback too
            raise error
        _, self.info, (self.max_queue, self.max_prompt_tokens) = msg
        self.capacity = self.info.capacity
        self.vocab_size = self.info.vocab_size
        self.pool = _Pool(self.info.state_bytes)
        self.on_events: Callable[[list[Sequence]], None] | None = None
        self._ids = itertools.count(1)
        self._live: dict[int, Sequence] = {}  # request id -> its mirror, until it finishes
        self._snapshot = (Stats(), 0, 0, 0)  # the engine's (stats, active, prefilling, queued)
        self._rejected = 0  # requests refused here (queue full): the engine never sees them
        self._failed = 0  # requests failed here when the engine process died
        self._eof = False

    # --- the scheduler's interface, as the HTTP layer uses it ----------------------------------------
    @property
    def stats(self) -> Stats:
        st = self._snapshot[0]
        if not (self._rejected or self._failed):
            return st
        finished = dict(st.finished)
        finished["error"] = finished.get("error", 0) + self._failed
        return replace(st, rejected=st.rejected + self._rejected, finished=finished)

    # the gauges: the engine's last word while it runs; once it is gone nothing runs or waits
    @property
    def active(self) -> int:
        return self._snapshot[1] if self.alive else 0

    @property
    def prefilling(self) -> int:
        return self._snapshot[2] if self.alive else 0

    @property
    def queued(self) -> int:
        return self._snapshot[3] if self.alive else 0

    @property
    def alive(self) -> bool:
        return not self._eof and self._proc.is_alive()

    def submit_many(self, prompts, params: list, sinks: list) -> list[Sequence]:
        """As :meth:`Scheduler.submit_many`: ValueError for a bad prompt, QueueFullError when full."""
        arrays = [check_prompt(p, self.vocab_size, self.max_prompt_tokens) for p in prompts]
        if not self.alive:
            raise RuntimeError("the engine process is not running")
        if len(self._live) + len(arrays) > self.capacity + self.max_queue:
            self._rejected += len(arrays)
            raise QueueFullError(self.capacity, self.max_queue)
        now = time.perf_counter()
        seqs = [Sequence(next(self._ids), a, p, sink=s, t_submit=now) for a, p, s in zip(arrays, params, sinks)]
        for s in seqs:
            self._live[s.id] = s
        self._send(("submit", [(s.id, s.prompt, s.params) for s in seqs]))
        return seqs

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop ``seq``; its finish (``reason``) comes back from the engine like any other."""
        if seq.finish_reason is None and not seq._cancel and seq.id in self._live:
            seq._cancel = reason
            self._send(("cancel", seq.id, reason))

    def start(self) -> None:
        """Read the engine's messages on the running event loop (call it from there); from now on
        sends do not block."""
        self._end.start(asyncio.get_running_loop(), self._receive, self._engine_gone)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Ask the engine to stop; read (and drop) what it still sends until it exits, so that a
        send of its cannot hold it; kill it after ``timeout``."""
        if self._conn.closed:
            return
        deadline = time.monotonic() + timeout
        try:
            self._end.close(("stop",), lambda: not self._proc.is_alive(), timeout)
        except OSError:  # it has exited
            pass
        self._proc.join(max(0.0, deadline - time.monotonic()))
        self._kill()
        self._conn.close()

    # --- the server process ----------------------------------------------------------------------------
    def _send(self, msg) -> None:
        if self._eof:
            return
        try:
            self._end.send(msg)
        except OSError:  # the engine is gone (a blocking send): the reader sees the end of the stream
            pass

    def _receive(self, msgs: list) -> None:  # the event loop
        changed: dict[Sequence, None] = {}
        live = self._live
        for kind, payload in msgs:
            if kind == "events":
                ids, one_token, others = payload
                for rid, token in zip(ids, one_token):
                    s = live.get(rid)
                    if s is not None:
                        s.tokens.append(token)
                        changed[s] = None
                for rid, tokens, reason, error in others:
                    s = live.get(rid)
                    if s is None:
                        continue
                    s.tokens += tokens
                    if reason is not None:  # tokens first: readers take finish_reason first
                        s.error = error
                        s.finish_reason = reason
                        del live[rid]
                    changed[s] = None
            elif kind == "stats":
                self._snapshot = payload
        if changed and self.on_events is not None:
            self.on_events(list(changed))

    def _engine_gone(self) -> None:  # the event loop
        self._eof = True
        log.error("the engine process exited (exit code %s): failing %d requests",
                  self._proc.exitcode, len(self._live))
        for s in self._live.values():
            s.error = "the engine process exited"
            s.finish_reason = "error"
        gone = list(self._live.values())
        self._failed += len(gone)
        self._live.clear()
        if gone and self.on_events is not None:
            self.on_events(gone)

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


# --- the engine process ------------------------------------------------------------------------------
def _engine_main(conn, target: str, backend_options: dict, scheduler_options: dict) -> None:
    import signal
    import traceback

    from .backend import load_backend

    # Ctrl-C, or a service manager's SIGTERM, reaches the whole process group: the server stops us
    # once its requests are done
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = conn.fileno()
    try:
        backend = load_backend(target, **backend_options)
        scheduler = Scheduler(backend.pool, **scheduler_options)
    except Exception as e:  # raised again in the server process
        _write_all(fd, _Frames.frame(("failed", type(e).__name__, str(e), traceback.format_exc())))
        return
    _write_all(fd, _Frames.frame(("ready", ServedModel.of(backend, scheduler),
                                  (scheduler.max_queue, scheduler.max_prompt_tokens))))
    gc.collect()
    gc.freeze()  # what loading left lives as long as the process: later collections skip it
    _Engine(fd, scheduler).run()


class _Engine:
    """The child's loop: take the server's messages, run one scheduler iteration, send what changed
    (see the module doc)."""

    def __init__(self, fd: int, scheduler: Scheduler):
        self.fd, self.scheduler = fd, scheduler
        self.frames = _Frames()
        self.by_id: dict[int, Sequence] = {}  # request id -> the scheduler's sequence (its sink: the id)
        self.sent: dict[Sequence, int] = {}  # tokens already sent
        self.stats_sent = -math.inf
        # the counters moved since the last ("stats", ...): an iteration ran, or sequences finished
        # (an iteration that only drops a cancelled sequence runs nothing, yet active falls)
        self.changed = False
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)
        scheduler.on_events = self.hand_off

    def send(self, msg) -> None:
        _write_all(self.fd, _Frames.frame(msg))

    def run(self) -> None:
        try:
            while self.receive(block=False):
                busy = self.scheduler.safe_step()
                self.changed |= busy
                now = time.perf_counter()
                if self.changed and (not busy or now - self.stats_sent >= STATS_INTERVAL_S):
                    s = self.scheduler
                    self.send(("stats", (s.stats, s.active, s.prefilling, s.queued)))
                    self.stats_sent, self.changed = now, False
                # idle: wait for a message (a failed iteration is idle too, but leaves the queue to admit)
                if not busy and not self.scheduler.queued and not self.receive(block=True):
                    return
        except OSError:  # the server process is gone (a send to it failed)
            return

    def receive(self, block: bool) -> bool:
        """Apply the server's waiting messages (wait for one when ``block``); False: stop."""
        try:
            if block:
                msgs = _read_blocking(self.fd, self.frames, None)
            elif self.poll.poll(0):
                data = os.read(self.fd, READ_BYTES)
                if not data:
                    raise EOFError
                msgs = self.frames.feed(data)
            else:
                return True
        except (EOFError, OSError):  # the server process is gone
            return False
        for msg in msgs:
            if msg[0] == "submit":
                self.submit(msg[1])
            elif msg[0] == "cancel":
                s = self.by_id.get(msg[1])
                if s is not None:
                    self.scheduler.cancel(s, msg[2])
            elif msg[0] == "stop":
                return False
        return True

    def submit(self, requests: list) -> None:
        try:
            seqs = self.scheduler.submit_many([r[1] for r in requests], [r[2] for r in requests],
                                              [r[0] for r in requests])
        except Exception as e:  # the server checked them as we would: a bug, but not ours to die of
            log.exception("the engine refused requests the server had admitted")
            self.send(("events", ([], [], [(r[0], [], "error", f"the engine refused the request: {e}")
                                           for r in requests])))
            return
        self.by_id.update((s.sink, s) for s in seqs)

    def hand_off(self, seqs: list[Sequence]) -> None:
        ids, one_token, others = [], [], []  # see the module doc: ("events", (ids, tokens, others))
        sent = self.sent
        for s in seqs:
            tokens = s.tokens
            k = sent.get(s, 0)
            if s.finish_reason is None:
                sent[s] = len(tokens)
                if len(tokens) == k + 1:  # a running stream's next token: what nearly every step sends
                    ids.append(s.sink)
                    one_token.append(tokens[k])
                else:
                    others.append((s.sink, tokens[k:], None, None))
            else:
                others.append((s.sink, tokens[k:], s.finish_reason, s.error))
                self.by_id.pop(s.sink, None)
                sent.pop(s, None)
        if ids or others:
            self.changed = True
            self.send(("events", (ids, one_token, others)))
