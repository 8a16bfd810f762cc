"""Chunkwise mLSTM in Triton: forward and backward kernels (training), any sequence length.

Same function and signature as the reference :func:`~xlstm_export.kernels.mlstm.naive.naive_chunk_mlstm`::

    h, (c, n, m) = chunk_mlstm(q, k, v, i, f, state=None, *, chunk_size=64, eps=1e-6)
    # q, k: (B, NH, S, DHQK)   v: (B, NH, S, DHV)   i, f: (B, NH, S) gate pre-activations
    # state: None or (c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH)), float32
    # h: (B, NH, S, DHV) in the dtype of v; final state float32

Example (on CUDA, or on CPU under ``TRITON_INTERPRET=1``)::

    >>> B, NH, S, DHQK, DHV = 2, 4, 100, 64, 128
    >>> q, k = torch.randn(B, NH, S, DHQK, device="cuda"), torch.randn(B, NH, S, DHQK, device="cuda")
    >>> v = torch.randn(B, NH, S, DHV, device="cuda")
    >>> i, f = torch.randn(B, NH, S, device="cuda"), torch.randn(B, NH, S, device="cuda") + 3.0
    >>> h, (c, n, m) = chunk_mlstm(q, k, v, i, f)   # h (2, 4, 100, 128), c (2, 4, 64, 128), n (2, 4, 64), m (2, 4)

Design (TFLA-style, Beck et al. 2025). L is the chunk size, BL <= 64 the tile of time steps
(L a multiple of BL: chunks of 128 or 256 keep 64 x 64 tiles). The last chunk may be partial: every
kernel masks the steps t >= S, the math is unchanged. Per chunk, b = in-chunk cumsum of
logsigmoid(f), g = b at the chunk's last step, a_j = g - b_j + i_j:

  forward (kernels and launcher in chunk_fwd.py)
    chunk_mlstm_fwd_gates_kernel   b, g, max_j a_j, cummax_t (i_t - b_t)        parallel over chunks
    chunk_mlstm_fwd_state_kernel   m_k = max(g + m_{k-1}, max_j a_j),
                                   C_k = e^{g+m_{k-1}-m_k} C_{k-1} + sum_j e^{a_j-m_k} k_j v_j^T
                                   (n alike); one program per (DHQK tile, DHV tile, head)  sequential
    chunk_mlstm_fwd_kernel         h_t from q_t C_{k-1} and the causal D-weighted q k^T v of the
                                   chunk, m_t = b_t + max(m_{k-1}, cummax_t); per (row tile, DHV tile)
  backward (chunk_bwd.py; the forward states are recomputed, not stored)
    chunk_mlstm_bwd_prep_kernel    1/den_t, z_t = dL/d(n_t.q_t), E_t = dL/dm_t through eps
    chunk_mlstm_bwd_state_kernel   dC_{k-1} = e^{g+m_{k-1}-m_k} dC_k + sum_t e^{b_t+m_{k-1}-m_t} q_t dnum_t^T
                                   (dn alike with z), from dC_S, dn_S                 reverse, sequential
    chunk_mlstm_bwd_kernel         dq, dk, dv of every (time tile, DHQK or DHV tile) in one launch,
                                   plus the row sums q.dq, k.dk per DHQK tile (the pair (t, t) apart)
    chunk_mlstm_bwd_gates_kernel   di, df, dm0: prefix sums and the stabilizer chain, one scan per head

Gradients are exact, including the normalizer's (TFLA treats the denominator as a constant) and
the stabilizer's: h depends on m_t only through eps (h_t = C~_t^T q / (max(|n~_t^T q|, 1) + eps e^{m_t})
in unstabilized terms), the final state (C_S, n_S) = (C~_S, n~_S) e^{-m_S} and m_S itself on m_S
directly; that gradient is routed down m_t = max(logsigmoid(f_t) + m_{t-1}, i_t) to i, f and m0
exactly as autograd through the reference does (see ``chunk_mlstm_bwd_gates_kernel``).

Precision: float32 inputs use IEEE float32 tl.dot (configurable); float16/bfloat16 inputs feed the
tensor cores with 16-bit tiles (inputs as they are, float32 intermediates such as the D-weighted
scores and the states rounded to the input dtype), accumulating in float32; gates, stabilizers,
normalizers and states are float32 throughout.

Nearly closed forget gates (logsigmoid(f) ~ -10 and below): df is computed from the small terms
only (see ``chunk_mlstm_bwd_gates_kernel``), at float32 accuracy against the float64 reference
(measured at S = 37-70: 2e-6 at f ~ -10, 9e-6 at f ~ -30 with L = 16 and 1.7e-5 with L = 64, whose
in-chunk cumsums b reach ~30 L and round to ~1e-7 of that). float16 tiles cannot hold such pair
weights as they are (e^-20 and e^-30 lie below float16's smallest subnormal, 6e-8): the backward's
products whose left operand carries them (the state gradients' q w tiles, dq's and dk's pair
tiles) and those of the state gradients, tiny with such gates (dk's v dC^T), are scaled per row or
column by a power of two before the rounding (``_tl.mm_rows``, ``mm_cols``; exact, float16 only).
Measured in the interpreter at S = 37, L = 16 with a loss scale of 1024 (what float16 training
uses): at logsigmoid(f) ~ -20, df, dc0 and dm0 within 5.6e-4, 3.0e-4 and 2.5e-4 of float64 (0.61,
1.0 and 1.0 before: flushed to 0). At ~ -30 dc0 and dm0 are as good, but df itself (~e^-30 times
the loss scale) is below float16's range in the returned gradient. bfloat16 has float32's range
and needs none of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ...contract import MLSTM, check_inputs
from .._reference import EPS_ZERO
from .._triton import DOT_MIN, dot_tile, is_pow2, require_triton
from .chunk_bwd import (  # noqa: F401  (the kernels stay importable from here)
    chunk_mlstm_bwd,
    chunk_mlstm_bwd_gates_kernel,
    chunk_mlstm_bwd_kernel,
    chunk_mlstm_bwd_prep_kernel,
    chunk_mlstm_bwd_state_kernel,
)
from .chunk_fwd import (  # noqa: F401
    chunk_mlstm_fwd,
    chunk_mlstm_fwd_gates_kernel,
    chunk_mlstm_fwd_kernel,
    chunk_mlstm_fwd_state_kernel,
)

__all__ = ["chunk_mlstm", "ChunkMLSTMLaunch", "chunk_mlstm_launch_params", "ChunkMLSTMFunction"]

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # c (B,NH,DHQK,DHV), n (B,NH,DHQK), m (B,NH)


# ---------------------------------------------------------------------------------------------
# launch parameters: the tile sizes, written once
# ---------------------------------------------------------------------------------------------

MAX_BLOCK_T = 64  # BL: time steps per intra-chunk tile (chunks of 128, 256 run 2, 4 tiles of 64)
MAX_BLOCK_D = 64  # BK, BV: tiles of DHQK and DHV (a head dim of 128 runs in 2 tiles)


@dataclass(frozen=True)
class ChunkMLSTMLaunch:
    """Tile sizes and launch settings of the chunkwise kernels (all powers of two)."""

    chunk_size: int  # L: steps per chunk; states are materialized every L steps (sequential kernel)
    block_t: int  # BL: time steps per intra-chunk tile; L is a multiple; >= DOT_MIN for tl.dot
    block_dqk: int  # BK: tile of DHQK (looped over inside a program where a full row is needed)
    block_dv: int  # BV: tile of DHV
    block_t_prep: int = 32  # BT of the backward prep kernel (rows per program)
    block_t_gates: int = 256  # BT of the gate-gradient scan (steps per loop iteration, one program per head)
    num_warps: int = 4  # warps per program of the tiled kernels
    num_stages: int = 2  # software pipelining depth of the tiled kernels' loops
    dot_precision: Literal["ieee", "tf32x3", "tf32"] = "ieee"  # tl.dot on float32 operands (exact by default)

    def __post_init__(self):
        for name in ("chunk_size", "block_t", "block_dqk", "block_dv", "block_t_prep", "block_t_gates"):
            val = getattr(self, name)
            if not (isinstance(val, int) and is_pow2(val) and val >= DOT_MIN):
                raise ValueError(f"ChunkMLSTMLaunch.{name} must be a power of two >= {DOT_MIN}, got {val!r}")
        if self.chunk_size % self.block_t:
            raise ValueError(
                f"ChunkMLSTMLaunch: chunk_size {self.chunk_size} must be a multiple of block_t {self.block_t}"
            )
        if self.dot_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"ChunkMLSTMLaunch.dot_precision must be ieee|tf32x3|tf32, got {self.dot_precision!r}")


def chunk_mlstm_launch_params(S: int, DHQK: int, DHV: int, chunk_size: int) -> ChunkMLSTMLaunch:
    """Pick tiles for a problem. The chunk never exceeds the (power-of-two padded) sequence, which
    only skips work on padding: the result does not depend on the chunk size."""
    L = min(chunk_size, dot_tile(S))
    BL = min(L, MAX_BLOCK_T)
    BK = min(MAX_BLOCK_D, dot_tile(DHQK))
    BV = min(MAX_BLOCK_D, dot_tile(DHV))
    # 64 x 64 tiles keep several fp32 accumulators live: 8 warps avoid register spills on sm_90
    # (checked with cuobjdump --dump-resource-usage); small tiles run best with 4.
    num_warps = 8 if BL * max(BK, BV) >= 64 * 64 else 4
    return ChunkMLSTMLaunch(chunk_size=L, block_t=BL, block_dqk=BK, block_dv=BV, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------
# autograd
# ---------------------------------------------------------------------------------------------


class ChunkMLSTMFunction(torch.autograd.Function):
    """Autograd of the chunkwise kernels on flattened heads: q, k (BH, S, DHQK), v (BH, S, DHV),
    i, f (BH, S), optional c0 (BH, DHQK, DHV), n0 (BH, DHQK), m0 (BH,) float32."""

    @staticmethod
    def forward(ctx, q, k, v, i, f, c0, n0, m0, params: ChunkMLSTMLaunch, eps: float):
        h, (c, n, m), (b, g, amax, mrow, nq) = chunk_mlstm_fwd(q, k, v, i, f, c0, n0, m0, params, eps)
        ctx.save_for_backward(q, k, v, i, f, c0, n0, m0, h, b, g, amax, mrow, nq)
        ctx.params, ctx.eps = params, eps
        ctx.set_materialize_grads(False)
        return h, c, n, m

    @staticmethod
    def backward(ctx, dh, dc, dn, dm):
        q, k, v, i, f, c0, n0, m0, h, b, g, amax, mrow, nq = ctx.saved_tensors
        if dh is None:
            dh = torch.zeros_like(h)
        dq, dk, dv, di, df, dc0, dn0, dm0 = chunk_mlstm_bwd(
            q, k, v, i, f, c0, n0, m0, h, b, g, amax, mrow, nq,
            dh.contiguous(),
            None if dc is None else dc.float().contiguous(),
            None if dn is None else dn.float().contiguous(),
            None if dm is None else dm.float().contiguous(),
            ctx.params, ctx.eps,
        )
        return dq, dk, dv, di.to(i.dtype), df.to(f.dtype), dc0, dn0, dm0, None, None




# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------


def chunk_mlstm(
    q: torch.Tensor,  # (B, NH, S, DHQK)
    k: torch.Tensor,  # (B, NH, S, DHQK)
    v: torch.Tensor,  # (B, NH, S, DHV)
    i: torch.Tensor,  # (B, NH, S)
    f: torch.Tensor,  # (B, NH, S)
    state: MLSTMState | None = None,  # c (B, NH, DHQK, DHV), n (B, NH, DHQK), m (B, NH), float32
    *,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, MLSTMState]:
    """The mLSTM over a sequence with the chunkwise Triton kernels (differentiable in every input,
    the initial state included). Any S >= 1; ``chunk_size`` a power of two >= 16 (it sets where
    states are materialized; the result does not depend on it beyond rounding).

    Returns h (B, NH, S, DHV) in the dtype of v and the final state (c, n, m) in float32.
    """
    B, NH, S, DHQK, DHV = check_inputs(
        MLSTM, "chunk_mlstm", (q, k, v, i, f), state, {"chunk_size": chunk_size, "eps": eps}, same_dtype="qkv",
        allow=EPS_ZERO,
    )
    # capability: the tiles of tl.dot need a chunk of a power of two >= DOT_MIN steps
    if not is_pow2(chunk_size) or chunk_size < DOT_MIN:
        raise ValueError(f"chunk_mlstm: chunk_size must be a power of two >= {DOT_MIN}, got {chunk_size!r}")
    require_triton("chunk_mlstm", q.device)
    params = chunk_mlstm_launch_params(S, DHQK, DHV, chunk_size)
    BH = B * NH
    qf = q.reshape(BH, S, DHQK).contiguous()  # (BH, S, DHQK)
    kf = k.reshape(BH, S, DHQK).contiguous()  # (BH, S, DHQK)
    vf = v.reshape(BH, S, DHV).contiguous()  # (BH, S, DHV)
    i_f = i.reshape(BH, S).contiguous()  # (BH, S)
    f_f = f.reshape(BH, S).contiguous()  # (BH, S)
    if state is None:
        c0 = n0 = m0 = None
    else:
        c0 = state[0].reshape(BH, DHQK, DHV).contiguous()  # (BH, DHQK, DHV)
        n0 = state[1].reshape(BH, DHQK).contiguous()  # (BH, DHQK)
        m0 = state[2].reshape(BH).contiguous()  # (BH,)
    h, c, n, m = ChunkMLSTMFunction.apply(qf, kf, vf, i_f, f_f, c0, n0, m0, params, float(eps))
    return h.view(B, NH, S, DHV), (c.view(B, NH, DHQK, DHV), n.view(B, NH, DHQK), m.view(B, NH))
