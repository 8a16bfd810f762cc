"""The mLSTM reference forms (kernels/mlstm/naive.py): agreement, state passing, gradients,
parity with the NX-AI `mlstm_kernels` native kernels, dtypes and input validation.

Errors are relative: max |actual - expected| / max |expected| over the whole tensor.
"""

from __future__ import annotations

import pytest
import torch

from op_inputs import mlstm_inputs, mlstm_state, rel_err
from xlstm_export.kernels.mlstm.naive import (
    naive_chunk_mlstm,
    naive_parallel_mlstm,
    naive_recurrent_mlstm,
    naive_step_mlstm,
)

SEED = 1234

# Relative tolerance of a form against the float64 recurrent form, per compute dtype.
TOL = {
    torch.float64: 1e-10,  # same math in a different order: rounding only
    # the 1e-5. The margin is thin by nature: h = C^T q / |n^T q| and on random q, k the
    # dot product n^T q cancels (|q| |n| / |n^T q| reaches ~70 in these cases), which amplifies
    # float32 rounding in ANY float32 evaluation, the step loop included; worst seen 8.9e-6.
    torch.float32: 1e-5,
}
# Gradients in float64: the forms differentiate different (equal) expressions.
GRAD_TOL = 1e-11  # observed ~2e-14

FORMS = {
    "parallel": naive_parallel_mlstm,
    "chunk": naive_chunk_mlstm,
    "recurrent": naive_recurrent_mlstm,
}

DTYPE_ID = {torch.float32: "fp32", torch.float64: "fp64"}


def make_inputs(B, NH, S, DHQK, DHV, dtype=torch.float64, seed=SEED, f_mean=3.0):
    """op_inputs.mlstm_inputs drawn in float64 (float32-representable values, so a float32 run and
    the float64 reference see the same inputs and the error measures the arithmetic only)."""
    return mlstm_inputs(B, NH, S, DHQK, DHV, seed=seed, dtype=dtype, f_mean=f_mean, draw_dtype=torch.float64)


def make_state(kind, B, NH, DHQK, DHV, seed=SEED + 1):
    """A float64 initial state (op_inputs.mlstm_state): None, "prefix" or "random"."""
    return mlstm_state(B, NH, DHQK, DHV, kind, seed=seed, dtype=torch.float64, draw_dtype=torch.float64)


def as_dtype(state, dtype):
    return None if state is None else tuple(t.to(dtype) for t in state)


# (B, NH, S, DHQK, DHV, chunk_size): odd S, S not a multiple of the chunk, DHQK != DHV
SHAPES = [
    (1, 1, 1, 8, 8, 4),
    (2, 2, 7, 8, 16, 4),
    (1, 3, 33, 16, 8, 16),
    (2, 4, 63, 16, 16, 16),
    (1, 2, 65, 8, 24, 64),
    (2, 2, 64, 12, 20, 16),  # exact multiple of the chunk size
    (1, 2, 129, 16, 32, 64),
    (1, 2, 17, 8, 8, 1),  # chunk of one step
    (1, 1, 9, 8, 8, 64),  # chunk longer than the sequence
    (1, 2, 301, 8, 16, 64),  # model-test lengths: 4 full chunks + 45
]


def shape_id(B, NH, S, DHQK, DHV, L):
    return f"B{B}-S{S}-NH{NH}-DQK{DHQK}-DV{DHV}-L{L}"


CASES = [
    pytest.param(*shape, dtype, kind, id=f"{shape_id(*shape)}-{DTYPE_ID[dtype]}-state_{kind}")
    for shape in SHAPES
    for dtype in (torch.float32, torch.float64)
    for kind in ("none", "prefix", "random")
    if shape[2] < 300 or kind == "prefix"  # one state kind for the long case keeps the suite fast
]


