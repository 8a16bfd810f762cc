"""Which onnxruntime and OpenVINO releases run our exports: each version installed on its own,
then a prefill and a decode step of each export, against the installed onnxruntime's outputs.

Triton Inference Server's onnxruntime backend ships the onnxruntime of its release (TRITON_VERSION_MAP
in build.py of the release's branch of triton-inference-server/server), and other deployments pin
theirs: this says which of them take the files as they are. Each version is pip-installed into a
folder of its own (onnxruntime with numpy < 2, which the older wheels were built against) and run
in a child process, so a crash inside a runtime is a result, not the end of the run. onnxruntime
runs every file with its default graph optimizations, and a failing one again with the basic level
only (Triton's ``optimization { graph { level: -1 } }``). OpenVINO runs the ``--inline`` export
(standard ops only: its ONNX frontend neither converts the xlstm nodes nor inlines local functions,
so a default export goes through xlstm_export.openvino_runner, which inlines it in memory) on its
CPU device with the f32 inference precision (the float32 exports only, as that runner picks).

    python bench/runtime_versions.py        # onnxruntime 1.16.3 .. 1.20.1, OpenVINO 2024.0.0 .. 2025.4.1
    python bench/runtime_versions.py --onnxruntime 1.18.1 1.22.0 --openvino --out table.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ORT_VERSIONS = ["1.16.3", "1.17.3", "1.18.1", "1.19.2", "1.20.1"]
OPENVINO_VERSIONS = ["2024.0.0", "2024.3.0", "2024.6.0", "2025.0.0", "2025.2.0", "2025.4.1"]
MODELS = [("tiny", "fp32"), ("tiny-large", "fp32"), ("tiny-large", "fp16")]  # paper (mLSTM + sLSTM), 7B-style

# Run in the child (and for the reference here): a prefill of 7 tokens for 2 sequences from a random
# state, then one decode step from its output state; every output saved. argv: runtime, model, out,
# level ("all" / "basic": onnxruntime's graph optimizations). The inputs' shapes and dtypes come from
# onnx (the graph's own interface), so both runtimes get the same feeds.
CHILD = r"""
import json, sys
import numpy as np, onnx
runtime, path, out, level = sys.argv[1:5]
g = onnx.load(path, load_external_data=False).graph
try:
    if runtime == "onnxruntime":
        import onnxruntime as ort
        so = ort.SessionOptions()
        if level == "basic":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = [o.name for o in s.get_outputs()]
        run = lambda feeds: s.run(None, feeds)
    else:
        import openvino as ov
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        names = [o.name for o in g.output]
        run = lambda feeds: [compiled(feeds)[compiled.output(n)] for n in names]
except Exception as e:  # the message after the runtime's source location
    print(json.dumps({"error": "refused: " + str(e).strip().splitlines()[-1].rsplit(") ", 1)[-1][-160:]}))
    sys.exit(0)
rng = np.random.default_rng(0)
feeds = {}
for i in g.input:
    t = i.type.tensor_type
    shape = [2 if d.dim_param == "batch" else 7 if d.dim_param else d.dim_value for d in t.shape.dim]
    if i.name == "input_ids":
        feeds[i.name] = rng.integers(0, 200, shape).astype(np.int64)
    else:
        a = rng.standard_normal(shape) * 0.5
        feeds[i.name] = (np.abs(a) if i.name.endswith((".n", ".m")) else a).astype(
            np.float16 if t.elem_type == onnx.TensorProto.FLOAT16 else np.float32)
res = {}
try:
    for step in range(2):
        outs = run(feeds)
        res.update({f"{step}:{n}": np.asarray(v).astype(np.float64) for n, v in zip(names, outs)})
        feeds = {"past." + n[len("present."):]: v for n, v in zip(names, outs) if n.startswith("present.")}
        feeds["input_ids"] = rng.integers(0, 200, (2, 1)).astype(np.int64)
except Exception as e:
    print(json.dumps({"error": "failed to run: " + str(e).strip().splitlines()[-1][-160:]}))
    sys.exit(0)
np.savez(out, **res)
print(json.dumps({"ok": True}))
"""


def run_child(runtime: str, python_path: str | None, model: Path, out: Path, level: str) -> dict:
    env = None
    if python_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, "-c", CHILD, runtime, str(model), str(out), level], capture_output=True,
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
    p.add_argument("--onnxruntime", nargs="*", default=ORT_VERSIONS, metavar="VERSION",
                   help="onnxruntime releases (none: skip; default: %(default)s)")
    p.add_argument("--openvino", nargs="*", default=OPENVINO_VERSIONS, metavar="VERSION",
                   help="OpenVINO releases (none: skip; default: %(default)s)")
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
        inline = path.with_name(f"{preset}-inline.onnx")
        if dtype == "fp32" and not inline.exists():
            export_onnx(load(preset, seed=0), inline, dtype=dtype, progress=False, inline=True)
        ref = path.with_suffix(".ref.npz")
        got = run_child("onnxruntime", None, path, ref, "all")
        assert got.get("ok"), got
        files[(preset, dtype)] = (path, inline, ref)

    rows = []
    runs = [("onnxruntime", v) for v in args.onnxruntime] + [("openvino", v) for v in args.openvino]
    for runtime, v in runs:
        target = work / f"{runtime}-{v}"
        if not (target / runtime).is_dir():
            extra = ["numpy<2"] if runtime == "onnxruntime" else []
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target),
                            f"{runtime}=={v}", *extra], check=True)
        levels = ((("default optimizations", "all"), ("basic optimizations", "basic")) if runtime == "onnxruntime"
                  else (("CPU, f32", "all"),))
        for (preset, dtype), (path, inline, ref) in files.items():
            if runtime == "openvino":
                if dtype != "fp32":
                    continue
                path = inline
            out = work / f"out-{runtime}-{v}-{preset}-{dtype}.npz"
            results = []
            for label, level in levels:
                got = run_child(runtime, str(target), path, out, level)
                results.append((label, worst_error(out, ref) if got.get("ok") else got["error"]))
                if got.get("ok"):
                    break  # the first way that runs is the answer
            rows.append((f"{runtime} {v}", f"{preset} {dtype}{' --inline' if path == inline else ''}", results))

    import datetime as dt
    import platform

    head = onnx.load(str(files[MODELS[0]][0]), load_external_data=False)
    lines = [f"Date (UTC): {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}; {platform.processor() or platform.machine()}; "
             f"reference: onnxruntime {onnxruntime.__version__}  ",
             f"Command: `python bench/runtime_versions.py {' '.join(sys.argv[1:])}`  ",
             f"Exports: IR version {head.ir_version}, opsets "
             + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in head.opset_import)
             + "; max rel err: every output of a prefill and a decode step against the reference", "",
             "| runtime | export | result (tried in order until one runs) |", "|---|---|---|"]
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
