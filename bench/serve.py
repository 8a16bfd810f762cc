"""Benchmark: `xlstm-export serve` under concurrent streamed completions (continuous batching).

For each model, the export runs in a real server process (``xlstm-export serve model.onnx``,
onnxruntime with the native CPU kernels) on 127.0.0.1; this process is the client (an asyncio
protocol, one keep-alive connection per worker; streamed completions, ``ignore_eos``). At each
concurrency level C, C client workers each send requests back to back (closed loop) until the
level's requests are done:

- aggregate generated tokens/s = tokens received / wall time of the level (prefill included);
- time to first token (TTFT) per request: from sending it to the first streamed token; p50, p99;
  and the scheduler's part of it from /metrics (its receipt of the request -> the first token
  sampled: the rest is HTTP, the server's event loop and the messages to and from the engine);
- the server's own view from /metrics: mean decode batch (rows / steps), mean step latency, and
  "model runs": the share of the level's wall time spent in the model itself (decode steps with
  their sampling, prefill chunks); at C = 32 the tokens/s those same runs would give with nothing
  else between them (what no serving layer around this model can beat at that batch occupancy);
- ``--rounds`` times over (the levels one after another, then again): each level reports its
  median round, every round's tokens/s beside it (a 2-core VM's speed drifts by 10-20% within a
  minute; one short level can land on a slow stretch);
- server memory: resident set (VmRSS) of the server process and its children (the engine process)
  after each level, and after a second run of the largest level (twice the tokens): flat means
  generated tokens cost no memory.

    python bench/serve.py                                    # tiny-large and xlstm-large-160m
    python bench/serve.py --models xlstm-large-160m --requests 4 --waves 1 --rounds 1 --no-repeat   # shorter
    python bench/serve.py --models tiny-large --concurrency 1 8 --requests 16   # smoke test
    python bench/serve.py --out /tmp/serve.md --json /tmp/serve.json
    python bench/serve.py --models xlstm-large-160m --dtype bf16 --requests 4 --rounds 1   # a bf16 export

Random prompts of ``--prompt-len`` token ids, ``--max-tokens`` new tokens each (greedy). The
models have random weights (presets); what is measured is the serving path, not the text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _report import cpu_name  # bench/_report.py (the script's folder is on sys.path)

MODELS = {  # name -> (preset, config overrides); random weights
    # 7B-style, 0.49M parameters: framework overhead is what batching amortises
    "tiny-large": ("tiny-large", {}),
    # paper (mLSTM + sLSTM blocks), 0.39M: the main job's model; 8x tiny-large's state per sequence
    "tiny": ("tiny", {}),
    # 7B-style, 162M parameters: a B = 32 step is compute-bound
    "xlstm-large-160m": ("xlstm-large-160m", {}),
    # 7B-style, 33k parameters (E = 32, one block): a probe with the arithmetic taken away, so that
    # what bounds the ratio is the serving path itself (HTTP, scheduler, the client on the same cores)
    "tiny-large-e32": ("tiny-large", {"embedding_dim": 32, "num_blocks": 1, "num_heads": 2}),
}
TARGETS = {"tiny-large": 10.0, "xlstm-large-160m": 5.0}  # tokens/s at C=32 over C=1
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 900  # one streamed completion, from sending it to its last event


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the server and its engine process), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, parent in parents.items() if parent == p]
    return tree


def rss_mib(pid: int) -> float:
    """Resident memory of the server: the process and its children (the engine process), MiB."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:")) / 1024
        except (OSError, StopIteration):
            pass
    return total


def export(name: str, workdir: Path, dtype: str = "fp32") -> Path:
    import torch

    from xlstm_export.export import export_onnx
    from xlstm_export.models import load

    stem = name if dtype == "fp32" else f"{name}-{dtype}"
    path = workdir / stem / f"{stem}.onnx"  # a folder each: a tokenizer.json beside it is the model's
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        source, overrides = MODELS[name]
        export_onnx(load(source, **overrides), path, dtype=dtype, progress=False)
    return path


