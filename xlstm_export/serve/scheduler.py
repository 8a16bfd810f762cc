"""Continuous batching over recurrent state: the serving loop, without any HTTP.

Every active sequence holds a state slot (a row of the slot pool, :mod:`.slots`). One scheduler
iteration

1. drops cancelled sequences and admits waiting ones while slots are free (``capacity`` bounds the
   sequences being prefilled or decoded; beyond it a bounded queue, then :class:`QueueFullError`);
2. runs one bounded prefill chunk: up to ``prefill_chunk`` prompt tokens of each of a few new
   sequences whose next chunks have the same length, ``prefill_tokens`` tokens in all, so a long
   prompt delays the running streams by one chunk at most; a sequence whose prompt is done takes
   its first token from the chunk's last logits and joins the running batch;
3. runs one decode step for all running sequences as one batch (rows ``0..n-1`` of the pool);
   finished and cancelled sequences leave at once (the last row moves into the freed one).

A recurrent state has a fixed size, so nothing grows with a sequence's length: the memory of a
slot is known up front, which is what admission counts.

    sched = Scheduler(OrtSlots(model, 32), max_batch=32, max_queue=64)
    seq = sched.submit([1, 2, 3], SamplingParams(max_tokens=8, temperature=0))
    while seq.finish_reason is None:
        sched.step()                 # or sched.start(): the same loop in a background thread
    seq.tokens                       # the 8 new token ids

``on_events(seqs)`` is called after each iteration with the sequences that got tokens or
finished; readers take ``seq.finish_reason`` first, then ``seq.tokens`` (tokens are appended
before a sequence is marked finished). With ``stream_interval`` > 0 the tokens of running sequences
gather and are handed on at most that often (each reader then takes several tokens at once, which
is what streaming costs per token at high concurrency); a sequence's first token, finish or
cancellation still goes after its iteration, that sequence alone.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .sampling import SamplingParams, greedy, sample_row

__all__ = ["QueueFullError", "Scheduler", "Sequence", "Stats", "check_prompt"]

log = logging.getLogger("xlstm_export.serve")

# Prometheus histogram buckets (seconds) for decode steps and prefill chunks.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full: try again later (HTTP 503)."""

    def __init__(self, capacity: int, max_queue: int):
        super().__init__(f"all {capacity} sequence slots are busy and the queue of {max_queue} is full")


