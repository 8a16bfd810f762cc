"""GPU timings of the fused recurrent sLSTM (kernels/slstm/fused_recurrent.py) against FlashRNN
(`triton_fused`, `cuda_fused` backends) and the PyTorch reference loop, forward and
forward+backward, in one run on one GPU.

    python bench/kernels_slstm.py                          # print a markdown table
    python bench/kernels_slstm.py --quick                  # fewer shapes and repetitions
    python bench/kernels_slstm.py --write bench/RESULTS.md # also append it (date, GPU, command)
    python bench/kernels_slstm.py --head-dims 64 128 --seq-lens 1024 4096 --batch 16 --heads 4

Exits cleanly (status 0, one line) on a machine without CUDA. FlashRNN is optional
(`pip install --no-deps flashrnn`; it needs einops, and `cuda_fused` compiles its CUDA sources
with nvcc on first use); a backend that is missing or rejects a shape is reported in the table.

``flashrnn_cuda`` compiles for minutes on its first call (per head dim): on a short GPU lease run it
apart (``--backends ours flashrnn_cuda``). SIGTERM (``timeout``) or Ctrl-C stops the run and writes
the table of what was measured so far, marked partial.

Timings: CUDA events around each call, median of ``--reps`` after ``--warmup`` calls.
"fwd" is inference (torch.no_grad: nothing saved); "fwd+bwd" is a forward that keeps what the
backward needs plus the backward of sum(y * g) to x, r, b. Every backend gets the same values in
its own layout (FlashRNN: Wx (B, S, 4, NH, DH), R (4, NH, DH, DH), b (4, NH, DH)); the layout
permutes are done once, outside the timed region.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402
from _timing import cuda_time_ms, failure, sigterm_stops  # noqa: E402

BACKENDS = ("ours", "flashrnn_triton", "flashrnn_cuda", "torch")


def _inputs(B, NH, S, DH, dtype, seed=0):
    """Realistic sLSTM pre-activations (forget gate mostly open), r ~ N(0,1)/sqrt(DH)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, NH, S, 4, DH, device="cuda", generator=g)  # (B, NH, S, 4, DH)
    x[..., 0, :] *= 2.0
    x[..., 1, :] += 3.0
    x = x.reshape(B, NH, S, 4 * DH).to(dtype)  # (B, NH, S, 4*DH)
    r = (torch.randn(NH, DH, 4 * DH, device="cuda", generator=g) / DH**0.5).to(dtype)  # (NH, DH, 4*DH)
    b = (0.5 * torch.randn(NH, 4 * DH, device="cuda", generator=g)).to(dtype)  # (NH, 4*DH)
    return x, r, b


def _make_fn(backend: str, x, r, b):
    """Return f(x, r, b) -> y (B, NH, S, DH) for one backend, taking our layout's tensors and
    calling the backend on its own layout (views prepared here, outside the timing)."""
    B, NH, S, G = x.shape
    DH = G // 4
    if backend == "ours":
        from xlstm_export.kernels.slstm.fused_recurrent import fused_recurrent_slstm

        return lambda x, r, b: fused_recurrent_slstm(x, r, b)[0], (x, r, b)
    if backend == "torch":
        from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm

        return lambda x, r, b: naive_recurrent_slstm(x, r, b)[0], (x, r, b)
    from flashrnn import flashrnn  # noqa: F401  (ImportError -> "not installed")

    kind = {"flashrnn_triton": "triton_fused", "flashrnn_cuda": "cuda_fused"}[backend]
    dtype_name = str(x.dtype).removeprefix("torch.")  # "bfloat16", "float16", "float32"
    # ours: pre = h @ r[head], r (NH, DH_in, 4*DH_out) gate-major  ==  FlashRNN "GHDP": R[g, head, out, in]
    x_f = x.reshape(B, NH, S, 4, DH).permute(0, 2, 3, 1, 4).contiguous()  # (B, S, 4, NH, DH)
    r_f = r.reshape(NH, DH, 4, DH).permute(2, 0, 3, 1).contiguous()  # (4, NH, DH_out, DH_in)
    b_f = b.reshape(NH, 4, DH).permute(1, 0, 2).contiguous()  # (4, NH, DH)

    def fn(x_f, r_f, b_f):
        states, _ = flashrnn(x_f, r_f, b_f, function="slstm", backend=kind, dtype=dtype_name)
        return states[0]  # h of every step: (B, S, NH, DH)

    return fn, (x_f, r_f, b_f)


