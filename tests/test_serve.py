"""`serve`: continuous batching over recurrent state behind the OpenAI completions API.

Scheduler tests run the serving loop directly (no HTTP); server tests talk to a real uvicorn
server on 127.0.0.1 with the official `openai` client. One small 7B-style model (2 blocks,
byte vocabulary, byte tokenizer beside the .onnx) is exported once for the module; the reference
for every completion is that prompt's solo greedy generation through the same exported model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from xlstm_export.export import export_onnx  # noqa: E402
from xlstm_export.generate import generate  # noqa: E402
from xlstm_export.models import preset, xLSTMLM  # noqa: E402
from xlstm_export.ort import OrtModel  # noqa: E402
from xlstm_export.serve import EngineProcess, OrtSlots, SamplingParams, Scheduler, TorchSlots  # noqa: E402
from xlstm_export.serve.app import _drop_unread_connections, create_app  # noqa: E402
from xlstm_export.tokenizer import byte_tokenizer_files, load_tokenizer, write_tokenizer_files  # noqa: E402

MAX_WAIT_S = 30  # every polling loop gives up after this


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(OrtModel with the native kernels, tokenizer, torch model) of a small exported model."""
    d = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = xLSTMLM(preset("tiny-large", embedding_dim=64, num_heads=2)).eval()
    path = export_onnx(model, d / "small.onnx", progress=False)
    write_tokenizer_files(byte_tokenizer_files(), d)
    return OrtModel(path, native_ops=True), load_tokenizer(path), model


def scheduler_for(where: str, om: OrtModel, capacity: int, **options):
    """What a test's server runs: a Scheduler over ``om`` (run in a thread of the server) or, for
    "process", an EngineProcess over the same file (the default of `xlstm-export serve`)."""
    if where == "thread":
        return Scheduler(OrtSlots(om, capacity), max_batch=capacity, **options)
    return EngineProcess(str(om.path), dict(max_batch=capacity, max_state_mb=1024),
                         dict(max_batch=capacity, **options))


def solo(om: OrtModel, prompt, max_tokens: int) -> list[int]:
    return generate(om.decoder(), np.array([prompt], np.int64), max_tokens).tokens[0].tolist()


@contextlib.contextmanager
def running_server(scheduler, tokenizer, name="small"):
    """A uvicorn server for ``scheduler`` on a free loopback port, in a thread; yields its URL."""
    with serving(create_app(scheduler, model_name=name, tokenizer=tokenizer)) as (url, _):
        yield url


