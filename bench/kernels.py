"""Both cell-kernel benchmarks in one run on the same GPU.

    python bench/kernels.py --write bench/RESULTS.md

mLSTM: our Triton chunkwise kernel against mlstm_kernels' TFLA `chunkwise--triton_xl_chunk` at the
TFLA paper's setting (bf16, NH=16, DHQK=128, DHV=256, 65,536 tokens per batch, S 2k..64k), forward
and forward+backward (bench/kernels_mlstm.py). sLSTM: our fused recurrent Triton kernel against
FlashRNN (`triton_fused`, `cuda_fused`) and the PyTorch reference (bench/kernels_slstm.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels_mlstm  # noqa: E402
import kernels_slstm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", help="append both tables to this markdown file")
    p.add_argument("--quick", action="store_true", help="fewer lengths and repetitions (a smoke run)")
    args = p.parse_args(argv)
    write = ["--write", args.write] if args.write else []
    m_args = ["--seq-lens", "2048,8192", "--rep", "20"] if args.quick else []
    s_args = ["--quick"] if args.quick else []
    rc_m = kernels_mlstm.main(m_args + write)
    rc_s = kernels_slstm.main(s_args + write)
    return rc_m or rc_s


if __name__ == "__main__":
    sys.exit(main())
