"""CPU tier of the CUDA plugin kernels: the PTX builds, entry signatures match the op contract, and
the launch-parameter functions fit the hardware across shapes (incl. the largest head dims).

Numerics of the kernels run in tests/test_plugins_gpu.py (``-m gpu``).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from xlstm_export import contract
from xlstm_export.contract import MLSTM, SLSTM
from xlstm_export.plugins import build, launch

OPS = {"mLSTM": MLSTM, "sLSTM": SLSTM}
EXTRA_NAMES = {"mLSTM": launch.MLSTM_EXTRA_ARGS, "sLSTM": launch.SLSTM_EXTRA_ARGS}
SM80, SM90 = launch.SMEM_OPTIN_BYTES["sm_80"], launch.SMEM_OPTIN_BYTES["sm_90"]


def _extra_count(op: str) -> int:
    if op == "mLSTM":
        return len(launch.mlstm_launch(1, 1, 1, 16, 16).extra_args)
    return len(launch.slstm_launch(1, 1, 1, 16, itemsize=4, smem_limit=SM80).extra_args)


# ---------------------------------------------------------------------------------------------
# PTX build (fresh nvcc run into a temporary cache)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ptx_texts(tmp_path_factory):
    """{(op, arch): PTX text}, compiled now with nvcc (warnings as errors) into an empty cache."""
    try:
        build.find_nvcc()
    except build.NvccNotFoundError as exc:
        pytest.skip(f"nvcc not available, cannot build the plugin PTX: {exc}")
    cache = tmp_path_factory.mktemp("ptx_cache")
    old = os.environ.get("XLSTM_EXPORT_CACHE")
    os.environ["XLSTM_EXPORT_CACHE"] = str(cache)
    os.environ["XLSTM_NVCC_STRICT"] = "1"  # any nvcc warning fails the build
    try:
        paths = build.build_all(force=True)
        assert all(Path(p).is_relative_to(cache) or Path(p).parent == build.SHIPPED_DIR for p in paths.values())
        yield {key: Path(p).read_text() for key, p in paths.items()}
    finally:
        os.environ.pop("XLSTM_NVCC_STRICT", None)
        if old is None:
            os.environ.pop("XLSTM_EXPORT_CACHE", None)
        else:
            os.environ["XLSTM_EXPORT_CACHE"] = old


@pytest.mark.parametrize("arch", build.ARCHS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_ptx_builds_with_every_entry(ptx_texts, op, arch):
    text = ptx_texts[(op, arch)]
    assert re.search(rf"^\.target\s+{arch}\b", text, re.M), f"PTX of {op} does not target {arch}"
    assert build.entry_names(text) == [build.kernel_name(op, d) for d in contract.T_DTYPES]


@pytest.mark.parametrize("arch", build.ARCHS)
@pytest.mark.parametrize("dtype", contract.T_DTYPES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_entry_params_follow_tensorrt_aot_order(ptx_texts, op, dtype, arch):
    """input pointers (contract order), then the int32 args the launch functions produce, then
    output pointers: the parameter list TensorRT's AOT plugins launch with."""
    spec = OPS[op]
    params = build.entry_params(ptx_texts[(op, arch)], build.kernel_name(op, dtype))
    n_in, n_extra, n_out = len(spec.inputs), _extra_count(op), len(spec.outputs)
    assert len(params) == n_in + n_extra + n_out, [p.type for p in params]
    assert all(p.is_pointer for p in params[:n_in]), [p.type for p in params]
    assert all(p.is_int32 for p in params[n_in:n_in + n_extra]), [p.type for p in params]
    assert all(p.is_pointer for p in params[n_in + n_extra:]), [p.type for p in params]


@pytest.mark.parametrize("op", sorted(OPS))
def test_entry_parameter_names_match_contract(op):
    """The C++ parameter names of the entry macro spell the contract's inputs, the launch module's
    int32 argument names and the contract's outputs, in that order."""
    src = (build.PLUGIN_DIR / build.SOURCES[op]).read_text()
    macro = re.search(r"#define XLSTM_\w+_ENTRY\(NAME, T\).*?NAME\((.*?)\)\s*\{", src, re.S)
    assert macro, f"entry macro not found in {build.SOURCES[op]}"
    names = [re.findall(r"(\w+)\s*$", a.replace("\\", " ").strip())[0] for a in macro.group(1).split(",")]
    spec = OPS[op]
    assert names == [*contract.input_names(spec), *EXTRA_NAMES[op], *contract.output_names(spec)]


