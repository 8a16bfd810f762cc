"""Test-wide setup.

- Without a CUDA device, Triton kernels run in the interpreter (TRITON_INTERPRET=1) — it must be
  set before any kernel module is imported, so it is set here.
- The `poison_empty` fixture fills fresh float tensors from torch.empty / torch.empty_like with NaN
  (as fla's tests do), so a kernel that leaves part of an output unwritten fails instead of
  passing on stale memory. Kernel test modules use it with
  `pytestmark = pytest.mark.usefixtures("poison_empty")`.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_empty, _empty_like = torch.empty, torch.empty_like


def _poisoned(fn):
    def wrapper(*args, **kwargs):
        t = fn(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    return wrapper


@pytest.fixture
def poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _poisoned(_empty))
    monkeypatch.setattr(torch, "empty_like", _poisoned(_empty_like))
    yield