def _bench_one(backend, B, NH, S, DH, dtype, warmup, reps):
    import torch

    x, r, b = _inputs(B, NH, S, DH, dtype)
    fn, args = _make_fn(backend, x, r, b)
    leaves = [a.detach().clone().requires_grad_(True) for a in args]
    with torch.no_grad():
        y = fn(*args)  # compiles / warms up, and fails early on an unsupported shape
    grad = torch.randn_like(y)

    def fwd():
        with torch.no_grad():
            fn(*args)

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad)

    fwd_bwd()
    return cuda_time_ms(fwd, warmup, reps), cuda_time_ms(fwd_bwd, warmup, reps)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else v


def run(args) -> str:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    gpu = torch.cuda.get_device_name()
    lines = [
        f"sLSTM fused recurrent, {gpu}, {args.dtype}, B={args.batch}, NH={args.heads}; "
        f"median of {args.reps} (CUDA events), ms",
        "",
        "| DH | S | backend | fwd ms | fwd+bwd ms | fwd vs ours | fwd+bwd vs ours |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    sigterm_stops()
    try:
        for DH in args.head_dims:
            for S in args.seq_lens:
                ours = None
                for backend in args.backends:
                    row = _row(backend, args, S, DH, dtype)
                    if backend == "ours" and isinstance(row[0], float):
                        ours = row
                    ratio = [
                        f"{row[k] / ours[k]:.2f}x" if ours and isinstance(row[k], float) else ""
                        for k in (0, 1)
                    ]
                    cells = (DH, S, backend, _fmt(row[0]), _fmt(row[1]), *ratio)
                    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
                    print(lines[-1], flush=True)
    except KeyboardInterrupt as exc:  # SIGTERM from a time limit, or Ctrl-C: keep the rows so far
        lines[0] += f"; PARTIAL: stopped ({exc or 'interrupted'})"
        print(f"# stopped ({exc or 'interrupted'})", flush=True)
    lines.append("")
    lines.append("ratios: time / our time (above 1: ours is faster)")
    return "\n".join(lines)


def _row(backend: str, args, S: int, DH: int, dtype) -> tuple:
    """(fwd ms, fwd+bwd ms) of one backend and shape, or (reason, "") when it cannot be timed."""
    import torch

    if backend == "torch" and S > args.torch_max_seq:
        return ("skipped (S > --torch-max-seq)", "")
    try:
        return _bench_one(backend, args.batch, args.heads, S, DH, dtype, args.warmup,
                          1 if backend == "torch" else args.reps)
    except ImportError as e:
        return (f"not installed ({e.name})", "")
    except Exception as e:  # noqa: BLE001 - a backend that rejects a shape, or fails to build
        return (f"failed: {failure(e)}", "")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--torch-max-seq", type=int, default=1024, help="the reference loop only up to this S")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="S 1024 only, 5 repetitions")
    p.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_lens, args.reps, args.warmup = [1024], 5, 1

    try:
        import torch
    except ImportError:
        print("bench/kernels_slstm.py: torch is not installed; nothing to time")
        return 0
    if not torch.cuda.is_available():
        print("bench/kernels_slstm.py: no CUDA device; the sLSTM kernel timings need a GPU (skipped)")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench/kernels_slstm.py: triton is not installed; nothing to time")
        return 0

    table = run(args)
    print()
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return report(table, args.write, f"sLSTM kernels ({stamp})", "bench/kernels_slstm.py", argv)


if __name__ == "__main__":
    sys.exit(main())
