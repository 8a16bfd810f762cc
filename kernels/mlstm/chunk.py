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

  forward
    chunk_mlstm_fwd_gates_kernel   b, g, max_j a_j, cummax_t (i_t - b_t)        parallel over chunks
    chunk_mlstm_fwd_state_kernel   m_k = max(g + m_{k-1}, max_j a_j),
                                   C_k = e^{g+m_{k-1}-m_k} C_{k-1} + sum_j e^{a_j-m_k} k_j v_j^T
                                   (n alike); one program per (DHQK tile, DHV tile, head)  sequential
    chunk_mlstm_fwd_kernel         h_t from q_t C_{k-1} and the causal D-weighted q k^T v of the
                                   chunk, m_t = b_t + max(m_{k-1}, cummax_t); per (row tile, DHV tile)
  backward (the forward states are recomputed, not stored)
    chunk_mlstm_bwd_prep_kernel    1/den_t, z_t = dL/d(n_t.q_t), E_t = dL/dm_t through eps
    chunk_mlstm_bwd_state_kernel   dC_{k-1} = e^{g+m_{k-1}-m_k} dC_k + sum_t e^{b_t+m_{k-1}-m_t} q_t dnum_t^T
                                   (dn alike with z), from dC_S, dn_S                 reverse, sequential
    chunk_mlstm_bwd_kernel         dq, dk, dv of every (time tile, DHQK or DHV tile) in one launch,
                                   plus the row sums q.dq, k.dk per DHQK tile
    chunk_mlstm_bwd_gates_kernel   di, df, dm0: suffix sums and the stabilizer chain, one scan per head

Gradients are exact, including the normalizer's (TFLA treats the denominator as a constant) and
the stabilizer's: h depends on m_t only through eps (h_t = C~_t^T q / (max(|n~_t^T q|, 1) + eps e^{m_t})
in unstabilized terms), the final state (C_S, n_S) = (C~_S, n~_S) e^{-m_S} and m_S itself on m_S
directly; that gradient is routed down m_t = max(logsigmoid(f_t) + m_{t-1}, i_t) to i, f and m0
exactly as autograd through the reference does (see ``chunk_mlstm_bwd_gates_kernel``).

Precision: float32 inputs use IEEE float32 tl.dot (configurable); float16/bfloat16 inputs feed the
tensor cores with 16-bit tiles (inputs as they are, float32 intermediates such as the D-weighted
scores and the states rounded to the input dtype), accumulating in float32; gates, stabilizers,
normalizers and states are float32 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["chunk_mlstm", "ChunkMLSTMLaunch", "chunk_mlstm_launch_params", "ChunkMLSTMFunction"]

MLSTMState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # c (B,NH,DHQK,DHV), n (B,NH,DHQK), m (B,NH)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# launch parameters
# ---------------------------------------------------------------------------------------------


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class ChunkMLSTMLaunch:
    """Tile sizes and launch settings of the chunkwise kernels (all powers of two)."""

    chunk_size: int  # L: steps per chunk; states are materialized every L steps (sequential kernel)
    block_t: int  # BL: time steps per intra-chunk tile; L is a multiple; >= 16 for tl.dot
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
            if not (isinstance(val, int) and _is_pow2(val) and val >= 16):
                raise ValueError(f"ChunkMLSTMLaunch.{name} must be a power of two >= 16, got {val!r}")
        if self.chunk_size % self.block_t:
            raise ValueError(
                f"ChunkMLSTMLaunch: chunk_size {self.chunk_size} must be a multiple of block_t {self.block_t}"
            )
        if self.dot_precision not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"ChunkMLSTMLaunch.dot_precision must be ieee|tf32x3|tf32, got {self.dot_precision!r}")