@pytest.mark.parametrize("B, NH, S, DHQK, DHV, chunk_size, dtype, state_kind", CASES)
def test_forms_agree(B, NH, S, DHQK, DHV, chunk_size, dtype, state_kind):
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV)
    state = make_state(state_kind, B, NH, DHQK, DHV)
    h_ref, state_ref = naive_recurrent_mlstm(q, k, v, i, f, state)  # float64 truth

    args = tuple(t.to(dtype) for t in (q, k, v, i, f))
    for name, fn in FORMS.items():
        h, (c, n, m) = fn(*args, as_dtype(state, dtype), chunk_size=chunk_size)
        assert h.shape == (B, NH, S, DHV) and h.dtype == dtype, name
        assert c.shape == (B, NH, DHQK, DHV) and n.shape == (B, NH, DHQK) and m.shape == (B, NH)
        assert c.dtype == n.dtype == m.dtype == dtype, name
        for what, a, e in (("h", h, h_ref), ("c", c, state_ref[0]), ("n", n, state_ref[1]), ("m", m, state_ref[2])):
            err = rel_err(a, e)
            assert err < TOL[dtype], f"{name} {what}: rel err {err:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("f_mean", [-1.0, 0.0, 6.0], ids=["f-strong-forget", "f-half", "f-keep"])
def test_forms_agree_gate_regimes(f_mean):
    """Strong forgetting (tiny f, the exp(-m) branch of the denominator) and near-1 forgetting."""
    q, k, v, i, f = make_inputs(2, 2, 45, 8, 12, f_mean=f_mean)
    state = make_state("prefix", 2, 2, 8, 12)
    h_ref, s_ref = naive_recurrent_mlstm(q, k, v, i, f, state)
    for name, fn in FORMS.items():
        h, s = fn(q, k, v, i, f, state, chunk_size=8)
        for a, e in zip((h, *s), (h_ref, *s_ref)):
            assert rel_err(a, e) < TOL[torch.float64], name


def test_unstabilized_math():
    """Independent statement of the math in float64 without the stabilizer m (short sequence,
    eps = 0): C~ = sigmoid(f) C~ + exp(i) k v^T, h = C~^T q / max(|n~^T q|, 1)."""
    B, NH, S, DHQK, DHV = 2, 3, 21, 8, 4
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV)
    c = torch.zeros(B, NH, DHQK, DHV, dtype=torch.float64)
    n = torch.zeros(B, NH, DHQK, dtype=torch.float64)
    hs = []
    for t in range(S):
        fg = torch.sigmoid(f[:, :, t])[..., None]  # (B, NH, 1)
        ig = torch.exp(i[:, :, t])[..., None]  # (B, NH, 1)
        c = fg[..., None] * c + ig[..., None] * k[:, :, t, :, None] * v[:, :, t, None, :]
        n = fg * n + ig * k[:, :, t]
        qs = q[:, :, t] / DHQK**0.5  # (B, NH, DHQK)
        num = torch.einsum("bnd,bndv->bnv", qs, c)
        den = (qs * n).sum(-1, keepdim=True).abs().clamp_min(1.0)
        hs.append(num / den)
    h_ref = torch.stack(hs, dim=2)  # (B, NH, S, DHV)
    for name, fn in FORMS.items():
        h, (c_out, n_out, m_out) = fn(q, k, v, i, f, None, chunk_size=4, eps=0.0)
        assert rel_err(h, h_ref) < 1e-12, name
        # the state is the unstabilized state times exp(-m)
        assert rel_err(c_out * m_out.exp()[..., None, None], c) < 1e-12, name
        assert rel_err(n_out * m_out.exp()[..., None], n) < 1e-12, name


def test_non_contiguous_inputs():
    """Inputs that are views (e.g. (B, S, NH, D) transposed to head-first) give the same result."""
    B, NH, S, DHQK, DHV = 2, 3, 21, 8, 4
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=torch.float32)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # (B, NH, S, D) views
    views += [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (i, f)]  # (B, NH, S) views
    assert not views[0].is_contiguous()
    state = as_dtype(make_state("prefix", B, NH, DHQK, DHV), torch.float32)
    for name, fn in FORMS.items():
        h0, s0 = fn(q, k, v, i, f, state, chunk_size=8)
        h1, s1 = fn(*views, state, chunk_size=8)
        assert rel_err(h1, h0) < 1e-6 and all(rel_err(a, e) < 1e-6 for a, e in zip(s1, s0)), name


