"""Parity of an exported model, judged against what its precision achieves.

    report = validate_onnx("model.onnx", model)      # model: the xLSTMLM it was exported from
    print(report.table()); sys.exit(0 if report.ok else 1)

Three runners see the same random prompts and decode tokens:

- the **reference**: the PyTorch model in float64;
- the **export**: the file in onnxruntime (or any runner, e.g. a TensorRT engine);
- the **baseline**: the PyTorch model in the export's own dtype (float32, float16 or bfloat16).

For every output and state (a row per case), the report gives the export's error and the
baseline's error against the reference, both as ``err = max |x - ref| / max |ref|`` (float64).
The export passes when

1. every row has ``err_export <= max(factor * err_baseline, atol)``, and
2. the median over all rows of ``typ_export / typ_baseline`` is at most ``median``, and for every
   output (logits, each state) the median over its cases at most ``OUTPUT_MEDIAN_SCALE * median``;
   ``typ`` is a row's typical error: the median over its slices ((batch, position) of the logits,
   (batch, head) of a state) of ``|x - ref|_2 / |ref|_2``.

The baseline's error is what the precision achieves on this model and these inputs: a deep model
with random weights amplifies rounding far beyond what a fixed tolerance can know, a shallow one
does not. (1) catches a defect that stands out of the rounding anywhere; ``atol`` is a floor for
rows where the baseline happens to be nearly exact, and the whole limit of a row where it
overflowed (inf or nan: it judges nothing). (2) catches a small defect that hides in the
rounding row by row but moves every slice: on an ill-conditioned model (12 random blocks, fp16)
two honest fp16 computations differ from float64 by factors of 5-15 in single rows (the rounding
blows up different slices), yet their typical errors are alike (median ratio 0.6-1.2 measured),
while one weight off by 1% lifts the median ratio to 2 and more. Defaults per dtype:
:data:`DEFAULT_FACTOR`, :data:`DEFAULT_ATOL`, :data:`DEFAULT_MEDIAN` (CLI ``--factor`` /
``--atol`` / ``--median``).

What it cannot tell: where PyTorch's own error in the dtype is as large as the defect. On the
xlstm-large-160m preset with random weights PyTorch fp16 is 1-4% off float64 on the logits, so an
fp16 export with its embedding or its head scaled by 1.01 passes (median ratio 1.06, logits 1.18;
honest 0.75), and so does xlstm-125m's embedding (1.26, honest 0.82); fp32 flags the same defects
at 800x and more.

States: both cells store c and n relative to the stabilizer m (the cell's true C is c·exp(m)), and
m itself is a representation choice: two correct runs may pick different m. So c and n are
compared as ``c·exp(m - m_ref)`` against ``c_ref`` (likewise n), which is independent of the
stabilizer and also checks m; m gets no row of its own. h and the conv states are compared as
they are.

Cases: prefill from a fresh state for several (B, S), then decode steps that continue from each
runner's own state (so errors accumulate as they do in use). The medians need several independent
prompts: a case's rows share its prompts' rounding (the decode steps continue its prefill), and on
an ill-conditioned model one prompt can put an honest export up to 13x above the baseline on the
rows of its case. With only two cases of one and two prompts, such a prompt moved an honest output's
median to 4.94 (12-block fp16 model); with three cases (six prompts) or the defaults (eight), the
worst honest output stayed at or below 1.18 over four prompt seeds, and a 1% weight gave 6.2-9.8.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import contract

# (B, S) of the prefill cases: odd lengths, S = 1, and S above the default chunk of 64.
DEFAULT_CASES: tuple[tuple[int, int], ...] = ((1, 1), (1, 7), (3, 64), (3, 129))

# Per row: how many times the baseline's error (PyTorch in the export's dtype vs float64) the
# export may be off. Honest exports measured (tiny, tiny-large, a 12-block E=64 model, the presets
# xlstm-125m and xlstm-large-160m): fp32 rows up to 10.6x (one mLSTM n state of the 24-block 125M
# preset through the function bodies; 3x elsewhere), fp16 / bf16 rows up to 14x on the 12-block
# model (rounding amplified through the stack lands on different rows). A weight off by 1% puts
# fp32 rows 800x and more above PyTorch's error.
DEFAULT_FACTOR: dict[str, float] = {"float32": 20.0, "float16": 20.0, "bfloat16": 20.0}
# Floor of a row's limit, in the same units (max |x - ref| / max |ref|): a few units of rounding of
# the dtype (float32 2^-24, float16 2^-11, bfloat16 2^-8), below any real defect's error.
DEFAULT_ATOL: dict[str, float] = {"float32": 1e-6, "float16": 5e-3, "bfloat16": 3e-2}
# Over all rows: the median of typical error / the baseline's. Honest exports measured 0.6-1.2; a
# weight scaled by 1.01: fp32 > 1000, fp16 2.6-6.5 (tiny, tiny-large, 12 blocks); bf16 rounding
# (0.4%) hides a 1% weight, so bf16 only catches larger defects.
DEFAULT_MEDIAN: dict[str, float] = {"float32": 2.0, "float16": 1.5, "bfloat16": 1.5}
# Each output's own median (over its cases) may reach this multiple of the median limit: it has
# fewer rows to average (honest, on the 12-block fp16 model: up to 2.8 with two cases on one host
# and 4.94 on another, at most 1.18 with three or more; see "Cases" above); it catches a defect that
# touches one output only (the vocabulary head: logits alone).
OUTPUT_MEDIAN_SCALE = 2.5

Runner = Callable[[np.ndarray, "dict | None"], "tuple[object, dict]"]


@dataclass
class Row:
    case: str  # e.g. "prefill B3 S129" or "decode B3 S129+2"
    name: str  # "logits" or a state name ("3.c": c·exp(m - m_ref), see the module docstring)
    err: float  # the runner's error against the reference (max |x - ref| / max |ref|)
    base: float | None  # the baseline's error against the same reference (None: no baseline)
    limit: float
    typ: float = float("nan")  # the runner's typical error (see _typical_error)
    typ_base: float | None = None  # the baseline's typical error

    @property
    def typ_ratio(self) -> float | None:
        if self.typ_base is None or not 0 < self.typ_base < np.inf:  # no baseline, or one that overflowed
            return None
        return self.typ / self.typ_base if np.isfinite(self.typ) else np.inf

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.err) and self.err <= self.limit)

    @property
    def badness(self) -> float:
        """err / limit; inf for a non-finite error (sorts first)."""
        return self.err / self.limit if np.isfinite(self.err) else np.inf


@dataclass
class Report:
    """Rows of errors against a reference, their limits and the verdict: what :func:`validate_onnx`,
    :func:`compare_runners` and ``tensorrt.validate_engine`` return (rows added by :meth:`add`)."""

    dtype: str
    factor: float | None = None  # None: fixed limits (no baseline runner)
    atol: float | None = None
    median: float | None = None  # limit of median_ratio
    rows: list[Row] = field(default_factory=list)

    def median_ratios(self) -> dict[str, float]:
        """Per output (logits, each state): the median over the cases of typical error / the
        baseline's. Empty without a baseline."""
        by_name: dict[str, list[float]] = {}
        for r in self.rows:
            if r.typ_ratio is not None:
                by_name.setdefault(r.name, []).append(r.typ_ratio)
        return {k: float(np.median(v)) for k, v in by_name.items()}

    @property
    def median_ratio(self) -> float | None:
        """The median over all rows of typical error / the baseline's; None without a baseline."""
        ratios = [r.typ_ratio for r in self.rows if r.typ_ratio is not None]
        return float(np.median(ratios)) if ratios else None

    def worst_output_median(self) -> tuple[str, float] | None:
        """(output, its median ratio) of the output with the largest one; None without a baseline."""
        ratios = self.median_ratios()
        return max(ratios.items(), key=lambda kv: kv[1]) if ratios else None

    @property
    def rows_ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    @property
    def median_ok(self) -> bool:
        if self.median is None:
            return True
        m, worst = self.median_ratio, self.worst_output_median()
        return m is not None and m <= self.median and worst[1] <= OUTPUT_MEDIAN_SCALE * self.median

    @property
    def ok(self) -> bool:
        return self.rows_ok and self.median_ok

    def worst(self) -> Row:
        return max(self.rows, key=lambda r: r.badness)

    def add(self, case: str, actual: dict, reference: dict, baseline: dict | None = None) -> list[Row]:
        """One row per output of ``reference`` (name -> array or tensor, any float dtype): the error
        of ``actual`` against it and its limit, ``max(factor * baseline error, atol)`` with a
        ``baseline``, else the fixed ``contract.MAX_RELATIVE_ERROR`` of the dtype. Returns the rows."""
        rows = []
        for name, ref in reference.items():
            ref, act = _np64(ref), _np64(actual[name])
            err = _error(case, name, act, ref)
            if baseline is None:
                rows.append(Row(case, name, err, None, contract.MAX_RELATIVE_ERROR[self.dtype]))
            else:
                base_x = _np64(baseline[name])
                base = _error(case, name, base_x, ref)
                # a baseline that overflowed (inf / nan) judges nothing: the floor alone is the limit
                limit = max(self.factor * base, self.atol) if np.isfinite(base) else self.atol
                rows.append(Row(case, name, err, base, limit, _typical_error(act, ref), _typical_error(base_x, ref)))
        self.rows.extend(rows)
        return rows

    def __str__(self) -> str:
        return self.table()

    def table(self, *, all_rows: bool = False) -> str:
        """Worst rows first. Without all_rows, each case's states are folded to its worst one."""
        rows = self.rows if all_rows else _fold_states(self.rows)
        rows = sorted(rows, key=lambda r: -r.badness)
        w = max(len(r.case) for r in rows)
        n = max(len(r.name) for r in rows)
        base_head = f"PyTorch {self.dtype}"
        lines = [f"{'case':<{w}}  {'output':<{n}}  {'export err':>10}  {base_head:>16}  {'ratio':>7}  "
                 f"{'limit':>9}  ok   {'typical ratio':>13}"]
        for r in rows:
            base = f"{r.base:16.2e}" if r.base is not None else f"{'-':>16}"
            ratio = f"{r.err / r.base:7.2f}" if r.base else f"{'-':>7}"
            typ = f"{r.typ_ratio:13.2f}" if r.typ_ratio is not None else f"{'-':>13}"
            lines.append(f"{r.case:<{w}}  {r.name:<{n}}  {r.err:10.2e}  {base}  {ratio}  {r.limit:9.2e}  "
                         f"{'yes' if r.ok else 'NO ':<3}  {typ}")
        if self.factor is not None:
            lines.append(f"errors: max |x - ref| / max |ref| against the PyTorch model in float64; limit = "
                         f"max({self.factor:g} x the PyTorch {self.dtype} error, {self.atol:g}); "
                         f"c and n compared as c*exp(m - m_ref)")
        else:
            lines.append("errors: max |x - ref| / max |ref| against the second runner; fixed limit of the dtype")
        worst = self.worst()
        verdict = "PASS" if self.ok else "FAIL"
        line = (f"{verdict}: {len(self.rows)} comparisons ({self.dtype}); worst {worst.name} in "
                f"'{worst.case}': err {worst.err:.2e} (limit {worst.limit:.2e}) {'ok' if self.rows_ok else 'NO'}")
        if self.median is not None and self.worst_output_median() is None:
            line += "; median typical ratio: none (no row has a finite, nonzero baseline error to divide by) NO"
        elif self.median is not None:
            name, worst = self.worst_output_median()
            line += (f"; median typical ratio {self.median_ratio:.2f} (limit {self.median:g}), worst output "
                     f"{name} {worst:.2f} (limit {OUTPUT_MEDIAN_SCALE * self.median:g}) "
                     f"{'ok' if self.median_ok else 'NO'}")
        lines.append(line)
        return "\n".join(lines)


