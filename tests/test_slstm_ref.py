"""The sLSTM reference (kernels/slstm/naive.py): step/loop agreement, the unstabilized math,
state passing, gradients, parity with the NX-AI xlstm vanilla sLSTM, dtypes, input validation.

Errors are relative: max |actual - expected| / max |expected| over the whole tensor.
"""

from __future__ import annotations

import pytest
import torch

from op_inputs import rel_err, slstm_inputs, slstm_state
from slstm_oracle import check_against_official, extreme_first_step_inputs, official_vanilla_slstm
from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm, naive_step_slstm

SEED = 4321

# Relative tolerance against a float64 reference, per compute dtype.
TOL = {
    torch.float64: 1e-12,  # same math, rounding only
    torch.float32: 1e-5,  # float32 rounding through <= 129 recurrent steps
}

DTYPE_ID = {torch.float32: "fp32", torch.float64: "fp64"}


def make_inputs(B, NH, S, DH, dtype=torch.float64, seed=SEED):
    """op_inputs.slstm_inputs: x with a realistic gate spread (gate-major i, f, z, o), r, b."""
    return slstm_inputs(B, NH, S, DH, seed=seed, dtype=dtype)


def make_state(kind, B, NH, DH, seed=SEED + 1):
    """A float64 state (op_inputs.slstm_state): None, "prefix" or "random" (n > 0)."""
    return slstm_state(B, NH, DH, kind, seed=seed, dtype=torch.float64)


def as_dtype(state, dtype):
    return None if state is None else tuple(t.to(dtype) for t in state)


def unstabilized_slstm(x, r, b, state):
    """Independent statement of the math in float64, without the stabilizer m:
    c~ = sigmoid(f) c~ + exp(i) tanh(z), n~ = sigmoid(f) n~ + exp(i), h = sigmoid(o) c~ / n~."""
    B, NH, S, G = x.shape
    DH = G // 4
    if state is None:
        h = c = n = torch.zeros(B, NH, DH, dtype=torch.float64)
    else:
        h, c, n, m = state
        c, n = c * m.exp(), n * m.exp()
    ys = []
    for t in range(S):
        pre = x[:, :, t] + torch.einsum("bnd,ndg->bng", h, r) + b  # (B, NH, 4*DH)
        i_pre, f_pre, z_pre, o_pre = pre.split(DH, dim=-1)
        c = torch.sigmoid(f_pre) * c + torch.exp(i_pre) * torch.tanh(z_pre)
        n = torch.sigmoid(f_pre) * n + torch.exp(i_pre)
        h = torch.sigmoid(o_pre) * c / n
        ys.append(h)
    return torch.stack(ys, dim=2), (h, c, n)


# (B, NH, S, DH): odd S
SHAPES = [(1, 1, 1, 4), (2, 2, 7, 8), (1, 3, 33, 16), (2, 4, 65, 8), (1, 2, 129, 16)]
CASES = [
    pytest.param(*shape, dtype, kind, id=f"B{shape[0]}-S{shape[2]}-NH{shape[1]}-D{shape[3]}-{DTYPE_ID[dtype]}-state_{kind}")
    for shape in SHAPES
    for dtype in (torch.float32, torch.float64)
    for kind in ("none", "prefix", "random")
]


@pytest.mark.parametrize("B, NH, S, DH, dtype, state_kind", CASES)
def test_matches_unstabilized_math_and_step(B, NH, S, DH, dtype, state_kind):
    x, r, b = make_inputs(B, NH, S, DH)
    state = make_state(state_kind, B, NH, DH)
    y_ref, (h_ref, c_ref, n_ref) = unstabilized_slstm(x, r, b, state)

    y, (h, c, n, m) = naive_recurrent_slstm(x.to(dtype), r.to(dtype), b.to(dtype), as_dtype(state, dtype))
    assert y.shape == (B, NH, S, DH) and y.dtype == dtype
    assert all(t.shape == (B, NH, DH) and t.dtype == dtype for t in (h, c, n, m))
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(h, h_ref) < TOL[dtype]
    assert torch.equal(h, y[:, :, -1])
    # the state is the unstabilized state times exp(-m)
    m64 = m.double()
    assert rel_err(c.double() * m64.exp(), c_ref) < TOL[dtype] * 10  # exp(m) amplifies m's rounding
    assert rel_err(n.double() * m64.exp(), n_ref) < TOL[dtype] * 10

    # the step function, looped, is the same computation
    s = as_dtype(state, dtype) or tuple(torch.zeros(B, NH, DH, dtype=dtype) for _ in range(4))
    ys = []
    for t in range(S):
        y_t, s = naive_step_slstm(x[:, :, t : t + 1].to(dtype), r.to(dtype), b.to(dtype), s)
        assert y_t.shape == (B, NH, 1, DH)
        ys.append(y_t)
    assert torch.equal(torch.cat(ys, dim=2), y)
    for a, e in zip(s, (h, c, n, m)):
        assert torch.equal(a, e)