def chunk_mlstm_launch_params(S: int, DHQK: int, DHV: int, chunk_size: int) -> ChunkMLSTMLaunch:
    """Pick tiles for a problem. The chunk never exceeds the (power-of-two padded) sequence, which
    only skips work on padding: the result does not depend on the chunk size."""
    L = min(chunk_size, max(16, _next_pow2(S)))
    BL = min(L, 64)
    BK = min(64, max(16, _next_pow2(DHQK)))
    BV = min(64, max(16, _next_pow2(DHV)))
    # 64 x 64 tiles keep several fp32 accumulators live: 8 warps avoid register spills on sm_90
    # (checked with cuobjdump --dump-resource-usage); small tiles run best with 4.
    num_warps = 8 if BL * max(BK, BV) >= 64 * 64 else 4
    return ChunkMLSTMLaunch(chunk_size=L, block_t=BL, block_dqk=BK, block_dv=BV, num_warps=num_warps)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mm(a, b, DOT_PREC: tl.constexpr):
        # tl.dot with float32 accumulation. "interpret-bf16" exists for the interpreter only:
        # Triton's interpreter (3.9) multiplies bfloat16 operands as their raw uint16 bits
        # (triton-lang/triton#11584, unsupported upstream), so there the (already bf16-rounded)
        # operands are widened to float32 first: the same products as the GPU's bf16 MMA.
        if DOT_PREC == "interpret-bf16":
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def _cast(x, dtype: tl.constexpr, DOT_PREC: tl.constexpr):
        # x.to(dtype), rounding to nearest even as compiled Triton does. Under the interpreter with
        # bfloat16 ("interpret-bf16") the interpreter's own float32 -> bfloat16 cast truncates,
        # which biases every rounding; there the rounding is done on the bits instead.
        if DOT_PREC == "interpret-bf16":
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _logsigmoid(x):
        # log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), stable for any x
        return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _linear_recurrence_combine(a1, b1, a2, b2):
        # composition of y -> a1 y + b1 then y -> a2 y + b2 (left is the earlier element)
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def chunk_mlstm_fwd_gates_kernel(
        i_ptr,  # (BH, S) input-gate pre-activations
        f_ptr,  # (BH, S) forget-gate pre-activations
        b_ptr,  # out (BH, S) fp32: in-chunk cumsum of logsigmoid(f)
        cmx_ptr,  # out (BH, S) fp32: in-chunk cummax_{s<=t} (i_s - b_s)
        g_ptr,  # out (BH, NC) fp32: b at the chunk's last step
        amax_ptr,  # out (BH, NC) fp32: max_j a_j, a_j = g - b_j + i_j
        S,
        NC,
        L: tl.constexpr,
    ):
        kc = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        t = kc * L + tl.arange(0, L)  # (L,)
        tv = t < S
        ig = tl.load(i_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)  # (L,)
        fg = tl.load(f_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)  # (L,)
        lf = tl.where(tv, _logsigmoid(fg), 0.0)  # (L,)
        b = tl.cumsum(lf, 0)  # (L,)
        last = tl.minimum(S, (kc + 1) * L) - 1
        g = tl.sum(tl.where(t == last, b, 0.0), 0)  # scalar: b_L of this (maybe partial) chunk
        a = tl.where(tv, g - b + ig, float("-inf"))  # (L,)
        cmx = tl.associative_scan(tl.where(tv, ig - b, float("-inf")), 0, _max_combine)  # (L,)
        tl.store(b_ptr + bh * S + t, b, mask=tv)
        tl.store(cmx_ptr + bh * S + t, cmx, mask=tv)
        tl.store(g_ptr + bh * NC + kc, g)
        tl.store(amax_ptr + bh * NC + kc, tl.max(a, 0))

    @triton.jit
    def chunk_mlstm_fwd_state_kernel(
        k_ptr,  # (BH, S, DHQK)
        v_ptr,  # (BH, S, DHV)
        i_ptr,  # (BH, S)
        b_ptr,  # (BH, S) fp32
        g_ptr,  # (BH, NC) fp32
        amax_ptr,  # (BH, NC) fp32
        c0_ptr,  # (BH, DHQK, DHV) fp32 initial state (read when HAS_STATE)
        n0_ptr,  # (BH, DHQK) fp32
        m0_ptr,  # (BH,) fp32
        cs_ptr,  # out (BH, NC + 1, DHQK, DHV) fp32: the state before chunk k at index k
        ns_ptr,  # out (BH, NC + 1, DHQK) fp32
        ms_ptr,  # out (BH, NC + 1) fp32
        S,
        NC,
        DHQK: tl.constexpr,
        DHV: tl.constexpr,
        L: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_STATE: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Inter-chunk recurrence: one program per (DHQK tile, DHV tile, head), loop over chunks."""
        ik = tl.program_id(0)
        iv = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        offs_k = ik * BK + tl.arange(0, BK)  # (BK,)
        offs_v = iv * BV + tl.arange(0, BV)  # (BV,)
        mk = offs_k < DHQK
        mv = offs_v < DHV
        c_off = offs_k[:, None] * DHV + offs_v[None, :]  # (BK, BV)
        c_mask = mk[:, None] & mv[None, :]
        if HAS_STATE:
            c = tl.load(c0_ptr + bh * DHQK * DHV + c_off, mask=c_mask, other=0.0).to(tl.float32)  # (BK, BV)
            n = tl.load(n0_ptr + bh * DHQK + offs_k, mask=mk, other=0.0).to(tl.float32)  # (BK,)
            m = tl.load(m0_ptr + bh).to(tl.float32)
        else:
            c = tl.zeros([BK, BV], dtype=tl.float32)
            n = tl.zeros([BK], dtype=tl.float32)
            m = tl.sum(tl.zeros([BK], dtype=tl.float32), 0)  # a float32 scalar 0
        st = bh * (NC + 1)
        tl.store(cs_ptr + st * DHQK * DHV + c_off, c, mask=c_mask)
        if iv == 0:
            tl.store(ns_ptr + st * DHQK + offs_k, n, mask=mk)
            if ik == 0:
                tl.store(ms_ptr + st, m)
        NSUB: tl.constexpr = L // BL
        # one flat loop over (chunk, time tile): the loads of the next tile are independent of the
        # carried state, so the compiler can prefetch them across chunk boundaries
        for it in range(NC * NSUB):
            kc = it // NSUB
            sb = it % NSUB
            g = tl.load(g_ptr + bh * NC + kc)
            m_new = tl.maximum(g + m, tl.load(amax_ptr + bh * NC + kc))  # m_k (m is m_{k-1} all chunk long)
            decay = tl.where(sb == 0, tl.exp(g + m - m_new), 1.0)  # applied once per chunk
            c = c * decay
            n = n * decay
            t = kc * L + sb * BL + tl.arange(0, BL)  # (BL,)
            tv = t < S
            b = tl.load(b_ptr + bh * S + t, mask=tv, other=0.0)  # (BL,)
            ig = tl.load(i_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)  # (BL,)
            w = tl.where(tv, tl.exp(g - b + ig - m_new), 0.0)  # (BL,) e^{a_j - m_k}
            kT = tl.load(
                k_ptr + bh * S * DHQK + t[None, :] * DHQK + offs_k[:, None],
                mask=mk[:, None] & tv[None, :], other=0.0,
            )  # (BK, BL)
            vt = tl.load(
                v_ptr + bh * S * DHV + t[:, None] * DHV + offs_v[None, :],
                mask=tv[:, None] & mv[None, :], other=0.0,
            )  # (BL, BV)
            kw = kT.to(tl.float32) * w[None, :]  # (BK, BL)
            c += _mm(_cast(kw, vt.dtype, DOT_PREC), vt, DOT_PREC)  # (BK, BV)
            n += tl.sum(kw, 1)  # (BK,)
            if sb == NSUB - 1:
                o = st + kc + 1
                tl.store(cs_ptr + o * DHQK * DHV + c_off, c, mask=c_mask)
                if iv == 0:
                    tl.store(ns_ptr + o * DHQK + offs_k, n, mask=mk)
                    if ik == 0:
                        tl.store(ms_ptr + o, m_new)
            m = tl.where(sb == NSUB - 1, m_new, m)

    @triton.jit
    def chunk_mlstm_fwd_kernel(
        q_ptr,  # (BH, S, DHQK)
        k_ptr,  # (BH, S, DHQK)
        v_ptr,  # (BH, S, DHV)
        i_ptr,  # (BH, S)
        b_ptr,  # (BH, S) fp32
        cmx_ptr,  # (BH, S) fp32
        cs_ptr,  # (BH, NC + 1, DHQK, DHV) fp32
        ns_ptr,  # (BH, NC + 1, DHQK) fp32
        ms_ptr,  # (BH, NC + 1) fp32
        h_ptr,  # out (BH, S, DHV), dtype of v
        mrow_ptr,  # out (BH, S) fp32: the per-step stabilizer m_t
        nq_ptr,  # out (BH, S) fp32: the stabilized n_t . q_t (scaled q)
        scale,
        eps,
        S,
        NC,
        DHQK: tl.constexpr,
        DHV: tl.constexpr,
        L: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Outputs of one (row tile of a chunk, DHV tile, head): inter-chunk term from C_{k-1}
        plus the causal D-weighted q k^T v over the chunk's tiles up to the diagonal."""
        NSUB: tl.constexpr = L // BL
        kc = tl.program_id(0) // NSUB
        rb = tl.program_id(0) % NSUB
        iv = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        t = kc * L + rb * BL + tl.arange(0, BL)  # (BL,) rows
        tv = t < S
        offs_v = iv * BV + tl.arange(0, BV)  # (BV,)
        mv = offs_v < DHV
        st = bh * (NC + 1) + kc
        m_prev = tl.load(ms_ptr + st)
        b_r = tl.load(b_ptr + bh * S + t, mask=tv, other=0.0)  # (BL,)
        cmx_r = tl.load(cmx_ptr + bh * S + t, mask=tv, other=0.0)  # (BL,)
        mrow = b_r + tl.maximum(m_prev, cmx_r)  # (BL,) m_t = max(b_t + m_prev, max_s b_t - b_s + i_s)
        w_inter = tl.exp(b_r + m_prev - mrow)  # (BL,)

        # inter-chunk term: q_t C_{k-1}, q_t . n_{k-1}
        acc_h = tl.zeros([BL, BV], dtype=tl.float32)
        acc_n = tl.zeros([BL], dtype=tl.float32)
        for ik in range((DHQK + BK - 1) // BK):
            offs_k = ik * BK + tl.arange(0, BK)
            mk = offs_k < DHQK
            qt = tl.load(
                q_ptr + bh * S * DHQK + t[:, None] * DHQK + offs_k[None, :], mask=tv[:, None] & mk[None, :], other=0.0
            )  # (BL, BK)
            c = tl.load(
                cs_ptr + st * DHQK * DHV + offs_k[:, None] * DHV + offs_v[None, :],
                mask=mk[:, None] & mv[None, :], other=0.0,
            )  # (BK, BV)
            n = tl.load(ns_ptr + st * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
            acc_h += _mm(qt, _cast(c, qt.dtype, DOT_PREC), DOT_PREC)
            acc_n += tl.sum(qt.to(tl.float32) * n[None, :], 1)
        acc_h = acc_h * (w_inter * scale)[:, None]
        acc_n = acc_n * (w_inter * scale)

        # intra-chunk term over column tiles cb <= rb
        for cb in range(0, rb + 1):
            s = kc * L + cb * BL + tl.arange(0, BL)  # (BL,) columns
            sv = s < S
            b_c = tl.load(b_ptr + bh * S + s, mask=sv, other=0.0)  # (BL,)
            i_c = tl.load(i_ptr + bh * S + s, mask=sv, other=0.0).to(tl.float32)  # (BL,)
            sc = tl.zeros([BL, BL], dtype=tl.float32)
            for ik in range((DHQK + BK - 1) // BK):
                offs_k = ik * BK + tl.arange(0, BK)
                mk = offs_k < DHQK
                qt = tl.load(
                    q_ptr + bh * S * DHQK + t[:, None] * DHQK + offs_k[None, :],
                    mask=tv[:, None] & mk[None, :], other=0.0,
                )  # (BL, BK)
                kT = tl.load(
                    k_ptr + bh * S * DHQK + s[None, :] * DHQK + offs_k[:, None],
                    mask=mk[:, None] & sv[None, :], other=0.0,
                )  # (BK, BL)
                sc += _mm(qt, kT, DOT_PREC)  # (BL, BL)
            mask = (t[:, None] >= s[None, :]) & sv[None, :] & tv[:, None]
            d = tl.where(mask, tl.exp(b_r[:, None] - b_c[None, :] + i_c[None, :] - mrow[:, None]), 0.0)  # (BL, BL)
            p = sc * scale * d  # (BL, BL)
            acc_n += tl.sum(p, 1)
            vt = tl.load(
                v_ptr + bh * S * DHV + s[:, None] * DHV + offs_v[None, :], mask=sv[:, None] & mv[None, :], other=0.0
            )  # (BL, BV)
            acc_h += _mm(_cast(p, vt.dtype, DOT_PREC), vt, DOT_PREC)

        den = tl.maximum(tl.abs(acc_n), tl.exp(-mrow)) + eps  # (BL,)
        h = acc_h / den[:, None]  # (BL, BV)
        tl.store(
            h_ptr + bh * S * DHV + t[:, None] * DHV + offs_v[None, :],
            _cast(h, h_ptr.dtype.element_ty, DOT_PREC),
            mask=tv[:, None] & mv[None, :],
        )
        if iv == 0:
            tl.store(mrow_ptr + bh * S + t, mrow, mask=tv)
            tl.store(nq_ptr + bh * S + t, acc_n, mask=tv)

    @triton.jit
    def chunk_mlstm_bwd_prep_kernel(
        h_ptr,  # (BH, S, DHV) forward output
        dh_ptr,  # (BH, S, DHV) its gradient
        mrow_ptr,  # (BH, S) fp32
        nq_ptr,  # (BH, S) fp32
        rden_ptr,  # out (BH, S) fp32: 1 / (max(|n.q|, e^{-m}) + eps)
        z_ptr,  # out (BH, S) fp32: dL/d(n_t.q_t)
        e_ptr,  # out (BH, S) fp32: dL/dm_t through eps, -(dh.h) eps / den
        eps,
        S,
        DHV: tl.constexpr,
        BT: tl.constexpr,
        BV: tl.constexpr,
    ):
        bh = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * BT + tl.arange(0, BT)  # (BT,)
        tv = t < S
        dhh = tl.zeros([BT], dtype=tl.float32)
        for iv in range((DHV + BV - 1) // BV):
            offs_v = iv * BV + tl.arange(0, BV)
            msk = tv[:, None] & (offs_v < DHV)[None, :]
            off = bh * S * DHV + t[:, None] * DHV + offs_v[None, :]
            h = tl.load(h_ptr + off, mask=msk, other=0.0).to(tl.float32)  # (BT, BV)
            dh = tl.load(dh_ptr + off, mask=msk, other=0.0).to(tl.float32)  # (BT, BV)
            dhh += tl.sum(h * dh, 1)
        m = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
        nq = tl.load(nq_ptr + bh * S + t, mask=tv, other=0.0)
        lower = tl.exp(-m)
        rden = 1.0 / (tl.maximum(tl.abs(nq), lower) + eps)
        dden = -dhh * rden  # dL/dden
        sgn = tl.where(nq > 0, 1.0, tl.where(nq < 0, -1.0, 0.0))
        z = tl.where(tl.abs(nq) > lower, dden * sgn, 0.0)
        tl.store(rden_ptr + bh * S + t, rden, mask=tv)
        tl.store(z_ptr + bh * S + t, z, mask=tv)
        tl.store(e_ptr + bh * S + t, dden * eps, mask=tv)

    @triton.jit
    def chunk_mlstm_bwd_state_kernel(
        q_ptr,  # (BH, S, DHQK)
        dh_ptr,  # (BH, S, DHV)
        b_ptr,  # (BH, S) fp32
        mrow_ptr,  # (BH, S) fp32
        rden_ptr,  # (BH, S) fp32
        z_ptr,  # (BH, S) fp32
        g_ptr,  # (BH, NC) fp32
        ms_ptr,  # (BH, NC + 1) fp32
        dcl_ptr,  # (BH, DHQK, DHV) gradient of the final c (read when HAS_DFINAL)
        dnl_ptr,  # (BH, DHQK) gradient of the final n
        dcs_ptr,  # out (BH, NC + 1, DHQK, DHV) fp32: dL/dC_k (index 0 is dL/dc0)
        dns_ptr,  # out (BH, NC + 1, DHQK) fp32
        scale,
        S,
        NC,
        DHQK: tl.constexpr,
        DHV: tl.constexpr,
        L: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        HAS_DFINAL: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """Reverse inter-chunk recurrence of the state gradients."""
        ik = tl.program_id(0)
        iv = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        offs_k = ik * BK + tl.arange(0, BK)
        offs_v = iv * BV + tl.arange(0, BV)
        mk = offs_k < DHQK
        mv = offs_v < DHV
        c_off = offs_k[:, None] * DHV + offs_v[None, :]  # (BK, BV)
        c_mask = mk[:, None] & mv[None, :]
        if HAS_DFINAL:
            dc = tl.load(dcl_ptr + bh * DHQK * DHV + c_off, mask=c_mask, other=0.0).to(tl.float32)  # (BK, BV)
            dn = tl.load(dnl_ptr + bh * DHQK + offs_k, mask=mk, other=0.0).to(tl.float32)  # (BK,)
        else:
            dc = tl.zeros([BK, BV], dtype=tl.float32)
            dn = tl.zeros([BK], dtype=tl.float32)
        st = bh * (NC + 1)
        NSUB: tl.constexpr = L // BL
        # one flat loop over (chunk, time tile), backwards (see the forward state kernel)
        for j in range(NC * NSUB):
            it = NC * NSUB - 1 - j
            kc = it // NSUB
            sb = it % NSUB
            m_prev = tl.load(ms_ptr + st + kc)
            if sb == NSUB - 1:  # entering chunk kc from its end: dc is dL/dC_{kc+1}
                o = st + kc + 1
                tl.store(dcs_ptr + o * DHQK * DHV + c_off, dc, mask=c_mask)
                if iv == 0:
                    tl.store(dns_ptr + o * DHQK + offs_k, dn, mask=mk)
            g = tl.load(g_ptr + bh * NC + kc)
            m_next = tl.load(ms_ptr + st + kc + 1)
            decay = tl.where(sb == NSUB - 1, tl.exp(g + m_prev - m_next), 1.0)  # once per chunk
            dc = dc * decay
            dn = dn * decay
            t = kc * L + sb * BL + tl.arange(0, BL)  # (BL,)
            tv = t < S
            b_r = tl.load(b_ptr + bh * S + t, mask=tv, other=0.0)
            mrow = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
            rden = tl.load(rden_ptr + bh * S + t, mask=tv, other=0.0)
            z = tl.load(z_ptr + bh * S + t, mask=tv, other=0.0)
            w_q = tl.where(tv, tl.exp(b_r + m_prev - mrow), 0.0)  # (BL,)
            qT = tl.load(
                q_ptr + bh * S * DHQK + t[None, :] * DHQK + offs_k[:, None],
                mask=mk[:, None] & tv[None, :], other=0.0,
            )  # (BK, BL)
            dh = tl.load(
                dh_ptr + bh * S * DHV + t[:, None] * DHV + offs_v[None, :],
                mask=tv[:, None] & mv[None, :], other=0.0,
            )  # (BL, BV)
            # the row scale 1/den_t goes on q (one rounding to the input dtype), dh stays exact
            qw = qT.to(tl.float32) * (rden * w_q * scale)[None, :]  # (BK, BL)
            dc += _mm(_cast(qw, dh.dtype, DOT_PREC), dh, DOT_PREC)  # (BK, BV)
            dn += tl.sum(qT.to(tl.float32) * (z * w_q * scale)[None, :], 1)  # (BK,)
        tl.store(dcs_ptr + st * DHQK * DHV + c_off, dc, mask=c_mask)
        if iv == 0:
            tl.store(dns_ptr + st * DHQK + offs_k, dn, mask=mk)

    @triton.jit
    def _bwd_dq_tile(
        q_ptr, k_ptr, v_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr, z_ptr,
        cs_ptr, ns_ptr, ms_ptr, dq_ptr, qpart_ptr,
        kc, rb, ik, bh, BH, scale, S, NC,
        DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """dq of one (row tile, DHQK tile): inter (dnum C_{k-1}^T + z n_{k-1}) and intra dS K."""
        t = kc * L + rb * BL + tl.arange(0, BL)  # (BL,) rows
        tv = t < S
        offs_k = ik * BK + tl.arange(0, BK)
        mk = offs_k < DHQK
        st = bh * (NC + 1) + kc
        m_prev = tl.load(ms_ptr + st)
        b_r = tl.load(b_ptr + bh * S + t, mask=tv, other=0.0)
        mrow = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
        rden = tl.load(rden_ptr + bh * S + t, mask=tv, other=0.0)
        z = tl.load(z_ptr + bh * S + t, mask=tv, other=0.0)
        w_q = tl.where(tv, tl.exp(b_r + m_prev - mrow), 0.0)  # (BL,)
        qt = tl.load(
            q_ptr + bh * S * DHQK + t[:, None] * DHQK + offs_k[None, :], mask=tv[:, None] & mk[None, :], other=0.0
        )  # (BL, BK)
        dq = tl.zeros([BL, BK], dtype=tl.float32)
        for iv in range((DHV + BV - 1) // BV):
            offs_v = iv * BV + tl.arange(0, BV)
            mv = offs_v < DHV
            dh = tl.load(
                dh_ptr + bh * S * DHV + t[:, None] * DHV + offs_v[None, :], mask=tv[:, None] & mv[None, :], other=0.0
            )  # (BL, BV)
            cT = tl.load(
                cs_ptr + st * DHQK * DHV + offs_k[None, :] * DHV + offs_v[:, None],
                mask=mk[None, :] & mv[:, None], other=0.0,
            )  # (BV, BK)
            dq += _mm(dh, _cast(cT, dh.dtype, DOT_PREC), DOT_PREC)  # (BL, BK) dh C^T; 1/den applied below
        n_prev = tl.load(ns_ptr + st * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
        dq = w_q[:, None] * (rden[:, None] * dq + z[:, None] * n_prev[None, :])
        for cb in range(0, rb + 1):
            s = kc * L + cb * BL + tl.arange(0, BL)  # (BL,) columns
            sv = s < S
            b_c = tl.load(b_ptr + bh * S + s, mask=sv, other=0.0)
            i_c = tl.load(i_ptr + bh * S + s, mask=sv, other=0.0).to(tl.float32)
            dp = tl.zeros([BL, BL], dtype=tl.float32)
            for iv in range((DHV + BV - 1) // BV):
                offs_v = iv * BV + tl.arange(0, BV)
                mv = offs_v < DHV
                dh = tl.load(
                    dh_ptr + bh * S * DHV + t[:, None] * DHV + offs_v[None, :],
                    mask=tv[:, None] & mv[None, :], other=0.0,
                )  # (BL, BV)
                vT = tl.load(
                    v_ptr + bh * S * DHV + s[None, :] * DHV + offs_v[:, None], mask=mv[:, None] & sv[None, :], other=0.0
                )  # (BV, BL)
                dp += _mm(dh, vT, DOT_PREC)  # (BL, BL) dh_t . v_s
            mask = (t[:, None] >= s[None, :]) & sv[None, :] & tv[:, None]
            d = tl.where(mask, tl.exp(b_r[:, None] - b_c[None, :] + i_c[None, :] - mrow[:, None]), 0.0)
            ds = d * (dp * rden[:, None] + z[:, None])  # (BL, BL) dL/d(score)
            kc_t = tl.load(
                k_ptr + bh * S * DHQK + s[:, None] * DHQK + offs_k[None, :], mask=sv[:, None] & mk[None, :], other=0.0
            )  # (BL, BK)
            dq += _mm(_cast(ds, kc_t.dtype, DOT_PREC), kc_t, DOT_PREC)
        dq = dq * scale
        tl.store(
            dq_ptr + bh * S * DHQK + t[:, None] * DHQK + offs_k[None, :],
            _cast(dq, dq_ptr.dtype.element_ty, DOT_PREC),
            mask=tv[:, None] & mk[None, :],
        )
        qp = tl.sum(qt.to(tl.float32) * dq, 1)  # (BL,) partial q.dq over this DHQK tile
        tl.store(qpart_ptr + (ik * BH + bh) * S + t, qp, mask=tv)

    @triton.jit
    def _bwd_dk_tile(
        q_ptr, k_ptr, v_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr, z_ptr,
        g_ptr, ms_ptr, dcs_ptr, dns_ptr, dk_ptr, kpart_ptr,
        kc, cb, ik, bh, BH, scale, S, NC,
        DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """dk of one (column tile, DHQK tile): inter w (dC_k v + dn_k) and intra dS^T Q."""
        NSUB: tl.constexpr = L // BL
        s = kc * L + cb * BL + tl.arange(0, BL)  # (BL,) columns
        sv = s < S
        offs_k = ik * BK + tl.arange(0, BK)
        mk = offs_k < DHQK
        st = bh * (NC + 1) + kc + 1
        g = tl.load(g_ptr + bh * NC + kc)
        m_next = tl.load(ms_ptr + st)
        b_c = tl.load(b_ptr + bh * S + s, mask=sv, other=0.0)
        i_c = tl.load(i_ptr + bh * S + s, mask=sv, other=0.0).to(tl.float32)
        w_k = tl.where(sv, tl.exp(g - b_c + i_c - m_next), 0.0)  # (BL,)
        kt = tl.load(
            k_ptr + bh * S * DHQK + s[:, None] * DHQK + offs_k[None, :], mask=sv[:, None] & mk[None, :], other=0.0
        )  # (BL, BK)
        dk = tl.zeros([BL, BK], dtype=tl.float32)
        for iv in range((DHV + BV - 1) // BV):
            offs_v = iv * BV + tl.arange(0, BV)
            mv = offs_v < DHV
            vt = tl.load(
                v_ptr + bh * S * DHV + s[:, None] * DHV + offs_v[None, :], mask=sv[:, None] & mv[None, :], other=0.0
            )  # (BL, BV)
            dcT = tl.load(
                dcs_ptr + st * DHQK * DHV + offs_k[None, :] * DHV + offs_v[:, None],
                mask=mk[None, :] & mv[:, None], other=0.0,
            )  # (BV, BK)
            dk += _mm(vt, _cast(dcT, vt.dtype, DOT_PREC), DOT_PREC)
        dn_next = tl.load(dns_ptr + st * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
        dk = w_k[:, None] * (dk + dn_next[None, :])
        acc = tl.zeros([BL, BK], dtype=tl.float32)
        for rb in range(cb, NSUB):
            t = kc * L + rb * BL + tl.arange(0, BL)  # (BL,) rows
            tv = t < S
            b_r = tl.load(b_ptr + bh * S + t, mask=tv, other=0.0)
            mrow = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
            rden = tl.load(rden_ptr + bh * S + t, mask=tv, other=0.0)
            z = tl.load(z_ptr + bh * S + t, mask=tv, other=0.0)
            dpT = tl.zeros([BL, BL], dtype=tl.float32)  # (s, t)
            for iv in range((DHV + BV - 1) // BV):
                offs_v = iv * BV + tl.arange(0, BV)
                mv = offs_v < DHV
                vt = tl.load(
                    v_ptr + bh * S * DHV + s[:, None] * DHV + offs_v[None, :],
                    mask=sv[:, None] & mv[None, :], other=0.0,
                )  # (BL, BV)
                dhT = tl.load(
                    dh_ptr + bh * S * DHV + t[None, :] * DHV + offs_v[:, None],
                    mask=mv[:, None] & tv[None, :], other=0.0,
                )  # (BV, BL)
                dpT += _mm(vt, dhT, DOT_PREC)  # (BL, BL) v_s . dh_t
            maskT = (t[None, :] >= s[:, None]) & sv[:, None] & tv[None, :]
            dT = tl.where(maskT, tl.exp(b_r[None, :] - b_c[:, None] + i_c[:, None] - mrow[None, :]), 0.0)  # (s, t)
            dsT = dT * (dpT * rden[None, :] + z[None, :])  # (BL, BL)
            qt = tl.load(
                q_ptr + bh * S * DHQK + t[:, None] * DHQK + offs_k[None, :], mask=tv[:, None] & mk[None, :], other=0.0
            )  # (BL, BK)
            acc += _mm(_cast(dsT, qt.dtype, DOT_PREC), qt, DOT_PREC)
        dk = dk + scale * acc
        tl.store(
            dk_ptr + bh * S * DHQK + s[:, None] * DHQK + offs_k[None, :],
            _cast(dk, dk_ptr.dtype.element_ty, DOT_PREC),
            mask=sv[:, None] & mk[None, :],
        )
        kp = tl.sum(kt.to(tl.float32) * dk, 1)  # (BL,) partial k.dk over this DHQK tile
        tl.store(kpart_ptr + (ik * BH + bh) * S + s, kp, mask=sv)

    @triton.jit
    def _bwd_dv_tile(
        q_ptr, k_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr,
        g_ptr, ms_ptr, dcs_ptr, dv_ptr,
        kc, cb, iv, bh, scale, S, NC,
        DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """dv of one (column tile, DHV tile): inter w K dC_k and intra (D o S)^T dnum."""
        NSUB: tl.constexpr = L // BL
        s = kc * L + cb * BL + tl.arange(0, BL)  # (BL,) columns
        sv = s < S
        offs_v = iv * BV + tl.arange(0, BV)
        mv = offs_v < DHV
        st = bh * (NC + 1) + kc + 1
        g = tl.load(g_ptr + bh * NC + kc)
        m_next = tl.load(ms_ptr + st)
        b_c = tl.load(b_ptr + bh * S + s, mask=sv, other=0.0)
        i_c = tl.load(i_ptr + bh * S + s, mask=sv, other=0.0).to(tl.float32)
        w_k = tl.where(sv, tl.exp(g - b_c + i_c - m_next), 0.0)  # (BL,)
        dv = tl.zeros([BL, BV], dtype=tl.float32)
        for ik in range((DHQK + BK - 1) // BK):
            offs_k = ik * BK + tl.arange(0, BK)
            mk = offs_k < DHQK
            kt = tl.load(
                k_ptr + bh * S * DHQK + s[:, None] * DHQK + offs_k[None, :], mask=sv[:, None] & mk[None, :], other=0.0
            )  # (BL, BK)
            dct = tl.load(
                dcs_ptr + st * DHQK * DHV + offs_k[:, None] * DHV + offs_v[None, :],
                mask=mk[:, None] & mv[None, :], other=0.0,
            )  # (BK, BV)
            dv += _mm(kt, _cast(dct, kt.dtype, DOT_PREC), DOT_PREC)
        dv = w_k[:, None] * dv
        for rb in range(cb, NSUB):
            t = kc * L + rb * BL + tl.arange(0, BL)  # (BL,) rows
            tv = t < S
            b_r = tl.load(b_ptr + bh * S + t, mask=tv, other=0.0)
            mrow = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
            rden = tl.load(rden_ptr + bh * S + t, mask=tv, other=0.0)
            scT = tl.zeros([BL, BL], dtype=tl.float32)  # (s, t)
            for ik in range((DHQK + BK - 1) // BK):
                offs_k = ik * BK + tl.arange(0, BK)
                mk = offs_k < DHQK
                kt = tl.load(
                    k_ptr + bh * S * DHQK + s[:, None] * DHQK + offs_k[None, :],
                    mask=sv[:, None] & mk[None, :], other=0.0,
                )  # (BL, BK)
                qT = tl.load(
                    q_ptr + bh * S * DHQK + t[None, :] * DHQK + offs_k[:, None],
                    mask=mk[:, None] & tv[None, :], other=0.0,
                )  # (BK, BL)
                scT += _mm(kt, qT, DOT_PREC)
            maskT = (t[None, :] >= s[:, None]) & sv[:, None] & tv[None, :]
            dT = tl.where(maskT, tl.exp(b_r[None, :] - b_c[:, None] + i_c[:, None] - mrow[None, :]), 0.0)  # (s, t)
            pT = dT * scT * (scale * rden[None, :])  # (BL, BL) score weights with 1/den_t folded in
            dh = tl.load(
                dh_ptr + bh * S * DHV + t[:, None] * DHV + offs_v[None, :], mask=tv[:, None] & mv[None, :], other=0.0
            )  # (BL, BV)
            dv += _mm(_cast(pT, dh.dtype, DOT_PREC), dh, DOT_PREC)
        tl.store(
            dv_ptr + bh * S * DHV + s[:, None] * DHV + offs_v[None, :],
            _cast(dv, dv_ptr.dtype.element_ty, DOT_PREC),
            mask=sv[:, None] & mv[None, :],
        )

    @triton.jit
    def chunk_mlstm_bwd_kernel(
        q_ptr,  # (BH, S, DHQK)
        k_ptr,  # (BH, S, DHQK)
        v_ptr,  # (BH, S, DHV)
        dh_ptr,  # (BH, S, DHV)
        i_ptr,  # (BH, S)
        b_ptr,  # (BH, S) fp32
        mrow_ptr,  # (BH, S) fp32
        rden_ptr,  # (BH, S) fp32
        z_ptr,  # (BH, S) fp32
        g_ptr,  # (BH, NC) fp32
        cs_ptr,  # (BH, NC + 1, DHQK, DHV) fp32 forward states
        ns_ptr,  # (BH, NC + 1, DHQK) fp32
        ms_ptr,  # (BH, NC + 1) fp32
        dcs_ptr,  # (BH, NC + 1, DHQK, DHV) fp32 state gradients
        dns_ptr,  # (BH, NC + 1, DHQK) fp32
        dq_ptr,  # out (BH, S, DHQK)
        dk_ptr,  # out (BH, S, DHQK)
        dv_ptr,  # out (BH, S, DHV)
        qpart_ptr,  # out (NK, BH, S) fp32: q.dq per DHQK tile
        kpart_ptr,  # out (NK, BH, S) fp32: k.dk per DHQK tile
        scale,
        S,
        NC,
        BH,
        DHQK: tl.constexpr,
        DHV: tl.constexpr,
        L: tl.constexpr,
        BL: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        DOT_PREC: tl.constexpr,
    ):
        """All intra-chunk gradients in one launch: grid axis 1 enumerates NK dq tiles, NK dk
        tiles and NV dv tiles of the time tile given by axis 0."""
        NSUB: tl.constexpr = L // BL
        NK: tl.constexpr = (DHQK + BK - 1) // BK
        kc = tl.program_id(0) // NSUB
        blk = tl.program_id(0) % NSUB
        role = tl.program_id(1)
        bh = tl.program_id(2).to(tl.int64)
        if role < NK:
            _bwd_dq_tile(
                q_ptr, k_ptr, v_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr, z_ptr,
                cs_ptr, ns_ptr, ms_ptr, dq_ptr, qpart_ptr,
                kc, blk, role, bh, BH, scale, S, NC,
                DHQK, DHV, L, BL, BK, BV, DOT_PREC,
            )
        elif role < 2 * NK:
            _bwd_dk_tile(
                q_ptr, k_ptr, v_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr, z_ptr,
                g_ptr, ms_ptr, dcs_ptr, dns_ptr, dk_ptr, kpart_ptr,
                kc, blk, role - NK, bh, BH, scale, S, NC,
                DHQK, DHV, L, BL, BK, BV, DOT_PREC,
            )
        else:
            _bwd_dv_tile(
                q_ptr, k_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr,
                g_ptr, ms_ptr, dcs_ptr, dv_ptr,
                kc, blk, role - 2 * NK, bh, scale, S, NC,
                DHQK, DHV, L, BL, BK, BV, DOT_PREC,
            )

    @triton.jit
    def chunk_mlstm_bwd_gates_kernel(
        qpart_ptr,  # (NK, BH, S) fp32
        kpart_ptr,  # (NK, BH, S) fp32
        e_ptr,  # (BH, S) fp32: dL/dm_t through eps
        mrow_ptr,  # (BH, S) fp32
        i_ptr,  # (BH, S)
        f_ptr,  # (BH, S)
        m0_ptr,  # (BH,) fp32 (read when HAS_STATE)
        qfin_ptr,  # (BH,) fp32: sum(c_S * dc_S) + sum(n_S * dn_S)
        dmfin_ptr,  # (BH,) fp32: upstream dL/dm_S
        q0_ptr,  # (BH,) fp32: sum(c0 * dc0) + sum(n0 * dn0)
        di_ptr,  # out (BH, S) fp32
        df_ptr,  # out (BH, S) fp32
        dm0_ptr,  # out (BH,) fp32 (written when HAS_STATE)
        S,
        BH,
        NK: tl.constexpr,
        BT: tl.constexpr,
        HAS_STATE: tl.constexpr,
    ):
        """Gate gradients, one program per head, scanning time backwards in blocks of BT.

        With every stabilizer frozen, i_s enters only as e^{i_s} k_s and a logsigmoid(f_r) term
        multiplies exactly the (query t >= r, key s < r) pairs, hence (keys include the initial
        state at s = 0, queries the final state at S + 1):
            di_s|frozen = k_s.dk_s,    dlogsig(f_r)|frozen = sum_{t>=r} (q_t.dq_t - k_t.dk_t) + Q_{S+1}
        with Q_{S+1} = sum(c_S dc_S) + sum(n_S dn_S). The stabilizers enter through eps at every step
        (E_t = -(dh_t.h_t) eps / den_t) and through the final state: dL/dm_S += dm_S - Q_{S+1}.
        That gradient D flows down m_t = max(logsig(f_t) + m_{t-1}, i_t): with c_t = [first branch],
        Dtot_t = D_t + c_{t+1} Dtot_{t+1}, di_t += (1 - c_t) Dtot_t, dlogsig(f_t) += c_t Dtot_t,
        dm0 = sum(c0 dc0) + sum(n0 dn0) + c_1 Dtot_1. Exact (up to ties of the max, measure zero).
        """
        bh = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BT)  # position in the reversed block: j = 0 is its latest step
        qfin = tl.load(qfin_ptr + bh)
        dmfin = tl.load(dmfin_ptr + bh)
        if HAS_STATE:
            m0 = tl.load(m0_ptr + bh).to(tl.float32)
        else:
            m0 = qfin * 0.0
        carry_suf = qfin  # sum_{t' > block} (q.dq - k.dk) + Q_{S+1}
        carry_d = qfin * 0.0  # c_{t0} Dtot_{t0} of the block after (t0 its first step)
        nb = (S + BT - 1) // BT
        for jb in range(nb):
            t = (nb - 1 - jb) * BT + (BT - 1 - j)  # (BT,) times, descending
            tv = t < S
            qs = tl.zeros([BT], dtype=tl.float32)
            ks = tl.zeros([BT], dtype=tl.float32)
            for ik in range(NK):
                qs += tl.load(qpart_ptr + (ik * BH + bh) * S + t, mask=tv, other=0.0)
                ks += tl.load(kpart_ptr + (ik * BH + bh) * S + t, mask=tv, other=0.0)
            qk = tl.where(tv, qs - ks, 0.0)
            suf = carry_suf + tl.cumsum(qk, 0)  # (BT,) sum_{t' >= t}
            ig = tl.load(i_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)
            fg = tl.load(f_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)
            mprev = tl.load(mrow_ptr + bh * S + t - 1, mask=tv & (t > 0), other=0.0)
            mprev = tl.where(t > 0, mprev, m0)
            c_t = tl.where(_logsigmoid(fg) + mprev >= ig, 1.0, 0.0)  # (BT,) m_t took the carried branch
            t1v = (t + 1) < S
            ig1 = tl.load(i_ptr + bh * S + t + 1, mask=t1v, other=0.0).to(tl.float32)
            fg1 = tl.load(f_ptr + bh * S + t + 1, mask=t1v, other=0.0).to(tl.float32)
            mt = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
            c_next = tl.where(t1v & (_logsigmoid(fg1) + mt >= ig1), 1.0, 0.0)  # c_{t+1}
            dd = tl.load(e_ptr + bh * S + t, mask=tv, other=0.0)
            dd += tl.where(t == S - 1, dmfin - qfin, 0.0)
            dd += tl.where(j == 0, carry_d, 0.0)
            a = tl.where(j == 0, 0.0, c_next)
            _, dtot = tl.associative_scan((a, dd), 0, _linear_recurrence_combine)  # (BT,) Dtot_t
            di = ks + (1.0 - c_t) * dtot
            dlf = suf + c_t * dtot
            df = dlf / (1.0 + tl.exp(fg))  # d logsigmoid(x)/dx = sigmoid(-x)
            tl.store(di_ptr + bh * S + t, di, mask=tv)
            tl.store(df_ptr + bh * S + t, df, mask=tv)
            carry_suf += tl.sum(qk, 0)
            carry_d = tl.sum(tl.where(j == BT - 1, c_t * dtot, 0.0), 0)
        if HAS_STATE:
            tl.store(dm0_ptr + bh, tl.load(q0_ptr + bh) + carry_d)

    # the kernels are interpreted when TRITON_INTERPRET=1 was set before triton.jit ran (import time)
    _INTERPRETED = type(chunk_mlstm_fwd_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


# ---------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------


def _dot_dtype_precision(dtype: torch.dtype, p: ChunkMLSTMLaunch | None) -> str:
    """input_precision of tl.dot: the configured one for float32 operands; for 16-bit operands it
    has no effect, except under the interpreter with bfloat16 (see ``_mm`` and ``_cast``)."""
    if dtype == torch.bfloat16 and _INTERPRETED:
        return "interpret-bf16"
    return p.dot_precision if (dtype == torch.float32 and p is not None) else "ieee"


def _fwd_gates(i, f, S, NC, p: ChunkMLSTMLaunch):
    BH = i.shape[0]
    b = torch.empty(BH, S, device=i.device, dtype=torch.float32)  # (BH, S)
    cmx = torch.empty_like(b)  # (BH, S)
    g = torch.empty(BH, NC, device=i.device, dtype=torch.float32)  # (BH, NC)
    amax = torch.empty_like(g)  # (BH, NC)
    chunk_mlstm_fwd_gates_kernel[(NC, BH)](i, f, b, cmx, g, amax, S, NC, L=p.chunk_size)
    return b, cmx, g, amax


def _fwd_states(k, v, i, b, g, amax, c0, n0, m0, NC, p: ChunkMLSTMLaunch):
    BH, S, DHQK = k.shape
    DHV = v.shape[-1]
    cs = torch.empty(BH, NC + 1, DHQK, DHV, device=k.device, dtype=torch.float32)  # (BH, NC+1, DHQK, DHV)
    ns = torch.empty(BH, NC + 1, DHQK, device=k.device, dtype=torch.float32)  # (BH, NC+1, DHQK)
    ms = torch.empty(BH, NC + 1, device=k.device, dtype=torch.float32)  # (BH, NC+1)
    has_state = c0 is not None
    dummy = cs
    grid = (triton.cdiv(DHQK, p.block_dqk), triton.cdiv(DHV, p.block_dv), BH)
    chunk_mlstm_fwd_state_kernel[grid](
        k, v, i, b, g, amax,
        c0 if has_state else dummy, n0 if has_state else dummy, m0 if has_state else dummy,
        cs, ns, ms, S, NC,
        DHQK=DHQK, DHV=DHV, L=p.chunk_size, BL=p.block_t, BK=p.block_dqk, BV=p.block_dv,
        HAS_STATE=has_state, DOT_PREC=_dot_dtype_precision(k.dtype, p),
        num_warps=p.num_warps, num_stages=p.num_stages,
    )
    return cs, ns, ms


def chunk_mlstm_fwd(
    q: torch.Tensor,  # (BH, S, DHQK)
    k: torch.Tensor,  # (BH, S, DHQK)
    v: torch.Tensor,  # (BH, S, DHV)
    i: torch.Tensor,  # (BH, S)
    f: torch.Tensor,  # (BH, S)
    c0: torch.Tensor | None,  # (BH, DHQK, DHV) fp32
    n0: torch.Tensor | None,  # (BH, DHQK) fp32
    m0: torch.Tensor | None,  # (BH,) fp32
    p: ChunkMLSTMLaunch,
    eps: float,
):
    """Host launcher of the forward; returns h (BH, S, DHV), the final state and the tensors the
    backward needs (b, g, amax, mrow, nq)."""
    BH, S, DHQK = q.shape
    DHV = v.shape[-1]
    L, BL = p.chunk_size, p.block_t
    NC = triton.cdiv(S, L)
    b, cmx, g, amax = _fwd_gates(i, f, S, NC, p)
    cs, ns, ms = _fwd_states(k, v, i, b, g, amax, c0, n0, m0, NC, p)
    h = torch.empty(BH, S, DHV, device=q.device, dtype=v.dtype)  # (BH, S, DHV)
    mrow = torch.empty(BH, S, device=q.device, dtype=torch.float32)  # (BH, S)
    nq = torch.empty_like(mrow)  # (BH, S)
    grid = (NC * (L // BL), triton.cdiv(DHV, p.block_dv), BH)
    chunk_mlstm_fwd_kernel[grid](
        q, k, v, i, b, cmx, cs, ns, ms, h, mrow, nq,
        DHQK**-0.5, eps, S, NC,
        DHQK=DHQK, DHV=DHV, L=L, BL=BL, BK=p.block_dqk, BV=p.block_dv,
        DOT_PREC=_dot_dtype_precision(q.dtype, p),
        num_warps=p.num_warps, num_stages=p.num_stages,
    )
    last = (cs[:, NC].clone(), ns[:, NC].clone(), ms[:, NC].clone())  # (BH, DHQK, DHV), (BH, DHQK), (BH,)
    return h, last, (b, g, amax, mrow, nq)


def chunk_mlstm_bwd(
    q, k, v, i, f,  # (BH, S, DHQK) x2, (BH, S, DHV), (BH, S) x2
    c0, n0, m0,  # None or (BH, DHQK, DHV), (BH, DHQK), (BH,) fp32
    h,  # (BH, S, DHV) forward output
    b, g, amax, mrow, nq,  # saved forward gate tensors
    dh,  # (BH, S, DHV)
    dc_last, dn_last, dm_last,  # None or (BH, DHQK, DHV), (BH, DHQK), (BH,)
    p: ChunkMLSTMLaunch,
    eps: float,
):
    """Host launcher of the backward; returns dq, dk, dv, di, df (fp32 for the gates), dc0, dn0, dm0."""
    BH, S, DHQK = q.shape
    DHV = v.shape[-1]
    L, BL, BK, BV = p.chunk_size, p.block_t, p.block_dqk, p.block_dv
    NC = triton.cdiv(S, L)
    NK, NV = triton.cdiv(DHQK, BK), triton.cdiv(DHV, BV)
    dev = q.device
    prec = _dot_dtype_precision(q.dtype, p)
    scale = DHQK**-0.5

    cs, ns, ms = _fwd_states(k, v, i, b, g, amax, c0, n0, m0, NC, p)  # recomputed, not stored

    rden = torch.empty(BH, S, device=dev, dtype=torch.float32)  # (BH, S)
    z = torch.empty_like(rden)  # (BH, S)
    e = torch.empty_like(rden)  # (BH, S)
    BT = p.block_t_prep
    chunk_mlstm_bwd_prep_kernel[(triton.cdiv(S, BT), BH)](
        h, dh, mrow, nq, rden, z, e, eps, S, DHV=DHV, BT=BT, BV=BV, num_warps=4, num_stages=2
    )

    has_dfinal = dc_last is not None or dn_last is not None
    if has_dfinal:
        dcl = dc_last if dc_last is not None else torch.zeros(BH, DHQK, DHV, device=dev, dtype=torch.float32)
        dnl = dn_last if dn_last is not None else torch.zeros(BH, DHQK, device=dev, dtype=torch.float32)
    else:
        dcl = dnl = rden  # unused
    dcs = torch.empty(BH, NC + 1, DHQK, DHV, device=dev, dtype=torch.float32)  # (BH, NC+1, DHQK, DHV)
    dns = torch.empty(BH, NC + 1, DHQK, device=dev, dtype=torch.float32)  # (BH, NC+1, DHQK)
    chunk_mlstm_bwd_state_kernel[(NK, NV, BH)](
        q, dh, b, mrow, rden, z, g, ms, dcl, dnl, dcs, dns, scale, S, NC,
        DHQK=DHQK, DHV=DHV, L=L, BL=BL, BK=BK, BV=BV, HAS_DFINAL=has_dfinal, DOT_PREC=prec,
        num_warps=p.num_warps, num_stages=p.num_stages,
    )

    dq = torch.empty_like(q)  # (BH, S, DHQK)
    dk = torch.empty_like(k)  # (BH, S, DHQK)
    dv = torch.empty_like(v)  # (BH, S, DHV)
    qpart = torch.empty(NK, BH, S, device=dev, dtype=torch.float32)  # (NK, BH, S)
    kpart = torch.empty_like(qpart)  # (NK, BH, S)
    chunk_mlstm_bwd_kernel[(NC * (L // BL), 2 * NK + NV, BH)](
        q, k, v, dh, i, b, mrow, rden, z, g, cs, ns, ms, dcs, dns, dq, dk, dv, qpart, kpart,
        scale, S, NC, BH,
        DHQK=DHQK, DHV=DHV, L=L, BL=BL, BK=BK, BV=BV, DOT_PREC=prec,
        num_warps=p.num_warps, num_stages=p.num_stages,
    )

    # per-head scalars of the final and initial states (tiny reductions)
    qfin = torch.zeros(BH, device=dev, dtype=torch.float32)  # (BH,)
    if dc_last is not None:
        qfin += (cs[:, NC] * dc_last).sum((-2, -1))
    if dn_last is not None:
        qfin += (ns[:, NC] * dn_last).sum(-1)
    dmfin = dm_last.float() if dm_last is not None else torch.zeros(BH, device=dev, dtype=torch.float32)
    has_state = c0 is not None
    if has_state:
        dc0, dn0 = dcs[:, 0], dns[:, 0]  # (BH, DHQK, DHV), (BH, DHQK)
        q0 = (c0 * dc0).sum((-2, -1)) + (n0 * dn0).sum(-1)  # (BH,)
        dm0 = torch.empty(BH, device=dev, dtype=torch.float32)  # (BH,)
    else:
        dc0 = dn0 = None
        q0 = dm0 = qfin  # unused
    di = torch.empty(BH, S, device=dev, dtype=torch.float32)  # (BH, S)
    df = torch.empty_like(di)  # (BH, S)
    chunk_mlstm_bwd_gates_kernel[(BH,)](
        qpart, kpart, e, mrow, i, f, m0 if has_state else qfin, qfin, dmfin, q0, di, df, dm0,
        S, BH, NK=NK, BT=min(p.block_t_gates, max(16, _next_pow2(S))), HAS_STATE=has_state,
    )
    return dq, dk, dv, di, df, dc0, dn0, (dm0 if has_state else None)


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


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def validate_mlstm_inputs(fn: str, q, k, v, i, f, state) -> tuple[int, int, int, int, int]:
    """Check the cell inputs of a Triton mLSTM entry point; return (B, NH, S, DHQK, DHV) or raise
    a ValueError / RuntimeError that names the expected and the actual value."""
    if triton is None:
        raise RuntimeError(f"{fn}: needs the triton package (pip install 'xlstm-export[triton]')")
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{fn}: q must be (B, NH, S, DHQK), got shape {_shape(q)}")
    B, NH, S, DHQK = q.shape
    if S < 1 or DHQK < 1 or B < 1 or NH < 1:
        raise ValueError(f"{fn}: q must be (B, NH, S, DHQK) with every size >= 1, got {_shape(q)}")
    if tuple(k.shape) != (B, NH, S, DHQK):
        raise ValueError(f"{fn}: k must be (B, NH, S, DHQK) = {(B, NH, S, DHQK)} like q, got {_shape(k)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, NH, S) or v.shape[3] < 1:
        raise ValueError(f"{fn}: v must be (B, NH, S, DHV) = {(B, NH, S)} + (DHV,), got {_shape(v)}")
    DHV = v.shape[3]
    for name, t in (("i", i), ("f", f)):
        if tuple(t.shape) != (B, NH, S):
            raise ValueError(f"{fn}: {name} must be (B, NH, S) = {(B, NH, S)}, got {_shape(t)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{fn}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("i", i), ("f", f)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v), ("i", i), ("f", f)):
        if t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but q is on {q.device}")
    if state is not None:
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError(f"{fn}: state must be None or a tuple (c, n, m), got {type(state).__name__}")
        expected = {"c": (B, NH, DHQK, DHV), "n": (B, NH, DHQK), "m": (B, NH)}
        for (name, shape), t in zip(expected.items(), state):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{fn}: state {name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{fn}: state {name} must be {shape}, got {_shape(t)}")
            if t.dtype != torch.float32:
                raise ValueError(f"{fn}: state {name} must be float32, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{fn}: state {name} is on {t.device} but q is on {q.device}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"{fn}: tensors are on {q.device.type}; the Triton kernels run on CUDA, or on CPU only "
            "under TRITON_INTERPRET=1 set before the kernels are imported. Use the PyTorch reference instead."
        )
    return B, NH, S, DHQK, DHV


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
    B, NH, S, DHQK, DHV = validate_mlstm_inputs("chunk_mlstm", q, k, v, i, f, state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not _is_pow2(chunk_size) or chunk_size < 16:
        raise ValueError(f"chunk_mlstm: chunk_size must be a power of two >= 16, got {chunk_size!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"chunk_mlstm: eps must be a finite float >= 0, got {eps!r}")
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
