"""The CUDA plugin kernels' source run on the CPU (tests/cuda_emu): the CPU tier's check of their math.

plugins/mlstm_fwd.cu and slstm_fwd.cu are compiled with g++ against a small emulation of the CUDA
execution model (tests/cuda_emu/cuda_emu.h: one OS thread per CUDA thread, barriers for
__syncthreads and the warp shuffles, dynamic shared memory set to NaN before every block so a read
of shared memory the block never wrote shows in the outputs) and launched with exactly the grid, block, shared memory and
int32 arguments that ``plugins/launch.py`` computes for the TensorRT plugins, then compared with
the PyTorch references, like the GPU tier (tests/test_plugins_gpu.py) but at smaller shapes; and,
registered with onnxruntime as the ops of the exported models' own `xlstm` nodes
(cuda_emu/emu_ort_ops.cc), inside whole models against their function bodies: a CPU rehearsal of
what a TensorRT engine with the plugins computes.
This checks the kernels' indexing, tiling, synchronization structure and arithmetic; nvcc's code
generation and the real memory model are the GPU tier's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from model_makers import perturbed_model
from op_inputs import op_args
from slstm_oracle import check_against_official, extreme_first_step_inputs
from xlstm_export.kernels.mlstm.naive import naive_chunk_mlstm, naive_step_mlstm
from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm
from xlstm_export.plugins import build, launch

from xlstm_export import contract

EMU_DIR = Path(__file__).parent / "cuda_emu"
SMEM_LIMIT = launch.SMEM_OPTIN_BYTES["sm_90"]  # per-block opt-in shared memory of an H100 / H200 (227 KiB)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def _cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (for cuda_fp16.h / cuda_bf16.h), or None."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    try:
        candidates.append(Path(build.find_nvcc()).resolve().parent.parent / "include")
    except build.NvccNotFoundError:
        pass
    candidates.append(Path("/usr/local/cuda/include"))
    return next((c for c in candidates if (c / "cuda_fp16.h").is_file()), None)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (cuda_fp16.h, from the toolkit of nvcc)")
    out = tmp_path_factory.mktemp("cuda_emu") / "emu_kernels.so"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", *launch.cuda_defines(),
           f"-DXLSTM_EMU_SMEM_LIMIT={SMEM_LIMIT}", "-I", str(EMU_DIR), "-I",
           str(build.PLUGIN_DIR), "-I", str(inc), str(EMU_DIR / "emu_kernels.cc"),
           str(EMU_DIR / "emu_ort_ops.cc"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    lib = ctypes.CDLL(str(out))
    for fn in (lib.emu_mlstm_fwd, lib.emu_slstm_fwd):
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_void_p),
                       ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = ctypes.c_int
    lib.emu_set_schedule.argtypes = [ctypes.c_int]
    lib.emu_set_schedule.restype = None
    lib.path = str(out)  # also an onnxruntime custom-op library (emu_ort_ops.cc)
    return lib


@contextlib.contextmanager
def _schedule(emu, schedule: int):
    """Launches inside run each block's threads one at a time (cuda_emu.h: 1 ascending, 2 descending)."""
    emu.emu_set_schedule(schedule)
    try:
        yield
    finally:
        emu.emu_set_schedule(0)


def _launch(fn, dtype, params: launch.LaunchParams, inputs, outputs) -> None:
    launch.check_limits(params, smem_limit=SMEM_LIMIT)
    geometry = (ctypes.c_uint * 7)(*params.grid, *params.block, params.shared_mem)
    ptrs = lambda ts: (ctypes.c_void_p * len(ts))(*(t.data_ptr() for t in ts))  # noqa: E731
    args = (ctypes.c_int * len(params.extra_args))(*params.extra_args)
    assert all(t.is_contiguous() for t in (*inputs, *outputs))
    assert fn(DTYPE_CODE[dtype], geometry, ptrs(inputs), args, ptrs(outputs)) == 0


def _poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)  # unwritten memory fails the comparison


def _close(name, actual, expected, tol: contract.Tolerance):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol.rtol, atol=tol.atol,
                               msg=lambda m: f"{name}: {m}")


# --- mLSTM -----------------------------------------------------------------------------------------


def _mlstm_inputs(B, NH, S, DQK, DV, dtype, with_state, seed=0):
    """The node's inputs: f ~ N(3, 1) (mostly-open forget gates), a used state or zeros."""
    half = lambda z: 0.5 * z  # noqa: E731
    return op_args(contract.MLSTM, dict(B=B, NH=NH, S=S, DQK=DQK, DV=DV), seed=seed, dtype=dtype,
                   state=with_state, how={"f": lambda z: z + 3.0, "c0": half, "n0": half})


