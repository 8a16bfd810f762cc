"""Benchmark: our chunkwise Triton mLSTM (kernels/mlstm/chunk.py) against TFLA, the `mlstm_kernels`
backend ``chunkwise--triton_xl_chunk``, at the TFLA paper's setting: bfloat16, NH=16, DHQK=128,
DHV=256, 65,536 tokens per batch (B = 65536 // S), S from 2,048 to 65,536. Forward, and forward +
backward (h.backward(dh) with every input requiring grad), timed with triton.testing.do_bench
(median, CUDA events). Prints a markdown table (and writes it with --out).

    python bench/kernels_mlstm.py                       # all S, our chunk sizes 64 and 128
    python bench/kernels_mlstm.py --seq-lens 8192 --chunk-sizes 128 --out /tmp/mlstm.md

Both kernels return the final state (TFLA with return_last_states=True), neither gets an initial
state. Published TFLA anchors (H100): fwd 6.37 ms / fwd+bwd 15.25 ms at S=8192; 7.15 / 17.50 at 65,536.
Needs a CUDA GPU; without one it exits with a message.

Lengths run in the order given (the table is sorted by S). A kernel that fails at a length is
reported in the table and the others go on; SIGTERM (``timeout``) or Ctrl-C stops the run and
writes the table of the lengths measured so far, marked partial.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report  # noqa: E402
from _timing import failure, sigterm_stops  # noqa: E402

TOKENS = 65536
NH, DHQK, DHV = 16, 128, 256
DEFAULT_SEQ_LENS = (2048, 4096, 8192, 16384, 32768, 65536)


def _inputs(B: int, S: int, device: str, dtype: torch.dtype, requires_grad: bool):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, NH, S, DHQK, device=device, dtype=dtype, generator=g)  # (B, NH, S, DHQK)
    k = torch.randn(B, NH, S, DHQK, device=device, dtype=dtype, generator=g)  # (B, NH, S, DHQK)
    v = torch.randn(B, NH, S, DHV, device=device, dtype=dtype, generator=g)  # (B, NH, S, DHV)
    i = torch.randn(B, NH, S, device=device, dtype=dtype, generator=g)  # (B, NH, S)
    f = 3.0 + torch.randn(B, NH, S, device=device, dtype=dtype, generator=g)  # (B, NH, S)
    xs = (q, k, v, i, f)
    if requires_grad:
        xs = tuple(x.requires_grad_() for x in xs)
    return xs


def _ours(chunk_size: int):
    from xlstm_export.kernels.mlstm.chunk import chunk_mlstm

    def fn(q, k, v, i, f):
        return chunk_mlstm(q, k, v, i, f, chunk_size=chunk_size)[0]

    return fn


def _tfla():
    """TFLA's xl_chunk kernel, or None (with the reason printed) where mlstm_kernels is missing."""
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
    except ImportError as exc:
        print(f"# mlstm_kernels not importable ({exc}); TFLA columns skipped", file=sys.stderr)
        return None
    kernel = get_mlstm_kernel("chunkwise--triton_xl_chunk")

    def fn(q, k, v, i, f):
        h, _ = kernel(q, k, v, i, f, return_last_states=True, chunk_size=128, autocast_kernel_dtype=torch.bfloat16)
        return h

    return fn


def _time(fn, xs, backward: bool, warmup: int, rep: int) -> float:
    """Median milliseconds of fn(*xs) (and of h.backward(dh) with it)."""
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*xs), warmup=warmup, rep=rep, return_mode="median")
    with torch.no_grad():
        dh = torch.randn_like(fn(*xs))  # (B, NH, S, DHV)

    def step():
        fn(*xs).backward(dh)

    return do_bench(step, warmup=warmup, rep=rep, grad_to_none=list(xs), return_mode="median")


