"""State slots: the recurrent state of every served sequence, kept where the runner reads it.

A slot pool holds ``capacity`` sequences' states as rows of one batch per state tensor
(``{name: (capacity, *dims)}``). The scheduler keeps its running sequences in rows ``0..n-1`` (it
moves the last row into a row that frees up), so one decode step runs the first ``n`` rows as one
batch, and their states are read and written where they lie: nothing is gathered or scattered.

    pool = OrtSlots(OrtModel("model.onnx", native_ops=True), capacity=32)
    logits, states = pool.prefill(ids, [None, None])     # ids (2, C): chunk of two new prompts
    logits, states = pool.prefill(ids2, states)          # next chunk, states carried
    pool.put(0, states[0]); pool.put(1, states[1])       # they join the running batch
    logits = pool.step(np.array([t0, t1]))               # (2, V): one decode step for rows 0, 1
    pool.move(1, 0)                                      # row 0 left: row 1 takes its place

Two pools share this interface: :class:`OrtSlots` (onnxruntime, the state in buffers bound to the
session with IOBinding, updated in place where the native kernels allow it) and
:class:`TorchSlots` (any ``run(ids, state) -> (logits, state)`` over torch tensors: a TensorRT
engine's :class:`~xlstm_export.tensorrt.TrtModel` on a GPU, or the PyTorch model).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np

# LOGITS_FROM: an int64 (1,) input of newer exports choosing the rows the head computes (0: all; a
# decode step's one row either way); older files do not have it
from ..interface import LOGITS_FROM, state_input_name, state_output_name

__all__ = ["OrtSlots", "TorchSlots", "state_bytes"]


def state_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of one sequence's float32 state, from the dims after the batch dim."""
    return sum(4 * math.prod(s) for s in shapes.values())


