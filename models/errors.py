"""The one error a checkpoint raises (below every module that reads one, so none imports another for it)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message says which file or tensor and why."""


__all__ = ["CheckpointError"]
