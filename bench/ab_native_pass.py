"""A/B: the native CPU kernels with and without one of their graph passes, side by side.

Passes of ``xlstm_export.ort_native``, most of them for the paper architecture:

* ``block-diagonal``: the q / k / v projections (blocks of 4) as ``BlockDiagMatMul``
  (:func:`~xlstm_export.ort_native._block_diagonal_products`) instead of onnxruntime's batch of
  one tiny product per block;
* ``causal-conv``: each paper block's causal convolution and its SiLU as one ``CausalConv``
  (:func:`~xlstm_export.ort_native._causal_convs`) instead of ~16 standard nodes;
* ``paper-layer``: each paper mLSTM block's layer between its products (head reshapes, gate biases,
  the cell, the norm, skip and gate: ~25 nodes and the cell's function) as one ``mLSTMPaperLayer``
  (:func:`~xlstm_export.ort_native._match_paper_mlstm_layer`), which runs prefill step by step;
* ``slstm-layer``: each paper sLSTM block's layer between its convolution and its residual (the
  head-wise gate products, the cell, the norm: ~15 nodes and the cell's function) as one
  ``sLSTMPaperLayer`` (:func:`~xlstm_export.ort_native._match_paper_slstm_layer`);
* ``geglu``: the paper sLSTM blocks' GeGLU (the exact GELU's 5 nodes, the gate's Mul and the Split)
  folded into the FFN's down-projection as ``PackedGluMatMulAdd`` (gelu = 1;
  :func:`~xlstm_export.ort_native._gelu_input`);
* ``layer-norm``: the paper blocks' LayerNorm before a product folded into it as ``PackedLnMatMul``
  (:func:`~xlstm_export.ort_native._match_layer_norm`);
* ``bf16-weights`` (any architecture; an export with ``--dtype bf16``): the packed weights whose
  values are all bfloat16 values held as bfloat16 (``PackedMatMulBf16`` and its kin,
  :func:`~xlstm_export.ort_native.bfloat16_bits`): the same products to the bit from half the bytes;
* ``bf16-rounding`` (an export with ``--dtype bf16``): the norms, mLSTM layers and paper
  convolutions whose output (or state) the graph rounds to bfloat16 (a Cast there and back) folded
  as in a float32 export, the rounding inside the kernel (``round_bf16``,
  :func:`~xlstm_export.ort_native._bf16_round_trip`), instead of left as standard nodes around the
  products (a decode step: tiny-large 125 nodes against 17, tiny 150 against 44);
* ``in-place``: decode steps update the paper mLSTM blocks' states c, n, m in place, one buffer
  bound as input and output (:func:`~xlstm_export.ort_native._native_step_in_place`, used by
  :func:`~xlstm_export.ort_native.inplace_states`), instead of reading one buffer and filling
  another (where the paper layer is not fused: ``mLSTMPaperLayer`` updates in place itself).

The script loads one export twice with ``OrtModel(path, native_ops=True)``, "A" with the pass(es)
turned off, "B" as users get it, and times both interleaved (A, B, A, B, ... per round) so that a
shared machine's drifts hit both alike: decode steps as the server runs them (``OrtSlots.step``:
IOBinding on a slot pool) and a prefill chunk (``OrtModel.run``, last-position logits). Each cell
is the median over rounds of the per-round medians; B / A below 1 is the pass's gain. It also
compares A's and B's logits: the prefill's, and one more decode step after each batch's timing
(both pools have taken the same steps on the same ids).

    python bench/ab_native_pass.py --pass block-diagonal            # tiny, B = 1, 8, 32
    python bench/ab_native_pass.py --pass in-place --models xlstm-125m --batch 1 8 32 --steps 5 --rounds 5
    python bench/ab_native_pass.py --pass causal-conv paper-layer   # A without either
    python bench/ab_native_pass.py --pass bf16-weights --dtype bf16 --models xlstm-large-160m --steps 5 --rounds 5
    python bench/ab_native_pass.py --pass bf16-rounding --dtype bf16 --models tiny-large
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from _report import cpu_name  # bench/_report.py (the script's folder is on sys.path)

from xlstm_export import ort_native
from xlstm_export.export import export_onnx
from xlstm_export.models import load
from xlstm_export.ort import OrtModel
from xlstm_export.serve import OrtSlots
from xlstm_export.serve.backend import session_options


PASSES = {  # --pass -> (the ort_native function, what it returns when the pass is off)
    "block-diagonal": ("_block_diagonal_products", 0),  # products swapped: none
    "in-place": ("_native_step_in_place", False),  # the paper mLSTM step may update in place: no
    "causal-conv": ("_causal_convs", 0),  # convolutions swapped: none
    "paper-layer": ("_match_paper_mlstm_layer", None),  # no paper mLSTM layer matches
    "slstm-layer": ("_match_paper_slstm_layer", None),  # no paper sLSTM layer matches
    "geglu": ("_gelu_input", None),  # no GELU matches: the GeGLU stays standard nodes
    "layer-norm": ("_match_layer_norm", None),  # no LayerNorm is folded into its product
    "bf16-weights": ("bfloat16_bits", None),  # every packed weight float32
    "bf16-rounding": ("_bf16_round_trip", None),  # no rounding point is folded: nor what it sits in
}


@contextmanager
def passes_off(names: list[str]):
    """ort_native's passes ``names`` do nothing while the block runs (the "A" model is loaded)."""
    kept = {PASSES[name][0]: getattr(ort_native, PASSES[name][0]) for name in names}
    for name in names:
        attr, off = PASSES[name]
        setattr(ort_native, attr, lambda *_, off=off: off)
    try:
        yield
    finally:
        for attr, fn in kept.items():
            setattr(ort_native, attr, fn)


