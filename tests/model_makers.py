"""Small random models for the pipeline tests (export, validate, runtimes)."""

from __future__ import annotations

import torch
from xlstm_export.models import xLSTMConfig, xLSTMLM


def perturbed_model(config: xLSTMConfig, seed: int = 0) -> xLSTMLM:
    """xLSTMLM(config) in eval mode with seeded init, every parameter moved by 0.02 * N(0, 1) so
    the gates leave their init values and the cells see varied inputs."""
    torch.manual_seed(seed)
    model = xLSTMLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model