def test_step_matches_recurrent():
    B, NH, S, DHQK, DHV = 2, 3, 13, 8, 16
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV)
    state = make_state("prefix", B, NH, DHQK, DHV)
    h_ref, s_ref = naive_recurrent_mlstm(q, k, v, i, f, state)
    s, hs = state, []
    for t in range(S):
        sl = slice(t, t + 1)
        h_t, s = naive_step_mlstm(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], s)
        assert h_t.shape == (B, NH, 1, DHV)
        hs.append(h_t)
    assert rel_err(torch.cat(hs, dim=2), h_ref) == 0.0
    for a, e in zip(s, s_ref):
        assert rel_err(a, e) == 0.0


def test_zero_state_equals_none():
    B, NH, S, DHQK, DHV = 2, 2, 19, 8, 8
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=torch.float32)
    zeros = (torch.zeros(B, NH, DHQK, DHV), torch.zeros(B, NH, DHQK), torch.zeros(B, NH))
    for name, fn in FORMS.items():
        h0, s0 = fn(q, k, v, i, f, None, chunk_size=8)
        h1, s1 = fn(q, k, v, i, f, zeros, chunk_size=8)
        assert torch.equal(h0, h1), name
        for a, b in zip(s0, s1):
            assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "splits, dtype",
    [
        pytest.param((1, 6), torch.float64, id="S7-split1+6-fp64"),
        pytest.param((13, 20, 30), torch.float64, id="S63-split13+20+30-fp64"),
        pytest.param((31, 1, 33), torch.float32, id="S65-split31+1+33-fp32"),
    ],
)
def test_state_passing(splits, dtype):
    """Running pieces and carrying the state (every form, mixed) equals the whole sequence."""
    B, NH, DHQK, DHV = 2, 2, 8, 12
    S = sum(splits)
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=dtype)
    state0 = as_dtype(make_state("prefix", B, NH, DHQK, DHV), dtype)
    h_ref, s_ref = naive_chunk_mlstm(q, k, v, i, f, state0, chunk_size=16)
    for order in (["chunk", "chunk", "chunk"], ["parallel", "recurrent", "chunk"], ["recurrent", "chunk", "parallel"]):
        s, hs, start = state0, [], 0
        for piece, name in zip(splits, order):
            sl = slice(start, start + piece)
            h, s = FORMS[name](q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl], f[:, :, sl], s, chunk_size=16)
            hs.append(h)
            start += piece
        assert rel_err(torch.cat(hs, dim=2), h_ref) < TOL[dtype], order
        for a, e in zip(s, s_ref):
            assert rel_err(a, e) < TOL[dtype], order


def _grads(fn, inputs, state, chunk_size, seed=SEED + 7):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    state = [t.detach().clone().requires_grad_(True) for t in state]
    h, (c, n, m) = fn(*inputs, tuple(state), chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed)
    # random cotangents for h and every final state component (drawn in float64 whatever the dtype)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum() for t in (h, c, n, m))
    loss.backward()
    return [t.grad for t in inputs + state]


@pytest.mark.parametrize(
    "B, NH, S, DHQK, DHV, chunk_size",
    [
        pytest.param(1, 2, 7, 8, 8, 4, id="B1-S7-NH2-D8-L4-fp64"),
        pytest.param(2, 2, 33, 8, 16, 16, id="B2-S33-NH2-DQK8-DV16-L16-fp64"),
        pytest.param(1, 1, 40, 16, 8, 16, id="B1-S40-NH1-DQK16-DV8-L16-fp64"),
    ],
)
@pytest.mark.parametrize("state_kind", ["prefix", "random"])
def test_gradients_match_recurrent(B, NH, S, DHQK, DHV, chunk_size, state_kind):
    inputs = make_inputs(B, NH, S, DHQK, DHV)
    state = make_state(state_kind, B, NH, DHQK, DHV)
    ref = _grads(naive_recurrent_mlstm, inputs, state, chunk_size)
    names = ["q", "k", "v", "i", "f", "c0", "n0", "m0"]
    for form in ("chunk", "parallel"):
        got = _grads(FORMS[form], inputs, state, chunk_size)
        for name, a, e in zip(names, got, ref):
            assert a is not None and e is not None, name
            assert e.abs().max() > 0, f"gradient of {name} is zero: the test would be vacuous"
            err = rel_err(a, e)
            assert err < GRAD_TOL, f"{form} d{name}: rel err {err:.3g}"


