"""Which onnxruntime releases run our exports: each version installed on its own, then a prefill
and a decode step of each export, against the installed onnxruntime's outputs.

Triton Inference Server's onnxruntime backend ships the onnxruntime of its release (TRITON_VERSION_MAP
in build.py of the release's branch of triton-inference-server/server), and other deployments pin
theirs: this says which of them take the files as they are. Each version is pip-installed into a
folder of its own (with numpy < 2, which the older wheels were built against) and run in a child
process, so a crash inside onnxruntime is a result, not the end of the run. Every file runs with
onnxruntime's default graph optimizations, and a failing one again with the basic level only
(Triton's ``optimization { graph { level: -1 } }``).

    python bench/ort_versions.py                          # 1.16.3 1.17.3 1.18.1 1.19.2 1.20.1
    python bench/ort_versions.py --versions 1.18.1 1.22.0 --out table.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

VERSIONS = ["1.16.3", "1.17.3", "1.18.1", "1.19.2", "1.20.1"]
MODELS = [("tiny", "fp32"), ("tiny-large", "fp32"), ("tiny-large", "fp16")]  # paper (mLSTM + sLSTM), 7B-style

# Run in the child (and for the reference here): a prefill of 7 tokens for 2 sequences from a random
# state, then one decode step from its output state; every output saved. argv: model, out, level.
CHILD = r"""
import json, sys
import numpy as np, onnxruntime as ort
path, out, level = sys.argv[1:4]
so = ort.SessionOptions()
if level == "basic":
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
try:
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
except Exception as e:  # the message after onnxruntime's source location
    print(json.dumps({"error": "refused: " + str(e).strip().splitlines()[-1].rsplit(") ", 1)[-1][-160:]}))
    sys.exit(0)
rng = np.random.default_rng(0)
feeds = {}
for i in s.get_inputs():
    shape = [2 if d == "batch" else 7 if isinstance(d, str) else d for d in i.shape]
    if i.name == "input_ids":
        feeds[i.name] = rng.integers(0, 200, shape).astype(np.int64)
    else:
        a = rng.standard_normal(shape) * 0.5
        feeds[i.name] = (np.abs(a) if i.name.endswith((".n", ".m")) else a).astype(
            np.float16 if i.type == "tensor(float16)" else np.float32)
res = {}
for step in range(2):
    outs = s.run(None, feeds)
    names = [o.name for o in s.get_outputs()]
    res.update({f"{step}:{n}": v.astype(np.float64) for n, v in zip(names, outs)})
    feeds = {"past." + n[len("present."):]: v for n, v in zip(names, outs) if n.startswith("present.")}
    feeds["input_ids"] = rng.integers(0, 200, (2, 1)).astype(np.int64)
np.savez(out, **res)
print(json.dumps({"ok": True}))
"""


def run_child(python_path: str | None, model: Path, out: Path, level: str) -> dict:
    env = None
    if python_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), str(out), level], capture_output=True,
                          text=True, env=env, timeout=600)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode == 0 and last.startswith("{"):
        return json.loads(last)
    why = (proc.stderr.strip().splitlines() or [""])[-1].rsplit("]: ", 1)[-1]  # an assertion's own text
    return {"error": f"crashed (exit code {proc.returncode}){': ' + why[-120:] if why else ''}"}


def worst_error(out: Path, ref: Path) -> str:
    a, b = np.load(out), np.load(ref)
    err = max(float(np.abs(a[k] - b[k]).max() / max(np.abs(b[k]).max(), 1e-30)) for k in b.files)
    return f"runs (max rel err {err:.1e})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", nargs="+", default=VERSIONS)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "xlstm-bench-ort-versions")
    p.add_argument("--out", type=Path, help="write the markdown here (else stdout)")
    args = p.parse_args()

    import onnx
    import onnxruntime

    from xlstm_export.export import export_onnx
    from xlstm_export.models import load

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for preset, dtype in MODELS:
        path = work / f"{preset}-{dtype}" / f"{preset}.onnx"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            export_onnx(load(preset, seed=0), path, dtype=dtype, progress=False)
        ref = path.with_suffix(".ref.npz")
        got = run_child(None, path, ref, "all")
        assert got.get("ok"), got
        files[(preset, dtype)] = (path, ref)

    rows = []
    for v in args.versions:
        target = work / f"onnxruntime-{v}"
        if not (target / "onnxruntime").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                            f"onnxruntime=={v}", "numpy<2"], check=True)
        for (preset, dtype), (path, ref) in files.items():
            out = work / f"out-{v}-{preset}-{dtype}.npz"
            results = []
            for label, level in (("default optimizations", "all"), ("basic optimizations", "basic")):
                got = run_child(str(target), path, out, level)
                results.append((label, worst_error(out, ref) if got.get("ok") else got["error"]))
                if got.get("ok"):
                    break  # the first way that runs is the answer
            rows.append((v, f"{preset} {dtype}", results))

    import datetime as dt
    import platform

    head = onnx.load(str(files[MODELS[0]][0]), load_external_data=False)
    lines = [f"Date (UTC): {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}; {platform.processor() or platform.machine()}; "
             f"reference: onnxruntime {onnxruntime.__version__}  ",
             f"Command: `python bench/ort_versions.py {' '.join(sys.argv[1:])}`  ",
             f"Exports: IR version {head.ir_version}, opsets "
             + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in head.opset_import)
             + "; max rel err: every output of a prefill and a decode step against the reference", "",
             "| onnxruntime | export | result (tried in order until one runs) |", "|---|---|---|"]
    for v, name, results in rows:
        lines.append(f"| {v} | {name} | " + "; ".join(f"{label}: {r}" for label, r in results) + " |")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
