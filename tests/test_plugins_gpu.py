"""GPU tier of the CUDA plugin kernels (``pytest -m gpu``): the PTX launched through CuPy with exactly
the launch parameters and int32 arguments the TensorRT ``aot_impl`` hands TensorRT
(:mod:`xlstm_export.plugins.runner`), compared with the PyTorch references for float32, float16 and
bfloat16, odd S, S = 1 decode, initial states, several chunk sizes and the largest head dims.
"""

from __future__ import annotations

import pytest
import torch

from xlstm_export import contract
from xlstm_export.kernels.mlstm.naive import naive_chunk_mlstm, naive_step_mlstm
from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm
from xlstm_export.plugins import device, launch
from xlstm_export.plugins.runner import mlstm_plugin_forward, slstm_plugin_forward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.usefixtures("poison_empty", "_cupy"),
]


@pytest.fixture(scope="module")
def _cupy():
    pytest.importorskip("cupy", reason="the plugin kernels are launched through CuPy "
                        "(pip install cupy-cuda13x, or cupy-cuda12x on CUDA 12)")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]
SEED = 0


def _needs_smem(nbytes: int) -> None:
    if nbytes > device.smem_optin_bytes():
        pytest.skip(f"needs {nbytes} bytes of shared memory per block; this GPU allows "
                    f"{device.smem_optin_bytes()}")


def _close(name, actual, expected, tol: contract.Tolerance):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol.rtol, atol=tol.atol,
                               msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# mLSTM
# ---------------------------------------------------------------------------------------------


def _mlstm_inputs(B, NH, S, DQK, DV, dtype, with_state, seed=SEED):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    q, k = rnd(B, NH, S, DQK).to(dtype), rnd(B, NH, S, DQK).to(dtype)  # (B, NH, S, DQK)
    v = rnd(B, NH, S, DV).to(dtype)  # (B, NH, S, DV)
    i = rnd(B, NH, S).to(dtype)  # (B, NH, S)
    f = (rnd(B, NH, S) + 3.0).to(dtype)  # (B, NH, S) mostly-open forget gates, as trained models
    if with_state:
        c0 = 0.5 * rnd(B, NH, DQK, DV)  # (B, NH, DQK, DV)
        n0 = 0.5 * rnd(B, NH, DQK)  # (B, NH, DQK)
        m0 = rnd(B, NH)  # (B, NH)
    else:
        c0, n0, m0 = (torch.zeros(B, NH, DQK, DV, device="cuda"), torch.zeros(B, NH, DQK, device="cuda"),
                      torch.zeros(B, NH, device="cuda"))
    return q, k, v, i, f, c0, n0, m0


