"""Pure-PyTorch reference forms of the mLSTM cell (the readable statement of the math).

All four forms compute the same function with the project's fixed cell signature::

    h, (c, n, m) = naive_chunk_mlstm(q, k, v, i, f, state=None, *, chunk_size=64, eps=1e-6)
    # q, k: (B, NH, S, DHQK)   v: (B, NH, S, DHV)   i, f: (B, NH, S) gate pre-activations
    # state: None or (c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH))
    # h: (B, NH, S, DHV) in the dtype of v; final state float32 (float64 for float64 inputs)

Per step (q scaled by 1/sqrt(DHQK) inside the cell; the state holds unscaled k, the
``mlstm_kernels`` / transformers convention)::

    m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)                      # stabilizer
    C_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t = exp(logsigmoid(f_t) + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps)

The initial state is C=0, n=0, m=0 when ``state`` is None, and an all-zero state is the same as
None. The max defining m always includes the carried term ``b_t + m_0`` (b = cumulative
logsigmoid(f)), also for a fresh sequence, so that every form here agrees to rounding error
(the plain ``mlstm_kernels`` parallel kernel drops that term for a fresh sequence; that only
changes h through the eps term, by at most eps relative).

Computation runs in float32, or float64 when any input is float64 (kept end-to-end). The forms:

* :func:`naive_parallel_mlstm`  quadratic in S; the initial state enters as one extra "column".
* :func:`naive_chunk_mlstm`     linear in S; chunks of ``chunk_size`` (the last may be shorter),
  vectorized inside a chunk, (C, n, m) carried between chunks.
* :func:`naive_recurrent_mlstm` a plain loop over :func:`naive_step_mlstm`'s update.
* :func:`naive_step_mlstm`      one step (S == 1), state required.

Example::

    >>> B, NH, S, DHQK, DHV = 1, 2, 5, 8, 16
    >>> q, k = torch.randn(B, NH, S, DHQK), torch.randn(B, NH, S, DHQK)
    >>> v = torch.randn(B, NH, S, DHV)
    >>> i, f = torch.randn(B, NH, S), torch.randn(B, NH, S) + 3.0
    >>> h, (c, n, m) = naive_chunk_mlstm(q, k, v, i, f, chunk_size=4)
    >>> h.shape, c.shape, n.shape, m.shape
    (torch.Size([1, 2, 5, 16]), torch.Size([1, 2, 8, 16]), torch.Size([1, 2, 8]), torch.Size([1, 2]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...contract import MLSTM, check_inputs
from .._reference import EPS_ZERO, REFERENCE_DTYPES, compute_dtype

__all__ = [
    "naive_parallel_mlstm",
    "naive_chunk_mlstm",
    "naive_recurrent_mlstm",
    "naive_step_mlstm",
]

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # c (B,NH,DHQK,DHV), n (B,NH,DHQK), m (B,NH)


# ---------------------------------------------------------------------------------------------
# validation and dtype helpers
# ---------------------------------------------------------------------------------------------


def _prepare(fn: str, q, k, v, i, f, state, attrs: dict, step: bool = False):
    """Check the inputs with the op's one check (xlstm_export.contract) and the references'
    capabilities: any float dtype (float64 included, mixed allowed), states in any float dtype, and
    eps = 0 (EPS_ZERO). ``attrs``: the attributes the form uses (only the chunkwise form reads
    chunk_size). Returns the dims (B, NH, S, DHQK, DHV), the output dtype (that of v), q, k, v, i, f
    in the compute dtype and the initial (c, n, m) in it."""
    B, NH, S, DHQK, DHV = check_inputs(
        MLSTM, fn, (q, k, v, i, f), state, attrs, dtypes=REFERENCE_DTYPES,
        state_dtypes=None, state_required=step, step=step, allow=EPS_ZERO,
    )
    dt = compute_dtype(q, k, v, i, f)
    if state is None:
        state = (
            torch.zeros(B, NH, DHQK, DHV, dtype=dt, device=q.device),  # c (B, NH, DHQK, DHV)
            torch.zeros(B, NH, DHQK, dtype=dt, device=q.device),  # n (B, NH, DHQK)
            torch.zeros(B, NH, dtype=dt, device=q.device),  # m (B, NH)
        )
    qkvif = tuple(t.to(dt) for t in (q, k, v, i, f))
    return (B, NH, S, DHQK, DHV), v.dtype, qkvif, tuple(t.to(dt) for t in state)


# ---------------------------------------------------------------------------------------------
# step / recurrent form
# ---------------------------------------------------------------------------------------------


def _step(
    q: torch.Tensor,  # (B, NH, DHQK), compute dtype
    k: torch.Tensor,  # (B, NH, DHQK)
    v: torch.Tensor,  # (B, NH, DHV)
    i: torch.Tensor,  # (B, NH)
    f: torch.Tensor,  # (B, NH)
    c: torch.Tensor,  # (B, NH, DHQK, DHV)
    n: torch.Tensor,  # (B, NH, DHQK)
    m: torch.Tensor,  # (B, NH)
    eps: float,
) -> tuple[torch.Tensor, MLSTMState]:
    """One mLSTM step in the compute dtype; returns h (B, NH, DHV) and (c, n, m)."""
    log_f = F.logsigmoid(f)  # (B, NH)
    m_new = torch.maximum(log_f + m, i)  # (B, NH)
    f_act = torch.exp(log_f + m - m_new)  # (B, NH)
    i_act = torch.exp(i - m_new)  # (B, NH)
    c_new = f_act[..., None, None] * c + i_act[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_new = f_act[..., None] * n + i_act[..., None] * k  # (B, NH, DHQK)
    q_scaled = q * (q.shape[-1] ** -0.5)  # (B, NH, DHQK)
    num = (q_scaled[..., None, :] @ c_new).squeeze(-2)  # (B, NH, DHV)
    qn = (q_scaled * n_new).sum(-1)  # (B, NH)
    den = torch.maximum(qn.abs(), torch.exp(-m_new)) + eps  # (B, NH)
    h = num / den[..., None]  # (B, NH, DHV)
    return h, (c_new, n_new, m_new)


def naive_step_mlstm(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,  # (B, NH, 1, DHQK) x2, (B, NH, 1, DHV), (B, NH, 1) x2
    state: MLSTMState,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)
    *, chunk_size: int = 64, eps: float = 1e-6,  # chunk_size unused (the cell signature)
) -> tuple[Tensor, MLSTMState]:
    """One recurrent mLSTM step (S == 1; the state is required).

    Returns h (B, NH, 1, DHV) in the dtype of v and the new state (c, n, m).
    """
    _, out_dtype, (q, k, v, i, f), (c, n, m) = _prepare(
        "naive_step_mlstm", q, k, v, i, f, state, {"eps": eps}, step=True)
    h, (c, n, m) = _step(q[:, :, 0], k[:, :, 0], v[:, :, 0], i[:, :, 0], f[:, :, 0], c, n, m, eps)
    return h[:, :, None].to(out_dtype), (c, n, m)  # (B, NH, 1, DHV)


def naive_recurrent_mlstm(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,  # (B, NH, S, DHQK) x2, (B, NH, S, DHV), (B, NH, S) x2
    state: MLSTMState | None = None,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)
    *, chunk_size: int = 64, eps: float = 1e-6,  # chunk_size unused (the cell signature)
) -> tuple[Tensor, MLSTMState]:
    """The mLSTM as a plain loop over single steps (O(S) steps, the most literal form)."""
    (B, NH, S, DHQK, DHV), out_dtype, (q, k, v, i, f), (c, n, m) = _prepare(
        "naive_recurrent_mlstm", q, k, v, i, f, state, {"eps": eps})
    hs = []
    for t in range(S):
        h_t, (c, n, m) = _step(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], f[:, :, t], c, n, m, eps)
        hs.append(h_t)  # (B, NH, DHV)
    h = torch.stack(hs, dim=2)  # (B, NH, S, DHV)
    return h.to(out_dtype), (c, n, m)


# ---------------------------------------------------------------------------------------------
# parallel form
# ---------------------------------------------------------------------------------------------


def _segment_sums(x: Tensor) -> Tensor:
    """x (..., L) -> (..., L, L) with [t, s] = x_{s+1} + ... + x_t for s <= t (0 on the diagonal),
    0 above it: b_t - b_s for b = cumsum(x), summed from the terms in between instead of taken as
    the difference of two cumsums. The difference loses ~1e-7 of |b| (a chunk of nearly closed
    forget gates: |b| ~ 30 L), and its gradient takes the diagonal's b_t - b_t apart into two
    large terms that cancel only to rounding, which then swamps the gradient of f; here the
    diagonal and every entry hold only the steps they span."""
    L = x.shape[-1]
    between = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)  # [u, s]: u > s
    terms = torch.where(between, x[..., :, None], x.new_zeros(()))  # (..., L, L): [u, s] = x_u for u > s
    return terms.cumsum(-2)  # [t, s] = sum_{s < u <= t} x_u


def naive_parallel_mlstm(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,  # (B, NH, S, DHQK) x2, (B, NH, S, DHV), (B, NH, S) x2
    state: MLSTMState | None = None,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)
    *, chunk_size: int = 64, eps: float = 1e-6,  # chunk_size unused (the cell signature)
) -> tuple[Tensor, MLSTMState]:
    """The mLSTM in its quadratic parallel form (memory O(S^2); for tests and short sequences).

    log D[t, s] = b_t - b_s + i_s for s <= t (b = cumsum logsigmoid(f); b_t - b_s summed from the
    steps in between, see ``_segment_sums``), -inf above the diagonal; the initial state contributes
    with log weight b_t + m_0 (an extra column); m_t is the row max.
    """
    (B, NH, S, DHQK, DHV), out_dtype, (q, k, v, i, f), (c0, n0, m0) = _prepare(
        "naive_parallel_mlstm", q, k, v, i, f, state, {"eps": eps})
    log_f = F.logsigmoid(f)  # (B, NH, S)
    b = log_f.cumsum(-1)  # (B, NH, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()  # (S, S)
    log_d = torch.where(causal, _segment_sums(log_f) + i[..., None, :], float("-inf"))  # (B, NH, S, S)
    log_w0 = b + m0[..., None]  # (B, NH, S) log weight of the initial state at step t
    m = torch.maximum(log_d.amax(-1), log_w0)  # (B, NH, S)
    d = torch.exp(log_d - m[..., None])  # (B, NH, S, S)
    w0 = torch.exp(log_w0 - m)  # (B, NH, S)

    q_scaled = q * (DHQK**-0.5)  # (B, NH, S, DHQK)
    scores = (q_scaled @ k.transpose(-2, -1)) * d  # (B, NH, S, S)
    num = scores @ v + w0[..., None] * (q_scaled @ c0)  # (B, NH, S, DHV)
    qn = scores.sum(-1) + w0 * (q_scaled @ n0[..., None]).squeeze(-1)  # (B, NH, S)
    den = torch.maximum(qn.abs(), torch.exp(-m)) + eps  # (B, NH, S)
    h = num / den[..., None]  # (B, NH, S, DHV)

    # final state: the last row of the same weights
    m_last = m[..., -1]  # (B, NH)
    w_last = d[..., -1, :]  # (B, NH, S)  exp(b_S - b_s + i_s - m_S)
    c = w0[..., -1, None, None] * c0 + (k * w_last[..., None]).transpose(-2, -1) @ v  # (B, NH, DHQK, DHV)
    n = w0[..., -1, None] * n0 + (k * w_last[..., None]).sum(-2)  # (B, NH, DHQK)
    return h.to(out_dtype), (c, n, m_last)


# ---------------------------------------------------------------------------------------------
# chunkwise form
# ---------------------------------------------------------------------------------------------


def naive_chunk_mlstm(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor,  # (B, NH, S, DHQK) x2, (B, NH, S, DHV), (B, NH, S) x2
    state: MLSTMState | None = None,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)
    *, chunk_size: int = 64, eps: float = 1e-6,  # chunk_size: the chunk length
) -> tuple[Tensor, MLSTMState]:
    """The mLSTM in chunkwise form: linear in S, any S and any chunk size.

    The sequence is cut into chunks of ``chunk_size`` steps; the last chunk holds the remaining
    ``S % chunk_size`` steps exactly (no padding). Inside a chunk (b = in-chunk cumsum of
    logsigmoid(f), L = chunk length)::

        m_t = max(b_t + m_prev, max_{s<=t} (b_t - b_s + i_s))     (b_t - b_s: see _segment_sums)
        h_t = [exp(b_t + m_prev - m_t) q_t C_prev + sum_{s<=t} exp(b_t - b_s + i_s - m_t) (q_t.k_s) v_s]
              / (max(|same with n|, exp(-m_t)) + eps)

    and the carried state becomes, with a_s = b_L - b_s + i_s and m = max(b_L + m_prev, max_s a_s),
    C = exp(b_L + m_prev - m) C_prev + sum_s exp(a_s - m) k_s v_s^T (n alike).
    """
    (B, NH, S, DHQK, DHV), out_dtype, (q, k, v, i, f), (c, n, m) = _prepare(
        "naive_chunk_mlstm", q, k, v, i, f, state, {"chunk_size": chunk_size, "eps": eps})
    q = q * (DHQK**-0.5)  # (B, NH, S, DHQK)
    log_f = F.logsigmoid(f)  # (B, NH, S)

    hs = []
    for start in range(0, S, chunk_size):
        end = min(start + chunk_size, S)
        L = end - start
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]  # (B, NH, L, D*)
        ic = i[:, :, start:end]  # (B, NH, L)
        b = log_f[:, :, start:end].cumsum(-1)  # (B, NH, L)
        seg = _segment_sums(log_f[:, :, start:end])  # (B, NH, L, L): b_t - b_s for s <= t

        # outputs of this chunk
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # (L, L)
        log_d = torch.where(causal, seg + ic[..., None, :], float("-inf"))
        log_inter = b + m[..., None]  # (B, NH, L)
        m_t = torch.maximum(log_d.amax(-1), log_inter)  # (B, NH, L)
        d = torch.exp(log_d - m_t[..., None])  # (B, NH, L, L)
        w_inter = torch.exp(log_inter - m_t)  # (B, NH, L)
        scores = (qc @ kc.transpose(-2, -1)) * d  # (B, NH, L, L)
        num = scores @ vc + w_inter[..., None] * (qc @ c)  # (B, NH, L, DHV)
        qn = scores.sum(-1) + w_inter * (qc @ n[..., None]).squeeze(-1)  # (B, NH, L)
        den = torch.maximum(qn.abs(), torch.exp(-m_t)) + eps  # (B, NH, L)
        hs.append(num / den[..., None])  # (B, NH, L, DHV)

        # carry the state to the next chunk
        a = seg[..., -1, :] + ic  # (B, NH, L): b_L - b_s + i_s
        g = b[..., -1]  # (B, NH)
        m_next = torch.maximum(g + m, a.amax(-1))  # (B, NH)
        w_carry = torch.exp(g + m - m_next)  # (B, NH)
        w_in = torch.exp(a - m_next[..., None])  # (B, NH, L)
        kw = kc * w_in[..., None]  # (B, NH, L, DHQK)
        c = w_carry[..., None, None] * c + kw.transpose(-2, -1) @ vc  # (B, NH, DHQK, DHV)
        n = w_carry[..., None] * n + kw.sum(-2)  # (B, NH, DHQK)
        m = m_next

    h = torch.cat(hs, dim=2)  # (B, NH, S, DHV)
    return h.to(out_dtype), (c, n, m)
