"""Parity of an exported model against a reference, output by output and state by state.

    report = validate_onnx("model.onnx", model)      # model: the xLSTMLM it was exported from
    print(report.table()); sys.exit(0 if report.ok else 1)

Cases: random prompts for several (B, S) — prefill from a fresh state — then decode steps that
continue from each prefill's state. Every output (logits and each present.* state) is compared
with the reference by the project's relative error (max |a - e| / max |e|) against the limit of
the graph's dtype in :data:`contract.MAX_RELATIVE_ERROR`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import contract

# (B, S) of the prefill cases: odd lengths, S = 1, and S above the default chunk of 64.
DEFAULT_CASES: tuple[tuple[int, int], ...] = ((1, 1), (1, 7), (3, 64), (3, 129))


@dataclass
class Row:
    case: str  # e.g. "prefill B3 S129" or "decode B3 step 2"
    name: str  # "logits" or a state name
    max_abs: float
    rel: float
    limit: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.limit)


@dataclass
class Report:
    dtype: str
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def worst(self) -> Row:
        return max(self.rows, key=lambda r: r.rel / r.limit)

    def table(self, *, all_rows: bool = False) -> str:
        """One line per (case, output); without all_rows, states are folded to their worst per case."""
        rows = self.rows if all_rows else _fold_states(self.rows)
        w = max(len(r.case) for r in rows)
        n = max(len(r.name) for r in rows)
        lines = [f"{'case':<{w}}  {'output':<{n}}  {'max abs err':>11}  {'rel err':>9}  {'limit':>7}  ok"]
        for r in rows:
            lines.append(f"{r.case:<{w}}  {r.name:<{n}}  {r.max_abs:11.3e}  {r.rel:9.2e}  {r.limit:7.0e}  "
                         f"{'yes' if r.ok else 'NO'}")
        worst = self.worst()
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {len(self.rows)} comparisons ({self.dtype}); worst {worst.name} in "
                     f"'{worst.case}': rel {worst.rel:.2e} (limit {worst.limit:.0e})")
        return "\n".join(lines)


def _fold_states(rows: list[Row]) -> list[Row]:
    out: list[Row] = []
    states: dict[str, list[Row]] = {}
    for r in rows:
        if r.name == "logits":
            out.append(r)
        else:
            states.setdefault(r.case, []).append(r)
    for case, rs in states.items():
        w = max(rs, key=lambda r: r.rel / r.limit)
        out.append(Row(case, f"states (worst: {w.name})", w.max_abs, w.rel, w.limit))
    order = {c: i for i, c in enumerate(dict.fromkeys(r.case for r in rows))}
    return sorted(out, key=lambda r: (order[r.case], r.name != "logits"))


Runner = Callable[[np.ndarray, dict | None], tuple[np.ndarray, dict]]


def compare_runners(
    actual: Runner,
    expected: Runner,
    *,
    vocab_size: int,
    dtype: str = "float32",
    cases: tuple[tuple[int, int], ...] = DEFAULT_CASES,
    decode_steps: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run both runners on the same random prompts and decode tokens; compare every output."""
    dtype = contract.canonical_dtype(dtype)
    limit = contract.MAX_RELATIVE_ERROR[dtype]
    rng = np.random.default_rng(seed)
    report = Report(dtype)

    def compare(case: str, a_out, e_out) -> None:
        (a_logits, a_state), (e_logits, e_state) = a_out, e_out
        report.rows.append(_row(case, "logits", a_logits, e_logits, limit))
        for k in e_state:
            report.rows.append(_row(case, k, a_state[k], e_state[k], limit))

    for B, S in cases:
        if progress:
            progress(f"B{B} S{S}")
        ids = rng.integers(0, vocab_size, size=(B, S), dtype=np.int64)
        a_out, e_out = actual(ids, None), expected(ids, None)
        compare(f"prefill B{B} S{S}", a_out, e_out)
        a_state, e_state = a_out[1], e_out[1]
        for step in range(decode_steps):
            tok = rng.integers(0, vocab_size, size=(B, 1), dtype=np.int64)
            a_out, e_out = actual(tok, a_state), expected(tok, e_state)
            compare(f"decode B{B} S{S}+{step + 1}", a_out, e_out)
            a_state, e_state = a_out[1], e_out[1]
    return report


def _row(case: str, name: str, actual, expected, limit: float) -> Row:
    a, e = _np(actual), _np(expected)
    if a.shape != e.shape:
        raise ValueError(f"{case}: {name} has shape {a.shape}, the reference {e.shape}")
    return Row(case, name, contract.max_abs_error(a, e), contract.relative_error(a, e), limit)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def torch_reference(model) -> Runner:
    """The PyTorch model as a runner; states go in as float32 tensors and come out as numpy."""

    @torch.no_grad()
    def run(ids: np.ndarray, state: dict | None):
        st = None if state is None else {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in state.items()}
        logits, new = model(torch.from_numpy(ids), st)
        return logits.float().numpy(), {k: v.float().numpy() for k, v in new.items()}

    return run


def validate_onnx(onnx_path, model, *, native_ops: bool = False, runtime: str = "onnxruntime",
                  **kwargs) -> Report:
    """onnxruntime on ``onnx_path`` against the PyTorch ``model`` (float32 reference computation
    for a float32 graph; for fp16/bf16 graphs the reference runs in the graph's dtype).
    ``native_ops``: run the cells with the native CPU kernels (:mod:`xlstm_export.ort_native`).
    ``runtime``: "onnxruntime" or "openvino" (:class:`xlstm_export.openvino_runner.OpenVinoModel`, CPU)."""
    from .ort import OrtModel

    if runtime == "openvino":
        if native_ops:
            raise ValueError("native_ops are onnxruntime kernels; runtime='openvino' runs the standard ops")
        from .openvino_runner import OpenVinoModel

        ort_model = OpenVinoModel(onnx_path)
    elif runtime == "onnxruntime":
        ort_model = OrtModel(onnx_path, native_ops=native_ops)
    else:
        raise ValueError(f"runtime must be 'onnxruntime' or 'openvino', got {runtime!r}")
    dtype = contract.canonical_dtype(ort_model.dtype)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    ref = model if torch_dtype == torch.float32 else _cast_copy(model, torch_dtype)
    return compare_runners(ort_model.run, torch_reference(ref), vocab_size=model.config.vocab_size,
                           dtype=dtype, **kwargs)


def _cast_copy(model, dtype: torch.dtype):
    import copy

    m = copy.deepcopy(model).to(dtype)
    return m.eval()