@pytest.mark.parametrize("f_mean", [-10.0, -30.0], ids=["f-10", "f-30"])
def test_float32_gradients_with_closed_forget_gates(f_mean):
    """The chunk and parallel forms in float32 (the chunk form is the CPU training path), forget
    gates nearly closed, against the float64 recurrent form. df is then ~e^f small; taken as the
    gradient of b_t - b_s = cumsum differences, the diagonal's b_t - b_t split into two large
    terms whose float32 rounding swamped it (chunk form: rel err 5e-5 at -10, 0.7-1.3 at -30)."""
    B, NH, S, DHQK, DHV = 1, 2, 45, 8, 12
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, f_mean=f_mean)
    state = make_state("prefix", B, NH, DHQK, DHV)
    ref = _grads(naive_recurrent_mlstm, (q, k, v, i, f), state, 16)
    assert ref[4].abs().max() > 0
    for form in ("chunk", "parallel"):
        got = _grads(FORMS[form], [t.float() for t in (q, k, v, i, f)], [t.float() for t in state], 16)
        for name, a, e in zip(["q", "k", "v", "i", "f", "c0", "n0", "m0"], got, ref):
            err = rel_err(a.double(), e)
            assert err < 1e-4, f"{form} d{name}: rel err {err:.3g}"


def test_gradcheck_chunk():
    """Autograd of the chunk form against finite differences (tiny float64 case)."""
    B, NH, S, DHQK, DHV = 1, 1, 6, 3, 2
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV)
    c0, n0, m0 = make_state("prefix", B, NH, DHQK, DHV)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, i, f, c0, n0, m0)]

    def fn(q, k, v, i, f, c0, n0, m0):
        h, (c, n, m) = naive_chunk_mlstm(q, k, v, i, f, (c0, n0, m0), chunk_size=4)
        return h, c, n, m

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# parity with the NX-AI mlstm_kernels native torch kernels (the oracle)
# ---------------------------------------------------------------------------------------------

ORACLE_SHAPES = [
    pytest.param(2, 2, 63, 16, 16, 16, id="B2-S63-NH2-D16-L16"),
    pytest.param(1, 3, 33, 8, 24, 4, id="B1-S33-NH3-DQK8-DV24-L4"),
    pytest.param(1, 2, 129, 32, 16, 64, id="B1-S129-NH2-DQK32-DV16-L64"),
]

# Oracle tolerances per dtype
ORACLE_TOL = {
    torch.float64: 1e-10,
    # float32: two independent float32 implementations, thin margin for the n^T q cancellation
    # explained at TOL (worst seen here 6.4e-6)
    torch.float32: 1e-5,
}


@pytest.mark.parametrize("B, NH, S, DHQK, DHV, chunk_size", ORACLE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_oracle_parallel_native(B, NH, S, DHQK, DHV, chunk_size, dtype):
    """mlstm_kernels `parallel--native_autograd` (fresh sequence, no state support).

    Its stabilizer is the row max of log D alone, ours also includes b_t + m_0 (m_0 = 0), which
    moves h only through eps (at most eps relative). In float64 we compare with eps = 0, where the
    two are the same function, at 1e-10; in float32 with the default eps at 1e-5."""
    mk = pytest.importorskip("mlstm_kernels.torch", reason="oracle needs mlstm_kernels")
    kernel = mk.get_mlstm_kernel("parallel--native_autograd")
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=dtype)
    eps = 0.0 if dtype == torch.float64 else 1e-6
    h_oracle = kernel(q=q, k=k, v=v, i=i, f=f, eps=eps)
    h, _ = naive_chunk_mlstm(q, k, v, i, f, chunk_size=chunk_size, eps=eps)
    err = rel_err(h, h_oracle)
    assert err < ORACLE_TOL[dtype], f"rel err {err:.3g}"