def test_build_is_cached_and_shipped_ptx_wins(ptx_texts, tmp_path, monkeypatch):
    monkeypatch.setenv("XLSTM_EXPORT_CACHE", str(tmp_path / "cache"))
    first = build.build_ptx("sLSTM", "sm_80")
    mtime = first.stat().st_mtime_ns
    assert build.build_ptx("sLSTM", "sm_80") == first and first.stat().st_mtime_ns == mtime
    monkeypatch.setattr(build, "SHIPPED_DIR", tmp_path / "ptx")
    (tmp_path / "ptx").mkdir()
    shipped = build.shipped_path("sLSTM", "sm_80")
    shutil.copyfile(first, shipped)
    assert build.build_ptx("sLSTM", "sm_80") == shipped


def test_missing_nvcc_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_nvcc_candidates", lambda: [tmp_path / "no" / "nvcc"])
    monkeypatch.setenv("XLSTM_EXPORT_CACHE", str(tmp_path / "empty"))
    with pytest.raises(build.NvccNotFoundError, match="nvcc not found.*nvidia-cuda-nvcc"):
        build.build_ptx("mLSTM", "sm_90")


def test_unknown_arch_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="unsupported PTX target"):
        build.build_ptx("mLSTM", "sm_70")
    with pytest.raises(KeyError, match="no kernel"):
        build.kernel_name("mLSTM", "float64")
    assert build.select_arch(8, 0) == build.select_arch(8, 9) == "sm_80"
    assert build.select_arch(9, 0) == build.select_arch(10, 0) == "sm_90"
    with pytest.raises(ValueError, match="not supported"):
        build.select_arch(7, 5)


# ---------------------------------------------------------------------------------------------
# launch parameters on ints
# ---------------------------------------------------------------------------------------------

MLSTM_SHAPES = [  # (B, NH, S, DQK, DV)
    pytest.param(1, 1, 1, 16, 16, id="B1-NH1-S1-D16"),
    pytest.param(2, 4, 63, 16, 32, id="B2-NH4-S63-DQK16-DV32"),
    pytest.param(3, 2, 129, 64, 96, id="B3-NH2-S129-DQK64-DV96"),
    pytest.param(1, 8, 1, 256, 512, id="B1-NH8-S1-DQK256-DV512-decode"),  # xLSTM-7B
    pytest.param(4, 8, 8191, 256, 512, id="B4-NH8-S8191-DQK256-DV512"),
    pytest.param(2, 16, 65536, 128, 256, id="B2-NH16-S65536-DQK128-DV256"),
]


