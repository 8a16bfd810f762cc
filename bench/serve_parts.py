"""Benchmark: where a served token's time goes, part by part, at 1 and 32 concurrent sequences.

For one export (onnxruntime with the native CPU kernels, the server's session options: worker
threads not spinning), the same workload as ``bench/serve.py`` (prompts of ``--prompt-len``
random ids, ``--max-tokens`` new tokens each, greedy), measured three ways:

1. the decode step alone: ``OrtSlots.step`` on B = 1 and B = C rows (median of ``--steps``), with
   the default intra-op threads and with one;
2. the scheduler without HTTP: a ``Scheduler`` over ``OrtSlots`` driven by ``step()`` in this
   process, the same requests as over HTTP (C slots; queued requests join as slots free up;
   prefill included): wall time per generated token; and the same over a pool whose model costs
   nothing (its own Python: admission, sampling, bookkeeping);
3. the real server over HTTP (``xlstm-export serve``, bench/serve.py's client): wall time per
   token, and the server's CPU time per token by thread, over the server process and its engine
   process (from /proc: the event loop is the server's main thread; the other busy threads are the
   scheduler, the engine process's main thread by default, and onnxruntime's worker).

    python bench/serve_parts.py                           # tiny-large, C = 1 and 32
    python bench/serve_parts.py --model xlstm-large-160m --requests 4
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench_serve  # noqa: E402  (bench/serve.py: export, server start, client)

from xlstm_export.ort import OrtModel  # noqa: E402
from xlstm_export.serve import OrtSlots, SamplingParams, Scheduler  # noqa: E402
from xlstm_export.serve.backend import session_options  # noqa: E402


def step_ms(model, rows: int, steps: int) -> float:
    pool = OrtSlots(model, rows)
    ids = np.arange(rows) % model.vocab_size
    for _ in range(max(10, steps // 10)):
        pool.step(ids)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        pool.step(ids)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


class FreePool:
    """A slot pool whose model costs nothing (the same random logits every time): a scheduler over it
    costs only its own Python."""

    def __init__(self, capacity: int, vocab_size: int):
        self.capacity, self.vocab_size = capacity, vocab_size
        self.logits = np.random.default_rng(0).standard_normal((capacity, vocab_size)).astype(np.float32)

    def step(self, ids):
        return self.logits[: len(ids)]

    def prefill(self, ids, states):
        return self.logits[: len(ids)], [None] * len(ids)

    def put(self, row, state):
        pass

    def move(self, src, dst):
        pass


def scheduler_us_per_token(pool, c: int, n: int, prompt_len: int, max_tokens: int, seed: int = 0) -> float:
    """Wall time per generated token of ``n`` requests through a Scheduler over ``pool`` with ``c``
    slots (the rest queue and join as slots free up, as in the server), after a warm-up of ``c``
    requests."""
    sched = Scheduler(pool, max_batch=c, max_queue=n)
    rng = np.random.default_rng(seed)
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)
    for count in (c, n):  # the warm-up, then the timed requests
        seqs = [sched.submit(rng.integers(0, pool.vocab_size, prompt_len), greedy) for _ in range(count)]
        t0 = time.perf_counter()
        while any(s.finish_reason is None for s in seqs):
            sched.step()
    return 1e6 * (time.perf_counter() - t0) / sum(len(s.tokens) for s in seqs)


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of every thread of the server's processes (it and its engine process)."""
    out = {}
    for p in bench_serve.process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{p}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return out


