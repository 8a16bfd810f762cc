"""The HTTP layer: the OpenAI completions API over a :class:`~.scheduler.Scheduler` (Starlette,
run by uvicorn; POST /v1/completions, the one route that streams, is an ASGI function that uvicorn
calls directly, past Starlette's middleware).

    POST /v1/completions   prompt (text or token ids), max_tokens, temperature, top_p, seed, stop,
                           stream (server-sent events), stream_options.include_usage, ignore_eos
    GET  /v1/models        the one model served; GET /v1/models/{id}: that model
    GET  /health           200 while the scheduler runs
    GET  /metrics          Prometheus text: requests, tokens, active sequences, queue, latencies
    /v1/chat/completions   404 saying why (no chat template: only /v1/completions is served)

The scheduler runs in its own thread (a :class:`~.scheduler.Scheduler`) or in an engine process
(an :class:`~.engine.EngineProcess`, whose messages arrive on the event loop); after each
iteration it hands the sequences that changed to the event loop in one call, which wakes their
requests. A request whose client disconnects cancels its sequences (the slot is free after the
current iteration). Every error a client can cause is a 4xx with OpenAI's JSON error shape (404s
too; a path with a trailing slash is a 404, not a redirect); 503 with Retry-After when the server is
full. When the server shuts down (SIGTERM, Ctrl-C) it does not wait for generations to run out: every
request in flight ends at once (a stream with an error event, a plain request with 503), and uvicorn
waits at most GRACEFUL_SHUTDOWN_S for the connections to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Any

from ..tokenizer import TextStream
from .protocol import RequestError, error_body, model_not_found, parse_completion_request
from .scheduler import QueueFullError, Scheduler

__all__ = ["create_app", "serve"]

log = logging.getLogger("xlstm_export.serve")

RETRY_AFTER_S = 1
GRACEFUL_SHUTDOWN_S = 5.0  # at shutdown, connections still open after this long are cut
SHUTTING_DOWN = "the server is shutting down"
ABORTED_WRITE_S = 1.0  # after shutdown began, a streamed write waits this long for a client that does not read
MAX_BODY_BYTES = 32 << 20  # a request body larger than this gets 413
SWITCH_INTERVAL_S = 0.0002  # GIL hand-over interval while serving (Python's default: 0.005)


_json_str = json.encoder.encode_basestring_ascii  # str -> its JSON string literal, as json.dumps writes it


class _Disconnected(Exception):
    pass


class _Aborted(RuntimeError):
    """The server ended the request (it is shutting down)."""


class _Waiter:
    """The sink of one request's sequences: the scheduler's hand-off (and a disconnect) ``wake`` it,
    on the event loop; ``wait`` returns at once when woken since the last wait. (One future per
    wait: asyncio.Event's set / wait / clear cost more, on every streamed token.)"""

    __slots__ = ("pending", "future")

    def __init__(self):
        self.pending = False
        self.future: asyncio.Future | None = None

    def wake(self) -> None:
        self.pending = True
        if self.future is not None and not self.future.done():
            self.future.set_result(None)

    async def wait(self) -> None:
        if not self.pending:
            self.future = asyncio.get_running_loop().create_future()
            try:
                await self.future
            finally:
                self.future = None
        self.pending = False


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class _Completion:
    """One request's sequences, read as they progress: text deltas and finish reasons."""

    def __init__(self, scheduler: Scheduler, seqs, waiter: _Waiter, tokenizer, stop):
        self.scheduler = scheduler
        self.seqs = seqs
        self.waiter = waiter
        self.texts = [TextStream(tokenizer, stop) for _ in seqs]
        self.read = [0] * len(seqs)  # tokens taken from each sequence
        self.token_ids: list[list[int]] = [[] for _ in seqs]
        self.finish: list[str | None] = [None] * len(seqs)
        self.unfinished = len(seqs)
        self.aborted: str | None = None  # why the server ended the request (see abort)
        self.sending: asyncio.Task | None = None  # the stream's task while it waits to write (see abort)

    @property
    def done(self) -> bool:
        return not self.unfinished

    async def updates(self, disconnect: asyncio.Future):
        """Yields lists of (index, text delta, token ids, finish reason or None) until all finish;
        raises _Disconnected when the client goes away."""
        disconnect.add_done_callback(lambda _: self.waiter.wake())  # a disconnect wakes us too
        while self.unfinished:
            await self.waiter.wait()
            if disconnect.done():
                raise _Disconnected
            if self.aborted is not None:
                raise _Aborted(self.aborted)
            out = []
            for i, s in enumerate(self.seqs):
                if self.finish[i] is not None:
                    continue
                reason = s.finish_reason  # before the tokens: all of them are in by then
                new = s.tokens[self.read[i]:]
                self.read[i] += len(new)
                if reason == "error":
                    raise RuntimeError(s.error or "generation failed")
                if reason == "cancelled":
                    raise RuntimeError("the sequence was cancelled by the server")
                text, used = self.texts[i].push(new)
                ids = new[:used]
                self.token_ids[i] += ids
                if self.texts[i].stopped:
                    self.scheduler.cancel(s, "stop")
                    reason = "stop"
                elif reason is not None:
                    text += self.texts[i].finish()
                    if self.texts[i].stopped:  # the held-back end (an incomplete character) held a stop string
                        reason = "stop"
                if text or ids or reason:
                    out.append((i, text, ids, reason))
                if reason is not None:
                    self.finish[i] = reason
                    self.unfinished -= 1
            if out:
                yield out

    def cancel(self) -> None:
        for s in self.seqs:
            self.scheduler.cancel(s)

    def abort(self, why: str) -> None:
        """End the request now (``updates`` raises _Aborted) and cancel its sequences (event loop)."""
        self.aborted = why
        self.cancel()
        self.waiter.wake()
        if self.sending is not None:  # a stream whose client stopped reading waits to write: it ends here
            self.sending.cancel()

    def usage(self) -> dict:
        prompt = sum(len(s.prompt) for s in self.seqs)
        completion = sum(len(t) for t in self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def create_app(scheduler: Scheduler, *, model_name: str, tokenizer=None, label: str = ""):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    created = int(time.time())
    eos = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
    # a request with more prompts than the slots and the queue hold could never be admitted: a 400, not a 503
    max_prompts = scheduler.capacity + scheduler.max_queue
    http_counts: dict[int, int] = {}
    loop_box: dict[str, Any] = {}
    live: set[_Completion] = set()  # the requests in flight (event loop)
    reading: set[asyncio.Task] = set()  # the requests still waiting for their bodies (event loop)
    closing = False  # set by shut_down

    def count(status: int) -> None:
        http_counts[status] = http_counts.get(status, 0) + 1

    def error(status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        count(status)
        return JSONResponse(body, status_code=status, headers=headers)

    async def respond(send, status: int, body: dict | None, headers: dict | None = None) -> None:
        """A JSON response (or an empty one) through the server's own ``send``, as JSONResponse writes it."""
        count(status)
        data = b"" if body is None else json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        fields = [(b"content-length", str(len(data)).encode())]
        if body is not None:
            fields.append((b"content-type", b"application/json"))
        fields += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": fields})
        await send({"type": "http.response.body", "body": data})

    def hand_off(seqs) -> None:  # the scheduler thread, or the event loop (an engine process's messages)
        loop = loop_box.get("loop")
        if threading.get_ident() == loop_box.get("thread"):
            _wake(seqs)
        elif loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_wake, seqs)

    def _wake(seqs) -> None:  # event loop
        for s in seqs:
            if s.sink is not None:
                s.sink.wake()

    async def completions(scope, receive, send) -> None:
        """POST /v1/completions, an ASGI app of its own (see _App)."""
        raw = bytearray()
        task = asyncio.current_task()
        reading.add(task)  # until the body is in, shut_down interrupts the wait for it
        try:
            while not closing and len(raw) <= MAX_BODY_BYTES:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                raw += message.get("body", b"")
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if not closing:
                raise
            _uncancel(task)  # shut_down's cancel, handled: the rest of the body is not read
        finally:
            reading.discard(task)
        if closing:  # (the body may be unread: the connection closes after the answer)
            return await respond(send, 503, error_body(SHUTTING_DOWN, "server_error"), {"Connection": "close"})
        if len(raw) > MAX_BODY_BYTES:
            return await respond(send, 413, error_body(f"the request body exceeds {MAX_BODY_BYTES} bytes"))
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, too deep
            return await respond(send, 400, error_body(f"the request body is not valid JSON: {e}"))
        try:
            req = parse_completion_request(body, model_name=model_name, tokenizer=tokenizer,
                                           vocab_size=scheduler.vocab_size, eos_token_ids=eos,
                                           max_prompts=max_prompts)
        except RequestError as e:
            return await respond(send, e.status, e.body())
        waiter = _Waiter()
        try:
            seqs = scheduler.submit_many(req.prompts, [req.params] * len(req.prompts), [waiter] * len(req.prompts))
        except QueueFullError as e:
            return await respond(send, 503, error_body(f"{e}; retry later", "server_error", None, "server_busy"),
                                 {"Retry-After": str(RETRY_AFTER_S)})
        except RuntimeError as e:  # the engine process is gone
            return await respond(send, 503, error_body(str(e), "server_error"))
        except ValueError as e:
            return await respond(send, 400, error_body(str(e), param="prompt"))
        comp = _Completion(scheduler, seqs, waiter, tokenizer, req.stop)
        cid = f"cmpl-{uuid.uuid4().hex}"
        live.add(comp)
        try:
            if req.stream:
                count(200)
                return await _SSE(comp, cid, created_now(), model_name, req.include_usage)(scope, receive, send)
            disconnect = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                async for _ in comp.updates(disconnect):  # each sequence's TextStream gathers its text
                    pass
            except _Disconnected:
                comp.cancel()
                return await respond(send, 499, None)
            except _Aborted as e:
                return await respond(send, 503, error_body(str(e), "server_error"))
            except RuntimeError as e:
                comp.cancel()
                return await respond(send, 500, error_body(str(e), "server_error"))
            finally:
                disconnect.cancel()
                if not comp.done:
                    comp.cancel()
        finally:
            live.discard(comp)
        choices = [{"index": i, "text": comp.texts[i].text, "logprobs": None, "finish_reason": comp.finish[i],
                    "token_ids": comp.token_ids[i]} for i in range(len(seqs))]
        await respond(send, 200, {"id": cid, "object": "text_completion", "created": created_now(),
                                  "model": model_name, "choices": choices, "usage": comp.usage()})

    async def guarded_completions(scope, receive, send) -> None:
        """``completions``: a bug there is logged and answered with 500 (unless the response had
        started: then uvicorn closes the connection)."""
        try:
            await completions(scope, receive, send)
        except Exception:
            log.exception("request failed")
            with contextlib.suppress(Exception):
                await respond(send, 500, error_body("internal server error", "server_error"))

    def shut_down() -> None:
        """The server is stopping (event loop): refuse new requests and end those in flight now,
        rather than when their generations would run out (a stream of 65536 tokens takes minutes)."""
        nonlocal closing
        closing = True
        for comp in list(live):
            comp.abort(SHUTTING_DOWN)
        for task in list(reading):  # a body still on its way (a slow upload, a client that stalled): 503 now
            task.cancel()

    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "xlstm-export"}

    async def models(request: Request):
        count(200)
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request):
        if request.path_params["model_id"] != model_name:
            e = model_not_found(request.path_params["model_id"], model_name)
            return error(e.status, e.body())
        count(200)
        return JSONResponse(model_card)

    async def chat(request: Request):
        return error(404, error_body(f"{request.url.path} is not served: the model has no chat template; this "
                                     "server serves completions of a prompt (POST /v1/completions)", code="not_found"))

    async def health(request: Request):
        alive = scheduler.alive
        count(200 if alive else 503)
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    async def metrics(request: Request):
        count(200)
        return PlainTextResponse(_prometheus(scheduler, http_counts),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException):  # 404 and 405 (with its Allow header)
        return error(exc.status_code, error_body(str(exc.detail), "invalid_request_error"), exc.headers)

    async def server_error(request: Request, exc: Exception):
        log.exception("request failed")
        return error(500, error_body("internal server error", "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop_box["loop"], loop_box["thread"] = asyncio.get_running_loop(), threading.get_ident()
        scheduler.on_events = hand_off
        scheduler.start()
        log.info("serving %s with %s: %d slots", model_name, label, scheduler.capacity)
        try:
            yield
        finally:
            shut_down()
            scheduler.stop()

    routes = [Route("/v1/completions", _ASGIEndpoint(guarded_completions), methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", model, methods=["GET"]),  # an id may hold a "/"
              Route("/v1/chat/completions", chat, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    # no 307 from "/v1/completions/" to a Location built from the client's Host header: a 404
    app.router.redirect_slashes = False
    return _App(app, guarded_completions, shut_down)


class _ASGIEndpoint:
    """An ASGI function as a Starlette route's endpoint (Starlette calls plain functions with a Request)."""

    def __init__(self, fn):
        self.fn = fn

    async def __call__(self, scope, receive, send) -> None:
        await self.fn(scope, receive, send)


class _App:
    """The Starlette app, with POST /v1/completions taken straight to its handler: Starlette's
    middleware would wrap the send of every streamed event in three more coroutines. (The route
    stays in Starlette too, which answers its other methods with 405.) ``shut_down()``, on the
    event loop when the server begins to stop, ends the requests in flight (:func:`serve` calls it)."""

    def __init__(self, app, completions, shut_down):
        self.app, self.completions, self.shut_down = app, completions, shut_down

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/completions":
            await self.completions(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def created_now() -> int:
    return int(time.time())


class _SSE:
    """A streamed completion as server-sent events (an ASGI response): one event per update of
    the request's sequences (tokens that arrive together go together), then ``data: [DONE]``.
    The client going away cancels the sequences."""

    def __init__(self, comp: _Completion, cid: str, created: int, model: str, include_usage: bool):
        self.comp, self.cid, self.created, self.model, self.include_usage = comp, cid, created, model, include_usage
        # an event's bytes around its choices: what _token_event writes each choice between
        empty = self._event([])
        cut = empty.rindex(b'"choices":[') + len(b'"choices":[')
        self._head, self._tail = empty[:cut], empty[cut:]

    def _event(self, choices: list, usage: dict | None = None) -> bytes:
        body = {"id": self.cid, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def _token_event(self, updates: list) -> bytes:
        """``_event`` of the updates' choices, byte for byte, without building the dicts: the event
        of every streamed token goes through here (at 32 streams, json.dumps alone was a fifth of
        the event loop's time per token)."""
        parts = [self._head]
        for n, (i, text, ids, reason) in enumerate(updates):
            parts.append(b'%s{"index":%d,"text":%s,"logprobs":null,"finish_reason":%s,"token_ids":[%s]}' % (
                b"," if n else b"", i, _json_str(text).encode(), b"null" if reason is None else _json_str(reason).encode(),
                ",".join(map(str, ids)).encode()))
        parts.append(self._tail)
        return b"".join(parts)

    async def _send(self, send, message: dict) -> None:
        """``send`` that shutting down can interrupt: a client that stopped reading leaves the
        stream waiting to write (uvicorn's flow control), and ``_Completion.abort`` cancels that
        wait. Once aborted, a write that cannot go at once is given up (the client is not reading)."""
        if self.comp.aborted is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(send(message), ABORTED_WRITE_S)
            return
        self.comp.sending = asyncio.current_task()
        try:
            await send(message)
        finally:
            self.comp.sending = None

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        disconnect = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            async for updates in self.comp.updates(disconnect):
                await self._send(send, {"type": "http.response.body", "body": self._token_event(updates),
                                        "more_body": True})
            tail = b""
            if self.include_usage:
                tail = self._event([], self.comp.usage())
            await self._send(send, {"type": "http.response.body", "body": tail + b"data: [DONE]\n\n",
                                    "more_body": False})
        except (_Disconnected, OSError):
            pass  # the client went away
        except RuntimeError as e:
            err = json.dumps(error_body(str(e), "server_error")).encode()
            try:
                await self._send(send, {"type": "http.response.body", "body": b"data: " + err + b"\n\n",
                                        "more_body": False})
            except OSError:
                pass
        except asyncio.CancelledError:
            if self.comp.aborted is None:  # not ours (abort's): pass it on
                raise
            _uncancel(asyncio.current_task())  # the server is stopping: uvicorn closes the connection
        finally:
            disconnect.cancel()
            if not self.comp.done:
                self.comp.cancel()


def serve(app: _App, sock: socket.socket, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn on the listening socket ``sock`` until interrupted (SIGINT, SIGTERM).
    Shutting down ends the requests in flight at once (``app.shut_down``) and waits at most
    GRACEFUL_SHUTDOWN_S for their connections; then SIGTERM ends the process with exit code 0."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            _drop_unread_connections(self.server_state)  # first: their streams then end as disconnected
            app.shut_down()  # before uvicorn waits for the connections: the streams end now
            await super().shutdown(sockets)

    # The scheduler thread needs the GIL back as soon as each decode step leaves onnxruntime; with
    # the default 5 ms switch interval it can wait that long behind the event loop's streaming work.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    # this process serves until it exits: what was loaded so far (the app, the model or the engine
    # process's handle, the imports) lives as long, and the collector's rounds skip it from now on
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(app, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    # uvicorn re-raises the signal it shut down on once it has; a SIGTERM (a service manager's stop)
    # then finds this handler rather than the default one, which would end the process with -15
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    try:
        Server(config).run(sockets=[sock])
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _uncancel(task: asyncio.Task) -> None:
    """The task's cancellation was caught and handled (Python >= 3.11 counts them; 3.10 does not)."""
    if hasattr(task, "uncancel"):
        task.uncancel()


def _drop_unread_connections(state) -> None:
    """At shutdown, close at once the connections of clients that stopped reading (uvicorn's flow
    control has paused writing to them): their unread bytes would otherwise hold the exit for
    GRACEFUL_SHUTDOWN_S. Reads uvicorn's connection objects (``transport``, ``flow``); where those
    are missing, the grace time does the same later."""
    for conn in list(getattr(state, "connections", ())):
        flow, transport = getattr(conn, "flow", None), getattr(conn, "transport", None)
        if transport is not None and getattr(flow, "write_paused", False):
            transport.abort()


def _stopped(signum, frame) -> None:
    """SIGTERM after uvicorn's shutdown: nothing left to do (the process exits 0)."""


def _prometheus(s: Scheduler, http_counts: dict[int, int]) -> str:
    st = s.stats
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP xlstm_{name} {help_}")
        lines.append(f"# TYPE xlstm_{name} {kind}")
        for labels, value in samples:
            lines.append(f"xlstm_{name}{labels} {value}")

    metric("http_requests_total", "counter", "HTTP responses by status code.",
           [(f'{{code="{c}"}}', n) for c, n in sorted(http_counts.items())])
    metric("requests_submitted_total", "counter", "Sequences accepted by the scheduler.", [("", st.submitted)])
    metric("requests_rejected_total", "counter", "Sequences refused because the queue was full (503).",
           [("", st.rejected)])
    metric("requests_finished_total", "counter", "Sequences finished, by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(st.finished.items())])
    metric("prompt_tokens_total", "counter", "Prompt tokens prefilled or admitted.", [("", st.prompt_tokens)])
    metric("generated_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens)])
    metric("active_sequences", "gauge", "Sequences in the running decode batch.", [("", s.active)])
    metric("prefilling_sequences", "gauge", "Sequences whose prompts are being prefilled.", [("", s.prefilling)])
    metric("queued_sequences", "gauge", "Sequences waiting for a slot.", [("", s.queued)])
    metric("slots", "gauge", "Sequences that can hold a state slot at once.", [("", s.capacity)])
    metric("state_bytes_per_sequence", "gauge", "Recurrent state of one sequence (float32).",
           [("", s.pool.state_bytes)])
    metric("decode_steps_total", "counter", "Decode steps run.", [("", st.decode_steps)])
    metric("decode_rows_total", "counter", "Sequences summed over decode steps (mean batch = rows / steps).",
           [("", st.decode_rows)])
    metric("prefill_chunks_total", "counter", "Prefill chunks run.", [("", st.prefill_chunks)])
    metric("prefill_rows_total", "counter",
           "Sequences summed over prefill chunks (mean chunk batch = rows / chunks).", [("", st.prefill_rows)])
    for name, h, what in (("step_latency_seconds", st.step_latency, "Decode step latency (one batch)."),
                          ("prefill_latency_seconds", st.prefill_latency, "Prefill chunk latency."),
                          ("time_to_first_token_seconds", st.first_token_latency,
                           "From a sequence's submission to the scheduler to its first token.")):
        samples = [(f'{{le="{b:g}"}}', c) for b, c in zip(h.buckets, h.cumulative())]
        samples += [('{le="+Inf"}', h.n), ("_sum", f"{h.total:.6f}"), ("_count", h.n)]
        lines.append(f"# HELP xlstm_{name} {what}")
        lines.append(f"# TYPE xlstm_{name} histogram")
        for labels, value in samples:
            if labels.startswith("_"):
                lines.append(f"xlstm_{name}{labels} {value}")
            else:
                lines.append(f"xlstm_{name}_bucket{labels} {value}")
    return "\n".join(lines) + "\n"