@pytest.mark.parametrize("B, NH, S, DHQK, DHV, chunk_size", ORACLE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("state_kind", ["none", "prefix", "random"])
def test_oracle_recurrent_native(B, NH, S, DHQK, DHV, chunk_size, dtype, state_kind):
    """mlstm_kernels native recurrent sequence kernel, with and without an initial state:
    outputs and final states."""
    pytest.importorskip("mlstm_kernels", reason="oracle needs mlstm_kernels")
    from mlstm_kernels.torch.recurrent.native_sequence import mlstm_recurrent_sequence__native_fw

    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=dtype)
    state = as_dtype(make_state(state_kind, B, NH, DHQK, DHV), dtype)
    init = {}
    if state is not None:
        init = dict(c_initial=state[0], n_initial=state[1], m_initial=state[2][..., None])
    h_o, (c_o, n_o, m_o) = mlstm_recurrent_sequence__native_fw(
        q, k, v, i, f, **init, return_last_states=True, eps=1e-6, dtype_state=dtype
    )
    h, (c, n, m) = naive_chunk_mlstm(q, k, v, i, f, state, chunk_size=chunk_size)
    for what, a, e in (("h", h, h_o), ("c", c, c_o), ("n", n, n_o), ("m", m, m_o.squeeze(-1))):
        err = rel_err(a, e)
        assert err < ORACLE_TOL[dtype], f"{what}: rel err {err:.3g}"


@pytest.mark.parametrize("state_kind", ["none", "prefix"])
@pytest.mark.parametrize(
    "B, NH, S, DHQK, DHV, chunk_size",
    [
        pytest.param(2, 2, 64, 16, 16, 16, id="B2-S64-NH2-D16-L16"),
        pytest.param(1, 2, 128, 8, 32, 64, id="B1-S128-NH2-DQK8-DV32-L64"),
    ],
)
def test_oracle_chunkwise_native(B, NH, S, DHQK, DHV, chunk_size, state_kind):
    """mlstm_kernels `chunkwise--native_autograd` (needs S divisible by the chunk size), float32,
    with and without an initial state: outputs and final states."""
    mk = pytest.importorskip("mlstm_kernels.torch", reason="oracle needs mlstm_kernels")
    kernel = mk.get_mlstm_kernel("chunkwise--native_autograd")
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=torch.float32)
    state = as_dtype(make_state(state_kind, B, NH, DHQK, DHV), torch.float32)
    init = {}
    if state is not None:
        init = dict(c_initial=state[0], n_initial=state[1], m_initial=state[2][..., None])
    h_o, (c_o, n_o, m_o) = kernel(
        q=q, k=k, v=v, i=i, f=f, **init, return_last_states=True, chunk_size=chunk_size, eps=1e-6
    )
    h, (c, n, m) = naive_chunk_mlstm(q, k, v, i, f, state, chunk_size=chunk_size)
    for what, a, e in (("h", h, h_o), ("c", c, c_o), ("n", n, n_o), ("m", m, m_o.reshape(B, NH))):
        err = rel_err(a, e)
        assert err < ORACLE_TOL[torch.float32], f"{what}: rel err {err:.3g}"


