"""Pure-PyTorch reference form of the sLSTM cell (the readable statement of the math).

Fixed cell signature (head-first, gate order i, f, z, o)::

    y, (h, c, n, m) = naive_recurrent_slstm(x, r, b, state=None)
    # x: (B, NH, S, 4*DH)  W x per head, gate-major [i | f | z | o] along the last dim, no bias
    # r: (NH, DH, 4*DH)    recurrent weights: pre-activations(t) = x_t + h_{t-1} @ r[head] + b[head]
    # b: (NH, 4*DH)        bias, same gate-major layout
    # state: None or (h, c, n, m), each (B, NH, DH)
    # y: (B, NH, S, DH) in the dtype of x; final state float32 (float64 for float64 inputs)

Per step, with pre-activations (i~, f~, z~, o~)::

    a = logsigmoid(f~) + m_{t-1}
    m_t = i~ where n_{t-1} == 0, else max(i~, a)                      # stabilizer
    i = exp(i~ - m_t);  f = exp(min(a - m_t, 0))
    c_t = f c_{t-1} + i tanh(z~);  n_t = f n_{t-1} + i;  h_t = sigmoid(o~) c_t / n_t

The first step of a fresh sequence (n == 0) is NX-AI's vanilla cell's: the stabilizer starts at
m = i~, so i = 1 and n_1 = 1 whatever i~ is. max(i~, a) alone would give n_1 = exp(i~ - a), which
underflows to 0 for i~ below about -104 (float32), and h = 0/0 = NaN; the official cell stays
finite (h_1 = sigmoid(o~) tanh(z~)). f is capped at 1 as the official cell caps it: a no-op where
m_t = max(i~, a) (a - m_t <= 0 there), and on the first step f multiplies c = n = 0. The official
cell tests n == 0 for the whole batch at once (``torch.all``); here it is per element, which is
the same for a fresh (all-zero) or a running (all n > 0) state, and keeps batch rows independent.

The initial state is all zeros when ``state`` is None (an all-zero state is the same as None).
Computation runs in float32, or float64 when any input is float64. Both functions are plain
differentiable torch code: they are the gradient reference for the fused kernels.

Example::

    >>> B, NH, S, DH = 1, 2, 5, 4
    >>> x = torch.randn(B, NH, S, 4 * DH)
    >>> r, b = 0.1 * torch.randn(NH, DH, 4 * DH), torch.randn(NH, 4 * DH)
    >>> y, (h, c, n, m) = naive_recurrent_slstm(x, r, b)
    >>> y.shape, h.shape
    (torch.Size([1, 2, 5, 4]), torch.Size([1, 2, 4]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...contract import SLSTM, check_inputs
from .._reference import REFERENCE_DTYPES, compute_dtype

__all__ = ["naive_recurrent_slstm", "naive_step_slstm"]

SLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # h, c, n, m: (B, NH, DH)


def _prepare(fn: str, x, r, b, state, step: bool = False):
    """Check the inputs with the op's one check (xlstm_export.contract) and the reference's
    capabilities (any float dtype, float64 included, mixed allowed; states in any float dtype).
    Returns the dims (B, NH, S, DH), the compute dtype and the initial (h, c, n, m) in it."""
    B, NH, S, DH = check_inputs(SLSTM, fn, (x, r, b), state, dtypes=REFERENCE_DTYPES, state_dtypes=None,
                                state_required=step, step=step)
    dt = compute_dtype(x, r, b)
    if state is None:
        z = torch.zeros(B, NH, DH, dtype=dt, device=x.device)  # (B, NH, DH)
        state = (z, z, z, z)
    return (B, NH, S, DH), dt, tuple(t.to(dt) for t in state)


def _step(
    pre_x: torch.Tensor,  # (B, NH, 4*DH)  x_t + b, compute dtype
    r: torch.Tensor,  # (NH, DH, 4*DH)
    h: torch.Tensor,  # (B, NH, DH)
    c: torch.Tensor,  # (B, NH, DH)
    n: torch.Tensor,  # (B, NH, DH)
    m: torch.Tensor,  # (B, NH, DH)
) -> SLSTMState:
    """One sLSTM step in the compute dtype; returns the new (h, c, n, m)."""
    pre = pre_x + torch.einsum("bnd,ndg->bng", h, r)  # (B, NH, 4*DH)
    i_pre, f_pre, z_pre, o_pre = pre.chunk(4, dim=-1)  # each (B, NH, DH)
    a = F.logsigmoid(f_pre) + m  # (B, NH, DH) log of the forget gate times the old scale
    m_new = torch.where(n == 0, i_pre, torch.maximum(i_pre, a))  # (B, NH, DH) n == 0: first step
    i_act = torch.exp(i_pre - m_new)  # (B, NH, DH)
    f_act = torch.exp(torch.clamp(a - m_new, max=0.0))  # (B, NH, DH) <= 1 (clamp passes grad at 0)
    c_new = f_act * c + i_act * torch.tanh(z_pre)  # (B, NH, DH)
    n_new = f_act * n + i_act  # (B, NH, DH)
    h_new = torch.sigmoid(o_pre) * c_new / n_new  # (B, NH, DH)
    return h_new, c_new, n_new, m_new


def naive_recurrent_slstm(
    x: torch.Tensor,  # (B, NH, S, 4*DH)
    r: torch.Tensor,  # (NH, DH, 4*DH)
    b: torch.Tensor,  # (NH, 4*DH)
    state: SLSTMState | None = None,  # h, c, n, m: (B, NH, DH)
) -> tuple[torch.Tensor, SLSTMState]:
    """The sLSTM over a sequence as a plain step loop. Returns y (B, NH, S, DH) in the dtype of
    x and the final state (h, c, n, m)."""
    (B, NH, S, DH), dt, (h, c, n, m) = _prepare("naive_recurrent_slstm", x, r, b, state)
    pre_x = x.to(dt) + b.to(dt)[:, None, :]  # (B, NH, S, 4*DH)
    r = r.to(dt)
    ys = []
    for t in range(S):
        h, c, n, m = _step(pre_x[:, :, t], r, h, c, n, m)
        ys.append(h)  # (B, NH, DH)
    y = torch.stack(ys, dim=2)  # (B, NH, S, DH)
    return y.to(x.dtype), (h, c, n, m)


def naive_step_slstm(
    x: torch.Tensor,  # (B, NH, 1, 4*DH)
    r: torch.Tensor,  # (NH, DH, 4*DH)
    b: torch.Tensor,  # (NH, 4*DH)
    state: SLSTMState,  # h, c, n, m: (B, NH, DH)
) -> tuple[torch.Tensor, SLSTMState]:
    """One sLSTM step (S == 1; the state is required). Returns y (B, NH, 1, DH) in the dtype of x
    and the new state (h, c, n, m)."""
    _, dt, (h, c, n, m) = _prepare("naive_step_slstm", x, r, b, state, step=True)
    h, c, n, m = _step(x[:, :, 0].to(dt) + b.to(dt), r.to(dt), h, c, n, m)
    return h[:, :, None].to(x.dtype), (h, c, n, m)
