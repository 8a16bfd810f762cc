"""Triton mLSTM kernels (kernels/mlstm/chunk.py, kernels/mlstm/fused_recurrent.py) against the
PyTorch reference (kernels/mlstm/naive.py): forward outputs, final states and every gradient
(q, k, v, i, f, c0, n0, m0).

CPU tier: the kernels run in Triton's interpreter (TRITON_INTERPRET=1) at tiny shapes.
`-m gpu`: the same checks compiled on CUDA at real shapes.

Errors are relative to the tensor's scale: max |actual - expected| / max |expected|. The reference
runs in float64 on the same (already rounded) inputs, so the error is the kernel's own.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")

from op_inputs import mlstm_inputs, mlstm_state, rel_err  # noqa: E402

from xlstm_export.kernels import MLSTM_BACKENDS  # noqa: E402
from xlstm_export.kernels.mlstm.chunk import (  # noqa: E402
    ChunkMLSTMFunction,
    ChunkMLSTMLaunch,
    chunk_mlstm,
)
from xlstm_export.kernels.mlstm.fused_recurrent import fused_recurrent_step_mlstm  # noqa: E402
from xlstm_export.kernels.mlstm.naive import naive_chunk_mlstm, naive_step_mlstm  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_empty")

SEED = 1234
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU_DEVICE = "cpu"

# Relative tolerance per input dtype (outputs, states and gradients alike).
TOL = {
    torch.float32: 1e-4,  # float32 throughout (tl.dot in IEEE fp32): rounding only
    torch.bfloat16: 2e-2,  # tiles are rounded to bf16 before each tl.dot (the 8-bit mantissa), as in TFLA
    torch.float16: 5e-3,  # the same roundings with fp16's 11-bit significand (8x finer than bf16's)
}
# The stabilizer m is computed from the gates in float32 in every case (no bf16 tile involved).
M_TOL = 1e-5

DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NAMES = ("h", "c", "n", "m", "dq", "dk", "dv", "di", "df", "dc0", "dn0", "dm0")


def make_inputs(B, NH, S, DHQK, DHV, dtype, device=CPU_DEVICE, seed=SEED, i_scale=2.0, f_mean=3.0):
    """op_inputs.mlstm_inputs: q, k, v ~ N(0, 1); i ~ i_scale N(0, 1); f ~ N(f_mean, 1), in ``dtype``."""
    return mlstm_inputs(B, NH, S, DHQK, DHV, seed=seed, dtype=dtype, device=device, i_scale=i_scale, f_mean=f_mean)


def make_state(B, NH, DHQK, DHV, device=CPU_DEVICE, seed=SEED + 1):
    """A float32 initial state with independent random c, n and m ~ 3 N(0, 1) (op_inputs.mlstm_state)."""
    return mlstm_state(B, NH, DHQK, DHV, seed=seed, device=device)


def make_cotangents(B, NH, S, DHQK, DHV, h_dtype, device=CPU_DEVICE, seed=SEED + 2):
    """Random upstream gradients of (h, c, n, m). dh is rounded to h's dtype, as autograd does."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, NH, S, DHV, generator=g).to(h_dtype).to(device),  # dh (B, NH, S, DHV)
        torch.randn(B, NH, DHQK, DHV, generator=g).to(device),  # dc (B, NH, DHQK, DHV)
        torch.randn(B, NH, DHQK, generator=g).to(device),  # dn (B, NH, DHQK)
        torch.randn(B, NH, generator=g).to(device),  # dm (B, NH)
    )


def run_with_grads(fn, inputs, state, cotangents, compute_dtype=None, **kwargs):
    """Call ``fn``, backprop sum(<output, cotangent>) and return outputs + gradients in NAMES order."""
    cast = (lambda t: t.to(compute_dtype)) if compute_dtype is not None else (lambda t: t)
    xs = [cast(t).detach().clone().requires_grad_() for t in inputs]
    st = None if state is None else [cast(t).detach().clone().requires_grad_() for t in state]
    h, (c, n, m) = fn(*xs, st, **kwargs)
    loss = sum((o.double() * ct.double()).sum() for o, ct in zip((h, c, n, m), cotangents))
    loss.backward()
    grads = [x.grad for x in xs] + ([] if st is None else [t.grad for t in st])
    return [h, c, n, m] + grads


