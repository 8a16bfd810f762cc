"""GPU timings of the CUDA plugin kernels (plugins/*.cu, launched as TensorRT launches them) against
the Triton kernels, and the mLSTM decode step as a fraction of HBM bandwidth.

    python bench/plugins.py                      # print a markdown table
    python bench/plugins.py --write bench/RESULTS.md   # also append it (date, GPU, command)
    python bench/plugins.py --quick              # fewer shapes / repetitions

Exits cleanly (status 0, one line) on a machine without CUDA or without CuPy. A kernel that cannot
run a shape (the Triton sLSTM takes DH <= 128) is reported in its row; SIGTERM (``timeout``) or
Ctrl-C stops the run and writes the rows measured so far, marked partial.
Timings: CUDA events around each call, median of ``--reps`` after ``--warmup`` calls; the Triton
side is the forward only (torch.no_grad). Decode bandwidth counts the bytes a step must move:
C read + written (float32), n read + written, q, k, v read, h written; the peak is a measured
device-to-device copy of 1 GiB (read + write) and, when the GPU is known, the nominal figure.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cuda_time_ms, failure, sigterm_stops  # noqa: E402

NOMINAL_HBM_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100 NVL": 3900, "H200": 4800,
                    "A100-SXM4-80GB": 2039, "A100-SXM4-40GB": 1555, "A100 80GB PCIe": 1935, "L40S": 864}


def _copy_bandwidth_gbps() -> float:
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = cuda_time_ms(lambda: y.copy_(x), 3, 10)
    return 2 * x.numel() * 4 / (ms * 1e-3) / 1e9


def _nominal_gbps(name: str) -> float | None:
    for key, value in NOMINAL_HBM_GBPS.items():
        if all(part in name for part in key.split()):
            return float(value)
    return None


def _triton(name: str):
    """A Triton entry point, or None with the reason when it is not importable here."""
    try:
        if name == "chunk_mlstm":
            from xlstm_export.kernels.mlstm.chunk import chunk_mlstm as fn
        elif name == "fused_recurrent_step_mlstm":
            from xlstm_export.kernels.mlstm.fused_recurrent import fused_recurrent_step_mlstm as fn
        else:
            from xlstm_export.kernels.slstm.fused_recurrent import fused_recurrent_slstm as fn
        return fn
    except Exception as exc:  # noqa: BLE001 - report and go on without that column
        print(f"note: Triton {name} unavailable ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def _cannot_time() -> str | None:
    """Why this machine cannot time the plugin kernels (no torch, CUDA device or CuPy), or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install cupy-cuda13x, or cupy-cuda12x on CUDA 12)"
    return None


def _time_or_reason(fn, warmup: int, reps: int) -> tuple[float | None, str]:
    """(median ms of fn(), "") or (None, why it failed): one shape a kernel refuses (the Triton sLSTM
    takes DH <= 128) or a launch that fails is reported in its row, and the other rows go on."""
    try:
        return cuda_time_ms(fn, warmup, reps), ""
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, failure(exc, 90)


def _mlstm_inputs(B: int, NH: int, S: int, DQK: int, DV: int, dtype, *, random_state: bool):
    """q, k, v, i, f, c0, n0, m0 on the GPU; forget gates mostly open; m0 zero, c0 and n0 random or zero."""
    import torch

    dev = "cuda"
    q, k = (torch.randn(B, NH, S, DQK, device=dev, dtype=dtype) for _ in range(2))  # (B, NH, S, DQK)
    v = torch.randn(B, NH, S, DV, device=dev, dtype=dtype)  # (B, NH, S, DV)
    i = torch.randn(B, NH, S, device=dev, dtype=dtype)  # (B, NH, S)
    f = (torch.randn(B, NH, S, device=dev) + 3).to(dtype)  # (B, NH, S)
    state = torch.randn if random_state else torch.zeros
    c0, n0 = state(B, NH, DQK, DV, device=dev), state(B, NH, DQK, device=dev)  # (B, NH, DQK, DV), (B, NH, DQK)
    return q, k, v, i, f, c0, n0, torch.zeros(B, NH, device=dev)  # m0 (B, NH)


