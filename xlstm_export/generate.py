"""Token generation on any runner that maps (input_ids, state) -> (logits, state).

A runner is the PyTorch model, an onnxruntime session (``ort.OrtModel``) or a TensorRT engine
(``tensorrt.TrtModel``): each takes int64 ids (B, S) and a state dict and returns logits (B, S, V)
and the new state. Generation prefills the prompt once, then decodes one token per call carrying
the state, so the work and memory per token do not grow with the length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from .models import sample_next


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
