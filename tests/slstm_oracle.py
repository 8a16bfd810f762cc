"""Shared by the sLSTM tests of every form: NX-AI's vanilla sLSTM cell as the oracle, and inputs
with an extreme input gate on the first step of a fresh sequence.

Every form of the sLSTM (the PyTorch reference, the Triton kernel, the CUDA kernel run through
tests/cuda_emu, the native CPU kernel, the ONNX function body) is checked against
``official_vanilla_slstm`` on ``extreme_first_step_inputs``: an input-gate pre-activation far
below -104 on the first step, where max(i~, logsigmoid(f~) + 0) as the stabilizer underflows
n_1 = exp(i~ - m_1) to 0 and h_1 = 0/0 (NaN); the official cell starts m at i~ when n == 0 and
stays finite (h_1 = sigmoid(o~) tanh(z~)).
"""

from __future__ import annotations

import pytest
import torch

# input-gate pre-activations put on the first step, one per head unit (cycled): below the float32
# underflow of exp (-104), below the float64 one (-745), and ordinary values beside them
EXTREME_I = (-150.0, -1000.0, -110.0, 0.5, -3.0, 20.0)


def official_vanilla_slstm(x, r, b, state=None):
    """xlstm's vanilla ``slstm_forward`` (the official cell) on our layout; float64 in, float64 out.

    Its layout: x (S, B, 4*H) and bias (4*H,) gate-major then head-major (H = NH*DH),
    R (NH, 4*DH, DH) with h_head @ R[head]^T giving the head's gate-major pre-activations,
    states (4, B, H) ordered (h, c, n, m). Ours: r[head] = R[head]^T.
    Returns y (B, NH, S, DH) and the final (h, c, n, m), each (B, NH, DH).
    """
    vanilla = pytest.importorskip("xlstm.blocks.slstm.src.vanilla", reason="oracle needs xlstm")
    B, NH, S, G = x.shape
    DH = G // 4
    x_v = x.reshape(B, NH, S, 4, DH).permute(2, 0, 3, 1, 4).reshape(S, B, 4 * NH * DH)  # (S, B, 4*H)
    b_v = b.reshape(NH, 4, DH).permute(1, 0, 2).reshape(4 * NH * DH)  # (4*H,)
    R_v = r.transpose(1, 2)  # (NH, 4*DH, DH)
    if state is None:
        states = torch.zeros(4, B, NH * DH, dtype=x.dtype)  # (4, B, H)
    else:
        states = torch.stack([t.reshape(B, NH * DH).to(x.dtype) for t in state])  # (4, B, H)
    pointwise = vanilla.slstm_pointwise_function_registry["slstm"]
    all_states, last, _ = vanilla.slstm_forward(x_v, states, R_v, b_v, pointwise)
    y = all_states[0, 1:].reshape(S, B, NH, DH).permute(1, 2, 0, 3)  # (B, NH, S, DH)
    return y, tuple(t.reshape(B, NH, DH) for t in last.unbind(0))


def extreme_first_step_inputs(B=2, NH=2, S=5, DH=4, dtype=torch.float32, seed=7):
    """x (B, NH, S, 4*DH), r (NH, DH, 4*DH), b (NH, 4*DH) in ``dtype``: random gates (forget gates
    open) with the first step's input-gate pre-activation (x + b, h_0 = 0) set to EXTREME_I."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, NH, S, 4, DH, generator=g, dtype=torch.float64)  # (B, NH, S, 4, DH)
    x[..., 1, :] += 3.0  # forget gates mostly open
    r = torch.randn(NH, DH, 4 * DH, generator=g, dtype=torch.float64) / DH**0.5  # (NH, DH, 4*DH)
    b = 0.5 * torch.randn(NH, 4 * DH, generator=g, dtype=torch.float64)  # (NH, 4*DH)
    extreme = torch.tensor(EXTREME_I, dtype=torch.float64)
    units = extreme[torch.arange(B * NH * DH) % len(extreme)].reshape(B, NH, DH)  # (B, NH, DH)
    x[:, :, 0, 0, :] = units - b.reshape(NH, 4, DH)[None, :, 0, :]  # i~ at t = 0 (h_0 = 0)
    x = x.reshape(B, NH, S, 4 * DH)  # gate-major
    x, r, b = x.to(dtype), r.to(dtype), b.to(dtype)
    return x, r, b


def check_against_official(y, state, x, r, b, tol: float) -> None:
    """y (B, NH, S, DH) and the final (h, c, n, m) of a form on ``x, r, b`` (fresh state) against
    the official cell run in float64 on the same (rounded) inputs: everything finite, y and h
    within ``tol`` relative, c and n compared with the stabilizer m taken out (c e^m, n e^m relative
    to the official ones: the forms may keep another m after the first step; none does today)."""
    y_o, (h_o, c_o, n_o, m_o) = official_vanilla_slstm(x.double(), r.double(), b.double())
    assert torch.isfinite(y_o).all(), "the oracle itself is not finite: the inputs are wrong"
    h, c, n, m = (t.double() for t in state)
    y = y.double()
    assert torch.isfinite(y).all(), f"non-finite outputs at steps {sorted(set(torch.nonzero(~torch.isfinite(y))[:, 2].tolist()))}"
    for name, t in zip("hcnm", (h, c, n, m)):
        assert torch.isfinite(t).all(), f"non-finite state {name}"
    rel = lambda a, e: ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    assert rel(y, y_o) < tol, f"y rel err {rel(y, y_o):.3g}"
    assert rel(h, h_o) < tol, f"h rel err {rel(h, h_o):.3g}"
    scale = torch.exp(m - m_o)  # (B, NH, DH): ours e^m over theirs
    assert rel(c * scale, c_o) < tol, f"c rel err {rel(c * scale, c_o):.3g}"
    assert rel(n * scale, n_o) < tol, f"n rel err {rel(n * scale, n_o):.3g}"