def _measure(fn, xs, backward: bool, warmup: int, rep: int) -> float | str:
    """Median ms of one configuration, or the reason it could not be timed ("OOM", "failed: ...").

    Any error of one kernel (a peer that does not run on this triton, a shape it refuses) is
    reported in its cell instead of ending the whole run."""
    try:
        return _time(fn, xs, backward, warmup, rep)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"
    except Exception as exc:  # noqa: BLE001 - reported in the table, the other kernels go on
        print(f"# failed: {failure(exc)}", file=sys.stderr, flush=True)
        return f"failed: {type(exc).__name__}"


def _fmt(ms: float | str | None) -> str:
    if isinstance(ms, str):
        return ms
    return "—" if ms is None else f"{ms:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=list(DEFAULT_SEQ_LENS),
                        help="comma-separated sequence lengths (divisors of 65536, multiples of 128)")
    parser.add_argument("--chunk-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128],
                        help="chunk sizes of our kernel to time (powers of two >= 16)")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    parser.add_argument("--no-tfla", action="store_true", help="skip the TFLA columns")
    parser.add_argument("--write", default=None, help="append the markdown table (with the command) to this file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench/kernels_mlstm.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to time.",
              file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench/kernels_mlstm.py needs triton (pip install 'xlstm-export[triton]').", file=sys.stderr)
        return 2
    for S in args.seq_lens:
        if TOKENS % S or S % 128:
            parser.error(f"--seq-lens: {S} must divide {TOKENS} and be a multiple of 128 (TFLA's chunk)")

    impls = {f"ours L={L}": _ours(L) for L in args.chunk_sizes}
    tfla = None if args.no_tfla else _tfla()
    if tfla is not None:
        impls["TFLA xl_chunk"] = tfla

    dtype = torch.bfloat16
    rows = []
    stopped = None
    sigterm_stops()
    try:
        for S in args.seq_lens:
            B = TOKENS // S
            xs = _inputs(B, S, "cuda", dtype, requires_grad=True)
            fwd, fwdbwd = {}, {}
            rows.append((S, B, fwd, fwdbwd))  # filled in place: a stopped run keeps a partial row
            for name, fn in impls.items():
                fwd[name] = _measure(fn, xs, False, args.warmup, args.rep)
                fwdbwd[name] = _measure(fn, xs, True, args.warmup, args.rep)
                print(f"# S={S} B={B} {name}: fwd {_fmt(fwd[name])} ms, fwd+bwd {_fmt(fwdbwd[name])} ms",
                      file=sys.stderr, flush=True)
            del xs
            torch.cuda.empty_cache()
    except KeyboardInterrupt as exc:  # SIGTERM from a time limit, or Ctrl-C: keep what was measured
        stopped = f"stopped ({exc or 'interrupted'}) at length {len(rows)} of {len(args.seq_lens)}"
        print(f"# {stopped}", file=sys.stderr, flush=True)

    table = _table(torch.cuda.get_device_name(), list(impls), rows, stopped)
    return report(table, args.write, "mLSTM kernels", "bench/kernels_mlstm.py", argv)


def _table(gpu: str, names: list[str], rows: list, stopped: str | None = None) -> str:
    """The markdown table of ``rows`` ((S, B, fwd, fwdbwd) with {name: ms or note}), sorted by S."""
    lines = [
        f"mLSTM chunkwise kernels, {gpu}, bf16, NH={NH}, DHQK={DHQK}, DHV={DHV}, "
        f"{TOKENS} tokens per batch, median ms (triton.testing.do_bench), {datetime.date.today().isoformat()}"
        + (f"; PARTIAL: {stopped}" if stopped else ""),
        "",
        "| S | B | " + " | ".join(f"fwd {n}" for n in names) + " | " + " | ".join(f"fwd+bwd {n}" for n in names) + " |",
        "|---|---|" + "---:|" * (2 * len(names)),
    ]
    for S, B, fwd, fwdbwd in sorted(rows, key=lambda row: row[0]):
        lines.append(
            f"| {S} | {B} | " + " | ".join(_fmt(fwd.get(n)) for n in names) + " | "
            + " | ".join(_fmt(fwdbwd.get(n)) for n in names) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