def _mlstm_emu(emu, inputs, chunk_size, eps=1e-6):
    q, v = inputs[0], inputs[2]
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    outs = [_poisoned(s, q.dtype if o.dtype == "T" else torch.float32)
            for s, o in zip(contract.mlstm_output_shapes(q.shape, inputs[1].shape, v.shape), contract.MLSTM.outputs)]
    _launch(emu.emu_mlstm_fwd, q.dtype, launch.mlstm_launch(B, NH, S, DQK, DV, chunk_size=chunk_size, eps=eps),
            inputs, outs)
    return outs


MLSTM_CASES = [  # B, NH, S, DQK, DV, chunk_size, with_state: the chunk path (S > 1)
    pytest.param(2, 3, 37, 16, 32, 16, True, id="B2-NH3-S37-DQK16-DV32-L16-state"),
    pytest.param(1, 2, 23, 8, 40, 7, False, id="B1-NH2-S23-DQK8-DV40-L7"),
    pytest.param(1, 1, 70, 100, 70, 64, True, id="B1-NH1-S70-DQK100-DV70-L64-state"),  # 2 slabs, 2 tiles
    pytest.param(1, 1, 5, 256, 512, 64, True, id="B1-NH1-S5-DQK256-DV512-state"),  # xLSTM-7B head dims
    pytest.param(1, 1, 129, 65, 17, 64, True, id="B1-NH1-S129-DQK65-DV17-L64-state"),  # last chunk: 1 step
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,S,DQK,DV,chunk_size,with_state", MLSTM_CASES)
def test_mlstm_kernel_source_matches_reference(emu, B, NH, S, DQK, DV, chunk_size, with_state, dtype):
    inputs = _mlstm_inputs(B, NH, S, DQK, DV, dtype, with_state)
    h, c, n, m = _mlstm_emu(emu, inputs, chunk_size)
    h_ref, (c_ref, n_ref, m_ref) = naive_chunk_mlstm(*inputs[:5], inputs[5:], chunk_size=chunk_size, eps=1e-6)
    tol = contract.tolerance(dtype)
    _close("h", h, h_ref, tol.outputs)
    for name, a, e in (("c", c, c_ref), ("n", n, n_ref), ("m", m, m_ref)):
        _close(name, a, e, tol.states)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,DQK,DV", [(3, 2, 48, 80), (1, 1, 300, 33), (1, 2, 256, 512)],
                         ids=["B3-NH2-DQK48-DV80", "B1-NH1-DQK300-DV33", "B1-NH2-DQK256-DV512"])
def test_mlstm_decode_step_source_matches_reference(emu, B, NH, DQK, DV, dtype):
    inputs = _mlstm_inputs(B, NH, 1, DQK, DV, dtype, with_state=True, seed=1)
    h, c, n, m = _mlstm_emu(emu, inputs, 64)
    h_ref, (c_ref, n_ref, m_ref) = naive_step_mlstm(*inputs[:5], inputs[5:], eps=1e-6)
    tol = contract.tolerance(dtype)
    _close("h", h, h_ref, tol.outputs)
    for name, a, e in (("c", c, c_ref), ("n", n, n_ref), ("m", m, m_ref)):
        _close(name, a, e, tol.states)


# --- sLSTM -----------------------------------------------------------------------------------------


def _slstm_inputs(B, NH, S, DH, dtype, with_state, seed=0):
    """The node's inputs: r ~ N(0, 1) / sqrt(DH), n0 in (1, 2) as the normalizer of a used state."""
    half = lambda z: 0.5 * z  # noqa: E731
    return op_args(contract.SLSTM, dict(B=B, NH=NH, S=S, DH=DH), seed=seed, dtype=dtype, state=with_state,
                   how={"r": lambda z: z / DH**0.5, "b": half, "h0": half, "n0": lambda z: 1.0 + torch.special.ndtr(z),
                        "m0": half})


def _slstm_emu(emu, inputs, smem_limit=SMEM_LIMIT):
    x, r = inputs[0], inputs[1]
    B, NH, S = x.shape[:3]
    DH = r.shape[1]
    outs = [_poisoned(s, x.dtype if o.dtype == "T" else torch.float32)
            for s, o in zip(contract.slstm_output_shapes(x.shape, r.shape), contract.SLSTM.outputs)]
    params = launch.slstm_launch(B, NH, S, DH, itemsize=x.element_size(), smem_limit=smem_limit)
    _launch(emu.emu_slstm_fwd, x.dtype, params, inputs, outs)
    return outs