def test_zero_state_equals_none():
    B, NH, S, DH = 2, 2, 11, 8
    x, r, b = make_inputs(B, NH, S, DH, dtype=torch.float32)
    zeros = tuple(torch.zeros(B, NH, DH) for _ in range(4))
    y0, s0 = naive_recurrent_slstm(x, r, b)
    y1, s1 = naive_recurrent_slstm(x, r, b, zeros)
    assert torch.equal(y0, y1)
    for a, e in zip(s0, s1):
        assert torch.equal(a, e)


@pytest.mark.parametrize(
    "splits, dtype",
    [
        pytest.param((1, 6), torch.float64, id="S7-split1+6-fp64"),
        pytest.param((13, 1, 19), torch.float64, id="S33-split13+1+19-fp64"),
        pytest.param((40, 25), torch.float32, id="S65-split40+25-fp32"),
    ],
)
def test_state_passing(splits, dtype):
    B, NH, DH = 2, 2, 8
    x, r, b = make_inputs(B, NH, sum(splits), DH, dtype=dtype)
    state0 = as_dtype(make_state("prefix", B, NH, DH), dtype)
    y_ref, s_ref = naive_recurrent_slstm(x, r, b, state0)
    s, ys, start = state0, [], 0
    for piece in splits:
        y, s = naive_recurrent_slstm(x[:, :, start : start + piece], r, b, s)
        ys.append(y)
        start += piece
    assert torch.equal(torch.cat(ys, dim=2), y_ref)
    for a, e in zip(s, s_ref):
        assert torch.equal(a, e)


def test_gradcheck():
    """Autograd (the gradient reference for the fused kernels) against finite differences:
    x, r, b and every initial-state component, through outputs and final states."""
    B, NH, S, DH = 1, 2, 5, 2
    x, r, b = make_inputs(B, NH, S, DH)
    state = make_state("prefix", B, NH, DH)
    leaves = [t.clone().requires_grad_(True) for t in (x, r, b, *state)]

    def fn(x, r, b, h0, c0, n0, m0):
        y, (h, c, n, m) = naive_recurrent_slstm(x, r, b, (h0, c0, n0, m0))
        return y, c, n, m

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# parity with the NX-AI xlstm vanilla sLSTM (the oracle)
# ---------------------------------------------------------------------------------------------


def _vanilla(x, r, b, state):
    return official_vanilla_slstm(x, r, b, state)


def _compare_states(ours, theirs, tol):
    """h must match; (c, n) are compared after moving ours onto the oracle's stabilizer
    (c exp(m) and n exp(m) are what the stabilizer leaves unchanged)."""
    h, c, n, m = ours
    h_o, c_o, n_o, m_o = theirs
    assert rel_err(h, h_o) < tol
    scale = torch.exp(m.double() - m_o.double())
    assert rel_err(c.double() * scale, c_o) < tol
    assert rel_err(n.double() * scale, n_o) < tol


ORACLE_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,  # two float32 implementations, rounding only
}