def check_prompt(prompt, vocab_size: int, max_tokens: int) -> np.ndarray:
    """A prompt as (S,) int64 token ids, or ValueError saying what is wrong with it."""
    a = np.asarray(prompt)
    if a.ndim != 1 or a.size < 1:
        raise ValueError("the prompt must be a non-empty list of token ids")
    if a.dtype.kind not in "iu":
        raise ValueError("token ids must be integers")
    if a.size > max_tokens:
        raise ValueError(f"the prompt has {a.size} tokens; this server takes at most {max_tokens}")
    if a.min() < 0 or a.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got values in [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


@dataclass(eq=False)
class Sequence:
    """One request's generation. The scheduler thread writes it; others read (see module doc)."""

    id: int
    prompt: np.ndarray  # (S,) int64
    params: SamplingParams
    sink: Any = None  # the caller's handle (the HTTP layer's stream)
    tokens: list[int] = field(default_factory=list)  # generated ids, EOS included when it ends the sequence
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None  # when the first token was sampled
    # scheduler-private
    _rng: Any = None  # the sampling generator (None when greedy: a fresh one costs ~30 us per request)
    _pos: int = 0  # prompt tokens prefilled
    _state: Any = None  # the state while prefilling (a pool's per-sequence state)
    _cancel: str | bool = False  # the finish reason it was cancelled with


@dataclass
class _Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        j = bisect.bisect_left(self.buckets, seconds)  # the first bucket >= seconds
        if j < len(self.counts):
            self.counts[j] += 1
        self.total += seconds
        self.n += 1

    def cumulative(self) -> list[int]:
        """Prometheus' bucket counts: observations <= each bound."""
        return list(itertools.accumulate(self.counts))


@dataclass
class Stats:
    """Counters and gauges for /metrics (read without a lock: each field is one int/float)."""

    submitted: int = 0
    rejected: int = 0  # queue full
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "cancelled": 0, "error": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of the batch sizes of the decode steps
    prefill_chunks: int = 0
    prefill_rows: int = 0  # sum of the sequences of the prefill chunks
    step_latency: _Histogram = field(default_factory=_Histogram)
    prefill_latency: _Histogram = field(default_factory=_Histogram)
    first_token_latency: _Histogram = field(default_factory=_Histogram)  # submit -> first token sampled


class Scheduler:
    def __init__(self, pool, *, max_batch: int, max_queue: int = 256, prefill_chunk: int = 64,
                 prefill_tokens: int = 256, max_prompt_tokens: int = 1 << 16, stream_interval: float = 0.0,
                 on_events: Callable[[list[Sequence]], None] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not 1 <= prefill_chunk <= prefill_tokens:
            raise ValueError(f"need 1 <= prefill_chunk <= prefill_tokens, got {prefill_chunk}, {prefill_tokens}")
        if not stream_interval >= 0:
            raise ValueError(f"stream_interval must be >= 0 seconds, got {stream_interval}")
        self.pool = pool
        self.capacity = min(max_batch, pool.capacity)  # sequences holding a slot at once
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.prefill_tokens = prefill_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.stream_interval = stream_interval
        self.vocab_size = pool.vocab_size
        self.on_events = on_events
        self.stats = Stats()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # guards _waiting and _cancelled (touched by other threads)
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Sequence] = deque()
        self._cancelled: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # scheduler thread only
        self._running: list[Sequence] = []  # row i of the pool is _running[i]
        self._admitted: dict[Sequence, None] = {}  # prefilling or running, until they finish
        self._last = np.zeros(self.capacity, np.int64)  # (capacity,) row i's last token: its next input
        self._sampled = np.zeros(self.capacity, bool)  # (capacity,) row i samples (is not greedy)
        self._events: dict[Sequence, None] = {}  # sequences with news since their last hand-off, in order
        self._urgent: list[Sequence] = []  # of those, the ones that go after this iteration: first tokens, ends
        self._last_flush = -math.inf  # perf_counter of the last hand-off of all
        self._thread: threading.Thread | None = None
        self._stop = False

    # --- called from any thread ------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def prefilling(self) -> int:
        return len(self._prefilling)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, prompt, params: SamplingParams, sink: Any = None) -> Sequence:
        """Queue a prompt (token ids) for generation; raises ValueError for a bad prompt and
        QueueFullError when every slot is taken and the queue is full."""
        return self.submit_many([prompt], [params], [sink])[0]

    def submit_many(self, prompts, params: list[SamplingParams], sinks: list[Any]) -> list[Sequence]:
        """Several prompts at once: all are queued, or none (QueueFullError)."""
        arrays = [check_prompt(p, self.vocab_size, self.max_prompt_tokens) for p in prompts]
        now = time.perf_counter()
        with self._lock:
            busy = len(self._prefilling) + len(self._running) + len(self._waiting)
            if busy + len(arrays) > self.capacity + self.max_queue:
                self.stats.rejected += len(arrays)
                raise QueueFullError(self.capacity, self.max_queue)
            seqs = [Sequence(next(self._ids), a, p, sink=s, t_submit=now, _rng=None if p.greedy else p.generator())
                    for a, p, s in zip(arrays, params, sinks)]
            self._waiting.extend(seqs)
            self.stats.submitted += len(seqs)
            self._wake.notify()
        return seqs

    @property
    def alive(self) -> bool:
        """The background loop is running."""
        return self._thread is not None and self._thread.is_alive()

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop ``seq``; its slot is free after the current iteration (at once if it was queued).
        ``reason`` is its finish reason ("stop" when the caller found a stop string)."""
        with self._lock:
            if seq.finish_reason is not None or seq._cancel:
                return
            seq._cancel = reason
            try:
                self._waiting.remove(seq)
            except ValueError:  # prefilling or running: the scheduler thread drops it
                self._cancelled.append(seq)
                self._wake.notify()
                return
            seq.finish_reason = reason  # never started: nothing of it is in the pool
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        if self.on_events is not None:
            self.on_events([seq])

    def start(self) -> None:
        """Run the loop in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="xlstm-serve-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop:
            if not self.safe_step():
                with self._lock:
                    self._wake.wait_for(lambda: self._stop or self._waiting or self._cancelled, timeout=1.0)

    # --- the scheduler thread --------------------------------------------------------------------
    def safe_step(self) -> bool:
        """:meth:`step` for a serving loop: a bug must not end the loop, so an iteration that raises
        is logged and fails what was in flight. Returns False when there was nothing to do."""
        try:
            return self.step()
        except Exception:
            log.exception("scheduler iteration failed")
            for s in list(self._admitted):  # also one caught between the lists when it failed
                self._finish(s, "error", "internal error in the scheduler")
            self._prefilling.clear()
            self._running.clear()
            self._flush_events()
            return False

    def step(self) -> bool:
        """One iteration (see the module doc). Returns False when there was nothing to do."""
        self._drop_cancelled()
        self._admit()
        did = False
        if self._prefilling:
            self._prefill_chunk()
            did = True
        if self._running:
            self._decode_step()
            did = True
        self._flush_events()
        return did

    def _drop_cancelled(self) -> None:
        if not self._cancelled:  # unlocked peek; a cancel that lands now is taken next iteration
            return
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
        if not cancelled:
            return
        gone = set(id(s) for s in cancelled)
        self._prefilling = [s for s in self._prefilling if id(s) not in gone]
        self._remove_rows([i for i, s in enumerate(self._running) if id(s) in gone])
        for s in cancelled:
            s._state = None
            self._finish(s, s._cancel)

    def _admit(self) -> None:
        if not self._waiting:  # unlocked peek, as above
            return
        with self._lock:
            while self._waiting and len(self._prefilling) + len(self._running) < self.capacity:
                s = self._waiting.popleft()
                self._prefilling.append(s)
                self._admitted[s] = None
                self.stats.prompt_tokens += len(s.prompt)

    def _prefill_chunk(self) -> None:
        head = self._prefilling[0]
        C = min(self.prefill_chunk, len(head.prompt) - head._pos)  # this chunk's length
        group = [s for s in self._prefilling if min(self.prefill_chunk, len(s.prompt) - s._pos) == C]
        group = group[: max(1, self.prefill_tokens // C)]
        ids = np.stack([s.prompt[s._pos : s._pos + C] for s in group])  # (k, C)
        t0 = time.perf_counter()
        try:
            logits, states = self.pool.prefill(ids, [s._state for s in group])  # (k, V)
        except Exception as e:
            log.exception("prefill failed")
            gone = set(id(s) for s in group)
            self._prefilling = [s for s in self._prefilling if id(s) not in gone]
            for s in group:
                self._finish(s, "error", f"prefill failed: {e}")
            return
        self.stats.prefill_latency.observe(time.perf_counter() - t0)
        self.stats.prefill_chunks += 1
        self.stats.prefill_rows += len(group)
        done = []
        for s, st, row in zip(group, states, logits):
            s._pos += C
            s._state = st
            if s._pos == len(s.prompt):
                done.append(s)
                self._append(s, self._sample(s, row))
        if not done:
            return
        gone = set(id(s) for s in done)
        self._prefilling = [s for s in self._prefilling if id(s) not in gone]
        for s in done:
            if s.finish_reason is None:  # joins the running batch
                self.pool.put(len(self._running), s._state)
                self._last[len(self._running)] = s.tokens[-1]
                self._sampled[len(self._running)] = not s.params.greedy
                self._running.append(s)
            s._state = None

    def _decode_step(self) -> None:
        n = len(self._running)
        last = self._last[:n]  # (n,) the last token of each row
        t0 = time.perf_counter()
        try:
            logits = self.pool.step(last)  # (n, V)
        except Exception as e:
            log.exception("decode step failed")
            for s in self._running:
                self._finish(s, "error", f"decode step failed: {e}")
            self._running = []
            return
        if not np.count_nonzero(self._sampled[:n]):
            toks = greedy(logits).tolist()
        else:
            toks = [sample_row(logits[i], s.params, s._rng) for i, s in enumerate(self._running)]
        self.stats.step_latency.observe(time.perf_counter() - t0)
        self.stats.decode_steps += 1
        self.stats.decode_rows += n
        self.stats.generated_tokens += n
        # _append for rows that have had their first token, written out: this loop runs for every
        # generated token, and at 32 streams its per-row Python is a measurable part of a token's cost
        events, ended = self._events, []
        for i, (s, t) in enumerate(zip(self._running, toks)):
            tokens = s.tokens
            tokens.append(t)
            params = s.params
            if t in params.stop_token_ids:
                self._finish(s, "stop")
                ended.append(i)
            elif len(tokens) >= params.max_tokens:
                self._finish(s, "length")
                ended.append(i)
            else:
                events[s] = None
        self._last[:n] = toks
        self._remove_rows(ended)

    def _remove_rows(self, rows: list[int]) -> None:
        """Take rows out of the running batch; the last row moves into each freed one."""
        for i in sorted(rows, reverse=True):
            last = len(self._running) - 1
            if i != last:
                self.pool.move(last, i)
                self._running[i] = self._running[last]
                self._last[i] = self._last[last]
                self._sampled[i] = self._sampled[last]
            self._running.pop()

    def _sample(self, s: Sequence, logits: np.ndarray) -> int:
        return sample_row(logits, s.params, s._rng)

    def _append(self, s: Sequence, tok: int) -> None:
        # (_decode_step writes this out for its running rows, which have had their first token: a
        # change here goes there too)
        if s.t_first is None:
            s.t_first = time.perf_counter()
            self.stats.first_token_latency.observe(s.t_first - s.t_submit)
            self._urgent.append(s)
        s.tokens.append(int(tok))
        self.stats.generated_tokens += 1
        if tok in s.params.stop_token_ids:
            self._finish(s, "stop")
        elif len(s.tokens) >= s.params.max_tokens:
            self._finish(s, "length")
        else:
            self._events[s] = None

    def _finish(self, s: Sequence, reason: str, error: str | None = None) -> None:
        if s.finish_reason is not None:
            return
        s.error = error
        s.finish_reason = reason  # last: readers take finish_reason before tokens
        self._admitted.pop(s, None)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._events[s] = None
        self._urgent.append(s)

    def _flush_events(self) -> None:
        if not self._events:
            return
        now = time.perf_counter()
        if now - self._last_flush >= self.stream_interval:  # everything (always, without an interval)
            events = list(self._events)
            self._events.clear()
            self._last_flush = now
        elif self._urgent:  # only those: the others' tokens keep gathering
            events = list(dict.fromkeys(self._urgent))
            for e in events:
                del self._events[e]
        else:
            return
        self._urgent.clear()
        if self.on_events is not None:
            self.on_events(events)