def check_against_reference(inputs, state, cotangents, dtype, tol=None, **kwargs):
    out = run_with_grads(chunk_mlstm, inputs, state, cotangents, **kwargs)
    ref = run_with_grads(naive_chunk_mlstm, inputs, state, cotangents, compute_dtype=torch.float64, **kwargs)
    assert out[0].dtype == inputs[2].dtype and all(t.dtype == torch.float32 for t in out[1:4])
    tol = TOL[dtype] if tol is None else tol
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, out, ref)}
    limits = {name: (M_TOL if name == "m" else tol) for name in errors}
    bad = {name: f"{err:.2e} > {limits[name]:.0e}" for name, err in errors.items() if not err <= limits[name]}
    assert not bad, f"relative errors too large: {bad} (all: { {k: f'{v:.1e}' for k, v in errors.items()} })"


# ---------------------------------------------------------------------------------------------
# CPU tier (interpreter): tiny shapes
# ---------------------------------------------------------------------------------------------

# (B, NH, S, DHQK, DHV, chunk_size, with_state): odd S, S not a multiple of the chunk, S < chunk
FP32_CASES = [
    pytest.param(1, 2, 1, 16, 16, 16, True, id="B1-NH2-S1-D16x16-L16-state"),
    pytest.param(2, 2, 5, 16, 32, 16, False, id="B2-NH2-S5-D16x32-L16"),
    pytest.param(1, 2, 37, 16, 32, 16, True, id="B1-NH2-S37-D16x32-L16-state"),
    pytest.param(1, 2, 37, 32, 16, 16, False, id="B1-NH2-S37-D32x16-L16"),
    pytest.param(2, 1, 33, 24, 40, 16, True, id="B2-NH1-S33-D24x40-L16-state"),  # dims not powers of two
    pytest.param(1, 1, 48, 16, 16, 32, True, id="B1-NH1-S48-D16x16-L32-state"),  # S a multiple of 16, not of 32
    pytest.param(1, 2, 32, 16, 16, 16, True, id="B1-NH2-S32-D16x16-L16-state"),  # S a multiple of the chunk
]


@pytest.mark.parametrize("B, NH, S, DHQK, DHV, chunk_size, with_state", FP32_CASES)
def test_chunk_fp32_matches_reference(B, NH, S, DHQK, DHV, chunk_size, with_state):
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    state = make_state(B, NH, DHQK, DHV) if with_state else None
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, torch.float32)
    check_against_reference(inputs, state, cotangents, torch.float32, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "dtype, S, with_state",
    [
        pytest.param(torch.bfloat16, 29, True, id="B1-NH2-S29-D32x32-L16-bf16-state"),
        pytest.param(torch.bfloat16, 21, False, id="B1-NH2-S21-D32x32-L16-bf16"),
        pytest.param(torch.float16, 29, True, id="B1-NH2-S29-D32x32-L16-fp16-state"),
    ],
)
def test_chunk_half_inputs_match_reference(dtype, S, with_state):
    B, NH, DHQK, DHV = 1, 2, 32, 32
    inputs = make_inputs(B, NH, S, DHQK, DHV, dtype)
    state = make_state(B, NH, DHQK, DHV) if with_state else None
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, dtype)
    check_against_reference(inputs, state, cotangents, dtype, chunk_size=16)


@pytest.mark.parametrize(
    "dtype, chunk_size, with_state",
    [
        pytest.param(torch.bfloat16, 128, True, id="B1-NH1-S200-D128x256-L128-bf16-state"),
        pytest.param(torch.float32, 64, False, id="B1-NH1-S200-D128x256-L64-fp32"),
    ],
)
def test_chunk_real_head_dims(dtype, chunk_size, with_state):
    """xLSTM head sizes with the default tiles (64 x 64, two time tiles per chunk of 128)."""
    B, NH, S, DHQK, DHV = 1, 1, 200, 128, 256
    inputs = make_inputs(B, NH, S, DHQK, DHV, dtype)
    state = make_state(B, NH, DHQK, DHV) if with_state else None
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, dtype)
    check_against_reference(inputs, state, cotangents, dtype, chunk_size=chunk_size)