def median_time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench_model(name: str, args, workdir: Path) -> None:
    """Print the table rows of one model."""
    path = workdir / f"{name}.onnx"
    torch.manual_seed(args.seed)
    export_onnx(load(name), path, dtype=args.dtype, progress=False)
    opts = lambda: session_options(args.threads)  # noqa: E731 (the server's: workers not spinning)
    with passes_off(args.pass_names):
        a = OrtModel(path, native_ops=True, session_options=opts())
    b = OrtModel(path, native_ops=True, session_options=opts())
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, a.vocab_size, (1, args.prefill_len))
    la, _ = a.run(prompt, None, logits="last")
    lb, _ = b.run(prompt, None, logits="last")
    diff = float(np.abs(la - lb).max() / np.abs(la).max())
    cases = [(f"decode B={B}", B) for B in args.batch] + [(f"prefill 1 x {args.prefill_len}", None)]
    for label, B in cases:
        per = {"A": [], "B": []}
        if B is not None:
            pools = {k: OrtSlots(m, B) for k, m in (("A", a), ("B", b))}
            ids = rng.integers(0, a.vocab_size, B)
            for pool in pools.values():
                pool.step(ids)  # warm-up
        for _ in range(args.rounds):
            for k, m in (("A", a), ("B", b)):
                if B is not None:
                    per[k].append(median_time(lambda: pools[k].step(ids), args.steps))
                else:
                    per[k].append(median_time(lambda: m.run(prompt, None, logits="last"), max(1, args.steps // 8)))
        if B is not None:  # both pools took the same steps on the same ids: one more, compared
            la, lb = pools["A"].step(ids).copy(), pools["B"].step(ids)
            diff = max(diff, float(np.abs(la - lb).max() / np.abs(la).max()))
        ta, tb = statistics.median(per["A"]), statistics.median(per["B"])
        print(f"| {name} | {label} | {1e3 * ta:.3f} ms | {1e3 * tb:.3f} ms | {tb / ta:.2f} |", flush=True)
    print(f"| {name} | logits, A against B (prefill, last decode step) | max abs difference / max abs: "
          f"{diff:.1e} | | |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pass", dest="pass_names", nargs="+", required=True, choices=list(PASSES),
                   help="the pass(es) A runs without")
    p.add_argument("--models", nargs="+", default=["tiny"], help="presets (default: tiny)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="the export's dtype")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--prefill-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=100, help="decode steps per round and model")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"Date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; machine: {cpu_name()}")
    print("| model | run | A: without the pass | B: with it | B / A |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            bench_model(name, args, Path(d))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
