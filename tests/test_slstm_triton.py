"""The fused recurrent sLSTM Triton kernels (kernels/slstm/fused_recurrent.py) against the
PyTorch reference (kernels/slstm/naive.py): outputs, final states and every gradient
(x, r, b, h0, c0, n0, m0), the step kernel, state passing, input validation.

CPU tier: the Triton interpreter (TRITON_INTERPRET=1) at small shapes, odd S, DH 16 / 24 / 32.
`-m gpu`: compiled on CUDA at real shapes (DH 64, 96, 128; S >= 1000).

The reference runs in float64 on the same (rounded) input values, so an error is the kernel's
own. Errors are relative: max |actual - expected| / max |expected| over the whole tensor.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

triton = pytest.importorskip("triton", reason="the fused sLSTM kernels need the triton package")

from xlstm_export.kernels import SLSTM_BACKENDS  # noqa: E402
from xlstm_export.kernels.slstm import fused_recurrent as fr  # noqa: E402
from xlstm_export.kernels.slstm.fused_recurrent import (  # noqa: E402
    MAX_HEAD_DIM,
    SLSTMLaunchParams,
    fused_recurrent_slstm,
    fused_recurrent_step_slstm,
)
from xlstm_export.kernels.slstm.naive import naive_recurrent_slstm, naive_step_slstm  # noqa: E402
from op_inputs import rel_err, slstm_inputs, slstm_state  # noqa: E402
from slstm_oracle import check_against_official, extreme_first_step_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_empty")  # unwritten outputs are NaN, not stale

# the small-shape tier runs interpreted on CPU, or compiled where a GPU runs the suite
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

SEED = 2024

# Relative tolerance against the float64 reference, per input dtype.
TOL = {
    # float32 everywhere (the recurrent matmul as 3xTF32 on GPU: float32 accuracy); measured <= 5e-7
    torch.float32: 1e-4,
    # 16-bit inputs: h_{t-1} (and d(pre-activations) in the backward) are rounded to the input
    # dtype for the recurrent matmul, and y, dx, dr, db are returned in it: 8-bit mantissa,
    # measured <= 5e-3 here and <= 2e-3 over 1031 steps (float32 reference loop with rounded h)
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,  # the same roundings with a 11-bit mantissa: measured <= 3e-4
}
DTYPE_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make_inputs(B, NH, S, DH, dtype, device=DEVICE, seed=SEED):
    """op_inputs.slstm_inputs: realistic gate spreads, gate-major [i | f | z | o]."""
    return slstm_inputs(B, NH, S, DH, seed=seed, dtype=dtype, device=device)


def make_state(kind, B, NH, DH, device=DEVICE, seed=SEED + 1):
    """op_inputs.slstm_state: None, "prefix" or "random" (n > 0); each (B, NH, DH) float32."""
    return slstm_state(B, NH, DH, kind, seed=seed, device=device)


def run_both(x, r, b, state):
    """Kernel and float64 reference on the same values with the same random upstream gradient
    on y and on every final-state component. Returns (outputs, grads) for both; grads are
    ordered x, r, b (, h0, c0, n0, m0)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, b, *(state or ()))]
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y, fin = fused_recurrent_slstm(leaves[0], leaves[1], leaves[2], tuple(leaves[3:]) if state else None)
    y64, fin64 = naive_recurrent_slstm(
        leaves64[0], leaves64[1], leaves64[2], tuple(leaves64[3:]) if state else None
    )
    g = torch.Generator().manual_seed(SEED + 7)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(x.device) for t in (y64, *fin64)]
    for outs, leaf in (((y, *fin), leaves), ((y64, *fin64), leaves64)):
        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
        loss.backward()
    return (y, fin, [t.grad for t in leaves]), (y64, fin64, [t.grad for t in leaves64])