def _fold_states(rows: list[Row]) -> list[Row]:
    out: list[Row] = []
    states: dict[str, Row] = {}
    for r in rows:
        if r.name == "logits":
            out.append(r)
        elif r.case not in states or r.badness > states[r.case].badness:
            states[r.case] = r
    for case, r in states.items():
        out.append(Row(case, f"states (worst: {r.name})", r.err, r.base, r.limit, r.typ, r.typ_base))
    return out


def compare_runners(
    actual: Runner,
    reference: Runner,
    *,
    baseline: Runner | None = None,
    vocab_size: int,
    dtype: str = "float32",
    factor: float | None = None,
    atol: float | None = None,
    median: float | None = None,
    cases: tuple[tuple[int, int], ...] = DEFAULT_CASES,
    decode_steps: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the runners on the same random prompts and decode tokens; compare every output.

    With a ``baseline`` (the reference computation in ``dtype``), each row's limit is
    ``max(factor * baseline error, atol)`` and the median ratio to the baseline is at most
    ``median`` (defaults: :data:`DEFAULT_FACTOR`, :data:`DEFAULT_ATOL`, :data:`DEFAULT_MEDIAN`).
    Without one, ``actual`` is held to the fixed limit ``contract.MAX_RELATIVE_ERROR[dtype]``
    against ``reference`` (e.g. a TensorRT engine against onnxruntime, both in ``dtype``).
    Runners take int64 ids (B, S) and their own state (None: fresh) and return (logits, state);
    torch tensors or numpy arrays of any float dtype.
    """
    dtype = contract.canonical_dtype(dtype)
    if baseline is not None:
        factor = DEFAULT_FACTOR[dtype] if factor is None else float(factor)
        atol = DEFAULT_ATOL[dtype] if atol is None else float(atol)
        median = DEFAULT_MEDIAN[dtype] if median is None else float(median)
        # finite: an infinite limit passes any export, which is no comparison
        if not (math.isfinite(factor + atol + median) and factor >= 1.0 and atol >= 0.0 and median >= 1.0):
            raise ValueError(f"factor and median must be >= 1 and atol >= 0, all finite, got factor={factor}, "
                             f"atol={atol}, median={median}")
    elif factor is not None or atol is not None or median is not None:
        raise ValueError("factor / atol / median apply to a comparison with a baseline runner")
    cases = tuple(tuple(c) for c in cases)
    if not cases or any(len(c) != 2 for c in cases):
        raise ValueError(f"cases must be one or more (B, S) pairs, got {cases!r}")
    if not isinstance(decode_steps, int) or decode_steps < 0:
        raise ValueError(f"decode_steps must be an int >= 0, got {decode_steps!r}")
    rng = np.random.default_rng(seed)
    report = Report(dtype, factor, atol, median)
    runners = [actual, reference] if baseline is None else [actual, reference, baseline]

    def compare(case: str, outs) -> None:
        r_state = outs[1][1]  # every state in the reference's stabilizer frame
        rows = [{"logits": logits, **_aligned_states(state, r_state)} for logits, state in outs]
        report.add(case, rows[0], rows[1], rows[2] if baseline is not None else None)

    for B, S in cases:
        if progress:
            progress(f"B{B} S{S}")
        ids = rng.integers(0, vocab_size, size=(B, S), dtype=np.int64)
        outs = [run(ids, None) for run in runners]
        compare(f"prefill B{B} S{S}", outs)
        for step in range(decode_steps):
            tok = rng.integers(0, vocab_size, size=(B, 1), dtype=np.int64)
            outs = [run(tok, out[1]) for run, out in zip(runners, outs)]
            compare(f"decode B{B} S{S}+{step + 1}", outs)
    return report


def _aligned_states(state: dict, ref_state: dict) -> dict[str, np.ndarray]:
    """The state in the reference's stabilizer frame (float64): for every block with an m,
    c -> c·exp(m - m_ref) and n -> n·exp(m - m_ref); m itself dropped; other tensors as they are."""
    if state.keys() != ref_state.keys():
        raise ValueError(f"state keys differ from the reference's: {sorted(state)} vs {sorted(ref_state)}")
    out = {}
    for key in ref_state:
        block, _, tensor = key.rpartition(".")
        m_key = f"{block}.m" if block else "m"
        if tensor == "m":
            continue
        x = _np64(state[key])
        if tensor in ("c", "n") and m_key in ref_state:
            dm = _np64(state[m_key]) - _np64(ref_state[m_key])  # (B, NH) mLSTM, (B, NH, DH) sLSTM
            with np.errstate(over="ignore", invalid="ignore"):
                x = x * np.exp(dm.reshape(dm.shape + (1,) * (x.ndim - dm.ndim)))
        out[key] = x
    return out


def _error(case: str, name: str, actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise ValueError(f"{case}: {name} has shape {actual.shape}, the reference {expected.shape}")
    with np.errstate(invalid="ignore", over="ignore"):
        return contract.relative_error(actual, expected)


def _typical_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """The median over slices (the first two dims: (batch, position) of logits, (batch, head) of a
    cell state, (batch, tap) of a conv state) of |x - ref|_2 / |ref|_2: the error of a typical
    slice. Rounding amplified by an ill-conditioned model blows up a few slices; a wrong weight
    moves them all."""
    a = actual.reshape(actual.shape[0] * actual.shape[1] if actual.ndim > 2 else actual.shape[0], -1)
    e = expected.reshape(a.shape)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        num = np.sqrt(np.sum((a - e) ** 2, axis=-1))
        den = np.sqrt(np.sum(e**2, axis=-1))
        rel = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
    return float(np.median(rel)) if rel.size else 0.0


def _np64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _torch_dtype(dtype) -> torch.dtype:
    from .models.model import resolve_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    return resolve_dtype(str(dtype) if str(dtype) in ("float64", "fp64") else contract.canonical_dtype(dtype))


def torch_runner(model, dtype: str | torch.dtype | None = None) -> Runner:
    """The PyTorch model as a runner, computing in ``dtype`` (a converted copy when it differs;
    the caller's model is never changed). States pass through as the model returns them; a fresh
    float64 model starts from float64 zeros."""
    if dtype is not None:
        dt = _torch_dtype(dtype)
        if next(model.parameters()).dtype != dt:
            model = copy.deepcopy(model).to(dt).eval()
    param_dtype = next(model.parameters()).dtype

    @torch.no_grad()
    def run(ids: np.ndarray, state: dict | None):
        ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        if state is None:
            state = model.init_state(ids.shape[0])
            if param_dtype == torch.float64:
                state = {k: v.double() for k, v in state.items()}
        else:
            state = {k: torch.as_tensor(v) for k, v in state.items()}
        return model(ids, state)

    return run


def torch_reference(model) -> Runner:
    """The PyTorch model in float64: the reference of :func:`validate_onnx`."""
    return torch_runner(model, torch.float64)


RUNTIMES = ("onnxruntime", "openvino")


def validate_onnx(onnx_path, model, *, native_ops: bool = False, runtime: str = "onnxruntime",
                  factor: float | None = None, atol: float | None = None, median: float | None = None,
                  **kwargs) -> Report:
    """The exported file in ``runtime`` ("onnxruntime" or "openvino") against the PyTorch ``model``
    it was exported from: errors against ``model`` in float64, limits from ``model`` run in the
    graph's dtype (module docstring). ``native_ops``: onnxruntime with the native CPU kernels
    (:mod:`xlstm_export.ort_native`); without them onnxruntime runs the file's bodies exactly as
    written (no decode fast path: what TensorRT and OpenVINO run too). ``kwargs``:
    :func:`compare_runners`' cases, decode_steps, seed, progress.

    Raises TypeError when ``model`` is not an xLSTMLM, ValueError when the file was not exported
    from it as far as the file tells (:func:`check_exported_from`), before anything runs."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    if runtime == "openvino" and native_ops:
        raise ValueError("native_ops are onnxruntime kernels; they do not apply to runtime='openvino'")
    check_exported_from(onnx_path, model)
    if runtime == "onnxruntime":
        from .ort import OrtModel

        exported = OrtModel(onnx_path, native_ops=native_ops, decode_step=False)
    else:
        from .openvino_runner import OpenVinoModel

        exported = OpenVinoModel(onnx_path)
    return compare_with_torch(exported.run, model, contract.canonical_dtype(exported.dtype), factor=factor,
                              atol=atol, median=median, **kwargs)


def check_exported_from(onnx_path: str | os.PathLike, model) -> None:
    """Refuse a PyTorch ``model`` that the exported file was not made from, before any comparison
    runs: the config the file records (metadata ``xlstm_export.config``), compared by
    :meth:`xLSTMConfig.function_fields`, else the file's vocabulary and state shapes. A model of
    the same config with other weights is not caught here: its comparison fails.

    Raises TypeError when ``model`` is not an xLSTMLM, ValueError naming the differences."""
    from .models import xLSTMConfig
    from .ort import inspect_model

    if not all(hasattr(model, a) for a in ("config", "state_spec")):
        raise TypeError(f"expected the xLSTMLM the file was exported from (xlstm_export.load(source) gives "
                        f"one), got {type(model).__name__}")
    iface = inspect_model(onnx_path)
    try:
        theirs = xLSTMConfig.from_dict(json.loads(iface["metadata"]["config"])).function_fields()
    except (KeyError, TypeError, ValueError):  # no config recorded, or one of another version
        theirs = None
    if theirs is not None:
        ours = model.config.function_fields()
        keys = [*theirs, *(k for k in ours if k not in theirs)]  # architectures differ: fields differ
        show = lambda c, k: repr(c[k]) if k in c else "none"  # noqa: E731
        what = [f"{k} {show(theirs, k)} in the file, {show(ours, k)} in the source" for k in keys
                if (k in theirs, theirs.get(k)) != (k in ours, ours.get(k))]
    else:  # what the file's interface shows
        what = []
        if iface["vocab_size"] is not None and iface["vocab_size"] != model.config.vocab_size:
            what.append(f"vocab_size {iface['vocab_size']} in the file, {model.config.vocab_size} in the source")
        spec = {k: tuple(s[1:]) for k, s in model.state_spec(1).items()}
        if spec != iface["state_shapes"]:
            what.append(f"state tensors {iface['state_shapes']} in the file, {spec} in the source")
    if what:
        shown = "; ".join(what[:4]) + (f"; and {len(what) - 4} more" if len(what) > 4 else "")
        raise ValueError(f"{onnx_path} was not exported from this source model: {shown}")


def compare_with_torch(runner: Runner, model, dtype, **kwargs) -> Report:
    """``runner`` (an export in any runtime) against the PyTorch ``model``: errors against ``model``
    in float64, limits from ``model`` run in ``dtype`` (the module docstring's rule). ``kwargs``:
    :func:`compare_runners`' (``vocab_size`` defaults to the model's)."""
    kwargs.setdefault("vocab_size", model.config.vocab_size)
    return compare_runners(runner, torch_reference(model), baseline=torch_runner(model, dtype), dtype=dtype,
                           **kwargs)