def test_chunk_stabilizer_gradient_is_exact():
    """With a large eps, h depends on the stabilizer m_t (h = C~q / (max(|n~q|, 1) + eps e^{m_t}))
    and large input gates move m along its max branches: the gradient through m must be exact."""
    B, NH, S, DHQK, DHV = 1, 2, 37, 16, 16
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32, i_scale=6.0, f_mean=0.0)
    state = make_state(B, NH, DHQK, DHV)
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, torch.float32)
    check_against_reference(inputs, state, cotangents, torch.float32, chunk_size=16, eps=0.3)


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_chunk_loss_on_h_only(with_state):
    """The training path: the loss reads h alone, so the final state's gradients are None
    (HAS_DFINAL=False, no final-state terms in the gate scan). B*NH = 3, S = chunk + 1, head dims
    below 16 and not powers of two (padded tiles)."""
    B, NH, S, DHQK, DHV = 3, 1, 17, 20, 12
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    state = make_state(B, NH, DHQK, DHV) if with_state else None
    dh = make_cotangents(B, NH, S, DHQK, DHV, torch.float32)[:1]  # zip stops at h: loss = <h, dh>
    check_against_reference(inputs, state, dh, torch.float32, chunk_size=16)


@pytest.mark.parametrize(
    "i_scale, f_mean", [pytest.param(30.0, 3.0, id="i-30N"), pytest.param(30.0, 0.0, id="i-30N-f-0")]
)
def test_chunk_extreme_input_gates(i_scale, f_mean):
    """Input gates spread +-30 (e^{i} far beyond float32): the stabilizer keeps every exponent <= 0;
    outputs, states and every gradient stay at float32 accuracy (measured <= 6e-5)."""
    B, NH, S, DHQK, DHV = 1, 2, 37, 16, 16
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32, i_scale=i_scale, f_mean=f_mean)
    state = make_state(B, NH, DHQK, DHV)
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, torch.float32)
    check_against_reference(inputs, state, cotangents, torch.float32, chunk_size=16)


@pytest.mark.parametrize("f_mean", [-10.0, -30.0], ids=["f-10", "f-30"])
@pytest.mark.parametrize("final", [False, True], ids=["dh-only", "final-state-grads"])
def test_chunk_closed_forget_gates(f_mean, final):
    """Forget gates nearly closed (logsig(f) ~ -10, -30: the state forgets all but the last step).
    Every pair (query t, key s < t) is then ~e^{f} small and so is df, while the pair (t, t) and
    the final state's pair with the last key are not: df must come from the small terms alone.
    (Computed as a difference of the large ones, df's error was 3e-4 to 2e-3 of it at -10 and
    2e5 to 5e5 times it at -30. dh-only is the training case, final-state gradients the
    truncated-BPTT one.)"""
    B, NH, S, DHQK, DHV = 1, 2, 37, 16, 16
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32, i_scale=1.0, f_mean=f_mean)
    state = make_state(B, NH, DHQK, DHV)
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, torch.float32)
    if not final:
        cotangents = (cotangents[0], *(torch.zeros_like(c) for c in cotangents[1:]))
    check_against_reference(inputs, state, cotangents, torch.float32, chunk_size=16)


@pytest.mark.parametrize("f_mean", [-20.0, -30.0], ids=["f-20", "f-30"])
@pytest.mark.parametrize("final", [False, True], ids=["dh-only", "final-state-grads"])
def test_chunk_fp16_closed_forget_gates_under_a_loss_scale(f_mean, final):
    """float16 training scales the loss (torch.amp.GradScaler) so that gradients stay in float16's
    range. With forget gates nearly closed the pair weights (e^-20, e^-30) lie below float16's
    smallest subnormal (6e-8): rounded into the products' float16 tiles as they were, they flushed
    to zero and left df, dc0 and dm0 at ~0 (relative errors 0.6-1.0 at -20 with a loss scale of
    1024). The tiles are now scaled by powers of two per row or column (mm_rows / mm_cols): df
    within 2e-3 at -20 (measured 5.6e-4; 4.3e-3 with the state-gradient tiles of dk unscaled, 1e-3
    with dq's or dk's pair tiles unscaled). At -30 df itself (~e^-30 times the scale) is below
    float16's range in the returned gradient, whatever the kernel does: it is left out there, and
    the float32 state gradients dc0, dn0, dm0 are checked."""
    check_fp16_closed_forget_gates(f_mean, final, (1, 2, 37, 16, 16), chunk_size=16)


