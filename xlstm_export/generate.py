"""Token generation on any runner that maps (input_ids, state) -> (logits, state).

A runner is the PyTorch model, an onnxruntime session (``ort.OrtModel``) or a TensorRT engine
(``tensorrt.TrtModel``): each takes int64 ids (B, S) and a state dict and returns logits (B, S, V)
and the new state. Generation prefills the prompt once, then decodes one token per call carrying
the state, so the work and memory per token do not grow with the length.

- ``generate``: a rectangular batch of prompts, a fixed number of new tokens (benchmarks, parity).
- ``generate_batch``: prompts of different lengths as ONE batch, each row stopping on its own (EOS,
  a caller's stop test, the token budget).
- ``generate_text``: text in, text out through a ``tokenizer.Tokenizer``, streamed per row as
  valid UTF-8 and cut before the first ``stop`` string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, TypedDict

import numpy as np
import torch

from .models import sample_next
from .tokenizer import TextStream

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11 on


class Runner(Protocol):
    def __call__(self, input_ids: np.ndarray, state: dict | None) -> tuple[np.ndarray, dict]: ...


@dataclass
class GenerationResult:
    tokens: np.ndarray  # (B, max_new_tokens) int64: the new tokens only
    prefill_s: float  # seconds for the prompt
    decode_s: list[float] = field(default_factory=list)  # seconds per decoded token

    @property
    def ms_per_token(self) -> float:
        return 1e3 * float(np.mean(self.decode_s)) if self.decode_s else float("nan")


def torch_runner(model) -> Runner:
    """Wrap an xLSTMLM as a numpy-in, numpy-out runner."""

    @torch.no_grad()
    def run(input_ids: np.ndarray, state: dict | None):
        logits, new_state = model(torch.from_numpy(np.ascontiguousarray(input_ids)), state)
        return logits.float().numpy(), new_state

    return run


def generate(
    runner: Runner,
    prompt_ids: np.ndarray,  # (B, S) int64
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = 0,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Greedy (temperature 0) or seeded sampling. The same seed and logits give the same tokens on
    every runner: sampling always goes through ``models.sample_next`` on a CPU torch generator."""
    check_sampling(temperature, top_k)
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64)
    if prompt_ids.ndim == 1:
        prompt_ids = prompt_ids[None]
    if prompt_ids.ndim != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"prompt ids must have shape (B, S) with S >= 1, got {prompt_ids.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    t0 = time.perf_counter()
    logits, state = runner(prompt_ids, None)
    result = GenerationResult(tokens=np.zeros((prompt_ids.shape[0], 0), np.int64), prefill_s=time.perf_counter() - t0)
    out = []
    for step in range(max_new_tokens):
        tok = sample_next(torch.from_numpy(np.asarray(logits[:, -1], np.float32)), temperature, top_k, gen)
        tok = tok.numpy().astype(np.int64)  # (B, 1)
        out.append(tok)
        if on_token is not None:
            on_token(step)
        if step + 1 < max_new_tokens:
            t0 = time.perf_counter()
            logits, state = runner(tok, state)
            result.decode_s.append(time.perf_counter() - t0)
    result.tokens = np.concatenate(out, axis=1)
    return result


def check_sampling(temperature: float, top_k: int | None) -> None:
    """One clear error for sampling settings that would fail deep inside torch or be ignored."""
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 (or unset: the whole vocabulary), got {top_k!r}")


# --- prompts of different lengths as one batch ----------------------------------------------------
@dataclass
class BatchResult:
    tokens: list[list[int]]  # per row: the new tokens (an EOS that ended the row is not included)
    finish_reasons: list[str]  # per row: "stop" (EOS or the caller's stop test) or "length"
    prefill_s: float  # seconds for the shared prompt prefix
    decode_s: list[float] = field(default_factory=list)  # seconds per one-token batch step

    @property
    def ms_per_step(self) -> float:
        return 1e3 * float(np.mean(self.decode_s)) if self.decode_s else float("nan")


class Sampling(TypedDict, total=False):
    """How :func:`generate_text` draws tokens: the keyword arguments it hands to :func:`generate_batch`."""

    temperature: float
    top_k: int | None
    seed: int | None