def server_parts(path: Path, levels: list[int], args) -> list[dict]:
    extra = ["--max-batch", str(max(levels)), "--stream-interval", f"{args.stream_interval:g}",
             *(["--in-process"] if args.in_process else [])]
    with bench_serve.running_server(path, extra) as (server, _, url, _client):
        vocab = args.vocab
        bench_serve.run(bench_serve.level(url, 8, 8, args.prompt_len, 8, vocab, 99))  # warm-up
        rows = []
        for c in levels:
            before, client0 = thread_cpu_s(server.pid), time.process_time()
            n = bench_serve.requests_at(c, args.requests, args.waves)
            res = bench_serve.run(bench_serve.level(url, c, n, args.prompt_len, args.max_tokens, vocab, c))
            after, client = thread_cpu_s(server.pid), time.process_time() - client0
            per_tok = {t: 1e6 * (after[t] - before.get(t, 0.0)) / res["tokens"] for t in after}
            main = per_tok.pop(server.pid)
            others = sorted(per_tok.values(), reverse=True)
            rows.append({"c": c, "wall_us": 1e6 * res["wall_s"] / res["tokens"], "event_loop_us": main,
                         "busiest_us": others[0], "second_us": others[1] if len(others) > 1 else 0.0,
                         "client_us": 1e6 * client / res["tokens"], "server_us": main + sum(others)})
        return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-large", choices=list(bench_serve.MODELS))
    p.add_argument("--concurrency", type=int, default=32, help="the batched level (default: 32)")
    p.add_argument("--requests", type=int, default=16, help="requests at C=1 (default: 16)")
    p.add_argument("--waves", type=int, default=2, help="requests per worker above C=1 (default: 2)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=400, help="decode steps timed alone (default: 400)")
    p.add_argument("--stream-interval", type=float, default=0.0, metavar="MS",
                   help="the server's --stream-interval (default: 0, one event per token)")
    p.add_argument("--in-process", action="store_true", help="the server's --in-process (default: an engine process)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/xlstm-bench-serve"))
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = bench_serve.export(args.model, args.workdir)
    c = args.concurrency
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"Date (UTC): {started}; load average at start: {load}  ",
             f"Command: `{' '.join(['python bench/serve_parts.py', *sys.argv[1:]])}`  ",
             f"Model: {args.model}; prompts of {args.prompt_len} ids, {args.max_tokens} new tokens each, greedy", "",
             f"| what | C = 1 | C = {c} | C={c} tokens/s over C=1 |", "|---|---|---|---|"]
    for threads, label in ((None, "default threads"), (1, "1 thread")):
        model = OrtModel(path, native_ops=True, session_options=session_options(threads))
        args.vocab = int(model.vocab_size)
        one, many = step_ms(model, 1, args.steps), step_ms(model, c, args.steps)
        lines.append(f"| decode step alone, {label} | {one:.3f} ms | {many:.3f} ms | {c * one / many:.1f}x |")
        if threads is None:
            sched_lines = []
            pools = ((functools.partial(OrtSlots, model), "scheduler without HTTP"),
                     (functools.partial(FreePool, vocab_size=args.vocab),
                      "of which the scheduler's own Python (a model that costs nothing)"))
            for make_pool, what in pools:
                s1, sc = (scheduler_us_per_token(make_pool(k), k, bench_serve.requests_at(k, args.requests, args.waves),
                                                 args.prompt_len, args.max_tokens) for k in (1, c))
                sched_lines.append(f"| {what}, per token | {s1:.1f} us | {sc:.1f} us | {s1 / sc:.1f}x |")
        del model
    lines += sched_lines
    one, many = server_parts(path, [1, c], args)
    lines.append(f"| server over HTTP, wall per token | {one['wall_us']:.1f} us | {many['wall_us']:.1f} us | "
                 f"{one['wall_us'] / many['wall_us']:.1f}x |")
    lines.append(f"| server CPU per token: event loop / busiest other thread / next | "
                 f"{one['event_loop_us']:.0f} / {one['busiest_us']:.0f} / {one['second_us']:.0f} us | "
                 f"{many['event_loop_us']:.0f} / {many['busiest_us']:.0f} / {many['second_us']:.0f} us | |")
    lines.append(f"| CPU per token, server + client (this process) | {one['server_us']:.0f} + {one['client_us']:.0f} us | "
                 f"{many['server_us']:.0f} + {many['client_us']:.0f} us | |")
    cores = os.cpu_count() or 1
    bound = one["wall_us"] * cores / (many["server_us"] + many["client_us"])
    lines.append(f"\nAt C={c} the server and the client need {many['server_us'] + many['client_us']:.0f} us of CPU per token: "
                 f"{cores} cores allow at most {bound:.1f}x the C=1 tokens/s over HTTP on this machine.")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