@contextlib.contextmanager
def serving(app):
    """``app`` served by uvicorn on a free loopback port, in a thread; yields (its URL, the uvicorn server)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + MAX_WAIT_S
    while not (server.started and server.servers):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(MAX_WAIT_S)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + MAX_WAIT_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=MAX_WAIT_S)


# --- the scheduler alone ---------------------------------------------------------------------------
class _Recording:
    """A pool that records the batch of every call (and forwards to the real one)."""

    def __init__(self, pool):
        self.pool, self.calls = pool, []
        self.capacity, self.vocab_size, self.state_bytes = pool.capacity, pool.vocab_size, pool.state_bytes

    def prefill(self, ids, states):
        self.calls.append(("prefill", ids.shape))
        return self.pool.prefill(ids, states)

    def step(self, ids):
        self.calls.append(("step", len(ids)))
        return self.pool.step(ids)

    def put(self, row, state):
        self.pool.put(row, state)

    def move(self, src, dst):
        self.pool.move(src, dst)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(served):
    om, _, _ = served
    rng = np.random.default_rng(1)
    pool = _Recording(OrtSlots(om, 4))
    sched = Scheduler(pool, max_batch=4, prefill_chunk=16, prefill_tokens=32)
    short = [sched.submit(rng.integers(0, 256, 3), SamplingParams(max_tokens=40, temperature=0)) for _ in range(2)]
    for _ in range(3):
        sched.step()
    assert sched.active == 2
    long_prompt = rng.integers(0, 256, 101)
    late = sched.submit(long_prompt, SamplingParams(max_tokens=5, temperature=0))
    n_before = [len(s.tokens) for s in short]
    start = len(pool.calls)
    for it in range(7):  # 101 tokens = 6 chunks of 16 + 5: one chunk per iteration, each beside a step
        sched.step()
        assert [len(s.tokens) for s in short] == [n + it + 1 for n in n_before]  # never stalled
    kinds = pool.calls[start:]
    chunks = [shape for kind, shape in kinds if kind == "prefill"]
    assert chunks == [(1, 16)] * 6 + [(1, 5)]
    assert all(c[0] * c[1] <= 32 for c in chunks)
    assert sched.active == 3  # joined the running batch after its last chunk
    while any(s.finish_reason is None for s in [*short, late]):
        sched.step()
    assert late.tokens == solo(om, long_prompt, 5)
    assert [s.tokens for s in short] == [solo(om, s.prompt, 40) for s in short]
    assert sched.active == 0 and sched.prefilling == 0


def test_a_sampled_row_that_moves_among_greedy_rows_still_samples(served):
    """When rows leave, the last row moves into a freed one: a seeded sampled sequence that moves
    keeps sampling as it does alone, and the greedy rows around it stay greedy."""
    om, _, _ = served
    rng = np.random.default_rng(5)
    prompt = rng.integers(0, 256, 9)
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=77)
    alone = Scheduler(OrtSlots(om, 1), max_batch=1)
    solo_seq = alone.submit(prompt, params)
    while solo_seq.finish_reason is None:
        alone.step()
    sched = Scheduler(OrtSlots(om, 4), max_batch=4)
    short = [sched.submit(rng.integers(0, 256, 5), SamplingParams(max_tokens=3, temperature=0)) for _ in range(3)]
    seq = sched.submit(prompt, params)  # joins last (a longer prompt): its row moves when the short ones end
    while any(s.finish_reason is None for s in [seq, *short]):
        sched.step()
    assert seq.tokens == solo_seq.tokens and len(seq.tokens) == 16
    assert [s.tokens for s in short] == [solo(om, s.prompt, 3) for s in short]


def test_paper_model_slots_update_mlstm_states_in_place_and_match_solo(tmp_path):
    """A paper-architecture model (mLSTM and sLSTM blocks): its mLSTM states have one buffer in the
    pool, updated in place by each decode step (the native mLSTMStep inside the cell's If); six
    sequences through four slots (queued, joining, leaving, moving rows) each generate what they
    generate alone through OrtModel.run, which keeps every state in separate arrays."""
    torch.manual_seed(3)
    path = export_onnx(xLSTMLM(preset("tiny")).eval(), tmp_path / "paper.onnx", progress=False)
    om = OrtModel(path, native_ops=True)
    pool = OrtSlots(om, 4)
    shared = {k for k in om.state_names if pool._bufs[0][k] is pool._bufs[1][k]}
    assert shared == om._inplace_states and {k.rsplit(".", 1)[1] for k in shared} == {"c", "n", "m"}
    assert len(shared) < len(om.state_names)  # the conv windows and the sLSTM's states: two buffers
    sched = Scheduler(pool, max_batch=4)
    rng = np.random.default_rng(4)
    seqs = [sched.submit(rng.integers(0, 256, n), SamplingParams(max_tokens=m, temperature=0))
            for n, m in ((5, 3), (17, 12), (2, 7), (9, 5), (30, 9), (1, 4))]
    while any(s.finish_reason is None for s in seqs):
        sched.step()
    for s in seqs:
        assert s.tokens == generate(om.run, np.array([s.prompt]), len(s.tokens)).tokens[0].tolist()


def test_seeded_sampling_does_not_depend_on_the_batch(served):
    om, _, _ = served
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 256, 7)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=1234)

    def run(n_others: int) -> list[int]:
        sched = Scheduler(OrtSlots(om, 8), max_batch=8)
        others = [sched.submit(rng.integers(0, 256, int(rng.integers(1, 40))),
                               SamplingParams(max_tokens=20, temperature=1.0, seed=j)) for j in range(n_others)]
        seq = sched.submit(prompt, params)
        while any(s.finish_reason is None for s in [seq, *others]):
            sched.step()
        return seq.tokens

    alone = run(0)
    assert run(5) == alone and len(alone) == 12
    other_seed = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=99)
    sched = Scheduler(OrtSlots(om, 1), max_batch=1)
    s = sched.submit(prompt, other_seed)
    while s.finish_reason is None:
        sched.step()
    assert s.tokens != alone


def test_torch_slots_match_the_onnx_slots(served):
    """The pool a TensorRT engine uses (torch tensors), run here on the PyTorch model."""
    om, _, model = served
    shapes = {k: tuple(s[1:]) for k, s in model.state_spec(1).items()}
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, int(n)) for n in (1, 17, 40, 5)]
    out = []
    for pool in (OrtSlots(om, 4), TorchSlots(model, shapes, 256, 4)):
        sched = Scheduler(pool, max_batch=4, prefill_chunk=16, prefill_tokens=32)
        seqs = [sched.submit(p, SamplingParams(max_tokens=9 + j, temperature=0)) for j, p in enumerate(prompts)]
        while any(s.finish_reason is None for s in seqs):
            sched.step()
        out.append([s.tokens for s in seqs])
    assert out[0] == out[1]


def test_queue_bound_and_cancel_without_http(served):
    om, _, _ = served
    sched = Scheduler(OrtSlots(om, 1), max_batch=1, max_queue=1)
    a = sched.submit([1, 2, 3], SamplingParams(max_tokens=1000, temperature=0))
    b = sched.submit([4], SamplingParams(max_tokens=2, temperature=0))
    with pytest.raises(Exception, match="queue"):
        sched.submit([5], SamplingParams(max_tokens=2, temperature=0))
    sched.step()
    sched.cancel(b)  # queued: gone at once
    assert b.finish_reason == "cancelled" and sched.queued == 0
    sched.cancel(a)  # running: leaves at the next iteration
    sched.step()
    assert a.finish_reason == "cancelled" and sched.active == 0
    with pytest.raises(ValueError, match="lie in"):
        sched.submit([256], SamplingParams(max_tokens=1))


class _RulePool:
    """A slot pool whose model is a rule: the next token after t is (7 t + 3) mod V, whatever the
    batch (a sequence's tokens follow from its prompt's last token alone)."""

    vocab_size = 64

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.moves = 0

    def _logits(self, last: np.ndarray) -> np.ndarray:
        out = np.zeros((len(last), self.vocab_size), np.float32)
        out[np.arange(len(last)), (7 * last + 3) % self.vocab_size] = 1.0
        return out

    def prefill(self, ids, states):
        return self._logits(np.asarray(ids)[:, -1]), [None] * len(ids)

    def step(self, ids):
        return self._logits(np.asarray(ids))

    def put(self, row, state):
        pass

    def move(self, src, dst):
        self.moves += 1


def test_decode_steps_end_each_row_at_its_stop_ids_or_its_max_tokens():
    """Rows end at any of their stop ids (also the last of several) or at max_tokens, wherever they
    sit in the batch as rows leave and others join: each sequence's tokens and finish reason are
    what the rule gives it alone."""
    V = _RulePool.vocab_size
    rng = np.random.default_rng(11)
    cases = []
    for j in range(23):
        prompt = rng.integers(0, V, int(rng.integers(1, 5))).tolist()
        seq, t = [], prompt[-1]  # the rule's continuation of the prompt, long enough for every case
        for _ in range(40):
            t = (7 * t + 3) % V
            seq.append(t)
        kind = j % 4
        if kind == 0:  # no stop ids: ends by length
            stops = ()
        elif kind == 1:  # one stop id, reached after a few tokens
            stops = (seq[int(rng.integers(1, 6))],)
        elif kind == 2:  # the id that stops it comes after four others that never occur
            never = [v for v in range(V) if v not in seq[:30]][:4]
            stops = (*never, seq[int(rng.integers(2, 8))])
        else:  # stop ids that never occur within max_tokens
            stops = tuple(v for v in range(V) if v not in seq)[:2]
        max_tokens = int(rng.integers(1, 20))
        want = []
        for tok in seq:
            want.append(tok)
            if tok in stops or len(want) == max_tokens:
                break
        reason = "stop" if want[-1] in stops else "length"
        cases.append((prompt, SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stops),
                      want, reason))
    assert {c[3] for c in cases} == {"stop", "length"} and any(len(c[1].stop_token_ids) == 5 for c in cases)
    pool = _RulePool(4)
    sched = Scheduler(pool, max_batch=4, max_queue=len(cases))
    seqs = sched.submit_many([c[0] for c in cases], [c[1] for c in cases], [None] * len(cases))
    for _ in range(1000):
        if all(s.finish_reason is not None for s in seqs):
            break
        sched.step()
    assert pool.moves > 0  # rows left from the middle of the batch
    for s, (_, _, want, reason) in zip(seqs, cases):
        assert (s.tokens, s.finish_reason) == (want, reason)
    assert sched.stats.generated_tokens == sum(len(c[2]) for c in cases)
    assert sched.active == 0


def test_stream_interval_gathers_running_tokens_but_not_first_tokens_or_ends(served):
    """With a stream interval longer than the run, a sequence is handed on at its first token and at
    its end only, the tokens between gathered; the tokens are the same as with hand-offs every step."""
    om, _, _ = served
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (7, 12)]
    prompts = [[3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8, 2]]
    runs = {}
    for interval in (0.0, 3600.0):
        sched = Scheduler(OrtSlots(om, 2), max_batch=2, stream_interval=interval)
        seen = []  # per hand-off: (sequence index, tokens so far, finish reason)
        seqs = []
        sched.on_events = lambda ev: seen.append(sorted((seqs.index(s), len(s.tokens), s.finish_reason) for s in ev))
        seqs += sched.submit_many(prompts, params, [None, None])
        steps = 0
        while any(s.finish_reason is None for s in seqs):
            sched.step()
            steps += 1
        runs[interval] = ([s.tokens for s in seqs], seen, steps)
    (tokens0, seen0, steps0), (tokens1, seen1, _) = runs[0.0], runs[3600.0]
    assert tokens1 == tokens0 and [len(t) for t in tokens0] == [7, 12]
    assert len(seen0) == steps0  # every iteration hands on
    # the prompts' lengths differ, so they are prefilled one iteration apart; each such iteration also
    # runs a decode step for what is running, hence 2 tokens at a first hand-off. A hand-off for one
    # sequence's first token or end takes that sequence alone: the other's tokens keep gathering.
    assert seen1 == [[(0, 2, None)], [(1, 2, None)], [(0, 7, "length")], [(1, 12, "length")]]
    with pytest.raises(ValueError, match="stream_interval"):
        Scheduler(OrtSlots(om, 1), max_batch=1, stream_interval=-1.0)


def test_streamed_event_bytes_equal_json_dumps():
    """The SSE fast path writes the bytes json.dumps writes for the same event (escapes included)."""
    import json

    from xlstm_export.serve.app import _SSE

    rng = np.random.default_rng(7)
    for include_usage in (False, True):
        sse = _SSE(None, "cmpl-1", 1700000000, 'a "model"\\', include_usage)
        for _ in range(20):
            updates = [(int(rng.integers(0, 4)), "".join(chr(int(c)) for c in rng.integers(0, 0x3000, 5)),
                        rng.integers(0, 50000, int(rng.integers(0, 4))).tolist(),
                        [None, "stop", "length"][int(rng.integers(0, 3))]) for _ in range(int(rng.integers(1, 4)))]
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r, "token_ids": ids}
                       for i, t, ids, r in updates]
            assert sse._token_event(updates) == sse._event(choices)
            body = json.loads(sse._token_event(updates)[len(b"data: "):])
            assert body["choices"] == choices and ("usage" in body) == include_usage


def load_tokenizer_bytes():
    from xlstm_export.tokenizer import byte_tokenizer

    return byte_tokenizer()


# --- over HTTP ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["thread", "process"])
def test_32_concurrent_completions_equal_their_solo_generation(served, where):
    om, tok, _ = served
    rng = np.random.default_rng(4)
    lengths = [1, 300, *rng.integers(1, 301, 30)]
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in lengths]
    max_tokens = [1, 64, *(int(m) for m in rng.integers(1, 65, 30))]
    sched = scheduler_for(where, om, 32, prefill_chunk=64, prefill_tokens=256)
    with running_server(sched, tok) as url:
        async def all_at_once():
            c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=MAX_WAIT_S)
            return await asyncio.gather(*(c.completions.create(model="small", prompt=p, max_tokens=m, temperature=0)
                                          for p, m in zip(prompts, max_tokens)))

        results = asyncio.run(all_at_once())
        # an engine process sends its counters at most every 50 ms, and when it falls idle
        wait_for(lambda: metrics(url)["xlstm_generated_tokens_total"] == sum(max_tokens), "the counters")
        m = metrics(url)
        assert httpx.get(f"{url}/health").status_code == 200
    assert m["xlstm_decode_rows_total"] / m["xlstm_decode_steps_total"] > 4  # they did share steps
    # each prompt in chunks of at most 64 tokens, a chunk for several prompts at once
    assert m["xlstm_prefill_rows_total"] == sum(-(-n // 64) for n in lengths)
    assert m["xlstm_prefill_latency_seconds_count"] == m["xlstm_prefill_chunks_total"] < m["xlstm_prefill_rows_total"]
    assert m["xlstm_generated_tokens_total"] == sum(max_tokens)
    # each sequence's first token observed once, within the histogram's range
    assert m["xlstm_time_to_first_token_seconds_count"] == m["xlstm_requests_submitted_total"] >= len(prompts)
    assert m['xlstm_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["xlstm_time_to_first_token_seconds_count"]
    assert 0 < m["xlstm_time_to_first_token_seconds_sum"] < 60 * len(prompts)
    for p, mt, r in zip(prompts, max_tokens, results):
        ref = solo(om, p, mt)
        choice = r.choices[0]
        assert choice.model_extra["token_ids"] == ref
        assert choice.text == tok.decode(ref)
        assert choice.finish_reason == "length"
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == mt


def test_streaming_yields_the_same_text(served):
    om, tok, _ = served
    sched = Scheduler(OrtSlots(om, 4), max_batch=4)
    ref = tok.decode(solo(om, tok.encode("Hello"), 40))
    stop = ref[12:14]  # a stop string the greedy text reaches; the text ends before its first match
    with running_server(sched, tok) as url:
        c = client(url)
        for prompt, stops, expected in (("The xLSTM ", None, None), ("def main():\n", None, None),
                                        ("Hello", ["\x00\x01", stop], ref[: ref.find(stop)])):
            whole = c.completions.create(model="small", prompt=prompt, max_tokens=40, temperature=0, stop=stops)
            chunks = list(c.completions.create(model="small", prompt=prompt, max_tokens=40, temperature=0,
                                               stop=stops, stream=True))
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
            assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
            if stops is None:
                assert whole.choices[0].text == tok.decode(solo(om, tok.encode(prompt), 40))
                assert whole.choices[0].finish_reason == "length"
            else:
                assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "stop"
        ids = tok.encode("tokens")
        assert c.completions.create(model="small", prompt=ids, max_tokens=5, temperature=0).choices[0].text == \
            c.completions.create(model="small", prompt="tokens", max_tokens=5, temperature=0).choices[0].text
        models = c.models.list()
        assert [m.id for m in models.data] == ["small"]
        m = metrics(url)
        # a stop string ends a sequence as "stop" (or it had already run to its length), never "cancelled"
        assert m['xlstm_requests_finished_total{reason="cancelled"}'] == 0


def test_streamed_tokens_gathered_by_the_stream_interval_make_the_same_text(served):
    om, tok, _ = served
    sched = Scheduler(OrtSlots(om, 2), max_batch=2, stream_interval=3600.0)
    with running_server(sched, tok) as url:
        c = client(url)
        whole = c.completions.create(model="small", prompt="The xLSTM ", max_tokens=30, temperature=0)
        chunks = list(c.completions.create(model="small", prompt="The xLSTM ", max_tokens=30, temperature=0,
                                           stream=True))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
        assert whole.choices[0].text == tok.decode(solo(om, tok.encode("The xLSTM "), 30))
        # two hand-offs (the first token, the end), so at most two events; nothing gathered is held back
        assert len(chunks) <= 2 and sum(len(ch.choices[0].token_ids) for ch in chunks) == 30
        assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("where", ["thread", "process"])
def test_cancelled_stream_frees_its_slot_and_a_full_server_says_503(served, where):
    om, tok, _ = served
    sched = scheduler_for(where, om, 1, max_queue=0)
    with running_server(sched, tok) as url:
        c = client(url)
        stream = c.completions.create(model="small", prompt="long", max_tokens=60000, temperature=0, stream=True)
        it = iter(stream)
        next(it)
        next(it)
        wait_for(lambda: metrics(url)["xlstm_active_sequences"] == 1, "the stream to be counted")
        with pytest.raises(openai.APIStatusError) as full:  # every slot busy, no queue
            c.completions.create(model="small", prompt="x", max_tokens=2)
        assert full.value.status_code == 503
        assert full.value.response.headers["retry-after"] == "1"
        assert full.value.response.json()["error"]["code"] == "server_busy"
        stream.close()  # the client goes away
        wait_for(lambda: metrics(url)["xlstm_active_sequences"] == 0, "the cancelled stream to leave")
        m = metrics(url)
        assert m['xlstm_requests_finished_total{reason="cancelled"}'] == 1
        assert m["xlstm_generated_tokens_total"] < 60000
        r = c.completions.create(model="small", prompt="x", max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason == "length"
        # idle, yet two prompts exceed the one slot and the empty queue: never admissible, so no "retry later"
        with pytest.raises(openai.BadRequestError) as never:
            c.completions.create(model="small", prompt=["x", "y"], max_tokens=2)
        err = never.value.response.json()["error"]
        assert err["param"] == "prompt" and err["message"] == "at most 1 prompt per request on this server, got 2"


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_storm_of_mixed_requests_leaves_the_server_idle_and_correct(served, where):
    """120 requests from 24 connections at once against 3 slots and a queue of 3: greedy and sampled,
    plain and streamed, streams abandoned after a few events, lists of prompts, bad bodies. Every
    answer is 200 (greedy ones equal their solo generation), 400 for the bad ones or 503 when full;
    afterwards nothing is left running or queued and the server still answers correctly."""
    om, tok, _ = served
    rng = np.random.default_rng(3)
    solos: dict[tuple, list[int]] = {}

    def expected(prompt, n):
        key = (tuple(prompt), n)
        if key not in solos:
            solos[key] = solo(om, prompt, n)
        return solos[key]

    async def one(h, j):
        kind = j % 6
        prompt = rng.integers(0, 256, int(rng.integers(1, 60))).tolist()
        body = {"model": "small", "prompt": prompt, "max_tokens": int(rng.integers(1, 24)), "temperature": 0}
        if kind == 0:  # bad
            body["max_tokens"] = ["x", 0, -3, None][j % 4] if j % 4 != 3 else 1.5
            r = await h.post("/v1/completions", json=body)
            return "bad", r.status_code
        if kind == 1:  # a list of prompts, sampled
            body.update(prompt=[prompt, prompt[:3]], temperature=0.8, seed=j)
            r = await h.post("/v1/completions", json=body)
            return "list", r.status_code
        if kind in (2, 3):  # streamed: to the end (greedy: checked), or abandoned after two events
            body["stream"] = True
            ids, events = [], 0
            async with h.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return "stream", r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        events += 1
                        ids += json.loads(line[6:])["choices"][0]["token_ids"]
                        if kind == 3 and events == 2:
                            return "abandoned", 200
            assert ids == expected(prompt, body["max_tokens"])
            return "stream", 200
        r = await h.post("/v1/completions", json=body)  # plain greedy: checked
        if r.status_code == 200:
            assert r.json()["choices"][0]["token_ids"] == expected(prompt, body["max_tokens"])
        return "plain", r.status_code

    async def storm(url):
        async with httpx.AsyncClient(base_url=url, timeout=MAX_WAIT_S,
                                     limits=httpx.Limits(max_connections=24)) as h:
            sem = asyncio.Semaphore(24)

            async def limited(j):
                async with sem:
                    return await one(h, j)

            return await asyncio.gather(*(limited(j) for j in range(120)))

    sched = scheduler_for(where, om, 3, max_queue=3)
    with running_server(sched, tok) as url:
        results = asyncio.run(storm(url))
        assert {code for kind, code in results if kind == "bad"} == {400}
        assert {code for kind, code in results if kind != "bad"} <= {200, 503}
        assert sum(code == 200 for kind, code in results if kind != "bad") >= 20
        wait_for(lambda: metrics(url)["xlstm_active_sequences"] == 0 and metrics(url)["xlstm_queued_sequences"] == 0,
                 "the server to fall idle")
        m = metrics(url)
        assert m['xlstm_requests_finished_total{reason="error"}'] == 0
        assert m['xlstm_http_requests_total{code="503"}'] == sum(code == 503 for _, code in results)
        prompt = tok.encode("after the storm")
        r = client(url).completions.create(model="small", prompt="after the storm", max_tokens=9, temperature=0)
        assert r.choices[0].model_extra["token_ids"] == solo(om, prompt, 9)


def test_a_stop_string_in_the_held_back_end_of_the_text_finishes_as_stop():
    """The last token is an incomplete UTF-8 character, held back until the sequence ends and then
    decoded as U+FFFD; a stop string found only there cuts the text and makes the finish "stop"
    (as a stop string found mid-text does), streamed or not, the token still counted."""
    tok = load_tokenizer_bytes()
    sched = Scheduler(_FakePool(2, vocab=256), max_batch=2)  # the next token is the last + 1
    body = {"model": "small", "prompt": [0xE1], "max_tokens": 1, "temperature": 0}  # generates 0xE2, a lead byte
    with running_server(sched, tok) as url:
        c = client(url)
        assert c.completions.create(**body).choices[0].text == "\ufffd"  # without a stop string
        r = c.completions.create(**body, stop=["x", "\ufffd"])
        assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
        chunks = list(c.completions.create(**body, stop=["\ufffd"], stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ""
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == 1


def test_a_request_whose_body_is_still_arriving_gets_503_at_shutdown():
    """A client stalled halfway through its body (a slow upload) when the server begins to stop is
    answered 503 at once, like the requests in flight, and its connection closes; it used to wait
    for the rest of the body until uvicorn cut it after GRACEFUL_SHUTDOWN_S (with a 500 and a
    traceback in the log)."""
    import socket

    app = create_app(Scheduler(_FakePool(2, vocab=256), max_batch=2), model_name="small",
                     tokenizer=load_tokenizer_bytes())
    with serving(app) as (url, server):
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\": [1, 2")
            server.servers[0].get_loop().call_soon_threadsafe(app.shut_down)  # what SIGTERM starts
            reply = b""
            with contextlib.suppress(TimeoutError):
                while chunk := s.recv(65536):  # until the server closes the connection
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 503") and b"connection: close" in reply.lower(), reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["message"] == "the server is shutting down"


def test_a_stream_whose_client_stopped_reading_ends_at_shutdown():
    """A streaming client that stopped reading leaves its stream waiting to write (uvicorn's flow
    control). Shutting down ends that request's handler at once, and closes its connection; the
    server used to wait until uvicorn cancelled the handler after GRACEFUL_SHUTDOWN_S, which
    logged a CancelledError traceback, and SIGTERM took 5.4 s to exit (now 0.4 s, by hand)."""
    import socket

    app = create_app(Scheduler(_FakePool(2, vocab=256), max_batch=2), model_name="small",
                     tokenizer=load_tokenizer_bytes())
    with serving(app) as (url, server):
        port = server.servers[0].sockets[0].getsockname()[1]
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 65536, "stream": True}).encode()
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills soon, and is never read
            s.connect(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            state = server.server_state
            wait_for(lambda: state.connections, "the connection")
            for c in state.connections:  # the kernel would buffer megabytes of it otherwise
                c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            wait_for(lambda: any(c.flow.write_paused for c in state.connections), "the stream to wait for its client")
            server.servers[0].get_loop().call_soon_threadsafe(app.shut_down)  # what SIGTERM starts
            deadline = time.monotonic() + 3.0  # well within GRACEFUL_SHUTDOWN_S
            while state.tasks and time.monotonic() < deadline:  # the requests' handlers
                time.sleep(0.02)
            assert not state.tasks, "the stream still waits for a client that does not read"
            assert metrics(url)["xlstm_active_sequences"] == 0
            # its unread bytes keep the connection open; `serve`'s shutdown drops it instead of
            # letting it hold the exit for GRACEFUL_SHUTDOWN_S
            assert state.connections
            server.servers[0].get_loop().call_soon_threadsafe(_drop_unread_connections, state)
            wait_for(lambda: not state.connections, "the connection to close")


class _FakePool:
    """A slot pool without a model (for the engine's own loop): the next token is (last + 1) %
    vocab; the first ``fail_put`` puts raise."""

    state_bytes = 4

    def __init__(self, capacity: int, vocab: int = 8, fail_put: int = 0):
        self.capacity, self.vocab_size, self.fail_put = capacity, vocab, fail_put

    def _logits(self, last) -> np.ndarray:  # (n, V) one-hot
        return np.eye(self.vocab_size, dtype=np.float32)[(np.asarray(last) + 1) % self.vocab_size]

    def prefill(self, ids, states):
        return self._logits(ids[:, -1]), [{} for _ in range(len(ids))]

    def step(self, ids):
        return self._logits(ids)

    def put(self, row, state):
        if self.fail_put:
            self.fail_put -= 1
            raise RuntimeError("put failed")

    def move(self, src, dst):
        pass


@contextlib.contextmanager
def engine_loop(scheduler):
    """The engine process's loop over ``scheduler``, in a thread of this process; yields the
    server's end of its socket pair (blocking until started on a loop: ``send``, ``recv``).
    Stops it (and drains what it still sends) at the end."""
    import socket

    from xlstm_export.serve.engine import _Engine, _ServerEnd

    server_socket, engine_socket = socket.socketpair()
    server = _ServerEnd(server_socket.fileno())
    thread = threading.Thread(target=_Engine(engine_socket.fileno(), scheduler).run, daemon=True)
    thread.start()
    try:
        yield server
    finally:  # never blocks: a broken engine that reads nothing must not hang the test
        server.close(("stop",), lambda: not thread.is_alive(), MAX_WAIT_S)
        assert not thread.is_alive(), "the engine loop did not stop"
        server_socket.close()
        engine_socket.close()


def finishes(server, n: int) -> dict[int, str]:
    """Read the engine's messages until ``n`` requests have finished: {request id: finish reason}."""
    out, deadline = {}, time.monotonic() + MAX_WAIT_S
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {out} of {n} requests finished"
        for kind, payload in server.recv(0.05):
            if kind == "events":  # (ids that got one token and go on, their tokens, the others)
                out.update((rid, reason) for rid, _, reason, _ in payload[2] if reason is not None)
    return out


def test_server_sends_never_block_while_the_engine_waits_to_send():
    """The engine sits in a blocking send while the server's event loop is busy; a large submit
    from the server meanwhile returns at once (the socket is full: it waits in the server's
    buffer), and once the loop reads again both go through: no deadlock."""
    sched = Scheduler(_FakePool(32), max_batch=32, max_prompt_tokens=1 << 20)
    endless = SamplingParams(max_tokens=1 << 30, temperature=0)
    with engine_loop(sched) as server:
        server.send(("submit", [(i, np.array([1, 2, 3]), endless) for i in range(32)]))

        async def main():
            ended = asyncio.get_running_loop().create_future()
            server.start(asyncio.get_running_loop(), lambda msgs: None, lambda: ended.set_result(None))
            time.sleep(1.0)  # the loop busy: the engine fills the socket with events, then blocks sending
            big = ("submit", [(100 + j, np.zeros(60000, np.int64), endless) for j in range(8)])  # ~4 MB
            t0 = time.monotonic()
            server.send(big)
            assert time.monotonic() - t0 < 0.5, "the server's send blocked"
            assert server.unsent, "the socket took the whole submit at once: nothing here was tested"
            deadline = time.monotonic() + MAX_WAIT_S
            while sched.stats.submitted < 40:  # the engine took the large submit
                assert not ended.done() and time.monotonic() < deadline, "the large submit did not arrive"
                await asyncio.sleep(0.01)

        asyncio.run(main())


def test_engine_admits_queued_requests_after_a_failed_iteration():
    """An iteration that raises fails what it had admitted, the sequence caught between the
    prefill and the running batch too, and the engine goes on with the queue unprompted."""
    sched = Scheduler(_FakePool(1, fail_put=1), max_batch=1)
    three = SamplingParams(max_tokens=3, temperature=0)
    with engine_loop(sched) as server:
        server.send(("submit", [(1, np.array([1]), three), (2, np.array([2]), three)]))
        assert finishes(server, 2) == {1: "error", 2: "length"}


def test_engine_reports_a_cancelled_stream_gone_in_its_stats(monkeypatch):
    """The iteration that drops a cancelled sequence runs nothing; the engine still sends its
    counters (active back to 0, the cancel counted) before it waits for work, however recently it
    sent them (here: after every iteration), or /metrics would show the stream running forever."""
    from xlstm_export.serve import engine

    monkeypatch.setattr(engine, "STATS_INTERVAL_S", 0.0)
    sched = Scheduler(_FakePool(2), max_batch=2)
    endless = SamplingParams(max_tokens=1 << 30, temperature=0)
    with engine_loop(sched) as server:
        server.send(("submit", [(1, np.array([1, 2]), endless)]))
        deadline = time.monotonic() + MAX_WAIT_S
        while not any(kind == "stats" and payload[1] == 1 for kind, payload in server.recv(0.05)):
            assert time.monotonic() < deadline, "the stream never ran"
        server.send(("cancel", 1, "cancelled"))
        stats, deadline = None, time.monotonic() + 5.0
        while stats is None or stats[1] != 0:
            assert time.monotonic() < deadline, f"the engine's last counters still say {stats}"
            for kind, payload in server.recv(0.05):
                stats = payload if kind == "stats" else stats
        assert stats[0].finished["cancelled"] == 1


def test_engine_process_exit_fails_its_requests_and_the_server_says_503(served):
    om, tok, _ = served
    engine = scheduler_for("process", om, 2)
    with running_server(engine, tok) as url:
        c = client(url)
        stream = iter(c.completions.create(model="small", prompt=["long"] * 3, max_tokens=60000, temperature=0,
                                           stream=True))  # two in the slots, one queued
        next(stream)
        wait_for(lambda: (metrics(url)["xlstm_active_sequences"], metrics(url)["xlstm_queued_sequences"]) == (2, 1),
                 "the streams to be counted")
        engine._proc.kill()
        with pytest.raises(openai.APIError, match="engine process exited"):  # the stream's last event
            for _ in stream:
                pass
        m = metrics(url)  # not the dead engine's last counters: nothing runs or waits now
        assert (m["xlstm_active_sequences"], m["xlstm_prefilling_sequences"], m["xlstm_queued_sequences"]) == (0, 0, 0)
        assert m['xlstm_requests_finished_total{reason="error"}'] == 3
        assert httpx.get(f"{url}/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as gone:
            c.completions.create(model="small", prompt="x", max_tokens=2)
        assert gone.value.status_code == 503 and "not running" in gone.value.response.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/models").status_code == 200  # the HTTP layer itself stays up


def test_engine_process_reports_what_it_serves_and_load_errors_as_themselves(served, tmp_path):
    om, tok, _ = served
    engine = scheduler_for("process", om, 3)
    try:
        assert (engine.info.capacity, engine.info.vocab_size) == (3, 256)
        assert engine.info.state_bytes == OrtSlots(om, 1).state_bytes
        assert engine.info.tokenizer.decode(tok.encode("same tokenizer")) == "same tokenizer"
    finally:
        engine.stop()
    assert not engine.alive
    with pytest.raises(ValueError, match="holds no sequence"):  # raised in the child, here as itself
        EngineProcess(str(om.path), dict(max_batch=4, max_state_mb=1e-6), dict(max_batch=4))
    with pytest.raises(FileNotFoundError, match="no such file"):
        EngineProcess(str(tmp_path / "missing.onnx"), dict(max_batch=4, max_state_mb=64), dict(max_batch=4))


# fields OpenAI's completions API does not define: refused (with OpenAI's wording), not ignored
UNKNOWN_FIELDS = {"top_k": 5, "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [1],
                  "max_completion_tokens": 4, "max_token": 4, "Temperature": 0}
BAD_REQUESTS = [
    ({"model": "small", "max_tokens": 3}, "prompt"),
    ({"model": "small", "prompt": None}, "prompt"),
    ({"model": "small", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "small", "prompt": "hi", "max_tokens": -5}, "max_tokens"),
    ({"model": "small", "prompt": [1, 2, 256]}, "prompt"),
    ({"model": "small", "prompt": [-1]}, "prompt"),
    ({"model": "small", "prompt": [1, 2.5]}, "prompt"),
    ({"model": "small", "prompt": []}, "prompt"),
    ({"model": "small", "prompt": ""}, "prompt"),
    ({"model": "small", "prompt": 5}, "prompt"),
    ({"model": "small", "prompt": {"text": "hi"}}, "prompt"),
    ({"model": "small", "prompt": "hi", "max_tokens": "5"}, "max_tokens"),
    ({"model": "small", "prompt": "hi", "max_tokens": 2.0}, "max_tokens"),
    ({"model": "small", "prompt": "hi", "max_tokens": True}, "max_tokens"),
    ({"model": "small", "prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"model": "small", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "small", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "small", "prompt": "hi", "seed": "1"}, "seed"),
    ({"model": "small", "prompt": "hi", "stream": "yes"}, "stream"),
    ({"model": "small", "prompt": "hi", "stop": 3}, "stop"),
    ({"model": "small", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "small", "prompt": "hi", "n": 2}, "n"),
    ({"model": "small", "prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"model": 7, "prompt": "hi"}, "model"),
    *(({"model": "small", "prompt": "hi", field: value}, field) for field, value in UNKNOWN_FIELDS.items()),
]


def test_bad_requests_get_400_and_the_server_stays_up(served):
    om, tok, _ = served
    sched = Scheduler(OrtSlots(om, 2), max_batch=2)
    with running_server(sched, tok) as url:
        with httpx.Client(base_url=url, timeout=MAX_WAIT_S) as h:
            for body, param in BAD_REQUESTS:
                r = h.post("/v1/completions", json=body)
                assert r.status_code == 400, (body, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
                assert err["param"] == param and err["message"], (body, err)
                if param in UNKNOWN_FIELDS:
                    assert err["message"] == f"Unrecognized request argument supplied: {param}"
            for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"[" * 100_000 + b"]" * 100_000):
                r = h.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 400 and "error" in r.json(), raw
            for raw, got in ((b'{"prompt": "hi", "temperature": 1e999}', "inf"),
                             (b'{"prompt": "hi", "top_p": NaN}', "nan")):
                r = h.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["message"].endswith(f"a finite number, got {got}"), r.text
            r = h.post("/v1/completions", content=b" " * (33 << 20), headers={"content-type": "application/json"})
            assert r.status_code == 413 and "error" in r.json()
            r = h.post("/v1/completions", json={"model": "other", "prompt": "hi"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            for method, path in (("GET", "/v1/nowhere"), ("POST", "/v1/completions/"), ("POST", "/v1/chat/completions")):
                r = h.request(method, path, json={"model": "small", "prompt": "hi"})  # a slash: no 307 redirect
                assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, r
            assert "POST /v1/completions" in r.json()["error"]["message"]  # why there is no chat endpoint
            r = h.get("/v1/completions")
            assert r.status_code == 405 and r.headers["allow"] == "POST" and "error" in r.json()
            assert h.get("/health").status_code == 200
        c = client(url)
        with pytest.raises(openai.BadRequestError):  # the official client sees the same
            c.completions.create(model="small", prompt=[1, 999], max_tokens=2)
        assert c.models.retrieve("small").model_dump() == c.models.list().data[0].model_dump()
        with pytest.raises(openai.NotFoundError) as missing:
            c.models.retrieve("other")
        assert missing.value.code == "model_not_found"
        # every field the client can send, at its neutral value (explicit nulls too), and vLLM's ignore_eos
        neutral = dict(best_of=1, echo=False, frequency_penalty=0, logit_bias={}, logprobs=None, n=1,
                       presence_penalty=0, seed=1, stop=None, suffix=None, top_p=1, user="u",
                       extra_body={"ignore_eos": False})
        r = c.completions.create(model="small", prompt="hi", max_tokens=2, temperature=0, **neutral)
        chunks = list(c.completions.create(model="small", prompt="hi", max_tokens=2, temperature=0, stream=True,
                                           stream_options={"include_usage": True}, **neutral))
        assert chunks[-1].usage.completion_tokens == 2 == r.usage.completion_tokens
        r = c.completions.create(model="small", prompt="still up", max_tokens=3, temperature=0)
        assert r.choices[0].model_extra["token_ids"] == solo(om, tok.encode("still up"), 3)
        m = metrics(url)
        assert m['xlstm_http_requests_total{code="400"}'] >= len(BAD_REQUESTS) + 4


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    from xlstm_export.cli import main

    for args, fragment in (([str(tmp_path / "missing.onnx")], "no such file"),
                           (["tiny", "--max-batch", "0"], "--max-batch must be >= 1"),
                           (["tiny", "--max-state-mb", "0.001"], "holds no sequence"),
                           (["tiny", "--max-state-mb", "nan"], "--max-state-mb must be > 0"),
                           (["tiny", "--port", "70000"], "a port lies in 0..65535"),
                           # for every target, before loading it (which would fail on the state budget)
                           (["tiny", "--threads", "0", "--max-state-mb", "0.001"], "--threads must be >= 1, got 0"),
                           (["tiny", "--threads", "-1", "--max-state-mb", "0.001", "--in-process"],
                            "--threads must be >= 1, got -1")):
        assert main(["serve", "--port", "0", *args]) == 2  # a --port in args comes last and wins
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "error:" in err[0] and fragment in err[0], err
    for value in ("-1", "inf"):
        with pytest.raises(SystemExit) as e:  # argparse: its usage line, then the error
            main(["serve", "tiny", "--stream-interval", value])
        assert e.value.code == 2
        assert f"--stream-interval: must be a finite number >= 0, got {value}" in capsys.readouterr().err


def test_a_second_server_on_the_port_fails_at_once_while_the_first_loads(monkeypatch, capsys):
    """The port is taken before the model loads: a second `serve` on it, started while the first is
    still loading, ends with the one-line error and exit code 2 rather than loading its own model."""
    import socket

    import xlstm_export.serve as serve_pkg
    from xlstm_export.cli import main

    loading, release = threading.Event(), threading.Event()

    def load_backend(target, **options):  # the first server's model takes its time to load
        if loading.is_set():
            raise RuntimeError("the second server went on to load its model")
        loading.set()
        release.wait(MAX_WAIT_S)
        raise RuntimeError("the first server stops here")

    monkeypatch.setattr(serve_pkg, "load_backend", load_backend)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome = []

    def first_server():
        try:
            serve_pkg.run_server("tiny", port=port, engine_process=False)
        except RuntimeError as e:
            outcome.append(str(e))

    first = threading.Thread(target=first_server)
    first.start()
    try:
        assert loading.wait(MAX_WAIT_S)
        assert main(["serve", "tiny", "--port", str(port), "--in-process"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"xlstm-export serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    finally:
        release.set()
        first.join(MAX_WAIT_S)
    assert outcome == ["the first server stops here"]
    serve_pkg.listen_socket("127.0.0.1", port).close()  # the first server, failed, let the port go


def test_admission_is_bounded_by_state_memory(served):
    from xlstm_export.serve import slot_capacity

    om, _, _ = served
    per_slot = OrtSlots.bytes_per_slot(om)
    assert per_slot >= 2 * OrtSlots(om, 1).state_bytes  # its rows plus a prefill state
    assert slot_capacity(64, 5 * per_slot / 2**20, per_slot) == 5  # memory binds before --max-batch
    assert slot_capacity(3, 1e6, per_slot) == 3
    with pytest.raises(ValueError, match="holds no sequence"):
        slot_capacity(8, 0.5 * per_slot / 2**20, per_slot)


def test_torch_slots_count_the_state_a_step_returns(served):
    """A TorchSlots decode step gets the runner's new state in fresh tensors (a TensorRT engine's
    outputs, the PyTorch model's results) before copying it back: with the pool's row and a prefill
    state, three states per slot at the peak, which admission must count."""
    _, _, model = served
    shapes = {k: tuple(s[1:]) for k, s in model.state_spec(1).items()}
    returned = []

    def run(ids, state):
        logits, new = model(ids, state)
        returned.append({k: v.data_ptr() for k, v in new.items()})
        return logits, new

    pool = TorchSlots(run, shapes, 256, 2)
    pool.step(np.array([1, 2], np.int64))
    own = {k: v.data_ptr() for k, v in pool._pool.items()}
    assert all(returned[-1][k] != own[k] for k in own)  # not written in place: a second state
    assert TorchSlots.bytes_per_slot(shapes) == 3 * pool.state_bytes


def test_serve_command_serves_until_terminated(served):
    """`xlstm-export serve model.onnx --port 0` as a user runs it: it says which port it took and
    answers there; SIGTERM ends the stream in flight at once (an error event, not the 65536 tokens it
    asked for), and the process exits with code 0 within seconds."""
    import re
    import subprocess
    import sys

    om, tok, _ = served
    proc = subprocess.Popen([sys.executable, "-m", "xlstm_export.cli", "serve", str(om.path), "--port", "0",
                             "--max-batch", "4", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, out, children = [], "", []
    try:
        while not lines or not lines[-1].startswith("serving "):  # once the model is loaded
            lines.append(proc.stdout.readline())
            assert lines[-1], "the server exited: " + "".join(lines)
        port = int(re.search(r" on http://127\.0\.0\.1:(\d+)/v1$", lines[-1]).group(1))
        assert port != 0
        url = f"http://127.0.0.1:{port}"  # it may not accept yet: a connection waits in the backlog
        r = client(url).completions.create(model="small", prompt="Hi", max_tokens=4, temperature=0)
        assert r.choices[0].model_extra["token_ids"] == solo(om, tok.encode("Hi"), 4)
        children = _children(proc.pid)  # the engine process (and multiprocessing's resource tracker)
        assert sum(b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read() for pid in children) == 1
        long = {"model": "small", "prompt": "long", "max_tokens": 65536, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=MAX_WAIT_S) as stream:
            events = (line for line in stream.iter_lines() if line)
            next(events)
            t0 = time.monotonic()
            proc.terminate()
            for last in events:
                assert time.monotonic() - t0 < 5, "the stream outlived the server's shutdown"
        assert json.loads(last[len("data: "):])["error"]["message"] == "the server is shutting down", last
        out, _ = proc.communicate(timeout=5)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            out, _ = proc.communicate(timeout=MAX_WAIT_S)
    out = "".join(lines) + out
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "serving small (onnxruntime (native CPU kernels) in an engine process; 4 sequence slots" in out
    wait_for(lambda: not any(_running(pid) for pid in children), "the engine process to exit")


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan waits for a PID 1 that may never reap it)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def test_model_id_keeps_a_dotted_name_and_drops_a_model_files_suffix():
    from xlstm_export.serve.backend import model_id

    assert model_id("xlstm-1.3b") == "xlstm-1.3b"  # a preset: its whole name (was "xlstm-1")
    assert model_id("runs/tiny-0.5/") == "tiny-0.5"  # a directory
    assert [model_id(f"out/m.v2{s}") for s in (".onnx", ".engine", ".plan")] == ["m.v2"] * 3


def test_an_inline_export_is_served_with_onnxruntimes_own_ops(tmp_path, caplog):
    """`serve` runs the native kernels by default; an --inline export has no xlstm nodes for them
    to replace, so it is served by onnxruntime's ops with a warning instead of refused."""
    import logging

    from xlstm_export.serve.backend import load_backend

    torch.manual_seed(1)
    model = xLSTMLM(preset("tiny-large", embedding_dim=64, num_heads=2, num_blocks=1)).eval()
    path = export_onnx(model, tmp_path / "inline.onnx", inline=True, progress=False)
    with caplog.at_level(logging.WARNING, logger="xlstm_export.serve"):
        backend = load_backend(str(path), max_batch=2, max_state_mb=64)
    assert backend.label == "onnxruntime" and backend.name == "inline"
    assert "--inline export" in caplog.text
    prompt = [3, 1, 4, 1, 5]
    ref = generate(OrtModel(path).decoder(), np.array([prompt], np.int64), 4).tokens[0].tolist()
    sched = Scheduler(backend.pool, max_batch=2)
    seq = sched.submit(prompt, SamplingParams(max_tokens=4, temperature=0))
    while seq.finish_reason is None:
        sched.step()
    assert seq.tokens == ref