def check_against_reference(x, r, b, state, tol):
    (y, fin, grads), (y64, fin64, grads64) = run_both(x, r, b, state)
    B, NH, S, G = x.shape
    assert y.shape == (B, NH, S, G // 4) and y.dtype == x.dtype
    assert all(t.shape == (B, NH, G // 4) and t.dtype == torch.float32 for t in fin)
    errors = {"y": rel_err(y, y64)}
    errors.update({f"state.{k}": rel_err(a, e) for k, a, e in zip("hcnm", fin, fin64)})
    names = ["dx", "dr", "db", "dh0", "dc0", "dn0", "dm0"]
    for name, leaf, gr, gr64 in zip(names, (x, r, b, *(state or ())), grads, grads64):
        assert gr is not None and gr.dtype == leaf.dtype, (name, None if gr is None else gr.dtype)
        errors[name] = rel_err(gr, gr64)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


def case_id(B, NH, S, DH, state_kind, dtype) -> str:
    return f"B{B}-NH{NH}-S{S}-D{DH}-{DTYPE_ID[dtype]}-state_{state_kind}"


# ---------------------------------------------------------------------------------------------
# CPU tier (interpreter)
# ---------------------------------------------------------------------------------------------
# (B, NH, S, DH, state kind, dtype): odd S; B 17 spans two batch tiles (the second masked);
# DH 24 is padded to a 32 block by masking; S 1 is a single step through the sequence kernel
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    (2, 2, 7, 16, "none", FP32), (3, 2, 9, 16, "random", FP32), (2, 1, 13, 32, "prefix", FP32),
    (1, 2, 5, 32, "none", FP32), (17, 1, 3, 16, "random", FP32), (2, 1, 5, 24, "prefix", FP32),
    (2, 2, 1, 16, "random", FP32), (2, 2, 7, 16, "none", BF16), (3, 1, 9, 32, "prefix", BF16),
    (17, 2, 4, 32, "prefix", BF16), (1, 3, 15, 16, "random", FP32), (2, 1, 7, 16, "random", FP16),
]


@pytest.mark.parametrize(
    "B, NH, S, DH, state_kind, dtype",
    [pytest.param(*c, id=case_id(*c)) for c in CASES],
)
def test_matches_reference(B, NH, S, DH, state_kind, dtype):
    x, r, b = make_inputs(B, NH, S, DH, dtype)
    state = make_state(state_kind, B, NH, DH)
    check_against_reference(x, r, b, state, TOL[dtype])


@pytest.mark.parametrize("state_kind", ["none", "random"])
def test_extreme_gates_match_reference(state_kind):
    """Input gates spread +-30 and forget gates +-30 (the stabilizer on both branches of its max,
    exponents far beyond float32), head dim 12 (below 16, padded), B*NH = 3: outputs, final
    states and every gradient at float32 accuracy (measured <= 4e-7)."""
    B, NH, S, DH = 3, 1, 9, 12
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    g = torch.Generator().manual_seed(SEED + 3)
    xg = x.view(B, NH, S, 4, DH).clone()
    xg[..., 0, :] = 30.0 * torch.randn(B, NH, S, DH, generator=g).to(x.device)  # input gates
    xg[..., 1, :] = 30.0 * torch.randn(B, NH, S, DH, generator=g).to(x.device)  # forget gates
    check_against_reference(xg.view_as(x), r, b, make_state(state_kind, B, NH, DH), TOL[torch.float32])


def test_mixed_dtypes():
    """bfloat16 activations with float32 parameters (a model under autocast): the recurrent
    matmul runs in bfloat16, every gradient comes back in its input's dtype."""
    B, NH, S, DH = 2, 2, 7, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    x = x.to(torch.bfloat16)
    state = make_state("prefix", B, NH, DH)
    check_against_reference(x, r, b, state, TOL[torch.bfloat16])


@pytest.mark.parametrize(
    "params",
    [
        pytest.param(SLSTMLaunchParams(max_r_bytes_on_chip=0), id="r-reread-every-step"),
        # re-read with ieee (or tf32) products: each gate block loaded just before its product (R_EACH)
        pytest.param(SLSTMLaunchParams(max_r_bytes_on_chip=0, fp32_precision="ieee"), id="r-each-block-reread"),
        pytest.param(SLSTMLaunchParams(block_b=32), id="block_b32"),
        pytest.param(SLSTMLaunchParams(step_block_n=16, fp32_precision="ieee"), id="step_block_n16"),
    ],
)
def test_launch_params_variants(params, monkeypatch):
    """Other launch parameters (r re-read every step as for float32 at DH 128, a larger batch
    tile, smaller step blocks) give the same results and gradients. fp32_precision is inert
    under the interpreter (float32 products either way)."""
    B, NH, S, DH = 3, 2, 5, 32
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    state = make_state("prefix", B, NH, DH)
    monkeypatch.setattr(fr, "DEFAULT_PARAMS", params)
    check_against_reference(x, r, b, state, TOL[torch.float32])
    state64 = tuple(t.double() for t in state)
    y64, s64 = naive_step_slstm(x[:, :, :1].double(), r.double(), b.double(), state64)
    y, s = fused_recurrent_step_slstm(x[:, :, :1], r, b, state)
    assert rel_err(y, y64) < TOL[torch.float32]
    for a, e in zip(s, s64):
        assert rel_err(a, e) < TOL[torch.float32]


def test_zero_state_equals_none():
    B, NH, S, DH = 2, 2, 5, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    zeros = tuple(torch.zeros(B, NH, DH, device=DEVICE) for _ in range(4))
    y0, s0 = fused_recurrent_slstm(x, r, b)
    y1, s1 = fused_recurrent_slstm(x, r, b, zeros)
    assert torch.equal(y0, y1)
    for a, e in zip(s0, s1):
        assert torch.equal(a, e)


def test_state_passing():
    """Chunks that carry the state (and its gradient) equal the whole sequence."""
    B, NH, DH, splits = 2, 1, 16, (4, 1, 6)
    x, r, b = make_inputs(B, NH, sum(splits), DH, torch.float32)
    state0 = make_state("prefix", B, NH, DH)

    def run(chunked):
        leaves = [t.clone().requires_grad_(True) for t in (x, r, b, *state0)]
        xs, s = leaves[0], tuple(leaves[3:])
        if chunked:
            ys, start = [], 0
            for piece in splits:
                y_piece, s = fused_recurrent_slstm(xs[:, :, start : start + piece], leaves[1], leaves[2], s)
                ys.append(y_piece)
                start += piece
            y = torch.cat(ys, dim=2)
        else:
            y, s = fused_recurrent_slstm(xs, leaves[1], leaves[2], s)
        g = torch.Generator().manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in (y, *s))
        loss.backward()
        return y, s, [t.grad for t in leaves]

    y_all, s_all, g_all = run(False)
    y_ch, s_ch, g_ch = run(True)
    assert rel_err(y_ch, y_all) < 1e-6  # identical arithmetic; only the bmm/sum order of dr, db
    for a, e in zip(s_ch, s_all):
        assert rel_err(a, e) < 1e-6
    for name, a, e in zip(["dx", "dr", "db", "dh0", "dc0", "dn0", "dm0"], g_ch, g_all):
        # dr, db: sums over the steps in another order (per chunk, then across chunks)
        assert rel_err(a, e) < 1e-5, name


def test_no_grad_forward_matches():
    """Under no_grad nothing is saved for the backward; the outputs are the same."""
    B, NH, S, DH = 2, 1, 7, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    state = make_state("random", B, NH, DH)
    y_grad, s_grad = fused_recurrent_slstm(x.requires_grad_(True), r, b, state)
    with torch.no_grad():
        y, s = fused_recurrent_slstm(x, r, b, state)
    assert not y.requires_grad
    assert torch.equal(y, y_grad.detach())
    for a, e in zip(s, s_grad):
        assert torch.equal(a, e.detach())


def test_backend_registry_routes_to_kernel():
    B, NH, S, DH = 1, 1, 3, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    # (the registry dict, not kernels.slstm: that name is also the subpackage kernels/slstm/)
    y, s = SLSTM_BACKENDS["triton"](x, r, b)
    y_k, s_k = fused_recurrent_slstm(x, r, b)
    assert torch.equal(y, y_k)
    y64, _ = naive_recurrent_slstm(x.double(), r.double(), b.double())
    assert rel_err(y, y64) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["torch", "triton", "auto", "custom_op"])
