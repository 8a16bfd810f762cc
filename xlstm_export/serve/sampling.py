"""Next-token choice for served sequences: greedy, temperature and nucleus (top-p) sampling.

Each sequence samples with its own seeded generator, so a request's tokens depend on its seed and
its logits only, not on which other sequences shared its decode steps.

    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, seed=1)
    rng = params.generator()
    tok = sample_row(logits_row, params, rng)        # logits_row (V,) float32 -> int
    toks = greedy(logits)                            # logits (n, V) -> (n,) int64, all rows at once
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens at most (OpenAI's default for completions)
    temperature: float = 1.0  # 0 = greedy; OpenAI's default is 1
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None: a fresh random seed
    stop_token_ids: tuple[int, ...] = field(default=())  # generation ends after one of these (EOS)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def greedy(logits: np.ndarray) -> np.ndarray:
    """logits (n, V) -> (n,) int64: the argmax of every row."""
    return logits.argmax(axis=-1)  # the method: no numpy dispatch layer, it runs every decode step


def sample_row(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token from logits (V,) at ``params.temperature`` within the ``params.top_p`` nucleus."""
    if params.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature  # (V,)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")  # most likely first
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, params.top_p)) + 1]  # reaches top_p
        q = p[keep] / p[keep].sum()
        return int(keep[min(int(np.searchsorted(np.cumsum(q), rng.random(), side="right")), len(keep) - 1)])
    return int(min(np.searchsorted(np.cumsum(p), rng.random(), side="right"), len(p) - 1))
