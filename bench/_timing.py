"""Shared GPU timing for the benchmark scripts: CUDA-event timing, the reason a kernel could not be
timed (for its table cell), and SIGTERM as KeyboardInterrupt (a time-limited run keeps its rows)."""

from __future__ import annotations

import signal
import statistics


def failure(exc: BaseException, width: int = 80) -> str:
    """"Type: first line of the message" (just "Type" without one), cut to ``width`` characters."""
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:width]}" if msg else type(exc).__name__


def sigterm_stops() -> None:
    """From now on SIGTERM (what ``timeout`` sends) raises KeyboardInterrupt, like Ctrl-C: a benchmark
    stopped by its time limit still writes the rows it measured."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def cuda_time_ms(fn, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` CUDA-event-timed calls after ``warmup`` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
