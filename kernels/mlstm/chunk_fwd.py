"""Forward of the chunkwise mLSTM in Triton: three kernels and their host launcher.

Per chunk of L steps (b = in-chunk cumsum of logsigmoid(f), g = b at the chunk's last step,
a_j = g - b_j + i_j; the design is in :mod:`.chunk`)::

    chunk_mlstm_fwd_gates_kernel   b, g, max_j a_j, cummax_t (i_t - b_t)        parallel over chunks
    chunk_mlstm_fwd_state_kernel   m_k, C_k, n_k: the state before every chunk     sequential
    chunk_mlstm_fwd_kernel         h_t, m_t, n_t.q_t per (row tile, DHV tile)      parallel

Every launcher takes flattened heads (BH = B * NH) and a ``ChunkMLSTMLaunch`` ``p`` (:mod:`.chunk`).
"""

from __future__ import annotations

import torch

from .._tl import cast, logsigmoid, mm, store_tile, tile, tl, triton
from .._triton import dot_precision

__all__ = ["chunk_mlstm_fwd", "chunk_mlstm_fwd_gates_kernel", "chunk_mlstm_fwd_kernel", "chunk_mlstm_fwd_state_kernel",
           "chunk_mlstm_fwd_states"]

if triton is not None:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def causal_decay(t, tv, b_t, m_t, s, sv, b_s, i_s, TRANS: tl.constexpr):
        """D[t, s] = e^{b_t - b_s + i_s - m_t} for s <= t, both real steps, else 0: a (len(t), len(s))
        tile of the chunk's D-weights, or with TRANS its transpose (len(s), len(t))."""
        if TRANS:
            causal = (t[None, :] >= s[:, None]) & sv[:, None] & tv[None, :]
            return tl.where(causal, tl.exp(b_t[None, :] - b_s[:, None] + i_s[:, None] - m_t[None, :]), 0.0)
        else:
            causal = (t[:, None] >= s[None, :]) & sv[None, :] & tv[:, None]
            return tl.where(causal, tl.exp(b_t[:, None] - b_s[None, :] + i_s[None, :] - m_t[:, None]), 0.0)

    @triton.jit
    def state_tile(c_ptr, n_ptr, LOAD: tl.constexpr, DHQK: tl.constexpr, DHV: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr):
        """This program's (DHQK tile, DHV tile) of a matrix state (grid axes 0 and 1): rows offs_k,
        columns offs_v, their masks, and float32 tiles c (BK, BV), n (BK,) read at c_ptr, n_ptr
        (zeros unless LOAD)."""
        offs_k = tl.program_id(0) * BK + tl.arange(0, BK)
        offs_v = tl.program_id(1) * BV + tl.arange(0, BV)
        mk = offs_k < DHQK
        mv = offs_v < DHV
        if LOAD:
            c = tile(c_ptr, offs_k, offs_v, mk, mv, DHV, 1).to(tl.float32)
            n = tl.load(n_ptr + offs_k, mask=mk, other=0.0).to(tl.float32)
        else:
            c = tl.zeros([BK, BV], dtype=tl.float32)
            n = tl.zeros([BK], dtype=tl.float32)
        return offs_k, offs_v, mk, mv, c, n

    @triton.jit
    def store_state_tile(cs_ptr, ns_ptr, k, c, n, offs_k, offs_v, mk, mv, DHQK: tl.constexpr, DHV: tl.constexpr):
        """Store the tiles c, n as state k of cs (.., DHQK, DHV), ns (.., DHQK); n from the first DHV tile."""
        store_tile(cs_ptr + k * DHQK * DHV, c, offs_k, offs_v, mk, mv, DHV, 1)
        if tl.program_id(1) == 0:
            tl.store(ns_ptr + k * DHQK + offs_k, n, mask=mk)

    @triton.jit
    def gram(x_ptr, r, mr, y_ptr, c, mc, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr, DOT_PREC: tl.constexpr):
        """(BL, BL) tile of X Y^T: x[r] . y[c] over the D axis in tiles of BD (x, y: one head's (S, D) rows)."""
        acc = tl.zeros([BL, BL], dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs = d0 + tl.arange(0, BD)
            md = offs < D
            acc += mm(tile(x_ptr, r, offs, mr, md, D, 1), tile(y_ptr, offs, c, md, mc, 1, D), DOT_PREC)
        return acc

    @triton.jit
    def key_cols(b_ptr, i_ptr, kc, cb, bh, S, L: tl.constexpr, BL: tl.constexpr):
        """The key (column) steps s of time tile cb in chunk kc: s, s < S, b_s and float32 i_s, each (BL,)."""
        s = kc * L + cb * BL + tl.arange(0, BL)
        sv = s < S
        b_s = tl.load(b_ptr + bh * S + s, mask=sv, other=0.0)
        i_s = tl.load(i_ptr + bh * S + s, mask=sv, other=0.0).to(tl.float32)
        return s, sv, b_s, i_s

    @triton.jit
    def query_rows(b_ptr, mrow_ptr, rden_ptr, z_ptr, kc, rb, bh, S, L: tl.constexpr, BL: tl.constexpr):
        """The query (row) steps t of time tile rb in chunk kc: t, t < S and the float32 b_t, m_t,
        1/den_t, z_t of the backward, each (BL,)."""
        t = kc * L + rb * BL + tl.arange(0, BL)
        tv = t < S
        idx = bh * S + t
        return (t, tv, tl.load(b_ptr + idx, mask=tv, other=0.0), tl.load(mrow_ptr + idx, mask=tv, other=0.0),
                tl.load(rden_ptr + idx, mask=tv, other=0.0), tl.load(z_ptr + idx, mask=tv, other=0.0))

    @triton.jit
    def chunk_mlstm_fwd_gates_kernel(
        i_ptr,  # (BH, S) input-gate pre-activations
        f_ptr,  # (BH, S) forget-gate pre-activations
        b_ptr,  # out (BH, S) fp32: in-chunk cumsum of logsigmoid(f)
        cmx_ptr,  # out (BH, S) fp32: in-chunk cummax_{s<=t} (i_s - b_s)
        g_ptr,  # out (BH, NC) fp32: b at the chunk's last step
        amax_ptr,  # out (BH, NC) fp32: max_j a_j, a_j = g - b_j + i_j
        S, NC, L: tl.constexpr,
    ):
        kc = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        t = kc * L + tl.arange(0, L)  # (L,)
        tv = t < S
        ig = tl.load(i_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)  # (L,)
        fg = tl.load(f_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)  # (L,)
        lf = tl.where(tv, logsigmoid(fg), 0.0)  # (L,)
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
        g_ptr, amax_ptr,  # (BH, NC) fp32
        c0_ptr,  # (BH, DHQK, DHV) fp32 initial state (read when HAS_STATE)
        n0_ptr,  # (BH, DHQK) fp32
        m0_ptr,  # (BH,) fp32
        cs_ptr,  # out (BH, NC + 1, DHQK, DHV) fp32: the state before chunk k at index k
        ns_ptr,  # out (BH, NC + 1, DHQK) fp32
        ms_ptr,  # out (BH, NC + 1) fp32
        S, NC, DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
        BV: tl.constexpr, HAS_STATE: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """Inter-chunk recurrence: one program per (DHQK tile, DHV tile, head), loop over chunks."""
        bh = tl.program_id(2).to(tl.int64)
        # (BK,), (BV,) this program's rows / columns of C; c (BK, BV), n (BK,) the initial state
        offs_k, offs_v, mk, mv, c, n = state_tile(c0_ptr + bh * DHQK * DHV, n0_ptr + bh * DHQK, HAS_STATE, DHQK, DHV,
                                                  BK, BV)
        if HAS_STATE:
            m = tl.load(m0_ptr + bh).to(tl.float32)
        else:
            m = tl.sum(tl.zeros([BK], dtype=tl.float32), 0)  # a float32 scalar 0
        st = bh * (NC + 1)
        store_state_tile(cs_ptr, ns_ptr, st, c, n, offs_k, offs_v, mk, mv, DHQK, DHV)
        if tl.program_id(0) + tl.program_id(1) == 0:
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
            kT = tile(k_ptr + bh * S * DHQK, offs_k, t, mk, tv, 1, DHQK)  # (BK, BL)
            vt = tile(v_ptr + bh * S * DHV, t, offs_v, tv, mv, DHV, 1)  # (BL, BV)
            kw = kT.to(tl.float32) * w[None, :]  # (BK, BL)
            c += mm(cast(kw, vt.dtype, DOT_PREC), vt, DOT_PREC)  # (BK, BV)
            n += tl.sum(kw, 1)  # (BK,)
            if sb == NSUB - 1:
                store_state_tile(cs_ptr, ns_ptr, st + kc + 1, c, n, offs_k, offs_v, mk, mv, DHQK, DHV)
                if tl.program_id(0) + tl.program_id(1) == 0:
                    tl.store(ms_ptr + st + kc + 1, m_new)
            m = tl.where(sb == NSUB - 1, m_new, m)

    @triton.jit
    def chunk_mlstm_fwd_kernel(
        q_ptr, k_ptr,  # (BH, S, DHQK)
        v_ptr,  # (BH, S, DHV)
        i_ptr,  # (BH, S)
        b_ptr, cmx_ptr,  # (BH, S) fp32
        cs_ptr,  # (BH, NC + 1, DHQK, DHV) fp32
        ns_ptr,  # (BH, NC + 1, DHQK) fp32
        ms_ptr,  # (BH, NC + 1) fp32
        h_ptr,  # out (BH, S, DHV), dtype of v
        mrow_ptr,  # out (BH, S) fp32: the per-step stabilizer m_t
        nq_ptr,  # out (BH, S) fp32: the stabilized n_t . q_t (scaled q)
        scale, eps, S, NC, DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
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
            qt = tile(q_ptr + bh * S * DHQK, t, offs_k, tv, mk, DHQK, 1)  # (BL, BK)
            c = tile(cs_ptr + st * DHQK * DHV, offs_k, offs_v, mk, mv, DHV, 1)  # (BK, BV)
            n = tl.load(ns_ptr + st * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
            acc_h += mm(qt, cast(c, qt.dtype, DOT_PREC), DOT_PREC)
            acc_n += tl.sum(qt.to(tl.float32) * n[None, :], 1)
        acc_h = acc_h * (w_inter * scale)[:, None]
        acc_n = acc_n * (w_inter * scale)

        # intra-chunk term over column tiles cb <= rb
        for cb in range(0, rb + 1):
            s, sv, b_c, i_c = key_cols(b_ptr, i_ptr, kc, cb, bh, S, L, BL)  # (BL,) each
            sc = gram(q_ptr + bh * S * DHQK, t, tv, k_ptr + bh * S * DHQK, s, sv, DHQK, BK, BL, DOT_PREC)  # q_t . k_s
            d = causal_decay(t, tv, b_r, mrow, s, sv, b_c, i_c, False)  # (BL, BL)
            p = sc * scale * d  # (BL, BL)
            acc_n += tl.sum(p, 1)
            vt = tile(v_ptr + bh * S * DHV, s, offs_v, sv, mv, DHV, 1)  # (BL, BV)
            acc_h += mm(cast(p, vt.dtype, DOT_PREC), vt, DOT_PREC)

        den = tl.maximum(tl.abs(acc_n), tl.exp(-mrow)) + eps  # (BL,)
        h = acc_h / den[:, None]  # (BL, BV)
        store_tile(h_ptr + bh * S * DHV, cast(h, h_ptr.dtype.element_ty, DOT_PREC), t, offs_v, tv, mv, DHV, 1)
        if iv == 0:
            tl.store(mrow_ptr + bh * S + t, mrow, mask=tv)
            tl.store(nq_ptr + bh * S + t, acc_n, mask=tv)



def _fwd_gates(i, f, S, NC, p):
    BH = i.shape[0]
    b = torch.empty(BH, S, device=i.device, dtype=torch.float32)  # (BH, S)
    cmx = torch.empty_like(b)  # (BH, S)
    g = torch.empty(BH, NC, device=i.device, dtype=torch.float32)  # (BH, NC)
    amax = torch.empty_like(g)  # (BH, NC)
    chunk_mlstm_fwd_gates_kernel[(NC, BH)](i, f, b, cmx, g, amax, S, NC, L=p.chunk_size)
    return b, cmx, g, amax


def chunk_mlstm_fwd_states(k, v, i, b, g, amax, c0, n0, m0, NC, p):
    """The state before every chunk: cs (BH, NC+1, DHQK, DHV), ns (BH, NC+1, DHQK), ms (BH, NC+1)."""
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
        HAS_STATE=has_state, DOT_PREC=dot_precision(k.dtype, p.dot_precision),
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
    p,
    eps: float,
):
    """Host launcher of the forward; returns h (BH, S, DHV), the final state and the tensors the
    backward needs (b, g, amax, mrow, nq)."""
    BH, S, DHQK = q.shape
    DHV = v.shape[-1]
    L, BL = p.chunk_size, p.block_t
    NC = triton.cdiv(S, L)
    b, cmx, g, amax = _fwd_gates(i, f, S, NC, p)
    cs, ns, ms = chunk_mlstm_fwd_states(k, v, i, b, g, amax, c0, n0, m0, NC, p)
    h = torch.empty(BH, S, DHV, device=q.device, dtype=v.dtype)  # (BH, S, DHV)
    mrow = torch.empty(BH, S, device=q.device, dtype=torch.float32)  # (BH, S)
    nq = torch.empty_like(mrow)  # (BH, S)
    grid = (NC * (L // BL), triton.cdiv(DHV, p.block_dv), BH)
    chunk_mlstm_fwd_kernel[grid](
        q, k, v, i, b, cmx, cs, ns, ms, h, mrow, nq,
        DHQK**-0.5, eps, S, NC,
        DHQK=DHQK, DHV=DHV, L=L, BL=BL, BK=p.block_dqk, BV=p.block_dv,
        DOT_PREC=dot_precision(q.dtype, p.dot_precision),
        num_warps=p.num_warps, num_stages=p.num_stages,
    )
    last = (cs[:, NC].clone(), ns[:, NC].clone(), ms[:, NC].clone())  # (BH, DHQK, DHV), (BH, DHQK), (BH,)
    return h, last, (b, g, amax, mrow, nq)


