"""What the PyTorch reference forms (``mlstm/naive.py``, ``slstm/naive.py``) share."""

from __future__ import annotations

import torch

from ..contract import T_DTYPES

# The references compute in float32, or in float64 end to end: they take every float dtype
# (the op's T dtypes and float64) and mixed dtypes.
REFERENCE_DTYPES = ("float64", *T_DTYPES)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (kept end-to-end), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# eps = 0 is the limit without eps, which the cell math allows (max(|n^T q|, exp(-m)) > 0
# already); the op's attribute range starts above it. Every mLSTM implementation here takes it.
EPS_ZERO = {"eps": (0, 0.0)}