def check_fp16_closed_forget_gates(f_mean, final, shape, chunk_size, device=CPU_DEVICE):
    """float16 inputs, forget gates at ``f_mean``, cotangents times a loss scale of 1024."""
    B, NH, S, DHQK, DHV = shape
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float16, device=device, i_scale=1.0, f_mean=f_mean)
    state = make_state(B, NH, DHQK, DHV, device=device)
    cotangents = tuple(c * 1024.0 for c in make_cotangents(B, NH, S, DHQK, DHV, torch.float16, device=device))
    if not final:
        cotangents = (cotangents[0], *(torch.zeros_like(c) for c in cotangents[1:]))
    out = run_with_grads(chunk_mlstm, inputs, state, cotangents, chunk_size=chunk_size)
    ref = run_with_grads(naive_chunk_mlstm, inputs, state, cotangents, compute_dtype=torch.float64,
                         chunk_size=chunk_size)
    errors = {name: rel_err(a, b) for name, a, b in zip(NAMES, out, ref) if not (name == "df" and f_mean < -25)}
    limits = {name: M_TOL if name == "m" else 2e-3 if name == "df" else TOL[torch.float16] for name in errors}
    assert all(errors[n] <= limits[n] for n in errors), {n: f"{e:.1e}" for n, e in errors.items()}


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "no-state"])
def test_chunk_tiles_inside_a_chunk(with_state):
    """Several tiles everywhere: a chunk of 2 time tiles (chunk 32 = 2 x 16; the public function
    does this for chunks >= 128), DHQK = 40 in 3 tiles of 16 (partial q.dq, k.dk sums) and
    DHV = 24 in 2 tiles, the last ones partial."""
    B, NH, S, DHQK, DHV = 1, 2, 45, 40, 24
    params = ChunkMLSTMLaunch(
        chunk_size=32, block_t=16, block_dqk=16, block_dv=16, block_t_prep=16, block_t_gates=16
    )
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    state = make_state(B, NH, DHQK, DHV) if with_state else None
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, torch.float32)
    BH = B * NH

    def tiled(q, k, v, i, f, st, **_):
        if st is None:
            c0 = n0 = m0 = None
        else:
            c0, n0, m0 = st[0].reshape(BH, DHQK, DHV), st[1].reshape(BH, DHQK), st[2].reshape(BH)
        h, c, n, m = ChunkMLSTMFunction.apply(
            q.reshape(BH, S, DHQK), k.reshape(BH, S, DHQK), v.reshape(BH, S, DHV), i.reshape(BH, S), f.reshape(BH, S),
            c0, n0, m0, params, 1e-6,
        )
        return h.view(B, NH, S, DHV), (c.view(B, NH, DHQK, DHV), n.view(B, NH, DHQK), m.view(B, NH))

    out = run_with_grads(tiled, inputs, state, cotangents)
    ref = run_with_grads(naive_chunk_mlstm, inputs, state, cotangents, compute_dtype=torch.float64)
    for name, a, b in zip(NAMES, out, ref):
        assert rel_err(a, b) <= (M_TOL if name == "m" else TOL[torch.float32]), name


def test_chunk_state_passing_equals_whole_sequence():
    """Two calls carrying (c, n, m) give the same outputs as one call over the whole sequence."""
    B, NH, S, DHQK, DHV = 1, 2, 37, 16, 16
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    h, (c, n, m) = chunk_mlstm(q, k, v, i, f, chunk_size=16)
    cut = 19
    h1, st1 = chunk_mlstm(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], i[:, :, :cut], f[:, :, :cut], chunk_size=16)
    h2, (c2, n2, m2) = chunk_mlstm(
        q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], i[:, :, cut:], f[:, :, cut:], st1, chunk_size=16
    )
    assert rel_err(torch.cat([h1, h2], dim=2), h) <= TOL[torch.float32]
    for a, b in ((c2, c), (n2, n), (m2, m)):
        assert rel_err(a, b) <= TOL[torch.float32]


def test_chunk_zero_state_equals_none():
    B, NH, S, DHQK, DHV = 1, 2, 20, 16, 16
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    zeros = (torch.zeros(B, NH, DHQK, DHV), torch.zeros(B, NH, DHQK), torch.zeros(B, NH))
    h0, st0 = chunk_mlstm(*inputs, chunk_size=16)
    hz, stz = chunk_mlstm(*inputs, zeros, chunk_size=16)
    assert rel_err(hz, h0) <= 1e-6
    for a, b in zip(stz, st0):
        assert rel_err(a, b) <= 1e-6