def test_cell_names_an_argument_that_is_not_a_tensor(backend):
    """A numpy array reached the backends, which read .device / .is_cuda first (an AttributeError);
    now one TypeError naming the argument, from every backend."""
    from xlstm_export.kernels import slstm_cell

    x, r, b = make_inputs(1, 2, 3, 16, torch.float32)
    with pytest.raises(TypeError, match=r"^slstm_cell: x must be a tensor, got ndarray$"):
        slstm_cell(x.numpy(), r, b, backend=backend)
    state = tuple(torch.zeros(1, 2, 16) for _ in range(4))
    with pytest.raises(TypeError, match=r"^slstm_cell: state m must be a tensor, got float$"):
        slstm_cell(x, r, b, (*state[:3], 0.0), backend=backend)


def test_triton_refuses_meta_tensors():
    from xlstm_export.kernels import slstm_cell

    x, r, b = (t.to("meta") for t in make_inputs(1, 2, 3, 16, torch.float32))
    with pytest.raises(RuntimeError, match=r"got tensors on meta; Triton runs on CUDA"):
        slstm_cell(x, r, b, backend="triton")


def test_matches_flashrnn_vanilla():
    """Parity with FlashRNN's vanilla sLSTM (an official implementation; our layout mapped to its
    Wx (B, S, 4, NH, DH), R (4, NH, DH_out, DH_in), b (4, NH, DH)). FlashRNN starts a fresh
    sequence differently (m from the first ĩ, n clamped >= 1), so the state given has n >= 1,
    where the two definitions coincide."""
    flashrnn = pytest.importorskip("flashrnn", reason="optional oracle: pip install --no-deps flashrnn")
    B, NH, S, DH = 2, 2, 9, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    h0, c0, n0, m0 = make_state("random", B, NH, DH)
    n0 = n0 + 1.0
    y, (h, c, n, m) = fused_recurrent_slstm(x, r, b, (h0, c0, n0, m0))
    x_f = x.reshape(B, NH, S, 4, DH).permute(0, 2, 3, 1, 4).contiguous()  # (B, S, 4, NH, DH)
    r_f = r.reshape(NH, DH, 4, DH).permute(2, 0, 3, 1).contiguous()  # (4, NH, DH_out, DH_in)
    b_f = b.reshape(NH, 4, DH).permute(1, 0, 2).contiguous()  # (4, NH, DH)
    s_f = torch.stack([h0, c0, n0, m0])[:, :, None]  # (4, B, 1, NH, DH)
    states, last = flashrnn.flashrnn(
        x_f, r_f, b_f, states=s_f, function="slstm", backend="vanilla", dtype="float32"
    )
    assert rel_err(y, states[0].permute(0, 2, 1, 3)) < TOL[torch.float32]  # (B, NH, S, DH)
    for a, e in zip((h, c, n, m), last[:, :, 0]):  # (4, B, NH, DH)
        assert rel_err(a, e) < TOL[torch.float32]