@pytest.mark.parametrize(
    "B, NH, S, DH",
    [
        pytest.param(2, 2, 33, 8, id="B2-S33-NH2-D8"),
        pytest.param(1, 4, 65, 16, id="B1-S65-NH4-D16"),
        pytest.param(3, 1, 7, 4, id="B3-S7-NH1-D4"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("state_kind", ["none", "prefix", "random"])
def test_oracle_vanilla_forward(B, NH, S, DH, dtype, state_kind):
    x, r, b = make_inputs(B, NH, S, DH, dtype=dtype)
    state = as_dtype(make_state(state_kind, B, NH, DH), dtype)
    y_o, s_o = _vanilla(x, r, b, state)
    y, s = naive_recurrent_slstm(x, r, b, state)
    assert rel_err(y, y_o) < ORACLE_TOL[dtype]
    _compare_states(s, s_o, ORACLE_TOL[dtype])
    assert rel_err(s[3], s_o[3]) < ORACLE_TOL[dtype]  # the same stabilizer, first step included


@pytest.mark.parametrize("state_kind", ["none", "prefix"])
def test_oracle_vanilla_gradients(state_kind):
    """Gradients of x, r, b and the initial state against autograd through the vanilla cell
    (float64)."""
    B, NH, S, DH = 2, 2, 17, 4
    x, r, b = make_inputs(B, NH, S, DH)
    state = make_state(state_kind, B, NH, DH)
    g = torch.Generator().manual_seed(SEED + 9)
    dy = torch.randn(B, NH, S, DH, generator=g, dtype=torch.float64)  # cotangent of y
    dh = torch.randn(B, NH, DH, generator=g, dtype=torch.float64)  # cotangent of the final h

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (x, r, b)]
        st = None if state is None else [t.clone().requires_grad_(True) for t in state]
        y, (h, *_) = fn(*leaves, None if st is None else tuple(st))
        ((y * dy).sum() + (h * dh).sum()).backward()
        return [t.grad for t in leaves + (st or [])]

    ours, theirs = grads(naive_recurrent_slstm), grads(_vanilla)
    for name, a, e in zip(["x", "r", "b", "h0", "c0", "n0", "m0"], ours, theirs):
        assert e.abs().max() > 0, f"gradient of {name} is zero: the test would be vacuous"
        err = rel_err(a, e)
        assert err < 1e-10, f"d{name}: rel err {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_extreme_first_step_input_gate_matches_official(dtype):
    """An input gate far below -104 on the first step of a fresh sequence: finite, as the official
    cell (m starts at i~ where n == 0), by the loop and by the step function; and gradients finite."""
    x, r, b = extreme_first_step_inputs(B=2, NH=2, S=5, DH=3, dtype=dtype)
    y, state = naive_recurrent_slstm(x, r, b)
    check_against_official(y, state, x, r, b, ORACLE_TOL[dtype])
    s = tuple(torch.zeros(2, 2, 3, dtype=dtype) for _ in range(4))
    ys = []
    for t in range(5):
        y_t, s = naive_step_slstm(x[:, :, t : t + 1], r, b, s)
        ys.append(y_t)
    check_against_official(torch.cat(ys, dim=2), s, x, r, b, ORACLE_TOL[dtype])
    leaves = [t.clone().requires_grad_(True) for t in (x, r, b)]
    y, (h, c, n, m) = naive_recurrent_slstm(*leaves)
    (y.sum() + h.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


# ---------------------------------------------------------------------------------------------
# dtypes and input validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_inputs(dtype):
    B, NH, S, DH = 1, 2, 15, 8
    x, r, b = make_inputs(B, NH, S, DH, dtype=torch.float32)
    x_lp = x.to(dtype)
    y_ref, s_ref = naive_recurrent_slstm(x_lp.float(), r, b)
    y, s = naive_recurrent_slstm(x_lp, r, b)
    assert y.dtype == dtype and all(t.dtype == torch.float32 for t in s)
    assert rel_err(y.float(), y_ref) < 1e-2  # the output rounding of `dtype` only
    for a, e in zip(s, s_ref):
        assert rel_err(a, e) < TOL[torch.float32]
    y1, s1 = naive_step_slstm(x_lp[:, :, :1], r.to(dtype), b.to(dtype), s)
    assert y1.dtype == dtype and all(t.dtype == torch.float32 for t in s1)


def _valid(B=2, NH=3, S=5, DH=4):
    x, r, b = make_inputs(B, NH, S, DH, dtype=torch.float32)
    state = as_dtype(make_state("random", B, NH, DH), torch.float32)
    return dict(x=x, r=r, b=b, state=state)


BAD_INPUTS = [
    pytest.param("x", lambda a: a["x"][0], r"x must be \(B, NH, S, 4\*DH\), got shape \(3, 5, 16\)", id="x-3d"),
    pytest.param("x", lambda a: a["x"][..., :15], r"last dim of x must be 4\*DH .*\(2, 3, 5, 15\)", id="x-not-4DH"),
    pytest.param("r", lambda a: a["r"].transpose(1, 2), r"r must be \(NH, DH, 4\*DH\) = \(3, 4, 16\), got \(3, 16, 4\)", id="r-vanilla-layout"),
    pytest.param("r", lambda a: a["r"][:2], r"r must be .* = \(3, 4, 16\), got \(2, 4, 16\)", id="r-heads"),
    pytest.param("b", lambda a: a["b"].reshape(-1), r"b must be \(NH, 4\*DH\) = \(3, 16\), got \(48,\)", id="b-flat"),
    pytest.param("x", lambda a: a["x"].long(), r"x must be a floating-point tensor", id="x-int"),
    pytest.param(
        "state", lambda a: (a["state"][0][:1], *a["state"][1:]),
        r"state h must be \(B, NH, DH\) = \(2, 3, 4\), got \(1, 3, 4\)", id="h-batch",
    ),
    pytest.param(
        "state", lambda a: (*a["state"][:3], a["state"][3].reshape(2, 12)),
        r"state m must be \(B, NH, DH\) = \(2, 3, 4\), got \(2, 12\)", id="m-flat",
    ),
    pytest.param("state", lambda a: torch.stack(a["state"]), r"state must be None or a tuple \(h, c, n, m\)", id="state-stacked"),
]


@pytest.mark.parametrize("key, mutate, message", BAD_INPUTS)
def test_bad_inputs(key, mutate, message):
    args = _valid()
    args[key] = mutate(args)
    with pytest.raises(ValueError, match=message):
        naive_recurrent_slstm(args["x"], args["r"], args["b"], args["state"])
    if key != "x":  # the step form validates the same way
        with pytest.raises(ValueError, match=message):
            naive_step_slstm(args["x"][:, :, :1], args["r"], args["b"], args["state"])


def test_bad_step_inputs():
    args = _valid()
    with pytest.raises(ValueError, match=r"needs S == 1, got x of shape \(2, 3, 5, 16\)"):
        naive_step_slstm(args["x"], args["r"], args["b"], args["state"])
    with pytest.raises(ValueError, match=r"state is required"):
        naive_step_slstm(args["x"][:, :, :1], args["r"], args["b"], None)
    with pytest.raises(ValueError, match=r"S must be >= 1"):
        naive_recurrent_slstm(args["x"][:, :, :0], args["r"], args["b"])