def test_chunk_through_the_backend_registry():
    B, NH, S, DHQK, DHV = 1, 2, 9, 16, 16
    inputs = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    # (the registry dict, not kernels.mlstm(): importing the kernels.mlstm subpackage shadows that function)
    h, _ = MLSTM_BACKENDS["triton"](*inputs, chunk_size=16)
    h_ref, _ = chunk_mlstm(*inputs, chunk_size=16)
    assert torch.equal(h, h_ref)


@pytest.mark.parametrize("backend", ["torch", "triton", "auto", "custom_op"])
def test_cell_names_an_argument_that_is_not_a_tensor(backend):
    """A numpy array or list reached the backends, which read .device / .is_cuda first: an
    AttributeError ('str' object has no attribute 'type') or the contract's 'k is on cpu but q is
    on cpu'. Every backend now answers with one TypeError naming the argument."""
    from xlstm_export.kernels import mlstm_cell

    q, k, v, i, f = make_inputs(1, 2, 3, 16, 16, torch.float32)
    c, n, m = make_state(1, 2, 16, 16)
    with pytest.raises(TypeError, match=r"^mlstm_cell: q must be a tensor, got ndarray$"):
        mlstm_cell(q.numpy(), k, v, i, f, backend=backend)
    with pytest.raises(TypeError, match=r"^mlstm_cell: f must be a tensor, got list$"):
        mlstm_cell(q, k, v, i, f.tolist(), backend=backend)
    with pytest.raises(TypeError, match=r"^mlstm_cell: state n must be a tensor, got NoneType$"):
        mlstm_cell(q, k, v, i, f, (c, None, m), backend=backend)


def test_triton_refuses_meta_tensors():
    """Under the interpreter every non-CUDA device passed require_triton, so meta tensors ended in
    'Cannot copy out of meta tensor; no data!' from inside the launch."""
    from xlstm_export.kernels import mlstm_cell

    inputs = [t.to("meta") for t in make_inputs(1, 2, 3, 16, 16, torch.float32)]
    with pytest.raises(RuntimeError, match=r"got tensors on meta; Triton runs on CUDA, or on CPU only under"):
        mlstm_cell(*inputs, backend="triton")


@pytest.mark.parametrize(
    "dtype, B, NH, DHQK, DHV",
    [
        pytest.param(torch.float32, 2, 3, 16, 32, id="B2-NH3-D16x32-fp32"),
        pytest.param(torch.float32, 1, 2, 24, 40, id="B1-NH2-D24x40-fp32"),
        pytest.param(torch.bfloat16, 1, 2, 32, 16, id="B1-NH2-D32x16-bf16"),
    ],
)
def test_step_matches_reference(dtype, B, NH, DHQK, DHV):
    q, k, v, i, f = make_inputs(B, NH, 1, DHQK, DHV, dtype)
    state = make_state(B, NH, DHQK, DHV)
    h, (c, n, m) = fused_recurrent_step_mlstm(q, k, v, i, f, state)
    h_ref, (c_ref, n_ref, m_ref) = naive_step_mlstm(
        *(t.double() for t in (q, k, v, i, f)), tuple(t.double() for t in state)
    )
    assert h.dtype == dtype and h.shape == (B, NH, 1, DHV)
    # the state update has no bf16 tile: float32 tolerance for c, n, m whatever the input dtype
    assert rel_err(h, h_ref) <= TOL[dtype]
    assert rel_err(c, c_ref) <= TOL[torch.float32]
    assert rel_err(n, n_ref) <= TOL[torch.float32]
    assert rel_err(m, m_ref) <= M_TOL


def test_steps_continue_a_chunked_prefix():
    """Decoding: chunk_mlstm over a prefix, then single steps, equals chunk_mlstm over everything."""
    B, NH, S, DHQK, DHV = 1, 2, 23, 16, 16
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, torch.float32)
    h_all, (c_all, n_all, m_all) = chunk_mlstm(q, k, v, i, f, chunk_size=16)
    prefix = 20
    h_pre, state = chunk_mlstm(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix], i[:, :, :prefix],
                               f[:, :, :prefix], chunk_size=16)
    hs = [h_pre]
    for t in range(prefix, S):
        sl = slice(t, t + 1)
        h_t, state = fused_recurrent_step_mlstm(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], state)
        hs.append(h_t)
    assert rel_err(torch.cat(hs, dim=2), h_all) <= TOL[torch.float32]
    for a, b in zip(state, (c_all, n_all, m_all)):
        assert rel_err(a, b) <= TOL[torch.float32]