def test_extreme_first_step_input_gate_matches_official():
    """An input gate far below -104 on the first step of a fresh sequence: the sequence kernel
    and the step kernel stay finite and match the official vanilla cell; the backward kernel's
    gradients match autograd through the float64 reference."""
    x, r, b = (t.to(DEVICE) for t in extreme_first_step_inputs(B=3, NH=2, S=5, DH=16))
    y, state = fused_recurrent_slstm(x, r, b)
    check_against_official(y.cpu(), [t.cpu() for t in state], x.cpu(), r.cpu(), b.cpu(), TOL[torch.float32])
    zeros = tuple(torch.zeros(3, 2, 16, device=DEVICE) for _ in range(4))
    with torch.no_grad():
        y1, s1 = fused_recurrent_step_slstm(x[:, :, :1], r, b, zeros)
    check_against_official(y1.cpu(), [t.cpu() for t in s1], x[:, :, :1].cpu(), r.cpu(), b.cpu(), TOL[torch.float32])
    check_against_reference(x, r, b, None, TOL[torch.float32])


# step kernel: (B, DH, state kind, dtype); DH 48 splits into two unit blocks, the second masked
STEP_CASES = [
    (2, 16, "random", torch.float32),
    (3, 48, "prefix", torch.float32),
    (17, 32, "none", torch.float32),
    (2, 32, "random", torch.bfloat16),
]