MLSTM_CASES = [  # B, NH, S, DQK, DV, chunk_size, with_state
    pytest.param(2, 3, 37, 16, 32, 16, True, id="B2-NH3-S37-DQK16-DV32-L16-state"),
    pytest.param(1, 2, 64, 64, 64, 64, False, id="B1-NH2-S64-DQK64-DV64-L64"),
    pytest.param(2, 2, 129, 32, 48, 64, True, id="B2-NH2-S129-DQK32-DV48-L64-state"),
    pytest.param(1, 1, 19, 16, 16, 1, True, id="B1-NH1-S19-D16-L1-state"),
    pytest.param(1, 2, 23, 8, 40, 7, False, id="B1-NH2-S23-DQK8-DV40-L7"),
    pytest.param(2, 2, 70, 256, 512, 64, True, id="B2-NH2-S70-DQK256-DV512-state"),  # xLSTM-7B heads
    pytest.param(1, 1, 5, 100, 70, 128, True, id="B1-NH1-S5-DQK100-DV70-L128-state"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,S,DQK,DV,chunk_size,with_state", MLSTM_CASES)
def test_mlstm_kernel_matches_reference(B, NH, S, DQK, DV, chunk_size, with_state, dtype):
    _needs_smem(launch.mlstm_shared_bytes(DQK))
    inputs = _mlstm_inputs(B, NH, S, DQK, DV, dtype, with_state)
    h, c, n, m = mlstm_plugin_forward(*inputs, chunk_size=chunk_size, eps=1e-6)
    q, k, v, i, f, c0, n0, m0 = inputs
    h_ref, (c_ref, n_ref, m_ref) = naive_chunk_mlstm(q, k, v, i, f, (c0, n0, m0), chunk_size=chunk_size, eps=1e-6)
    tol = contract.tolerance(dtype)
    assert h.dtype == dtype and c.dtype == n.dtype == m.dtype == torch.float32
    _close("h", h, h_ref, tol.outputs)
    for name, a, e in (("c", c, c_ref), ("n", n, n_ref), ("m", m, m_ref)):
        _close(name, a, e, tol.states)


DECODE_CASES = [  # B, NH, DQK, DV
    pytest.param(1, 8, 256, 512, id="B1-NH8-DQK256-DV512"),  # xLSTM-7B decode step
    pytest.param(3, 2, 48, 80, id="B3-NH2-DQK48-DV80"),
    pytest.param(2, 1, 16, 16, id="B2-NH1-D16"),
    pytest.param(1, 1, 300, 33, id="B1-NH1-DQK300-DV33"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,DQK,DV", DECODE_CASES)
def test_mlstm_decode_step_matches_reference(B, NH, DQK, DV, dtype):
    _needs_smem(launch.mlstm_shared_bytes(DQK))
    inputs = _mlstm_inputs(B, NH, 1, DQK, DV, dtype, with_state=True)
    h, c, n, m = mlstm_plugin_forward(*inputs, eps=1e-6)
    q, k, v, i, f, c0, n0, m0 = inputs
    h_ref, (c_ref, n_ref, m_ref) = naive_step_mlstm(q, k, v, i, f, (c0, n0, m0), eps=1e-6)
    tol = contract.tolerance(dtype)
    _close("h", h, h_ref, tol.outputs)
    for name, a, e in (("c", c, c_ref), ("n", n, n_ref), ("m", m, m_ref)):
        _close(name, a, e, tol.states)


def test_mlstm_state_passing_prefill_then_decode_equals_whole_sequence():
    """Chunks carrying state == the whole sequence; and S=1 decode steps continue it."""
    B, NH, S, DQK, DV = 2, 2, 41, 32, 64
    q, k, v, i, f, c0, n0, m0 = _mlstm_inputs(B, NH, S, DQK, DV, torch.float32, with_state=True)
    h_all, c_all, n_all, m_all = mlstm_plugin_forward(q, k, v, i, f, c0, n0, m0, chunk_size=16)
    cut = 29
    h1, c1, n1, m1 = mlstm_plugin_forward(*(t[:, :, :cut].contiguous() for t in (q, k, v, i, f)), c0, n0, m0,
                                          chunk_size=16)
    hs, state = [h1], (c1, n1, m1)
    for t in range(cut, S):  # decode the rest one step at a time (step path)
        h_t, *state = mlstm_plugin_forward(*(x[:, :, t:t + 1].contiguous() for x in (q, k, v, i, f)), *state)
        hs.append(h_t)
    tol = contract.tolerance(torch.float32)
    _close("h", torch.cat(hs, dim=2), h_all, tol.outputs)
    for name, a, e in zip("cnm", state, (c_all, n_all, m_all)):
        _close(name, a, e, tol.states)


# ---------------------------------------------------------------------------------------------
# sLSTM
# ---------------------------------------------------------------------------------------------


def _slstm_inputs(B, NH, S, DH, dtype, with_state, seed=SEED):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    x = rnd(B, NH, S, 4 * DH).to(dtype)  # (B, NH, S, 4*DH)
    r = (rnd(NH, DH, 4 * DH) / DH**0.5).to(dtype)  # (NH, DH, 4*DH)
    b = (0.5 * rnd(NH, 4 * DH)).to(dtype)  # (NH, 4*DH)
    if with_state:
        h0, c0 = 0.5 * rnd(B, NH, DH), rnd(B, NH, DH)  # (B, NH, DH)
        n0 = 1.0 + torch.rand(B, NH, DH, generator=g, device="cuda")  # (B, NH, DH) normalizer > 0
        m0 = 0.5 * rnd(B, NH, DH)  # (B, NH, DH)
    else:
        h0 = c0 = n0 = m0 = torch.zeros(B, NH, DH, device="cuda")
    return x, r, b, h0, c0, n0, m0


SLSTM_CASES = [  # B, NH, S, DH, with_state
    pytest.param(2, 3, 33, 16, True, id="B2-NH3-S33-DH16-state"),
    pytest.param(1, 4, 65, 64, False, id="B1-NH4-S65-DH64"),
    pytest.param(2, 2, 17, 128, True, id="B2-NH2-S17-DH128-state"),  # fp32: part of r from global
    pytest.param(1, 1, 9, 256, True, id="B1-NH1-S9-DH256-state"),
    pytest.param(3, 2, 1, 32, True, id="B3-NH2-S1-DH32-state-decode"),
    pytest.param(1, 2, 11, 7, True, id="B1-NH2-S11-DH7-state"),  # 4*DH not a multiple of 32
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,NH,S,DH,with_state", SLSTM_CASES)
def test_slstm_kernel_matches_reference(B, NH, S, DH, with_state, dtype):
    inputs = _slstm_inputs(B, NH, S, DH, dtype, with_state)
    y, h, c, n, m = slstm_plugin_forward(*inputs)
    x, r, b, *state = inputs
    y_ref, state_ref = naive_recurrent_slstm(x, r, b, tuple(state))
    tol = contract.tolerance(dtype)
    assert y.dtype == dtype
    _close("y", y, y_ref, tol.outputs)
    for name, a, e in zip("hcnm", (h, c, n, m), state_ref):
        _close(name, a, e, tol.states)


@pytest.mark.parametrize("r_rows_fit", [0, 5], ids=["r-all-global", "r-5-rows-on-chip"])
def test_slstm_r_partly_or_not_in_shared_memory(r_rows_fit):
    """Rows of r beyond the shared-memory budget are read from global memory: same result."""
    B, NH, S, DH, dtype = 2, 2, 13, 32, torch.float32
    inputs = _slstm_inputs(B, NH, S, DH, dtype, with_state=True)
    limit = launch.slstm_shared_bytes(DH, r_rows_fit, 4)
    assert launch.slstm_r_rows(DH, 4, limit) == r_rows_fit
    y, *state = slstm_plugin_forward(*inputs, smem_limit=limit)
    x, r, b, *state0 = inputs
    y_ref, state_ref = naive_recurrent_slstm(x, r, b, tuple(state0))
    tol = contract.tolerance(dtype)
    _close("y", y, y_ref, tol.outputs)
    for name, a, e in zip("hcnm", state, state_ref):
        _close(name, a, e, tol.states)


def test_device_reports_what_the_launches_assume():
    cc = device.capability()
    assert cc is not None and cc >= (8, 0)
    assert device.smem_optin_bytes() >= launch.mlstm_shared_bytes(128)  # 99 KiB GPUs and up
    assert device.ptx_arch() == ("sm_90" if cc >= (9, 0) else "sm_80")