def _mlstm_columns(DV: int, S: int) -> list[int]:
    """DV columns written by the blocks of grid.x, as the kernel assigns them (mlstm_fwd.cu)."""
    grid_x = -(-DV // launch.MLSTM_STEP_V)
    cols: list[int] = []
    for bx in range(grid_x):
        dv0 = bx * launch.MLSTM_STEP_V
        if S == 1:
            cols += [c for c in range(dv0, dv0 + launch.MLSTM_STEP_V) if c < DV]
        elif bx % (launch.MLSTM_TILE_V // launch.MLSTM_STEP_V) == 0:
            cols += [c for c in range(dv0, dv0 + launch.MLSTM_TILE_V) if c < DV]
    return cols


@pytest.mark.parametrize("B,NH,S,DQK,DV", MLSTM_SHAPES)
def test_mlstm_launch_on_ints(B, NH, S, DQK, DV):
    p = launch.mlstm_launch(B, NH, S, DQK, DV, chunk_size=48, eps=1e-6)
    assert p.grid == (-(-DV // 32), NH, B)
    assert p.block == (256, 1, 1) and p.threads <= launch.MAX_THREADS_PER_BLOCK
    assert p.extra_args[:6] == (B, NH, S, DQK, DV, 48)
    eps_back = struct.unpack("<f", struct.pack("<i", p.extra_args[6]))[0]
    assert eps_back == struct.unpack("<f", struct.pack("<f", 1e-6))[0]  # float32(1e-6), bit exact
    assert dict(zip(launch.MLSTM_EXTRA_ARGS, p.extra_args))["DQK"] == DQK
    # every DV column is written exactly once, in both paths
    for s in (S, 1, 2):
        assert sorted(_mlstm_columns(DV, s)) == list(range(DV))
    # supported head dims fit sm_80 (A100) and sm_90 (H100/H200)
    for arch in ("sm_80", "sm_90"):
        launch.check_limits(p, smem_limit=launch.SMEM_OPTIN_BYTES[arch], op="xlstm::mLSTM")
    assert p.shared_mem <= SM80 <= SM90


def test_mlstm_head_dim_limits_per_arch():
    # DQK 256 (xLSTM-7B) on A100 and H100; DQK 128 still fits the 99 KiB of sm_86/sm_89
    assert launch.mlstm_shared_bytes(256) <= SM80
    assert launch.mlstm_shared_bytes(128) <= launch.SMEM_OPTIN_BYTES["sm_89"]
    assert launch.max_mlstm_head_dim(launch.SMEM_OPTIN_BYTES["sm_89"]) == 128
    assert launch.max_mlstm_head_dim(SM80) >= 256 and launch.max_mlstm_head_dim(SM90) >= 512
    big = launch.mlstm_launch(1, 1, 8, 384, 64)
    with pytest.raises(ValueError, match="shared memory"):
        launch.check_limits(big, smem_limit=SM80)
    launch.check_limits(big, smem_limit=SM90)


def test_mlstm_chunk_size_and_eps():
    assert launch.mlstm_launch(1, 1, 9, 16, 16, chunk_size=1000).extra_args[5] == launch.MLSTM_CHUNK
    assert launch.mlstm_launch(1, 1, 9, 16, 16, chunk_size=5).extra_args[5] == 5
    assert launch.float_bits(1.0) == 0x3F800000 and launch.float_bits(-2.0) == -0x40000000
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            launch.mlstm_launch(1, 1, 9, 16, 16, chunk_size=bad)
    for bad in (0.0, -1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps"):
            launch.mlstm_launch(1, 1, 9, 16, 16, eps=bad)
    with pytest.raises(TypeError, match="static int"):
        launch.mlstm_launch(1, 1, 9, 16.0, 16)


SLSTM_SHAPES = [  # (B, NH, S, DH)
    pytest.param(1, 1, 1, 4, id="B1-NH1-S1-DH4"),
    pytest.param(2, 4, 33, 16, id="B2-NH4-S33-DH16"),
    pytest.param(3, 4, 257, 64, id="B3-NH4-S257-DH64"),
    pytest.param(8, 4, 1025, 128, id="B8-NH4-S1025-DH128"),
    pytest.param(2, 2, 17, 256, id="B2-NH2-S17-DH256"),
    pytest.param(1, 1, 5, 512, id="B1-NH1-S5-DH512"),
    pytest.param(1, 1, 3, 1024, id="B1-NH1-S3-DH1024"),
]


@pytest.mark.parametrize("itemsize", [4, 2], ids=["fp32", "fp16-bf16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
@pytest.mark.parametrize("B,NH,S,DH", SLSTM_SHAPES)
def test_slstm_launch_on_ints(B, NH, S, DH, arch, itemsize):
    limit = launch.SMEM_OPTIN_BYTES[arch]
    p = launch.slstm_launch(B, NH, S, DH, itemsize=itemsize, smem_limit=limit)
    threads = p.block[0]
    assert p.grid == (NH, B, 1) and p.block[1:] == (1, 1)
    assert threads % 32 == 0 and DH <= threads <= launch.MAX_THREADS_PER_BLOCK
    assert -(-4 * DH // threads) <= 4  # kMaxColsPerThread
    r_rows = p.extra_args[4]
    assert p.extra_args == (B, NH, S, DH, r_rows) and 0 <= r_rows <= DH
    assert p.shared_mem == launch.slstm_shared_bytes(DH, r_rows, itemsize) <= limit
    launch.check_limits(p, smem_limit=limit, op="xlstm::sLSTM")
    if r_rows < DH:  # only when one more row would not fit
        assert launch.slstm_shared_bytes(DH, r_rows + 1, itemsize) > limit


def test_slstm_keeps_all_of_r_on_chip_for_half_precision_dh128():
    for arch in ("sm_80", "sm_90"):
        p = launch.slstm_launch(4, 4, 100, 128, itemsize=2, smem_limit=launch.SMEM_OPTIN_BYTES[arch])
        assert p.extra_args[4] == 128
    with pytest.raises(ValueError, match="DH=1025"):
        launch.slstm_launch(1, 1, 1, 1025, itemsize=2, smem_limit=SM90)
    with pytest.raises(ValueError, match="itemsize"):
        launch.slstm_launch(1, 1, 1, 16, itemsize=8, smem_limit=SM90)


def test_check_limits_rejects_oversized_launches():
    ok = launch.LaunchParams((1, 1, 1), (1024, 1, 1), 1024, (1,))
    launch.check_limits(ok, smem_limit=SM80)
    with pytest.raises(ValueError, match="threads"):
        launch.check_limits(launch.LaunchParams((1, 1, 1), (2048, 1, 1), 0, ()), smem_limit=SM80)
    with pytest.raises(ValueError, match="grid.z"):
        launch.check_limits(launch.LaunchParams((1, 1, 70000), (32, 1, 1), 0, ()), smem_limit=SM80)
    with pytest.raises(ValueError, match="int32"):
        launch.check_limits(launch.LaunchParams((1, 1, 1), (32, 1, 1), 0, (2**31,)), smem_limit=SM80)


# ---------------------------------------------------------------------------------------------
# launch parameters on symbolic dims (what TensorRT passes for B, NH, S)
# ---------------------------------------------------------------------------------------------


class Sym:
    """A stand-in for TensorRT's SymInt32 / ShapeExpr: only ``sym (+ - * //) int|sym`` exists."""

    def __init__(self, fn):
        self.fn = fn

    @classmethod
    def var(cls, name):
        return cls(lambda env: env[name])

    def _op(self, other, op):
        o = other.fn if isinstance(other, Sym) else (lambda env, v=other: v)
        return Sym(lambda env: op(self.fn(env), o(env)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    def __bool__(self):
        raise TypeError("symbolic dims have no truth value")

    def __index__(self):
        raise TypeError("symbolic dims are not ints")

    __int__ = __index__


def _ev(x, env):
    return x.fn(env) if isinstance(x, Sym) else x


@pytest.mark.parametrize("env", [dict(B=1, NH=8, S=1), dict(B=3, NH=4, S=37), dict(B=64, NH=2, S=4096)])
def test_launch_functions_accept_symbolic_batch_heads_and_sequence(env):
    B, NH, S = Sym.var("B"), Sym.var("NH"), Sym.var("S")
    sym = launch.mlstm_launch(B, NH, S, 256, 512, chunk_size=64, eps=1e-6)
    ints = launch.mlstm_launch(env["B"], env["NH"], env["S"], 256, 512, chunk_size=64, eps=1e-6)
    assert tuple(_ev(g, env) for g in sym.grid) == ints.grid
    assert tuple(_ev(a, env) for a in sym.extra_args) == ints.extra_args
    assert (sym.block, sym.shared_mem) == (ints.block, ints.shared_mem)
    launch.check_limits(sym, smem_limit=SM80)  # symbolic entries are skipped, the rest checked

    sym = launch.slstm_launch(B, NH, S, 128, itemsize=2, smem_limit=SM80)
    ints = launch.slstm_launch(env["B"], env["NH"], env["S"], 128, itemsize=2, smem_limit=SM80)
    assert tuple(_ev(g, env) for g in sym.grid) == ints.grid
    assert tuple(_ev(a, env) for a in sym.extra_args) == ints.extra_args
    assert (sym.block, sym.shared_mem) == (ints.block, ints.shared_mem)


def test_head_dims_must_be_static():
    with pytest.raises(TypeError, match="DQK must be a static int"):
        launch.mlstm_launch(1, 1, 1, Sym.var("DQK"), 64)
    with pytest.raises(TypeError, match="DH must be a static int"):
        launch.slstm_launch(1, 1, 1, Sym.var("DH"), itemsize=2, smem_limit=SM80)


# ---------------------------------------------------------------------------------------------
# the CUDA side computes the same geometry (host build of layout.cuh)
# ---------------------------------------------------------------------------------------------


def test_cuda_layout_matches_launch_module(tmp_path):
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the layout check")
    dqks, dhs = [1, 16, 63, 64, 65, 128, 192, 256, 384, 512], [1, 4, 7, 16, 64, 100, 128, 256, 300, 1024]
    src = tmp_path / "layout_check.cpp"
    src.write_text(
        '#include "layout.cuh"\n#include <cstdio>\nint main() {\n'
        + "".join(f'  std::printf("m %d %d\\n", {d}, xlstm::mlstm::smem_floats({d}));\n' for d in dqks)
        + "".join(f'  std::printf("t %d %d\\n", {d}, xlstm::slstm::threads_for({d}));\n' for d in dhs)
        + "".join(f'  std::printf("s %d %d %d %d\\n", {d}, {r}, {t}, xlstm::slstm::smem_bytes({d}, {r}, {t}));\n'
                  for d in dhs for r in (0, 1, d) for t in (2, 4))
        + '  std::printf("k %d %d %d %d %d\\n", xlstm::mlstm::kThreads, xlstm::mlstm::kChunk, '
          'xlstm::mlstm::kTileV, xlstm::mlstm::kStepV, xlstm::mlstm::kSlab);\n'
        + '  std::printf("K %d\\n", xlstm::slstm::kMaxThreads);\n  return 0;\n}\n')
    exe = tmp_path / "layout_check"
    subprocess.run([cxx, "-std=c++17", *launch.cuda_defines(), "-I", str(build.PLUGIN_DIR), str(src), "-o",
                    str(exe)], check=True, capture_output=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    seen = 0
    for line in lines:
        kind, *vals = line.split()
        v = [int(x) for x in vals]
        if kind == "m":
            assert 4 * v[1] == launch.mlstm_shared_bytes(v[0]), line
        elif kind == "t":
            assert v[1] == launch.slstm_threads(v[0]), line
        elif kind == "s":
            assert v[3] == launch.slstm_shared_bytes(v[0], v[1], v[2]), line
        elif kind == "k":
            assert v == [launch.MLSTM_THREADS, launch.MLSTM_CHUNK, launch.MLSTM_TILE_V, launch.MLSTM_STEP_V,
                         launch.MLSTM_SLAB], line
        elif kind == "K":
            assert v == [launch.SLSTM_MAX_THREADS], line
        seen += 1
    assert seen == len(dqks) + len(dhs) + 6 * len(dhs) + 2


# ---------------------------------------------------------------------------------------------
# import guards
# ---------------------------------------------------------------------------------------------


def test_package_imports_without_tensorrt_and_plugin_module_says_what_to_install():
    import importlib
    import importlib.util

    importlib.import_module("xlstm_export.plugins")
    importlib.import_module("xlstm_export.plugins.runner")  # CuPy is only needed at launch time
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here; the guard is exercised where it is missing")
    with pytest.raises(ImportError, match="pip install tensorrt"):
        importlib.import_module("xlstm_export.plugins.tensorrt_plugins")


# ---------------------------------------------------------------------------------------------
# the GPU tier (bench/gpu_tier.sh and the benchmarks it runs) on a machine without a GPU
# ---------------------------------------------------------------------------------------------

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    import importlib.util
    import sys

    sys.path.insert(0, str(BENCH))  # the scripts import their _report / _timing siblings
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_tier_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_tier.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_plugin_bench_reports_a_shape_the_triton_kernel_refuses():
    """bench/plugins.py times the Triton sLSTM at DH=256, which it refuses (DH <= 128): the row says
    why instead of the whole table being lost to the ValueError (it was, after every other row)."""
    import torch

    from xlstm_export.kernels.slstm.fused_recurrent import MAX_HEAD_DIM, fused_recurrent_slstm

    plugins_bench = _bench_module("plugins")
    DH = 2 * MAX_HEAD_DIM
    x, r, b = torch.zeros(1, 1, 2, 4 * DH), torch.zeros(1, DH, 4 * DH), torch.zeros(1, 4 * DH)
    ms, why = plugins_bench._time_or_reason(lambda: fused_recurrent_slstm(x, r, b), 1, 1)
    assert ms is None and why.startswith("ValueError") and f"DH={DH}" in why


def test_kernel_benches_report_a_failing_kernel_and_keep_partial_tables(monkeypatch):
    """One kernel that fails (a peer that does not run on the GPU's triton) fills its cells with the
    reason; SIGTERM, as `timeout` sends it, stops a run with the rows so far (marked partial)."""
    mlstm_bench = _bench_module("kernels_mlstm")

    def broken(*xs):
        raise RuntimeError("PassManager::run failed\nmore lines")

    # the kernel called as the timer would call it; triton's do_bench itself needs a GPU (without one
    # it crashed this process, after the Triton interpreter tests had run in it)
    monkeypatch.setattr(mlstm_bench, "_time", lambda fn, xs, backward, warmup, rep: fn(*xs))
    assert mlstm_bench._measure(broken, (), backward=False, warmup=1, rep=1) == "failed: RuntimeError"
    rows = [(65536, 1, {"a": 7.0}, {"a": "OOM"}), (2048, 32, {"a": 1.25}, {})]  # run order, one row partial
    table = mlstm_bench._table("GPU", ["a"], rows, stopped="stopped at length 2 of 6")
    lines = table.splitlines()
    assert "PARTIAL: stopped at length 2 of 6" in lines[0]
    assert lines[-2:] == ["| 2048 | 32 | 1.25 | — |", "| 65536 | 1 | 7.00 | OOM |"]  # sorted by S

    slstm_bench = _bench_module("kernels_slstm")
    args = slstm_bench.argparse.Namespace(torch_max_seq=1024, batch=1, heads=1, warmup=1, reps=1)
    monkeypatch.setattr(slstm_bench, "_bench_one", lambda *a: broken())
    assert slstm_bench._row("ours", args, 16, 16, None)[0].startswith("failed: RuntimeError: PassManager")
    assert slstm_bench._row("torch", args, 4096, 16, None)[0].startswith("skipped")

    # SIGTERM in a process of its own: raised in this one it crashed pytest once OpenVINO's tests
    # had run here (their native threads), which says nothing about the benchmarks
    for name in ("kernels_mlstm", "kernels_slstm"):
        code = (f"import importlib.util, signal, sys; sys.path.insert(0, {str(BENCH)!r}); "
                f"spec = importlib.util.spec_from_file_location('m', {str(BENCH / (name + '.py'))!r}); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); m.sigterm_stops()\n"
                "try:\n    signal.raise_signal(signal.SIGTERM)\nexcept KeyboardInterrupt as e:\n    print('stopped:', e)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() == "stopped: signal 15", (name, proc.stdout, proc.stderr)


def test_gpu_tier_bench_commands_parse_and_exit_cleanly_without_cuda(capsys):
    """The bench command lines of gpu_tier.sh parse, and without CUDA each bench says so in one line."""
    import shlex

    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmarks would run")
    script = (BENCH / "gpu_tier.sh").read_text().replace("\\\n", " ")
    commands = re.findall(r"python3 bench/(\w+)\.py ([^\n]*)", script)
    assert {name for name, _ in commands} == {"kernels_mlstm", "kernels_slstm", "plugins"}
    for name, args in commands:
        argv = shlex.split(args)
        argv = argv[:argv.index("--write")] if "--write" in argv else argv  # no table without a GPU anyway
        assert _bench_module(name).main(argv) == (2 if name == "kernels_mlstm" else 0), (name, argv)
    out = capsys.readouterr()
    assert "no CUDA device" in out.out and "needs a CUDA GPU" in out.err