@pytest.mark.parametrize(
    "B, DH, state_kind, dtype",
    [pytest.param(*c, id=f"B{c[0]}-NH2-D{c[1]}-{DTYPE_ID[c[3]]}-state_{c[2]}") for c in STEP_CASES],
)
def test_step_matches_reference(B, DH, state_kind, dtype):
    NH = 2
    x, r, b = make_inputs(B, NH, 1, DH, dtype)
    state = make_state(state_kind, B, NH, DH)
    if state is None:
        ref_state = tuple(torch.zeros(B, NH, DH, dtype=torch.float64, device=DEVICE) for _ in range(4))
    else:
        ref_state = tuple(t.double() for t in state)
    y64, s64 = naive_step_slstm(x.double(), r.double(), b.double(), ref_state)
    y, s = fused_recurrent_step_slstm(x, r, b, state)
    assert y.shape == (B, NH, 1, DH) and y.dtype == dtype
    assert rel_err(y, y64) < TOL[dtype]
    for a, e in zip(s, s64):
        assert a.dtype == torch.float32 and rel_err(a, e) < TOL[dtype]
    # the step kernel and the sequence kernel agree on one step
    y_seq, s_seq = fused_recurrent_slstm(x, r, b, state)
    assert rel_err(y, y_seq) < 1e-6
    for a, e in zip(s, s_seq):
        assert rel_err(a, e) < 1e-6


def test_step_chain_matches_sequence():
    """Decoding token by token with the step kernel equals one sequence call."""
    B, NH, S, DH = 2, 2, 5, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    state = make_state("prefix", B, NH, DH)
    y_seq, s_seq = fused_recurrent_slstm(x, r, b, state)
    s, ys = state, []
    for t in range(S):
        y_t, s = fused_recurrent_step_slstm(x[:, :, t : t + 1], r, b, s)
        ys.append(y_t)
    assert rel_err(torch.cat(ys, dim=2), y_seq) < 1e-5
    for a, e in zip(s, s_seq):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        pytest.param(lambda x, r, b, s: (x[0], r, b, s), "x must have 4 dims", id="x-rank"),
        pytest.param(lambda x, r, b, s: (x[..., :-1], r, b, s), "multiple of 4", id="x-gates"),
        pytest.param(lambda x, r, b, s: (x, r[:, :-1], b, s), r"r must be \(NH, DH, 4\*DH\)", id="r-shape"),
        pytest.param(lambda x, r, b, s: (x, r, b[:1], s), r"b must be \(NH, 4\*DH\)", id="b-shape"),
        pytest.param(lambda x, r, b, s: (x.double(), r, b, s), "float32, float16 or bfloat16", id="x-fp64"),
        pytest.param(lambda x, r, b, s: (x, r, b, s[:3]), r"tuple \(h, c, n, m\)", id="state-len"),
        pytest.param(
            lambda x, r, b, s: (x, r, b, (s[0][:1], *s[1:])), r"state h must be \(B, NH, DH\)", id="state-shape"
        ),
    ],
)
def test_input_validation(change, message):
    B, NH, S, DH = 2, 2, 3, 16
    x, r, b = make_inputs(B, NH, S, DH, torch.float32)
    state = make_state("random", B, NH, DH)
    with pytest.raises((ValueError, TypeError), match=message):
        fused_recurrent_slstm(*change(x, r, b, state))


def test_input_validation_limits():
    DH = MAX_HEAD_DIM + 16
    x, r, b = (torch.zeros(shape, device=DEVICE) for shape in ((1, 1, 2, 4 * DH), (1, DH, 4 * DH), (1, 4 * DH)))
    with pytest.raises(ValueError, match=f"head dim DH={DH}"):
        fused_recurrent_slstm(x, r, b)
    x, r, b = make_inputs(1, 1, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="S=2"):
        fused_recurrent_step_slstm(x, r, b, None)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile for Hopper (no GPU needed): the interpreter never lowers the kernels, so