def test_input_validation():
    q, k, v, i, f = make_inputs(1, 2, 5, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=r"k must be \(B, NH, S, DHQK\)"):
        chunk_mlstm(q, k[:, :, :4], v, i, f)
    with pytest.raises(ValueError, match=r"v must be \(B, NH, S, DHV\)"):
        chunk_mlstm(q, k, v[:, :1], i, f)
    with pytest.raises(ValueError, match=r"f must be \(B, NH, S\)"):
        chunk_mlstm(q, k, v, i, f[..., None])
    with pytest.raises(ValueError, match="share one dtype"):
        chunk_mlstm(q, k.bfloat16(), v, i, f)
    with pytest.raises(ValueError, match="power of two >= 16"):
        chunk_mlstm(q, k, v, i, f, chunk_size=24)
    with pytest.raises(ValueError, match="power of two >= 16"):
        chunk_mlstm(q, k, v, i, f, chunk_size=8)
    bad_state = (torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"state c must be \(1, 2, 16, 16\)"):
        chunk_mlstm(q, k, v, i, f, bad_state)
    half_state = (torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16), torch.zeros(1, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="state m must be float32"):
        chunk_mlstm(q, k, v, i, f, half_state)
    with pytest.raises(ValueError, match="eps must be"):
        chunk_mlstm(q, k, v, i, f, eps=-1.0)
    state = make_state(1, 2, 16, 16)
    with pytest.raises(ValueError, match="needs S == 1"):
        fused_recurrent_step_mlstm(q, k, v, i, f, state)
    with pytest.raises(ValueError, match="state is required"):
        fused_recurrent_step_mlstm(q[:, :, :1], k[:, :, :1], v[:, :, :1], i[:, :, :1], f[:, :, :1], None)


# The interpreter is lenient (any tile shape, mixed dtypes in tl.dot, ...): compile every kernel
# for sm_90 ahead of time, without a GPU, in a fresh process where TRITON_INTERPRET is unset.
_COMPILE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xlstm_export.kernels.mlstm import chunk as ck, fused_recurrent as fr

def compile_(fn, dt, constexprs, num_warps):
    io = ("q_ptr", "k_ptr", "v_ptr", "h_ptr", "dh_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "i_ptr", "f_ptr")
    def ty(n):
        if n in constexprs: return "constexpr"
        if n in io: return "*" + dt
        if n.endswith("_ptr"): return "*fp32"
        return "fp32" if n in ("scale", "eps") else "i32"
    src = ASTSource(fn=fn, signature={n: ty(n) for n in fn.arg_names}, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=2))
    return k.asm["ptx"]

for dt in ("bf16", "fp32"):
    p = ck.chunk_mlstm_launch_params(4096, 128, 256, 128)  # the TFLA benchmark's heads, chunk 128
    t = dict(DHQK=128, DHV=256, L=p.chunk_size, BL=p.block_t, BK=p.block_dqk, BV=p.block_dv, DOT_PREC="ieee")
    w = p.num_warps
    compile_(ck.chunk_mlstm_fwd_gates_kernel, dt, dict(L=p.chunk_size), 4)
    for has in (True, False):
        compile_(ck.chunk_mlstm_fwd_state_kernel, dt, dict(t, HAS_STATE=has), w)
        compile_(ck.chunk_mlstm_bwd_state_kernel, dt, dict(t, HAS_DFINAL=has), w)
        compile_(ck.chunk_mlstm_bwd_gates_kernel, dt, dict(NK=2, BT=256, HAS_STATE=has), 4)
    ptx_fwd = compile_(ck.chunk_mlstm_fwd_kernel, dt, t, w)
    ptx_bwd = compile_(ck.chunk_mlstm_bwd_kernel, dt, t, w)
    compile_(ck.chunk_mlstm_bwd_prep_kernel, dt, dict(DHV=256, BT=p.block_t_prep, BV=p.block_dv), 4)
    if dt == "bf16":  # the tiles run on the Hopper tensor cores
        assert "wgmma" in ptx_fwd and "wgmma" in ptx_bwd, "no wgmma in the bf16 chunk kernels"
    q = fr.step_mlstm_launch_params(256, 512)
    compile_(fr.fused_recurrent_step_mlstm_fwd_kernel, dt,
             dict(DHQK=256, DHV=512, BK=q.block_dqk, BV=q.block_dv, ROUND="ieee"), q.num_warps)