def bench(quick: bool, warmup: int, reps: int, rows: list[str] | None = None) -> list[str]:
    """The table rows (header first), appended to ``rows`` as they are measured."""
    import torch

    from xlstm_export.plugins.runner import mlstm_plugin_forward, slstm_plugin_forward

    torch.manual_seed(0)
    dev = "cuda"
    rows = [] if rows is None else rows
    rows += ["| kernel | shape | dtype | CUDA plugin ms | Triton ms | plugin / Triton | note |",
             "|---|---|---|---|---|---|---|"]

    def fmt(a, b):
        return (f"{a:.3f}" if a is not None else "-", f"{b:.3f}" if b is not None else "-",
                f"{a / b:.2f}x" if a is not None and b else "-")

    def add(kernel, shape, dtype, ms, why, tms, twhy, note):
        """One table row; a failure reason goes in its note column."""
        note = "; ".join(p for p in (note, why and f"plugin: {why}", twhy and f"Triton: {twhy}") if p)
        rows.append(f"| {kernel} | {shape} | {str(dtype)[6:]} | " + " | ".join(fmt(ms, tms)) + f" | {note} |")
        print(rows[-1], flush=True)

    def timed(fn, no_grad=False):
        if no_grad:
            def call():
                with torch.no_grad():
                    fn()
            return _time_or_reason(call, warmup, reps)
        return _time_or_reason(fn, warmup, reps)

    # ---- mLSTM prefill (chunkwise)
    chunk = _triton("chunk_mlstm")
    prefill = [(1, 8, 2048, 256, 512), (4, 16, 2048, 128, 256)] + ([] if quick else [(1, 8, 8192, 256, 512)])
    for dtype in (torch.bfloat16, torch.float32):
        for B, NH, S, DQK, DV in prefill:
            q, k, v, i, f, c0, n0, m0 = _mlstm_inputs(B, NH, S, DQK, DV, dtype, random_state=False)
            ms, why = timed(lambda: mlstm_plugin_forward(q, k, v, i, f, c0, n0, m0))
            tms, twhy = (None, "") if chunk is None else timed(lambda: chunk(q, k, v, i, f, (c0, n0, m0)), True)
            speed = f"{B * S / (ms * 1e-3) / 1e3:.0f}k tok/s" if ms else ""
            add("mLSTM prefill", f"B{B} NH{NH} S{S} DQK{DQK} DV{DV}", dtype, ms, why, tms, twhy, speed)

    # ---- mLSTM decode step: bandwidth bound
    peak = _copy_bandwidth_gbps()
    nominal = _nominal_gbps(torch.cuda.get_device_name())
    step = _triton("fused_recurrent_step_mlstm")
    for dtype in (torch.bfloat16, torch.float32):
        for B in (1, 8) if quick else (1, 8, 32):
            NH, DQK, DV = 8, 256, 512  # xLSTM-7B heads
            q, k, v, i, f, c0, n0, m0 = _mlstm_inputs(B, NH, 1, DQK, DV, dtype, random_state=True)
            ms, why = timed(lambda: mlstm_plugin_forward(q, k, v, i, f, c0, n0, m0))
            tms, twhy = (None, "") if step is None else timed(lambda: step(q, k, v, i, f, (c0, n0, m0)), True)
            es = q.element_size()
            nbytes = B * NH * (2 * DQK * DV * 4 + 2 * DQK * 4 + 2 * 4 + 2 * DQK * es + 2 * DV * es + 2 * es)
            note = ""
            if ms:
                gbps = nbytes / (ms * 1e-3) / 1e9
                note = f"{gbps:.0f} GB/s = {100 * gbps / peak:.0f}% of copy {peak:.0f} GB/s"
                if nominal:
                    note += f", {100 * gbps / nominal:.0f}% of nominal {nominal:.0f}"
            add("mLSTM decode step", f"B{B} NH{NH} DQK{DQK} DV{DV}", dtype, ms, why, tms, twhy, note)

    # ---- sLSTM (whole sequence, one launch)
    srec = _triton("fused_recurrent_slstm")
    for dtype in (torch.bfloat16, torch.float32):
        for B, NH, S, DH in [(8, 4, 1024, 128)] + ([] if quick else [(1, 4, 4096, 64), (32, 4, 256, 256)]):
            x = torch.randn(B, NH, S, 4 * DH, device=dev, dtype=dtype)
            r = (torch.randn(NH, DH, 4 * DH, device=dev) / DH**0.5).to(dtype)
            b = torch.randn(NH, 4 * DH, device=dev, dtype=dtype)
            h0 = c0 = n0 = m0 = torch.zeros(B, NH, DH, device=dev)
            ms, why = timed(lambda: slstm_plugin_forward(x, r, b, h0, c0, n0, m0))
            tms, twhy = (None, "") if srec is None else timed(lambda: srec(x, r, b, (h0, c0, n0, m0)), True)
            per_step = f"{ms * 1e3 / S:.2f} us/step" if ms else ""
            add("sLSTM", f"B{B} NH{NH} S{S} DH{DH}", dtype, ms, why, tms, twhy, per_step)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = p.parse_args(argv)
    missing = _cannot_time()
    if missing:
        print(f"bench/plugins.py: {missing}; nothing to time")
        return 0
    import torch

    rows: list[str] = []
    stopped = ""

    sigterm_stops()  # `timeout` stops the run: the rows so far are written
    try:
        bench(args.quick, args.warmup, args.reps, rows)
    except KeyboardInterrupt as exc:
        stopped = f"; PARTIAL: stopped ({exc or 'interrupted'})"
    if len(rows) <= 2:  # the header rows only
        rows.append("| (nothing measured) | | | | | | |")
    header = (f"## CUDA plugin kernels vs Triton ({_dt.date.today().isoformat()}, "
              f"{torch.cuda.get_device_name()}, torch {torch.__version__}{stopped})\n\n"
              f"Command: `python bench/plugins.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    text = header + "\n" + "\n".join(rows) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