def generate_batch(
    runner: Runner,
    prompts: Sequence[Sequence[int]],  # B prompts of token ids, any lengths >= 1
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = 0,
    eos_token_ids: Sequence[int] = (),
    on_token: Callable[[int, int], bool] | None = None,
) -> BatchResult:
    """Generate for all prompts in one batch: the shortest prompt's length is prefilled in one call,
    then every step feeds each row either its next prompt token (a row still reading its prompt) or
    the token it just generated. A row's tokens are those of generating it alone (with greedy
    decoding; sampling draws from one generator for the batch). ``on_token(row, token)`` sees each
    new token and returns True to end that row (a stop string); a row also ends at an EOS id or
    after ``max_new_tokens``. Finished rows ride along until the last row ends.

    temperature: 0 is greedy (the default); above 0, sampling from softmax(logits / temperature).
    top_k: sample from the k most likely tokens only (None: the whole vocabulary). seed: the seed of
    the batch's sampling generator (None: torch's global one, not reproducible). eos_token_ids: the
    ids that end a row (the tokenizer's ``eos_token_ids``; none by default)."""
    check_sampling(temperature, top_k)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts or any(len(p) < 1 for p in prompts):
        raise ValueError("every prompt must hold at least one token")
    B, lens, eos = len(prompts), [len(p) for p in prompts], set(int(i) for i in eos_token_ids)
    S0 = min(lens)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    t0 = time.perf_counter()
    logits, state = runner(np.array([p[:S0] for p in prompts], np.int64), None)  # (B, S0, V)
    result = BatchResult([[] for _ in range(B)], ["length"] * B, prefill_s=time.perf_counter() - t0)
    done, fed = [False] * B, S0  # tokens fed to every row so far
    while True:
        sampled = sample_next(torch.from_numpy(np.asarray(logits[:, -1], np.float32)), temperature, top_k, gen)
        sampled = sampled.numpy()[:, 0]  # (B,)
        step = np.empty((B, 1), np.int64)  # (B, 1): what each row reads next
        for b in range(B):
            if fed < lens[b]:  # still reading its prompt: the sample is not used
                step[b, 0] = prompts[b][fed]
                continue
            tok = int(sampled[b])
            step[b, 0] = tok
            if done[b]:
                continue
            if tok in eos:
                done[b], result.finish_reasons[b] = True, "stop"
                continue
            result.tokens[b].append(tok)
            if on_token is not None and on_token(b, tok):
                done[b], result.finish_reasons[b] = True, "stop"
            elif len(result.tokens[b]) >= max_new_tokens:
                done[b] = True
        if all(done):
            return result
        t0 = time.perf_counter()
        logits, state = runner(step, state)  # (B, 1, V)
        result.decode_s.append(time.perf_counter() - t0)
        fed += 1


# --- text -----------------------------------------------------------------------------------------
@dataclass
class TextResult:
    prompt: str
    text: str  # the completion, cut before a stop string
    tokens: list[int]  # its token ids (through the one that completed a stop string)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def generate_text(
    runner: Runner,
    tokenizer,  # tokenizer.Tokenizer
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    on_text: Callable[[int, str], None] | None = None,
    **sampling: Unpack[Sampling],
) -> tuple[list[TextResult], BatchResult]:
    """Complete each prompt (one batch through ``runner``); ``on_text(row, piece)`` gets each row's
    text as it becomes final. Stops at the tokenizer's EOS ids, a ``stop`` string or
    ``max_new_tokens``. ``sampling``: ``temperature``, ``top_k``, ``seed`` as in :func:`generate_batch`.

    ``tokenizer`` is a ``tokenizer.Tokenizer`` (``load_tokenizer(path)``); a model without one
    (``load_tokenizer`` gives None) takes token ids through :func:`generate_batch` instead, as the CLI's
    ``--prompt-ids`` does. Raises TypeError for a missing tokenizer or a string for ``prompts``,
    ValueError for a prompt that encodes to no tokens."""
    if tokenizer is None or not all(callable(getattr(tokenizer, a, None)) for a in ("encode", "stream")):
        got = "None" if tokenizer is None else f"a {type(tokenizer).__name__}"
        raise TypeError(f"generate_text needs a tokenizer (xlstm_export.tokenizer.Tokenizer), got {got}: "
                        "load_tokenizer(path) returns None for a model without tokenizer.json; give such a model "
                        "prompt token ids with generate_batch(runner, [[1, 2, 3]], max_new_tokens)")
    if isinstance(prompts, str):  # would be one prompt per character
        raise TypeError(f"prompts is a list of strings, got one string: give [{prompts[:20]!r}]")
    ids = [tokenizer.encode(p) for p in prompts]
    for p, i in zip(prompts, ids):
        if not i:
            raise ValueError(f"prompt {p!r} encodes to no tokens")
    streams = [TextStream(tokenizer, stop) for _ in prompts]

    def emit(row: int, piece: str) -> None:
        if piece and on_text is not None:
            on_text(row, piece)

    def on_token(row: int, tok: int) -> bool:
        emit(row, streams[row].push([tok])[0])
        return streams[row].stopped

    res = generate_batch(runner, ids, max_new_tokens, eos_token_ids=tokenizer.eos_token_ids, on_token=on_token,
                         **sampling)
    for row, s in enumerate(streams):
        emit(row, s.finish())
    # a stop string found only in the text held back until the end (it ends the text all the same)
    out = [TextResult(p, s.text, toks, "stop" if s.stopped else reason)
           for p, s, toks, reason in zip(prompts, streams, res.tokens, res.finish_reasons)]
    return out, res