print("compiled")
"""


def test_kernels_compile_for_sm90():
    import shutil
    import subprocess
    import sys

    try:
        import triton.backends.nvidia as nvidia_backend
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    bundled_ptxas = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "ptxas")
    if not (os.path.exists(bundled_ptxas) or shutil.which("ptxas")):
        pytest.skip("no ptxas (bundled with triton or on PATH) to assemble the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# GPU tier: compiled, real shapes
# ---------------------------------------------------------------------------------------------

GPU_CASES = [
    pytest.param(2, 4, 1000, 128, 256, torch.bfloat16, True, id="B2-NH4-S1000-D128x256-bf16-state"),
    pytest.param(2, 4, 4099, 128, 256, torch.bfloat16, False, id="B2-NH4-S4099-D128x256-bf16"),
    pytest.param(2, 4, 1000, 128, 256, torch.float32, False, id="B2-NH4-S1000-D128x256-fp32"),
    pytest.param(2, 4, 4099, 128, 256, torch.float32, True, id="B2-NH4-S4099-D128x256-fp32-state"),
    pytest.param(1, 2, 777, 256, 256, torch.bfloat16, True, id="B1-NH2-S777-D256x256-bf16-state"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("B, NH, S, DHQK, DHV, dtype, with_state", GPU_CASES)
@pytest.mark.parametrize("chunk_size", [64, 128])
def test_chunk_gpu_matches_reference(B, NH, S, DHQK, DHV, dtype, with_state, chunk_size):
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset)")
    dev = "cuda"
    # gates as in trained models: the forget gate mostly open, input gates spread
    inputs = make_inputs(B, NH, S, DHQK, DHV, dtype, device=dev)
    state = make_state(B, NH, DHQK, DHV, device=dev) if with_state else None
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, dtype, device=dev)
    check_against_reference(inputs, state, cotangents, dtype, chunk_size=chunk_size)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunk_gpu_closed_forget_gates(dtype):
    """test_chunk_closed_forget_gates compiled, at a model's head sizes and chunk 64."""
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset)")
    B, NH, S, DHQK, DHV = 2, 4, 200, 64, 128
    inputs = make_inputs(B, NH, S, DHQK, DHV, dtype, device="cuda", i_scale=1.0, f_mean=-30.0)
    state = make_state(B, NH, DHQK, DHV, device="cuda")
    cotangents = make_cotangents(B, NH, S, DHQK, DHV, dtype, device="cuda")
    check_against_reference(inputs, state, cotangents, dtype, chunk_size=64)


@pytest.mark.gpu
@pytest.mark.parametrize("f_mean", [-20.0, -30.0], ids=["f-20", "f-30"])
def test_chunk_gpu_fp16_closed_forget_gates_under_a_loss_scale(f_mean):
    """test_chunk_fp16_closed_forget_gates_under_a_loss_scale compiled, at a model's head sizes."""
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset)")
    check_fp16_closed_forget_gates(f_mean, True, (2, 4, 200, 64, 128), chunk_size=64, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_gpu_matches_reference(dtype):
    if not torch.cuda.is_available() or INTERPRET:
        pytest.skip("needs a CUDA GPU with compiled Triton (TRITON_INTERPRET unset)")
    B, NH, DHQK, DHV = 4, 8, 256, 512
    q, k, v, i, f = make_inputs(B, NH, 1, DHQK, DHV, dtype, device="cuda")
    state = make_state(B, NH, DHQK, DHV, device="cuda")
    h, (c, n, m) = fused_recurrent_step_mlstm(q, k, v, i, f, state)
    h_ref, (c_ref, n_ref, m_ref) = naive_step_mlstm(
        *(t.double() for t in (q, k, v, i, f)), tuple(t.double() for t in state)
    )
    assert rel_err(h, h_ref) <= TOL[dtype]
    assert rel_err(c, c_ref) <= TOL[torch.float32]
    assert rel_err(n, n_ref) <= TOL[torch.float32]
    assert rel_err(m, m_ref) <= M_TOL
