"""Benchmark: the native kernels' packed matrix products against this core's FMA peak, one thread.

How close the products that make up a decode step (and a prefill chunk) come to what one core can
do at all: the packed product (plugins/cpu_gemm.h, ``packed_matmul_panel`` over every panel, as
xlstm.cpu::PackedMatMul runs it on one thread) on the weight shapes of the bench models, and the
core's peak measured the same way, in the same build: a loop of 16 independent 16-float fused
multiply-adds (plugins/cpu_vec.h's vectors, which need no further parallelism to reach it).

The C++ is compiled here with the library's compiler and flags (-O3 -march=native), run once, and
timed inside (median of repeats). GFLOP/s count 2 per multiply-add of the real columns; "padded"
counts the panels' zero columns too (what the core actually computes).

    python bench/cpu_products.py                 # print the table
    python bench/cpu_products.py --write bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_name, report  # noqa: E402

from xlstm_export.plugins import cpu_build  # noqa: E402

# (model, what, M rows, K, N): the products of a decode step at B = 1 and 32 and of a prefill chunk
# of 8 x 32 tokens (the server's), for the small 7B-style bench model (E = 128: the mLSTM input
# products fused, the FFN's gate and up fused, its down product, the output product, the logits)
# and two of the 160M model's (E = 768).
SHAPES = [
    ("tiny-large", "mLSTM in (q k v o i f)", [1, 32, 256], 128, 392),
    ("tiny-large", "FFN gate + up", [1, 32, 256], 128, 768),
    ("tiny-large", "FFN down", [1, 32, 256], 384, 128),
    ("tiny-large", "mLSTM out", [1, 32, 256], 128, 128),
    ("tiny-large", "logits", [1, 32, 256], 128, 256),
    ("xlstm-large-160m", "mLSTM in (q k v o i f)", [32], 768, 2312),
    ("xlstm-large-160m", "FFN down", [32], 2048, 768),
]

SOURCE = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "cpu_gemm.h"
using namespace xlstm_cpu;
using clock_type = std::chrono::steady_clock;

static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

// GFLOP/s of 16 independent chains of 16-float multiply-adds (enough to cover the FMA latency).
static double fma_peak() {
  vec16 acc[16], a = splat16(0.9999f), b = splat16(1e-4f);
  for (int i = 0; i < 16; ++i) acc[i] = splat16(0.001f * i);
  const long n = 20000000;
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = clock_type::now();
    for (long k = 0; k < n; ++k) {
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) acc[i] = acc[i] * a + b;
      __asm__ volatile("" : "+v"(a), "+v"(b));  // a, b in registers; the loop is not folded
    }
    const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    rates.push_back(n * 16.0 * 32.0 / s / 1e9);
  }
  float sink = 0;
  for (int i = 0; i < 16; ++i) sink += acc[i][0];
  if (sink == 12345.0f) std::printf("#");
  return median(rates);
}

int main(int argc, char** argv) {
  std::printf("peak %.3f\n", fma_peak());
  for (int j = 1; j + 2 < argc; j += 3) {
    const int M = std::atoi(argv[j]), K = std::atoi(argv[j + 1]), N = std::atoi(argv[j + 2]);
    const int P = (N + kPanel - 1) / kPanel;
    std::vector<float> x(size_t(M) * K), w(size_t(P) * K * kPanel), y(size_t(M) * N);
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 97) * 0.01f - 0.4f;
    for (size_t i = 0; i < w.size(); ++i) w[i] = float(i % 89) * 0.01f - 0.44f;
    auto run = [&] {
      for (int p = 0; p < P; ++p)
        packed_matmul_panel(x.data(), M, K, w.data() + size_t(p) * K * kPanel, y.data() + p * kPanel, N,
                            std::min(kPanel, N - p * kPanel));
    };
    const double flops = 2.0 * M * K * N;
    const int reps = std::max(20, int(4e8 / flops));
    for (int i = 0; i < reps / 4 + 1; ++i) run();
    std::vector<double> us;
    for (int rep = 0; rep < 7; ++rep) {
      const auto t0 = clock_type::now();
      for (int i = 0; i < reps; ++i) run();
      us.push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count() / reps);
    }
    std::printf("%d %d %d %.4f\n", M, K, N, median(us));
  }
  return 0;
}
"""


def measure(shapes) -> tuple[float, dict]:
    """(peak GFLOP/s, {(M, K, N): microseconds})."""
    cxx = cpu_build.find_compiler()
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "products.cc", Path(tmp) / "products"
        src.write_text(SOURCE)
        flags = [f for f in cpu_build.CXX_FLAGS if f not in ("-shared", "-fPIC", "-fvisibility=hidden")]
        subprocess.run([cxx, *flags, "-I", str(cpu_build.PLUGIN_DIR), str(src), "-o", str(exe)], check=True)
        args = [str(v) for m, k, n in shapes for v in (m, k, n)]
        out = subprocess.run([str(exe), *args], check=True, capture_output=True, text=True).stdout.split("\n")
    peak = float(out[0].split()[1])
    times = {}
    for line in out[1:]:
        if line.strip():
            m, k, n, us = line.split()
            times[(int(m), int(k), int(n))] = float(us)
    return peak, times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write", help="append the table to this markdown file")
    args = p.parse_args()
    shapes = sorted({(m, k, n) for _, _, ms, k, n in SHAPES for m in ms})
    peak, times = measure(shapes)
    lines = [f"Date (UTC): {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}; machine: {cpu_name()}, "
             f"{os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}  ",
             f"One core's FMA peak, measured: **{peak:.0f} GFLOP/s**", "",
             "| model | product | M x K x N | time | GFLOP/s | padded | of peak (padded) |",
             "|---|---|---|---|---|---|---|"]
    for model, what, ms, k, n in SHAPES:
        for m in ms:
            us = times[(m, k, n)]
            real = 2 * m * k * n / us / 1e3
            padded = 2 * m * k * (-(-n // 32) * 32) / us / 1e3
            lines.append(f"| {model} | {what} | {m} x {k} x {n} | {us:.2f} us | {real:.0f} | {padded:.0f} | "
                         f"{100 * padded / peak:.0f}% |")
    return report("\n".join(lines), args.write, "Packed products against the core's FMA peak (one thread)",
                  "bench/cpu_products.py", None)


if __name__ == "__main__":
    sys.exit(main())
