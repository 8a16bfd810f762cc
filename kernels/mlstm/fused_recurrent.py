"""One mLSTM decoding step in one Triton kernel (forward only; S == 1, the state is required).

Same function and signature as the reference :func:`~xlstm_export.kernels.mlstm.naive.naive_step_mlstm`::

    h, (c, n, m) = fused_recurrent_step_mlstm(q, k, v, i, f, state, *, eps=1e-6)
    # q, k: (B, NH, 1, DHQK)   v: (B, NH, 1, DHV)   i, f: (B, NH, 1) gate pre-activations
    # state: (c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)), float32
    # h: (B, NH, 1, DHV) in the dtype of v; the new state float32 (fresh tensors, the input state is not modified)

Per head (q scaled by 1/sqrt(DHQK)): m' = max(logsigmoid(f) + m, i), C' = e^{logsigmoid(f)+m-m'} C
+ e^{i-m'} k v^T, n' alike, h = C'^T q / (max(|n'^T q|, e^{-m'}) + eps).

Decoding is bound by reading and writing C (DHQK x DHV floats per head): one program per
(DHV tile, head) streams its columns of C once, tile by tile over DHQK, writing C' as it goes;
every program recomputes the scalar gates and n'.q (DHQK long, cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...contract import MLSTM, check_inputs
from .._reference import EPS_ZERO
from .._triton import dot_precision, dot_tile, is_pow2, next_pow2, require_triton

try:
    import triton
    import triton.language as tl

    from .._tl import cast, logsigmoid
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["fused_recurrent_step_mlstm", "StepMLSTMLaunch"]

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # c (B,NH,DHQK,DHV), n (B,NH,DHQK), m (B,NH)


@dataclass(frozen=True)
class StepMLSTMLaunch:
    """Tiles of the step kernel (powers of two)."""

    block_dqk: int  # BK: rows of C per loop iteration
    block_dv: int  # BV: columns of C per program
    num_warps: int = 4  # warps per program

    def __post_init__(self):
        for name in ("block_dqk", "block_dv"):
            val = getattr(self, name)
            if not (isinstance(val, int) and is_pow2(val)):
                raise ValueError(f"StepMLSTMLaunch.{name} must be a power of two, got {val!r}")


STEP_MAX_BLOCK_DQK = 64  # BK: rows of C per loop iteration
STEP_MAX_BLOCK_DV = 128  # BV: columns of C per program


def step_mlstm_launch_params(DHQK: int, DHV: int) -> StepMLSTMLaunch:
    return StepMLSTMLaunch(block_dqk=min(STEP_MAX_BLOCK_DQK, next_pow2(DHQK)),
                           block_dv=min(STEP_MAX_BLOCK_DV, dot_tile(DHV)))


if triton is not None:

    @triton.jit
    def fused_recurrent_step_mlstm_fwd_kernel(
        q_ptr,  # (BH, DHQK)
        k_ptr,  # (BH, DHQK)
        v_ptr,  # (BH, DHV)
        i_ptr,  # (BH,)
        f_ptr,  # (BH,)
        c_ptr,  # (BH, DHQK, DHV) fp32 state in
        n_ptr,  # (BH, DHQK) fp32
        m_ptr,  # (BH,) fp32
        h_ptr,  # out (BH, DHV), dtype of v
        c_out_ptr,  # out (BH, DHQK, DHV) fp32
        n_out_ptr,  # out (BH, DHQK) fp32
        m_out_ptr,  # out (BH,) fp32
        scale,
        eps,
        DHQK: tl.constexpr,
        DHV: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        ROUND: tl.constexpr,  # "interpret-bf16" under the interpreter with bfloat16 (see _tl.cast)
    ):
        iv = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        offs_v = iv * BV + tl.arange(0, BV)  # (BV,)
        mv = offs_v < DHV
        ig = tl.load(i_ptr + bh).to(tl.float32)
        fg = tl.load(f_ptr + bh).to(tl.float32)
        m = tl.load(m_ptr + bh)
        lf = logsigmoid(fg)
        m_new = tl.maximum(lf + m, ig)
        fw = tl.exp(lf + m - m_new)  # stabilized forget gate
        iw = tl.exp(ig - m_new)  # stabilized input gate
        vt = tl.load(v_ptr + bh * DHV + offs_v, mask=mv, other=0.0).to(tl.float32)  # (BV,)
        num = tl.zeros([BV], dtype=tl.float32)
        nq = tl.zeros([BK], dtype=tl.float32)
        for ik in range((DHQK + BK - 1) // BK):
            offs_k = ik * BK + tl.arange(0, BK)  # (BK,)
            mk = offs_k < DHQK
            c_off = bh * DHQK * DHV + offs_k[:, None] * DHV + offs_v[None, :]  # (BK, BV)
            c_mask = mk[:, None] & mv[None, :]
            c = tl.load(c_ptr + c_off, mask=c_mask, other=0.0)  # (BK, BV)
            kt = tl.load(k_ptr + bh * DHQK + offs_k, mask=mk, other=0.0).to(tl.float32)  # (BK,)
            qt = tl.load(q_ptr + bh * DHQK + offs_k, mask=mk, other=0.0).to(tl.float32) * scale  # (BK,)
            n = tl.load(n_ptr + bh * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
            c = fw * c + iw * kt[:, None] * vt[None, :]
            n = fw * n + iw * kt
            tl.store(c_out_ptr + c_off, c, mask=c_mask)
            if iv == 0:
                tl.store(n_out_ptr + bh * DHQK + offs_k, n, mask=mk)
            num += tl.sum(c * qt[:, None], 0)
            nq += n * qt
        den = tl.maximum(tl.abs(tl.sum(nq, 0)), tl.exp(-m_new)) + eps
        tl.store(h_ptr + bh * DHV + offs_v, cast(num / den, h_ptr.dtype.element_ty, ROUND), mask=mv)
        if iv == 0:
            tl.store(m_out_ptr + bh, m_new)


def fused_recurrent_step_mlstm(
    q: torch.Tensor,  # (B, NH, 1, DHQK)
    k: torch.Tensor,  # (B, NH, 1, DHQK)
    v: torch.Tensor,  # (B, NH, 1, DHV)
    i: torch.Tensor,  # (B, NH, 1)
    f: torch.Tensor,  # (B, NH, 1)
    state: MLSTMState,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH), float32
    *,
    chunk_size: int = 64,  # unused; accepted so every form shares the cell signature
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """One recurrent mLSTM step with the Triton step kernel (no autograd: decoding).

    Returns h (B, NH, 1, DHV) in the dtype of v and the new state (c, n, m) in float32.
    """
    B, NH, S, DHQK, DHV = check_inputs(
        MLSTM, "fused_recurrent_step_mlstm", (q, k, v, i, f), state, {"eps": eps},
        same_dtype="qkv", state_required=True, step=True, allow=EPS_ZERO,
    )
    require_triton("fused_recurrent_step_mlstm", q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f, *state)):
        raise RuntimeError(
            "fused_recurrent_step_mlstm: the step kernel has no backward; use chunk_mlstm (any S) for training"
        )
    p = step_mlstm_launch_params(DHQK, DHV)
    BH = B * NH
    c0, n0, m0 = (t.reshape(BH, *t.shape[2:]).contiguous() for t in state)  # (BH, DHQK, DHV), (BH, DHQK), (BH,)
    h = torch.empty(BH, DHV, device=q.device, dtype=v.dtype)  # (BH, DHV)
    c = torch.empty(BH, DHQK, DHV, device=q.device, dtype=torch.float32)  # (BH, DHQK, DHV)
    n = torch.empty(BH, DHQK, device=q.device, dtype=torch.float32)  # (BH, DHQK)
    m = torch.empty(BH, device=q.device, dtype=torch.float32)  # (BH,)
    grid = (triton.cdiv(DHV, p.block_dv), BH)
    fused_recurrent_step_mlstm_fwd_kernel[grid](
        q.reshape(BH, DHQK).contiguous(), k.reshape(BH, DHQK).contiguous(), v.reshape(BH, DHV).contiguous(),
        i.reshape(BH).contiguous(), f.reshape(BH).contiguous(),
        c0, n0, m0, h, c, n, m, DHQK**-0.5, float(eps),
        DHQK=DHQK, DHV=DHV, BK=p.block_dqk, BV=p.block_dv, ROUND=dot_precision(v.dtype),
        num_warps=p.num_warps,
    )
    return h.view(B, NH, 1, DHV), (c.view(B, NH, DHQK, DHV), n.view(B, NH, DHQK), m.view(B, NH))