# ---------------------------------------------------------------------------------------------
# dtypes and input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs(dtype):
    """h comes back in the dtype of v, the state in float32; compute is float32 inside."""
    B, NH, S, DHQK, DHV = 1, 2, 21, 8, 8
    inputs = make_inputs(B, NH, S, DHQK, DHV, dtype=torch.float32)
    inputs_lp = tuple(t.to(dtype) for t in inputs)
    h_ref, s_ref = naive_recurrent_mlstm(*(t.to(torch.float32) for t in inputs_lp))
    for name, fn in FORMS.items():
        h, s = fn(*inputs_lp, chunk_size=8)
        assert h.dtype == dtype, name
        assert all(t.dtype == torch.float32 for t in s), name
        assert rel_err(h.float(), h_ref) < 1e-2, name  # the output rounding of `dtype` only
        for a, e in zip(s, s_ref):
            assert rel_err(a, e) < TOL[torch.float32], name
    s32 = tuple(t.to(torch.float32) for t in s_ref)
    h1, s1 = naive_step_mlstm(*(t[:, :, :1] for t in inputs_lp[:3]), *(t[:, :, :1] for t in inputs_lp[3:]), s32)
    assert h1.dtype == dtype and all(t.dtype == torch.float32 for t in s1)


def _valid(B=2, NH=2, S=5, DHQK=4, DHV=6):
    q, k, v, i, f = make_inputs(B, NH, S, DHQK, DHV, dtype=torch.float32)
    state = as_dtype(make_state("random", B, NH, DHQK, DHV), torch.float32)
    return dict(q=q, k=k, v=v, i=i, f=f, state=state)


BAD_INPUTS = [
    pytest.param("q", lambda a: a["q"][0], r"q must be \(B, NH, S, DHQK\), got shape \(2, 5, 4\)", id="q-3d"),
    pytest.param("k", lambda a: a["k"][..., :3], r"k must be .*\(2, 2, 5, 4\).* got \(2, 2, 5, 3\)", id="k-dim"),
    pytest.param("v", lambda a: a["v"][:, :, :4], r"v must be .*got \(2, 2, 4, 6\)", id="v-seq"),
    pytest.param("i", lambda a: a["i"][..., None], r"i must be \(B, NH, S\) = \(2, 2, 5\), got \(2, 2, 5, 1\)", id="i-4d"),
    pytest.param("f", lambda a: a["f"][:1], r"f must be \(B, NH, S\) = \(2, 2, 5\), got \(1, 2, 5\)", id="f-batch"),
    pytest.param("i", lambda a: a["i"].long(), r"i must be a floating-point tensor", id="i-int"),
    pytest.param(
        "state", lambda a: (a["state"][0][..., :5], *a["state"][1:]),
        r"state c must be \(2, 2, 4, 6\) .*got \(2, 2, 4, 5\)", id="c-shape",
    ),
    pytest.param(
        "state", lambda a: (a["state"][0], a["state"][1][..., None], a["state"][2]),
        r"state n must be \(2, 2, 4\) .*got \(2, 2, 4, 1\)", id="n-shape",
    ),
    pytest.param(
        "state", lambda a: (*a["state"][:2], a["state"][2][..., None]),
        r"state m must be \(2, 2\) .*got \(2, 2, 1\)", id="m-shape-B-NH-1",
    ),
    pytest.param("state", lambda a: a["state"][:2], r"state must be None or a tuple \(c, n, m\).*length 2", id="state-len"),
]


@pytest.mark.parametrize("form", ["parallel", "chunk", "recurrent"])
@pytest.mark.parametrize("key, mutate, message", BAD_INPUTS)
def test_bad_inputs(form, key, mutate, message):
    args = _valid()
    args[key] = mutate(args)
    state = args.pop("state")
    with pytest.raises(ValueError, match=message):
        FORMS[form](*args.values(), state)


def test_bad_chunk_size_and_step_inputs():
    args = _valid()
    state = args.pop("state")
    for bad in (0, -4, 2.0, None):
        with pytest.raises(ValueError, match=r"chunk_size must be a positive int, got"):
            naive_chunk_mlstm(*args.values(), state, chunk_size=bad)
    with pytest.raises(ValueError, match=r"needs S == 1, got q of shape \(2, 2, 5, 4\)"):
        naive_step_mlstm(*args.values(), state)
    one = {name: t[:, :, :1] for name, t in args.items()}
    with pytest.raises(ValueError, match=r"state is required"):
        naive_step_mlstm(*one.values(), None)
    with pytest.raises(ValueError, match=r"S must be >= 1"):
        naive_chunk_mlstm(*(t[:, :, :0] for t in args.values()))
