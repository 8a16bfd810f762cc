"""A/B: the xlstm function bodies of another git revision against the working tree's, in onnxruntime.

One export of each model (the working tree's exporter, fixed random weights); the "A" file is the
same graph with its ``xlstm`` functions replaced by those that ``xlstm_export/onnx_functions.py``
builds at ``--base`` (loaded from git into a scratch module), the "B" file is the export as it is.
Both run through :class:`xlstm_export.ort.OrtModel` exactly as users run them: stock (the bodies;
B also gets the in-memory decode fast path, its default) and with the native CPU kernels
(``native_ops=True``). Timings are interleaved (A, B, A, B, ... per round) so a shared machine's
drifts hit both alike; the table gives medians over rounds of the per-round medians, and B / A.

    python bench/ab_bodies.py --base dadfc6b                      # tiny + tiny-large, B = 1 and 8
    python bench/ab_bodies.py --base dadfc6b --models xlstm-large-160m --rounds 9
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from xlstm_export.export import export_onnx
from xlstm_export.models import load
from xlstm_export.ort import OrtModel

ROOT = Path(__file__).resolve().parent.parent


def base_functions(rev: str):
    """``functions`` of xlstm_export/onnx_functions.py at git revision ``rev``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:xlstm_export/onnx_functions.py"],
                         check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("xlstm_export._ab_onnx_functions", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "xlstm_export"  # its relative imports (contract) resolve to the installed package
    exec(compile(src, f"{rev}:onnx_functions.py", "exec"), module.__dict__)
    return module.functions


def with_functions(path: Path, out: Path, functions) -> Path:
    model = onnx.load(path)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    ops = [f.name for f in model.functions]
    del model.functions[:]
    model.functions.extend(functions(opset, ops))
    onnx.save(model, out)
    return out


def step_ms(om: OrtModel, B: int, steps: int) -> float:
    """Median ms of a (B, 1) decode step carrying the state (OrtModel.run, as generate's fallback)."""
    rng = np.random.default_rng(0)
    _, state = om.run(rng.integers(0, om.vocab_size, (B, 8)))
    ids = rng.integers(0, om.vocab_size, (B, 1))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _, state = om.run(ids, state)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def prefill_ms(om: OrtModel, B: int, S: int) -> float:
    ids = np.random.default_rng(1).integers(0, om.vocab_size, (B, S))
    t = time.perf_counter()
    om.run(ids)
    return 1e3 * (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision whose bodies are A")
    p.add_argument("--models", nargs="+", default=["tiny", "tiny-large"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=40, help="decode steps per round and runner")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    functions_a = base_functions(args.base)
    print(f"| model | runner | B | decode A ms | decode B ms | B/A | prefill S={args.prefill_len} A ms | "
          f"prefill B ms | B/A |\n|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for name in args.models:
            torch.manual_seed(0)
            path_b = export_onnx(load(name), Path(d) / f"{name}.onnx", progress=False)
            path_a = with_functions(path_b, Path(d) / f"{name}-{args.base}.onnx", functions_a)
            for native in (False, True):
                # A: the old file as it was run (its body had the If inside); B: as users run it now
                a = OrtModel(path_a, native_ops=native, intra_op_threads=args.threads, decode_step=False)
                b = OrtModel(path_b, native_ops=native, intra_op_threads=args.threads)
                for B in args.batch:
                    dec = {"A": [], "B": []}
                    pre = {"A": [], "B": []}
                    for _ in range(args.rounds):
                        for tag, om in (("A", a), ("B", b)):
                            dec[tag].append(step_ms(om, B, args.steps))
                            pre[tag].append(prefill_ms(om, B, args.prefill_len))
                    da, db = statistics.median(dec["A"]), statistics.median(dec["B"])
                    pa, pb = statistics.median(pre["A"]), statistics.median(pre["B"])
                    runner = "native" if native else "stock"
                    print(f"| {name} | {runner} | {B} | {da:.3f} | {db:.3f} | {db / da:.2f} | {pa:.1f} | {pb:.1f} | "
                          f"{pb / pa:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