def metrics(client_sync, url: str) -> dict[str, float]:
    out = {}
    for line in client_sync.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of a client worker. The client shares the machine with
    the server, so it does as little per streamed event as it can: no HTTP library, no JSON parsing
    (tokens are counted from each event's "token_ids" array), and no task woken per event: the
    response is parsed as its bytes arrive, in the protocol's callback, and only its end wakes the
    worker."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.transport = None
        self.done: asyncio.Future | None = None  # the response being read

    async def post_stream(self, body: dict) -> tuple[float, float, int]:
        """(seconds to first token, seconds to the end, tokens) of one streamed completion."""
        loop = asyncio.get_running_loop()
        if self.transport is None:
            await loop.create_connection(lambda: self, self.host, self.port)
        data = json.dumps(body).encode()
        self.done = loop.create_future()
        self.head, self.raw, self.data = None, b"", b""  # raw: not yet de-chunked; data: not yet split
        self.first, self.n, self.end, self.got_done = None, 0, False, False
        self.t0 = time.perf_counter()
        self.transport.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (self.host.encode(), len(data), data))
        try:
            return await asyncio.wait_for(self.done, REQUEST_TIMEOUT_S)
        except BaseException:  # the connection is mid-response: it cannot carry another request
            self.close()
            raise

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.done is not None and not self.done.done():
            self.done.set_exception(RuntimeError(f"the server closed the connection mid-stream ({exc})"))

    def data_received(self, more: bytes) -> None:
        if self.done is None or self.done.done():
            return
        try:
            self._parse(more)
        except Exception as e:  # noqa: BLE001  (ends this response with the error)
            self.done.set_exception(e)

    def _parse(self, more: bytes) -> None:
        raw = self.raw + more
        if self.head is None:  # the status line and headers
            cut = raw.find(b"\r\n\r\n")
            if cut < 0:
                self.raw = raw
                return
            self.head, raw = raw[:cut], raw[cut + 4 :]
            if not self.head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"HTTP error: {self.head[:200]!r} {raw[:500]!r}")
            if b"chunked" not in self.head.lower():
                raise RuntimeError(f"expected a chunked event stream, got {self.head!r}")
        data = self.data
        while (j := raw.find(b"\r\n")) >= 0:  # chunked transfer encoding: whatever has arrived, at once
            size = int(raw[:j], 16)
            if len(raw) < j + size + 4:  # the chunk (or the last chunk's final CRLF) is not all here
                break
            data += raw[j + 2 : j + 2 + size]
            raw = raw[j + size + 4 :]
            if size == 0:
                self.end = True
                break
        self.raw = raw
        *events, self.data = data.split(b"\n\n")
        for ev in events:
            if ev == b"data: [DONE]":
                self.got_done = True
                continue
            if b'"error"' in ev:
                raise RuntimeError(ev.decode())
            j = ev.find(b'"token_ids":[')
            if j < 0:
                continue
            ids = ev[j + 13 : ev.index(b"]", j)]
            k = ids.count(b",") + 1 if ids else 0
            if k and self.first is None:
                self.first = time.perf_counter() - self.t0
            self.n += k
        if self.end:
            if not self.got_done:
                raise RuntimeError("the stream ended without [DONE]")
            self.done.set_result((self.first, time.perf_counter() - self.t0, self.n))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def level(url: str, concurrency: int, n_requests: int, prompt_len: int, max_tokens: int, vocab: int,
                seed: int) -> dict:
    host, port = url.split("//")[1].split(":")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, prompt_len).tolist() for _ in range(n_requests)]
    queue = list(range(n_requests))
    results = []

    async def worker():
        conn = _Connection(host, int(port))
        try:
            while queue:
                j = queue.pop()
                body = {"model": "bench", "prompt": prompts[j], "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "ignore_eos": True}
                results.append(await conn.post_stream(body))
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    assert tokens == n_requests * max_tokens, (tokens, n_requests * max_tokens)
    return {"concurrency": concurrency, "requests": n_requests, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": float(np.percentile(ttft, 99)), "latency_mean_s": statistics.mean(r[1] for r in results)}


@contextlib.contextmanager
def running_server(path: Path, extra: list[str]):
    """``xlstm-export serve path`` on a free port of 127.0.0.1 until the block ends; yields
    (process, command, url, httpx client) once /health answers 200. ``extra``: more serve options."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "xlstm_export.cli", "serve", str(path), "--port", str(port), "--model-name", "bench",
           "--log-level", "warning", *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = httpx.Client(timeout=60)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stdout.read()}")
            try:
                if client.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        yield server, cmd, url, client
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def run(coro):
    """Run a client coroutine on uvloop where it is installed (cheaper per streamed event than
    asyncio's own loop: the client shares the cores with the server), else on asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def requests_at(c: int, requests: int, waves: int) -> int:
    """Requests of the level with C workers: ``requests`` at C = 1, else ``waves`` per worker at least."""
    return max(requests, waves * c) if c > 1 else requests


def bench_model(name: str, args) -> dict:
    path = export(name, args.workdir, args.dtype)
    from xlstm_export.ort import inspect_model

    vocab = inspect_model(path)["vocab_size"]
    max_c = max(args.concurrency)
    extra = ["--max-batch", str(max_c), "--max-queue", str(4 * max_c), "--max-state-mb", str(args.max_state_mb),
             *(["--threads", str(args.threads)] if args.threads else []),
             *(["--stream-interval", f"{args.stream_interval:g}"] if args.stream_interval else []),
             *(["--in-process"] if args.in_process else [])]
    with running_server(path, extra) as (server, cmd, url, sync):
        out = {"model": name, "command": " ".join(cmd[1:]), "levels": []}
        out["server_line"] = server.stdout.readline().strip()
        run(level(url, min(8, max_c), min(8, max_c), args.prompt_len, 8, vocab, 99))  # warm-up
        out["rss_after_warmup_mib"] = rss_mib(server.pid)
        rounds: dict[int, list[dict]] = {c: [] for c in args.concurrency}
        for r in range(args.rounds):  # the levels one after another, then again: a drift of the
            for c in args.concurrency:  # machine's speed reaches every level alike
                before = metrics(sync, url)
                n = requests_at(c, args.requests, args.waves)
                res = run(level(url, c, n, args.prompt_len, args.max_tokens, vocab, c + 1000 * r))
                after = metrics(sync, url)
                steps = after["xlstm_decode_steps_total"] - before["xlstm_decode_steps_total"]
                res["mean_decode_batch"] = (after["xlstm_decode_rows_total"] - before["xlstm_decode_rows_total"]) / steps
                chunks = after["xlstm_prefill_chunks_total"] - before["xlstm_prefill_chunks_total"]
                res["mean_prefill_batch"] = (after["xlstm_prefill_rows_total"] - before["xlstm_prefill_rows_total"]) / chunks
                decode_s = after["xlstm_step_latency_seconds_sum"] - before["xlstm_step_latency_seconds_sum"]
                prefill_s = after["xlstm_prefill_latency_seconds_sum"] - before["xlstm_prefill_latency_seconds_sum"]
                res["mean_step_ms"] = 1e3 * decode_s / steps
                # the scheduler's share of TTFT: its receipt of a request -> the first token sampled (the
                # rest of the client's TTFT is HTTP, the server's event loop and the messages between them)
                res["scheduler_ttft_mean_s"] = ((after["xlstm_time_to_first_token_seconds_sum"]
                                              - before["xlstm_time_to_first_token_seconds_sum"])
                                             / (after["xlstm_time_to_first_token_seconds_count"]
                                                - before["xlstm_time_to_first_token_seconds_count"]))
                # the model's own runs (decode steps with their sampling, prefill chunks); tokens/s over
                # this share: the level's rate had everything else (HTTP, scheduling, messages, waiting) cost nothing
                res["model_share"] = (decode_s + prefill_s) / res["wall_s"]
                res["rss_mib"] = rss_mib(server.pid)
                res["generated_total"] = after["xlstm_generated_tokens_total"]
                rounds[c].append(res)
                print(f"{name} round {r + 1} C={c}: {res['tokens_per_s']:.0f} tok/s, TTFT p50 "
                      f"{res['ttft_p50_s'] * 1e3:.0f} ms p99 {res['ttft_p99_s'] * 1e3:.0f} ms "
                      f"(in the scheduler {res['scheduler_ttft_mean_s'] * 1e3:.1f} ms mean), batch "
                      f"{res['mean_decode_batch']:.1f}, prefill batch {res['mean_prefill_batch']:.1f}, step {res['mean_step_ms']:.2f} ms, model runs "
                      f"{100 * res['model_share']:.0f}% of the wall, RSS {res['rss_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
        for c in args.concurrency:  # each level's median round, with every round's tokens/s
            by_rate = sorted(rounds[c], key=lambda x: x["tokens_per_s"])
            res = dict(by_rate[(len(by_rate) - 1) // 2])
            res["rounds_tokens_per_s"] = [x["tokens_per_s"] for x in rounds[c]]
            res["rss_mib"] = rounds[c][-1]["rss_mib"]
            res["generated_total"] = rounds[c][-1]["generated_total"]
            out["levels"].append(res)
        if args.repeat:
            again = run(level(url, max_c, requests_at(max_c, args.requests, args.waves), args.prompt_len,
                                      args.max_tokens, vocab, 7))
            out["rss_after_repeat_mib"] = rss_mib(server.pid)
            out["generated_after_repeat"] = metrics(sync, url)["xlstm_generated_tokens_total"]
            out["repeat_tokens_per_s"] = again["tokens_per_s"]
        assert sync.get(f"{url}/health").status_code == 200
    return out


def markdown(results: list[dict], args, started: str, load: tuple) -> str:
    import onnxruntime
    import uvicorn

    cpu = cpu_name()
    lines = [f"Date (UTC): {started}  ",
             f"Machine: {cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, onnxruntime "
             f"{onnxruntime.__version__}, uvicorn {uvicorn.__version__}  ",
             f"Load average (1/5/15 min) at start: {load[0]}; at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}  ",
             f"Command: `python bench/serve.py {' '.join(sys.argv[1:])}`  ",
             f"Workload: prompts of {args.prompt_len} random token ids, {args.max_tokens} new tokens each "
             f"(greedy, ignore_eos), streamed; closed loop of C workers", ""]
    for r in results:
        lv = r["levels"]
        base = next((x for x in lv if x["concurrency"] == 1), None)
        lines += [f"#### {r['model']}", "", f"Server: `{r['command']}`  ", f"{r['server_line']}", "",
                  "| C | requests | tokens/s (median round) | rounds | vs C=1 | TTFT p50 | TTFT p99 | TTFT in the scheduler (mean) "
                  "| mean decode batch | mean prefill batch | mean step | model runs | server RSS |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in lv:
            ratio = f"{x['tokens_per_s'] / base['tokens_per_s']:.1f}x" if base else "-"
            each = " / ".join(f"{t:,.0f}" for t in x["rounds_tokens_per_s"])
            lines.append(f"| {x['concurrency']} | {x['requests']} | {x['tokens_per_s']:,.0f} | {each} | {ratio} | "
                         f"{x['ttft_p50_s'] * 1e3:,.0f} ms | {x['ttft_p99_s'] * 1e3:,.0f} ms | "
                         f"{x['scheduler_ttft_mean_s'] * 1e3:,.1f} ms | "
                         f"{x['mean_decode_batch']:.1f} | {x['mean_prefill_batch']:.1f} | {x['mean_step_ms']:.2f} ms | {100 * x['model_share']:.0f}% | "
                         f"{x['rss_mib']:,.0f} MiB |")
        target = TARGETS.get(r["model"])
        c32 = next((x for x in lv if x["concurrency"] == 32), None)
        if base and c32:
            lines.append("")
            if target:
                got = c32["tokens_per_s"] / base["tokens_per_s"]
                each = ", ".join(f"{a / b:.1f}x"
                                 for a, b in zip(c32["rounds_tokens_per_s"], base["rounds_tokens_per_s"]))
                lines.append(f"Target C=32 >= {target:g}x C=1: {got:.1f}x (median rounds), "
                             f"{'met' if got >= target else 'missed'}; round by round: {each}.")
            bound = c32["tokens_per_s"] / c32["model_share"]
            lines += [f"At C=32 the model's own runs (decode steps, prefill chunks) took {100 * c32['model_share']:.0f}% "
                      f"of the wall: had everything else (HTTP, scheduling, messages, waiting) cost nothing, the same runs "
                      f"would give {bound:,.0f} tokens/s, {bound / base['tokens_per_s']:.1f}x C=1."]
        mem = (f"Memory: {r['rss_after_warmup_mib']:,.0f} MiB after warm-up; "
               f"{lv[-1]['rss_mib']:,.0f} MiB after {lv[-1]['generated_total']:,.0f} generated tokens")
        if "rss_after_repeat_mib" in r:
            mem += (f"; {r['rss_after_repeat_mib']:,.0f} MiB after {r['generated_after_repeat']:,.0f} "
                    f"(the largest level again: {r['repeat_tokens_per_s']:,.0f} tokens/s)")
        lines += [mem + ".", ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(MODELS),
                   help=f"default: {' '.join(TARGETS)} (the models with targets)")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32, 128])
    p.add_argument("--requests", type=int, default=8, help="requests per level at least")
    p.add_argument("--waves", type=int, default=2, help="requests per worker above C=1 (default: 2)")
    p.add_argument("--rounds", type=int, default=5,
                   help="run the levels this many times; each level reports its median round (default: 5)")
    p.add_argument("--no-repeat", dest="repeat", action="store_false",
                   help="skip the second run of the largest level (the memory check)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="the exports' dtype (default: fp32; the presets' weights are float32 before it)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-state-mb", type=float, default=4096)
    p.add_argument("--threads", type=int, default=None, help="the server's onnxruntime threads (default: all)")
    p.add_argument("--stream-interval", type=float, default=0.0, metavar="MS",
                   help="the server's --stream-interval (default: 0, one event per token)")
    p.add_argument("--in-process", action="store_true",
                   help="the server's --in-process: the model in a thread of the server (default: an engine process)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/xlstm-bench-serve"))
    p.add_argument("--out", type=Path, help="write the markdown here (else stdout)")
    p.add_argument("--json", type=Path, help="write the raw figures here")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results = [bench_model(m, args) for m in args.models]
    md = markdown(results, args, started, (load,))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(md)
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