# this is where the compiled path's errors and its shared-memory budget are checked in CI
# ---------------------------------------------------------------------------------------------
_AOT_SCRIPT = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xlstm_export.kernels.slstm import fused_recurrent as fr

kind, DH, dtype_name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dtype = getattr(torch, dtype_name)
kernel = {"fwd": fr.fused_recurrent_slstm_fwd_kernel, "bwd": fr.fused_recurrent_slstm_bwd_kernel,
          "step": fr.fused_recurrent_step_slstm_fwd_kernel}[kind]
meta = fr.launch_meta(kind, DH, dtype)
options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
consts = dict(meta, NH=4)
if kind != "bwd":
    consts["USE_INITIAL_STATE"] = True
if kind == "fwd":
    consts["SAVE"] = True
tt = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
low = {"x", "r", "b", "y", "dy"}  # pointers in the dtype of x; the rest float32
sig = {a: "constexpr" if a in consts else "i32" if a in ("B", "S") else "*" + (tt if a in low else "fp32")
       for a in kernel.arg_names}
try:
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
except TypeError as e:
    print(json.dumps({"api": str(e)}))
    sys.exit(0)
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
print(json.dumps({"shared": compiled.metadata.shared, "r_on_chip": meta.get("R_ON_CHIP")}))
"""

H100_SMEM = 232448  # bytes of shared memory one H100/H200 block may use (227 KiB)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, DH, dtype",
    [
        ("fwd", 128, "bfloat16"),
        ("bwd", 128, "bfloat16"),
        ("fwd", 128, "float32"),  # r re-read from L2 every step: on chip it would not fit
        ("bwd", 128, "float32"),
        ("bwd", 64, "float32"),  # r on chip, 3xTF32 keeps two copies (high and low parts)
        ("step", 128, "bfloat16"),
    ],
)
def test_compiles_for_hopper(kind, DH, dtype):
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, kind, str(DH), dtype], env=env,
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling the {kind} kernel for sm_90 took over 300 s")
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas for the NVIDIA backend here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "api" in result:
        pytest.skip(f"this triton's ASTSource API differs: {result['api']}")
    assert result["shared"] <= H100_SMEM, result


# ---------------------------------------------------------------------------------------------
# GPU tier: compiled, real shapes
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    (4, 2, 1031, 64, "prefix", torch.bfloat16),
    (4, 2, 1031, 64, "none", torch.float32),
    (4, 2, 1031, 128, "prefix", torch.bfloat16),
    (3, 2, 1031, 128, "random", torch.float32),  # r (256 KiB) re-read from L2 every step
    (20, 3, 257, 96, "prefix", torch.float16),  # padded head dim, two batch tiles
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, NH, S, DH, state_kind, dtype",
    [pytest.param(*c, id=case_id(*c)) for c in GPU_CASES],
)
def test_gpu_matches_reference(B, NH, S, DH, state_kind, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, r, b = make_inputs(B, NH, S, DH, dtype, device="cuda")
    state = make_state(state_kind, B, NH, DH, device="cuda")
    # float32 rounding through 1031 steps stays ~1e-6 (measured with the reference in float32)
    check_against_reference(x, r, b, state, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("DH, dtype", [(64, torch.bfloat16), (128, torch.bfloat16), (128, torch.float32)])
def test_gpu_step_matches_reference(DH, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    B, NH = 5, 4
    x, r, b = make_inputs(B, NH, 1, DH, dtype, device="cuda")
    state = make_state("prefix", B, NH, DH, device="cuda")
    y64, s64 = naive_step_slstm(x.double(), r.double(), b.double(), tuple(t.double() for t in state))
    y, s = fused_recurrent_step_slstm(x, r, b, state)
    assert rel_err(y, y64) < TOL[dtype]
    for a, e in zip(s, s64):
        assert rel_err(a, e) < TOL[dtype]