class OrtSlots:
    """Slots for an :class:`~xlstm_export.ort.OrtModel`.

    Decode steps run through onnxruntime IOBinding on the first ``n`` rows of two preallocated sets
    of state buffers, read from one and written to the other by turns; states the native
    ``mLSTMLayer`` kernel updates in place have one buffer. Buffers are allocated once, for
    ``capacity`` rows, so the server's memory does not grow with the tokens it generates.
    Prefill chunks go through :meth:`OrtModel.run` (fresh arrays, one sequence's state each).
    """

    def __init__(self, model, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if model.vocab_size is None:
            raise ValueError(f"{model.path}: the logits have no static vocabulary dim")
        self.model = model
        self.capacity = capacity
        self.vocab_size = int(model.vocab_size)
        self.names = list(model.state_names)
        shapes = model.state_shapes  # dims after batch
        inplace = set(getattr(model, "_inplace_states", ()))  # read and overwritten by one kernel
        first = {k: np.zeros((capacity, *shapes[k]), np.float32) for k in self.names}
        second = {k: first[k] if k in inplace else np.zeros_like(first[k]) for k in self.names}
        self._bufs = (first, second)
        self._swap = any(k not in inplace for k in self.names)  # flip buffer sets after a step
        self._cur = 0  # the set holding the current states
        logits_type = model.session.get_outputs()[0].type
        self._logits_dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(logits_type)
        if self._logits_dtype is None:
            raise ValueError(f"serving binds float32 or float16 logits; the graph gives {logits_type}")
        self._ids = np.zeros((capacity, 1), np.int64)  # (capacity, 1)
        self._logits = np.zeros((capacity, 1, self.vocab_size), self._logits_dtype)  # (capacity, 1, V)
        self._bindings: dict[tuple[int, int], Any] = {}  # (rows, source set) -> IOBinding
        fed = {"input_ids", *(state_input_name(k) for k in self.names)}
        extra = [i.name for i in model.session.get_inputs() if i.name not in fed]
        if extra not in ([], [LOGITS_FROM]):
            raise ValueError(f"{model.path}: unexpected session inputs {extra}")
        self._logits_from = np.zeros(1, np.int64) if extra else None  # (1,)
        # prefill wants the last position's logits only; runners that can, compute only that row
        self._last_only = "logits" in inspect.signature(model.run).parameters
        self.state_bytes = state_bytes(shapes)
        self.slot_bytes = self.bytes_per_slot(model)

    @staticmethod
    def bytes_per_slot(model) -> int:
        """Memory one slot takes: its rows in the buffer sets (one set for in-place states, two for
        the others), plus one state while its prompt is prefilled."""
        inplace = set(getattr(model, "_inplace_states", ()))
        shapes = model.state_shapes
        return sum(4 * math.prod(s) * (1 if k in inplace else 2) for k, s in shapes.items()) + state_bytes(shapes)

    def _binding(self, n: int, src: int):
        b = self._bindings.get((n, src))
        if b is None:
            dst = 1 - src if self._swap else src
            b = self.model.session.io_binding()
            b.bind_cpu_input("input_ids", self._ids[:n])
            if self._logits_from is not None:
                b.bind_cpu_input(LOGITS_FROM, self._logits_from)
            for k in self.names:
                b.bind_cpu_input(state_input_name(k), self._bufs[src][k][:n])
                out = self._bufs[dst][k][:n]
                b.bind_output(state_output_name(k), "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            b.bind_output("logits", "cpu", 0, self._logits_dtype, [n, 1, self.vocab_size],
                          self._logits.ctypes.data)
            self._bindings[(n, src)] = b
        return b

    def step(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int64, the last token of rows 0..n-1 -> their next-token logits (n, V) float32.
        The result is a view that the next step overwrites."""
        n = len(ids)
        self._ids[:n, 0] = ids
        self.model.session.run_with_iobinding(self._binding(n, self._cur))
        if self._swap:
            self._cur = 1 - self._cur
        out = self._logits[:n, 0]
        return out if out.dtype == np.float32 else out.astype(np.float32)

    def prefill(self, ids: np.ndarray, states: list[dict | None]) -> tuple[np.ndarray, list[dict]]:
        """ids (k, C) int64 for k sequences after ``states`` (None: a fresh sequence) ->
        (last-position logits (k, V) float32, the k new states {name: (1, *dims)})."""
        k = ids.shape[0]
        if all(s is None for s in states):
            state = None
        else:
            zero = {n: np.zeros((1, *self.model.state_shapes[n]), np.float32) for n in self.names}
            state = {n: np.concatenate([(s or zero)[n] for s in states]) for n in self.names}
        if self._last_only:
            logits, new = self.model.run(ids, state, logits="last")  # (k, 1, V), {name: (k, *dims)}
        else:
            logits, new = self.model.run(ids, state)  # (k, C, V)
        return (np.ascontiguousarray(logits[:, -1], dtype=np.float32),
                [{n: new[n][i : i + 1] for n in self.names} for i in range(k)])

    def put(self, row: int, state: dict) -> None:
        """Make ``state`` ({name: (1, *dims)}) the current state of ``row``."""
        cur = self._bufs[self._cur]
        for k in self.names:
            cur[k][row] = state[k][0]

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src``'s current state into row ``dst``."""
        cur = self._bufs[self._cur]
        for k in self.names:
            cur[k][dst] = cur[k][src]


class TorchSlots:
    """Slots over torch tensors for ``run(ids (B, S) int64 tensor, state) -> (logits, state)``.

    Used for a TensorRT engine (:meth:`TrtModel.run`, the pool on the GPU) and the PyTorch model.
    A decode step passes the first ``n`` rows of the pool (views, no copy) and copies the new
    state back into them. ``max_chunk``: the most positions one call may take (an engine's
    profile maximum sequence length; None: any); prefill runs a longer chunk as consecutive
    pieces of at most that many tokens, the state carried from one to the next.
    """

    def __init__(self, run: Callable, state_shapes: dict[str, tuple[int, ...]], vocab_size: int,
                 capacity: int, device: Any = "cpu", max_chunk: int | None = None):
        import torch

        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_chunk is not None and max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1 (None: any length), got {max_chunk}")
        self.max_chunk = max_chunk
        self._torch = torch
        self._run = run
        self.capacity = capacity
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        self.names = list(state_shapes)
        self._shapes = dict(state_shapes)
        self._pool = {k: torch.zeros((capacity, *s), dtype=torch.float32, device=self.device)
                      for k, s in state_shapes.items()}
        self.state_bytes = state_bytes(state_shapes)
        self.slot_bytes = self.bytes_per_slot(state_shapes)

    @staticmethod
    def bytes_per_slot(state_shapes: dict[str, tuple[int, ...]]) -> int:
        """Its row of the pool, the new state a decode step returns for it before the copy back
        (the runner allocates its outputs), and one state while its prompt is prefilled."""
        return 3 * state_bytes(state_shapes)

    def _call(self, ids: np.ndarray, state: dict | None):
        torch = self._torch
        with torch.no_grad():
            logits, new = self._run(torch.as_tensor(ids, dtype=torch.int64, device=self.device), state)
        return logits, new

    def step(self, ids: np.ndarray) -> np.ndarray:
        n = len(ids)
        view = {k: v[:n] for k, v in self._pool.items()}
        logits, new = self._call(np.asarray(ids, np.int64).reshape(n, 1), view)  # (n, 1, V)
        for k in self.names:
            if new[k].data_ptr() != view[k].data_ptr():
                view[k].copy_(new[k])
        return logits[:, -1].float().cpu().numpy()

    def prefill(self, ids: np.ndarray, states: list[dict | None]) -> tuple[np.ndarray, list[dict]]:
        torch = self._torch
        if all(s is None for s in states):
            state = {k: torch.zeros((len(states), *s), dtype=torch.float32, device=self.device)
                     for k, s in self._shapes.items()}
        else:
            zero = {k: torch.zeros((1, *s), dtype=torch.float32, device=self.device) for k, s in self._shapes.items()}
            state = {k: torch.cat([(s or zero)[k] for s in states]) for k in self.names}
        ids = np.asarray(ids, np.int64)  # (k, C)
        piece = self.max_chunk or ids.shape[1]
        for j in range(0, ids.shape[1], piece):  # one call unless C > max_chunk
            logits, state = self._call(ids[:, j : j + piece], state)
        return (logits[:, -1].float().cpu().numpy(),
                [{k: state[k][i : i + 1].clone() for k in self.names} for i in range(len(states))])

    def put(self, row: int, state: dict) -> None:
        for k in self.names:
            self._pool[k][row].copy_(state[k][0])

    def move(self, src: int, dst: int) -> None:
        for k in self.names:
            self._pool[k][dst].copy_(self._pool[k][src])