def _close_to_naive_slstm(inputs, y, state, dtype=torch.float32) -> None:
    """y and the state (h, c, n, m) against the float reference sLSTM over the same inputs."""
    y_ref, state_ref = naive_recurrent_slstm(inputs[0], inputs[1], inputs[2], tuple(inputs[3:]))
    tol = contract.tolerance(dtype)
    _close("y", y, y_ref, tol.outputs)
    for name, a, e in zip("hcnm", state, state_ref):
        _close(name, a, e, tol.states)


SLSTM_CASES = [  # B, NH, S, DH, with_state
    pytest.param(2, 3, 33, 16, True, id="B2-NH3-S33-DH16-state"),
    pytest.param(1, 2, 11, 7, True, id="B1-NH2-S11-DH7-state"),  # 4*DH not a multiple of 32
    pytest.param(3, 2, 1, 32, False, id="B3-NH2-S1-DH32-decode"),
    pytest.param(1, 2, 4, 260, True, id="B1-NH2-S4-DH260-state"),  # 4*DH > 1024: 2 gate columns for some threads
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,S,DH,with_state", SLSTM_CASES)
def test_slstm_kernel_source_matches_reference(emu, B, NH, S, DH, with_state, dtype):
    inputs = _slstm_inputs(B, NH, S, DH, dtype, with_state)
    y, *state = _slstm_emu(emu, inputs)
    _close_to_naive_slstm(inputs, y, state, dtype)


@pytest.mark.parametrize("r_rows_fit", [0, 5], ids=["r-all-global", "r-5-rows-on-chip"])
def test_slstm_source_with_r_partly_or_not_in_shared_memory(emu, r_rows_fit):
    B, NH, S, DH = 2, 2, 13, 24
    inputs = _slstm_inputs(B, NH, S, DH, torch.float32, with_state=True, seed=3)
    limit = launch.slstm_shared_bytes(DH, r_rows_fit, 4)
    assert launch.slstm_r_rows(DH, 4, limit) == r_rows_fit
    y, *state = _slstm_emu(emu, inputs, smem_limit=limit)
    _close_to_naive_slstm(inputs, y, state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slstm_source_extreme_first_step_input_gate_matches_official(emu, dtype):
    """An input gate far below -104 on the first step of a fresh sequence: finite, as the official
    vanilla cell (m starts at i~ where n == 0), within the dtype's output tolerance."""
    B, NH, S, DH = 2, 2, 5, 6
    x, r, b = extreme_first_step_inputs(B, NH, S, DH, dtype=dtype)
    zeros = [torch.zeros(B, NH, DH) for _ in range(4)]
    y, *state = _slstm_emu(emu, [x.contiguous(), r.contiguous(), b.contiguous(), *zeros])
    tol = contract.tolerance(dtype).outputs
    check_against_official(y, state, x, r, b, max(tol.rtol, tol.atol))


# --- races: every block's threads one at a time, in ascending and in descending thread order ------

SERIAL_SCHEDULES = [pytest.param(1, id="ascending"), pytest.param(2, id="descending")]


@pytest.mark.parametrize("schedule", SERIAL_SCHEDULES)
@pytest.mark.parametrize("B,NH,S,DQK,DV,chunk_size", [(1, 1, 70, 100, 70, 64), (1, 2, 23, 8, 40, 7), (2, 1, 1, 48, 80, 64)],
                         ids=["S70-DQK100-DV70-L64", "S23-DQK8-DV40-L7", "decode-DQK48-DV80"])
def test_mlstm_source_has_no_shared_memory_race(emu, schedule, B, NH, S, DQK, DV, chunk_size):
    """Each stretch between two barriers run thread after thread, in both orders: a thread that
    reads a shared word another writes with no barrier between gets the wrong value in one of them
    (the chunk path's slab and chunk loops, 2 slabs, 2 DV tiles, a partial last chunk; the step path)."""
    inputs = _mlstm_inputs(B, NH, S, DQK, DV, torch.float32, with_state=True, seed=4)
    with _schedule(emu, schedule):
        h, c, n, m = _mlstm_emu(emu, inputs, chunk_size)
    if S == 1:
        h_ref, state_ref = naive_step_mlstm(*inputs[:5], inputs[5:], eps=1e-6)
    else:
        h_ref, state_ref = naive_chunk_mlstm(*inputs[:5], inputs[5:], chunk_size=chunk_size, eps=1e-6)
    tol = contract.tolerance(torch.float32)
    _close("h", h, h_ref, tol.outputs)
    for name, a, e in zip("cnm", (c, n, m), state_ref):
        _close(name, a, e, tol.states)


@pytest.mark.parametrize("schedule", SERIAL_SCHEDULES)
@pytest.mark.parametrize("r_rows_fit", [3, None], ids=["r-3-rows-on-chip", "r-all-on-chip"])
def test_slstm_source_has_no_shared_memory_race(emu, schedule, r_rows_fit):
    """As the mLSTM test: the sLSTM step's two barriers (pre-activations, h), r in shared memory
    and partly in global memory, 4*DH not a multiple of 32."""
    B, NH, S, DH = 2, 2, 9, 13
    inputs = _slstm_inputs(B, NH, S, DH, torch.float32, with_state=True, seed=5)
    limit = SMEM_LIMIT if r_rows_fit is None else launch.slstm_shared_bytes(DH, r_rows_fit, 4)
    with _schedule(emu, schedule):
        y, *state = _slstm_emu(emu, inputs, smem_limit=limit)
    _close_to_naive_slstm(inputs, y, state)


# --- the kernels inside exported models, fed by onnxruntime (a CPU rehearsal of the TensorRT path) ---


def test_ort_library_launch_geometry_is_launch_py(emu):
    """The emulated ops compute their launches from layout.cuh; they must be launch.py's."""
    launch_buf, args_buf = (ctypes.c_uint * 7)(), (ctypes.c_int * 7)()
    for B, NH, S, DQK, DV, chunk in [(1, 4, 1, 16, 32, 64), (3, 2, 37, 100, 70, 16), (2, 8, 9, 256, 512, 128)]:
        emu.emu_mlstm_geometry(B, NH, S, DQK, DV, chunk, ctypes.c_float(1e-6), launch_buf, args_buf)
        p = launch.mlstm_launch(B, NH, S, DQK, DV, chunk_size=chunk, eps=1e-6)
        assert list(launch_buf) == [*p.grid, *p.block, p.shared_mem] and list(args_buf) == list(p.extra_args)
    for B, NH, S, DH, itemsize in [(1, 4, 1, 16, 4), (2, 3, 33, 7, 2), (1, 1, 5, 512, 4)]:
        emu.emu_slstm_geometry(B, NH, S, DH, itemsize, SMEM_LIMIT, launch_buf, args_buf)
        p = launch.slstm_launch(B, NH, S, DH, itemsize=itemsize, smem_limit=SMEM_LIMIT)
        assert list(launch_buf) == [*p.grid, *p.block, p.shared_mem] and list(args_buf)[:5] == list(p.extra_args)


@pytest.fixture(scope="module")
def exported_models(tmp_path_factory):
    from xlstm_export.models import preset

    from xlstm_export.export import export_onnx

    root = tmp_path_factory.mktemp("emu_onnx")
    out = {}
    for kind, name, dtype in (("paper", "tiny", "fp32"), ("large", "tiny-large", "fp32"),
                              ("paper-fp16", "tiny", "fp16")):
        model = perturbed_model(preset(name), seed=4)
        out[kind] = export_onnx(model, root / f"{kind}.onnx", dtype=dtype, progress=False)
    return out


@pytest.mark.parametrize("kind", ["paper", "large", "paper-fp16"])
def test_plugin_kernels_inside_exported_models_match_the_function_bodies(emu, exported_models, kind):
    """Every xlstm node of the exported model runs the plugin kernel source (custom ops registered
    under the nodes' own domain and names take precedence over the function bodies): a prefill of
    odd length (chunk path, sLSTM loop), then decode steps (step path), states carried by the graph,
    against the same file through its standard-op bodies."""
    import numpy as np
    import onnxruntime as ort

    from xlstm_export.ort import OrtModel

    path = exported_models[kind]
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(emu.path)
    plugin, body = OrtModel(path, session_options=opts), OrtModel(path)
    dtype = contract.canonical_dtype(body.dtype)
    limit = contract.MAX_RELATIVE_ERROR[dtype]
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, (2, 9))
    (lp, sp), (lb, sb) = plugin.run(ids), body.run(ids)
    for step in range(3):
        assert contract.relative_error(lp, lb) < limit, f"logits, step {step}"
        for key in sb:
            assert contract.relative_error(sp[key], sb[key]) < limit, f"state {key}, step {step}"
        tok = rng.integers(0, 256, (2, 1))
        (lp, sp), (lb, sb) = plugin.run(tok, sp), body.run(tok, sb)
