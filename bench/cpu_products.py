"""Benchmark: the native kernels' packed matrix products against this core's FMA peak, one thread.

How close the products that make up a decode step (and a prefill chunk) come to what one core can
do at all: the packed product (plugins/cpu_gemm.h, ``packed_matmul_range`` over every panel, as
xlstm.cpu::PackedMatMul runs it on one thread) on the weight shapes of the bench models, and the
core's peak measured the same way, in the same build: a loop of 16 independent 16-float fused
multiply-adds (plugins/cpu_vec.h's vectors, which need no further parallelism to reach it).

The library's path (``packed_matmul_range``: two adjacent panels at a time, 6 rows x 64 columns of
sums, k-blocks outermost so that each block of the weights is read from L1 by every row block) is
timed alternately with the loop order it replaced, in the same build: row blocks outermost, each
row block through all of K (``panel_rows``, the path the library keeps for a padded last panel),
its sums copied out of a buffer. The two give the same bits.

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
    ("xlstm-large-160m", "mLSTM in (q k v o i f)", [1, 32, 256], 768, 2312),
    ("xlstm-large-160m", "FFN down", [1, 32, 256], 2048, 768),
]

SOURCE = r"""
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "cpu_gemm.h"
using namespace xlstm_cpu;
using clock_type = std::chrono::steady_clock;

static double median(std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; }

// acc[i] = acc[i] * a + b, n times over: 16 independent chains. A function of its own with no call
// inside, so that the chains stay in registers (inlined into a loop around clock calls, which
// clobber every vector register, GCC kept them on the stack: 67-76 instead of 220-230 GFLOP/s).
__attribute__((noinline)) static void fma_chains(vec16* acc, vec16 a, vec16 b, long n) {
  vec16 v[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) v[i] = acc[i];
  for (long k = 0; k < n; ++k) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) v[i] = v[i] * a + b;
    __asm__ volatile("" : "+v"(a), "+v"(b));  // a, b in registers; the loop is not folded
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = v[i];
}

// GFLOP/s of 16 independent chains of 16-float multiply-adds (enough to cover the FMA latency).
static double fma_peak() {
  vec16 acc[16], a = splat16(0.9999f), b = splat16(1e-4f);
  for (int i = 0; i < 16; ++i) acc[i] = splat16(0.001f * i);
  const long n = 20000000;
  std::vector<double> rates;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = clock_type::now();
    fma_chains(acc, a, b, n);
    const double s = std::chrono::duration<double>(clock_type::now() - t0).count();
    rates.push_back(n * 16.0 * 32.0 / s / 1e9);
  }
  float sink = 0;
  for (int i = 0; i < 16; ++i) sink += acc[i][0];
  if (sink == 12345.0f) std::printf("#");
  return median(rates);
}

// The loop order before k-blocks went outermost: each block of kRows rows through all of K against
// P panels (panel_rows), its sums copied from a buffer into y's first `cols` columns.
template <int P>
static void rows_first_panels(const float* x, int M, int K, const float* panel, float* y, int ldy, int cols) {
  constexpr int kRows = P == 1 ? 8 : 6;
  constexpr int kWidth = P * kPanel;
  float out[kRows * kWidth];
  for (int m0 = 0; m0 < M; m0 += kRows) {
    const int rows = std::min(kRows, M - m0);
    panel_rows<kRows, P>(rows, x + size_t(m0) * K, K, panel, K, out);
    for (int row = 0; row < rows; ++row) std::memcpy(y + size_t(m0 + row) * ldy, out + row * kWidth, sizeof(float) * cols);
  }
}

int main(int argc, char** argv) {
  std::printf("peak %.3f\n", fma_peak());
  for (int j = 1; j + 2 < argc; j += 3) {
    const int M = std::atoi(argv[j]), K = std::atoi(argv[j + 1]), N = std::atoi(argv[j + 2]);
    const int P = (N + kPanel - 1) / kPanel;
    std::vector<float> x(size_t(M) * K), w(size_t(P) * K * kPanel), y(size_t(M) * N);
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(i % 97) * 0.01f - 0.4f;
    for (size_t i = 0; i < w.size(); ++i) w[i] = float(i % 89) * 0.01f - 0.44f;
    // the library's path, and beside it the loop order it replaced (row blocks outermost)
    auto lib = [&] { packed_matmul_range(x.data(), M, K, w.data(), 0, P, N, y.data()); };
    auto rows_first = [&] {
      for (int p = 0; p < P; p += 2) {
        const int take = std::min(2, P - p);
        const int cols = std::min(take * kPanel, N - p * kPanel);
        take == 2 ? rows_first_panels<2>(x.data(), M, K, w.data() + size_t(p) * K * kPanel, y.data() + p * kPanel, N, cols)
                  : rows_first_panels<1>(x.data(), M, K, w.data() + size_t(p) * K * kPanel, y.data() + p * kPanel, N, cols);
      }
    };
    const double flops = 2.0 * M * K * N;
    const int reps = std::max(20, int(4e8 / flops));
    for (int i = 0; i < reps / 4 + 1; ++i) lib(), rows_first();
    std::vector<double> us[2];
    for (int rep = 0; rep < 7; ++rep) {  // the two alternated
      for (int v = 0; v < 2; ++v) {
        const auto t0 = clock_type::now();
        for (int i = 0; i < reps; ++i) v == 0 ? lib() : rows_first();
        us[v].push_back(std::chrono::duration<double, std::micro>(clock_type::now() - t0).count() / reps);
      }
    }
    std::printf("%d %d %d %.4f %.4f\n", M, K, N, median(us[0]), median(us[1]));
  }
  return 0;
}
"""


def measure(shapes) -> tuple[float, dict]:
    """(peak GFLOP/s, {(M, K, N): (microseconds, microseconds with row blocks outermost)})."""
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
            m, k, n, us, before = line.split()
            times[(int(m), int(k), int(n))] = (float(us), float(before))
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
             "| model | product | M x K x N | time | GFLOP/s | padded | of peak (padded) | row blocks outermost |",
             "|---|---|---|---|---|---|---|---|"]
    for model, what, ms, k, n in SHAPES:
        for m in ms:
            us, before = times[(m, k, n)]
            real = 2 * m * k * n / us / 1e3
            padded = 2 * m * k * (-(-n // 32) * 32) / us / 1e3
            lines.append(f"| {model} | {what} | {m} x {k} x {n} | {us:.2f} us | {real:.0f} | {padded:.0f} | "
                         f"{100 * padded / peak:.0f}% | {before:.2f} us ({before / us:.2f}x the time) |")
    return report("\n".join(lines), args.write, "Packed products against the core's FMA peak (one thread)",
                  "bench/cpu_products.py", None)


if __name__ == "__main__":
    sys.exit(main())
