"""Backward of the chunkwise mLSTM in Triton: five kernels and their host launcher.

The forward states are recomputed (:func:`.chunk_fwd.chunk_mlstm_fwd_states`), not stored::

    chunk_mlstm_bwd_prep_kernel    1/den_t, z_t = dL/d(n_t.q_t), E_t = dL/dm_t through eps
    chunk_mlstm_bwd_state_kernel   dC_k, dn_k from dC_S, dn_S                          reverse, sequential
    chunk_mlstm_bwd_kernel         dq, dk, dv of every (time tile, DHQK or DHV tile), plus the row
                                   sums q.dq, k.dk per DHQK tile (tiles: _bwd_dq/dk/dv_tile)
    chunk_mlstm_bwd_gates_kernel   di, df, dm0: suffix sums and the stabilizer chain, one scan per head

The launcher works on flattened heads (BH = B * NH) with the tiles of a ``ChunkMLSTMLaunch`` ``p``.
"""

from __future__ import annotations

import torch

from .._tl import cast, logsigmoid, mm, mm_cols, mm_rows, store_tile, tile, tl, triton
from .._triton import dot_precision, dot_tile
from .chunk_fwd import chunk_mlstm_fwd_states

__all__ = ["chunk_mlstm_bwd", "chunk_mlstm_bwd_gates_kernel", "chunk_mlstm_bwd_kernel", "chunk_mlstm_bwd_prep_kernel",
           "chunk_mlstm_bwd_state_kernel"]

if triton is not None:
    from .chunk_fwd import causal_decay, gram, key_cols, query_rows, state_tile, store_state_tile

    @triton.jit
    def _linear_recurrence_combine(a1, b1, a2, b2):
        # composition of y -> a1 y + b1 then y -> a2 y + b2 (left is the earlier element)
        return a1 * a2, b1 * a2 + b2

    @triton.jit
    def chunk_mlstm_bwd_prep_kernel(
        h_ptr,  # (BH, S, DHV) forward output
        dh_ptr,  # (BH, S, DHV) its gradient
        mrow_ptr, nq_ptr,  # (BH, S) fp32
        rden_ptr,  # out (BH, S) fp32: 1 / (max(|n.q|, e^{-m}) + eps)
        z_ptr,  # out (BH, S) fp32: dL/d(n_t.q_t)
        e_ptr,  # out (BH, S) fp32: dL/dm_t through eps, -(dh.h) eps / den
        eps, S, DHV: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
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
        b_ptr, mrow_ptr, rden_ptr, z_ptr,  # (BH, S) fp32
        g_ptr,  # (BH, NC) fp32
        ms_ptr,  # (BH, NC + 1) fp32
        dcl_ptr,  # (BH, DHQK, DHV) gradient of the final c (read when HAS_DFINAL)
        dnl_ptr,  # (BH, DHQK) gradient of the final n
        dcs_ptr,  # out (BH, NC + 1, DHQK, DHV) fp32: dL/dC_k (index 0 is dL/dc0)
        dns_ptr,  # out (BH, NC + 1, DHQK) fp32
        scale, S, NC, DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, HAS_DFINAL: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """Reverse inter-chunk recurrence of the state gradients."""
        bh = tl.program_id(2).to(tl.int64)
        # dc (BK, BV), dn (BK,): this program's tiles of the final state's gradient
        offs_k, offs_v, mk, mv, dc, dn = state_tile(dcl_ptr + bh * DHQK * DHV, dnl_ptr + bh * DHQK, HAS_DFINAL, DHQK,
                                                    DHV, BK, BV)
        st = bh * (NC + 1)
        NSUB: tl.constexpr = L // BL
        # one flat loop over (chunk, time tile), backwards (see the forward state kernel)
        for j in range(NC * NSUB):
            it = NC * NSUB - 1 - j
            kc = it // NSUB
            sb = it % NSUB
            m_prev = tl.load(ms_ptr + st + kc)
            if sb == NSUB - 1:  # entering chunk kc from its end: dc is dL/dC_{kc+1}
                store_state_tile(dcs_ptr, dns_ptr, st + kc + 1, dc, dn, offs_k, offs_v, mk, mv, DHQK, DHV)
            g = tl.load(g_ptr + bh * NC + kc)
            m_next = tl.load(ms_ptr + st + kc + 1)
            decay = tl.where(sb == NSUB - 1, tl.exp(g + m_prev - m_next), 1.0)  # once per chunk
            dc = dc * decay
            dn = dn * decay
            t, tv, b_r, mrow, rden, z = query_rows(b_ptr, mrow_ptr, rden_ptr, z_ptr, kc, sb, bh, S, L, BL)  # (BL,) each
            w_q = tl.where(tv, tl.exp(b_r + m_prev - mrow), 0.0)  # (BL,)
            qT = tile(q_ptr + bh * S * DHQK, offs_k, t, mk, tv, 1, DHQK)  # (BK, BL)
            dh = tile(dh_ptr + bh * S * DHV, t, offs_v, tv, mv, DHV, 1)  # (BL, BV)
            # the row scale 1/den_t goes on q (one rounding to the input dtype), dh stays exact; w_q
            # reaches e^-30 with nearly closed forget gates: mm_rows keeps it in float16's range
            qw = qT.to(tl.float32) * (rden * w_q * scale)[None, :]  # (BK, BL)
            dc += mm_rows(qw, dh, DOT_PREC)  # (BK, BV)
            dn += tl.sum(qT.to(tl.float32) * (z * w_q * scale)[None, :], 1)  # (BK,)
        store_state_tile(dcs_ptr, dns_ptr, st, dc, dn, offs_k, offs_v, mk, mv, DHQK, DHV)

    @triton.jit
    def times_state(x_ptr, r, mr, c_ptr, o, mo, sd, so, D: tl.constexpr, BD: tl.constexpr, BL: tl.constexpr,
                    BO: tl.constexpr, DOT_PREC: tl.constexpr):
        """(BL, BO) tile of X C: x[r, d] (one head's (S, D) rows) times a state tile whose element (d, o)
        is at c_ptr + d * sd + o * so, summed over the D axis in tiles of BD (C rounded to x's dtype)."""
        acc = tl.zeros([BL, BO], dtype=tl.float32)
        for d0 in range(0, D, BD):
            offs = d0 + tl.arange(0, BD)
            md = offs < D
            x = tile(x_ptr, r, offs, mr, md, D, 1)  # (BL, BD)
            acc += mm_cols(x, tile(c_ptr, offs, o, md, mo, sd, so), DOT_PREC)
        return acc

    @triton.jit
    def _key_steps(g_ptr, ms_ptr, b_ptr, i_ptr, kc, cb, bh, S, NC, L: tl.constexpr, BL: tl.constexpr):
        """The key steps of tile cb in chunk kc (see key_cols), the weight w_s = e^{g - b_s + i_s - m_k}
        with which k_s v_s^T enters the chunk's state C_k (BL,), and C_k's index in the states."""
        s, sv, b_c, i_c = key_cols(b_ptr, i_ptr, kc, cb, bh, S, L, BL)
        g = tl.load(g_ptr + bh * NC + kc)
        st = bh * (NC + 1) + kc + 1
        return s, sv, b_c, i_c, tl.where(sv, tl.exp(g - b_c + i_c - tl.load(ms_ptr + st)), 0.0), st

    @triton.jit
    def _bwd_dq_tile(
        q_ptr, k_ptr, v_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr, z_ptr,
        cs_ptr, ns_ptr, ms_ptr, dq_ptr, qpart_ptr, dpart_ptr,
        kc, rb, ik, bh, BH, scale, S, NC,
        DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """dq of one (row tile, DHQK tile): inter (dnum C_{k-1}^T + z n_{k-1}) and intra dS K; the
        pair (query t, key t) is added apart, so that qpart holds q.dq over the pairs s < t only and
        dpart the diagonal pair's own term (see chunk_mlstm_bwd_gates_kernel)."""
        t, tv, b_r, mrow, rden, z = query_rows(b_ptr, mrow_ptr, rden_ptr, z_ptr, kc, rb, bh, S, L, BL)  # (BL,) each
        offs_k = ik * BK + tl.arange(0, BK)
        mk = offs_k < DHQK
        st = bh * (NC + 1) + kc
        m_prev = tl.load(ms_ptr + st)
        w_q = tl.where(tv, tl.exp(b_r + m_prev - mrow), 0.0)  # (BL,)
        qt = tile(q_ptr + bh * S * DHQK, t, offs_k, tv, mk, DHQK, 1)  # (BL, BK)
        # (BL, BK) dh C_{k-1}^T; 1/den applied below
        dq = times_state(dh_ptr + bh * S * DHV, t, tv, cs_ptr + st * DHQK * DHV, offs_k, mk, 1, DHV, DHV, BV, BL, BK,
                         DOT_PREC)
        n_prev = tl.load(ns_ptr + st * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
        dq = w_q[:, None] * (rden[:, None] * dq + z[:, None] * n_prev[None, :])
        ds_tt = tl.zeros([BL], dtype=tl.float32)  # dL/d(score) of the pair (t, t)
        for cb in range(0, rb + 1):
            s, sv, b_c, i_c = key_cols(b_ptr, i_ptr, kc, cb, bh, S, L, BL)  # (BL,) each
            dp = gram(dh_ptr + bh * S * DHV, t, tv, v_ptr + bh * S * DHV, s, sv, DHV, BV, BL, DOT_PREC)  # dh_t . v_s
            d = causal_decay(t, tv, b_r, mrow, s, sv, b_c, i_c, False)  # (BL, BL)
            ds = d * (dp * rden[:, None] + z[:, None])  # (BL, BL) dL/d(score)
            same = t[:, None] == s[None, :]
            ds_tt += tl.sum(tl.where(same, ds, 0.0), 1)
            ds = tl.where(same, 0.0, ds)
            kc_t = tile(k_ptr + bh * S * DHQK, s, offs_k, sv, mk, DHQK, 1)  # (BL, BK)
            dq += mm_rows(ds, kc_t, DOT_PREC)
        qf = qt.to(tl.float32)
        k_own = tile(k_ptr + bh * S * DHQK, t, offs_k, tv, mk, DHQK, 1).to(tl.float32)  # (BL, BK) k_t
        dq = dq * scale
        qp = tl.sum(qf * dq, 1)  # (BL,) partial q.dq over this DHQK tile, pairs s < t
        dp_tt = scale * ds_tt * tl.sum(qf * k_own, 1)  # (BL,) partial term of the pair (t, t)
        dq += (scale * ds_tt)[:, None] * k_own
        store_tile(dq_ptr + bh * S * DHQK, cast(dq, dq_ptr.dtype.element_ty, DOT_PREC), t, offs_k, tv, mk, DHQK, 1)
        tl.store(qpart_ptr + (ik * BH + bh) * S + t, qp, mask=tv)
        tl.store(dpart_ptr + (ik * BH + bh) * S + t, dp_tt, mask=tv)

    @triton.jit
    def _bwd_dk_tile(
        q_ptr, k_ptr, v_ptr, dh_ptr, i_ptr, b_ptr, mrow_ptr, rden_ptr, z_ptr,
        g_ptr, ms_ptr, dcs_ptr, dns_ptr, dk_ptr, kpart_ptr,
        kc, cb, ik, bh, BH, scale, S, NC,
        DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
    ):
        """dk of one (column tile, DHQK tile): inter w (dC_k v + dn_k) and intra dS^T Q; the pair
        (query s, key s) is added apart, so that kpart holds k.dk over the pairs t > s only."""
        s, sv, b_c, i_c, w_k, st = _key_steps(g_ptr, ms_ptr, b_ptr, i_ptr, kc, cb, bh, S, NC, L, BL)  # (BL,) each
        offs_k = ik * BK + tl.arange(0, BK)
        mk = offs_k < DHQK
        kt = tile(k_ptr + bh * S * DHQK, s, offs_k, sv, mk, DHQK, 1)  # (BL, BK)
        # (BL, BK) v dC_k^T
        dk = times_state(v_ptr + bh * S * DHV, s, sv, dcs_ptr + st * DHQK * DHV, offs_k, mk, 1, DHV, DHV, BV, BL, BK,
                         DOT_PREC)
        dn_next = tl.load(dns_ptr + st * DHQK + offs_k, mask=mk, other=0.0)  # (BK,)
        dk = w_k[:, None] * (dk + dn_next[None, :])
        acc = tl.zeros([BL, BK], dtype=tl.float32)
        ds_ss = tl.zeros([BL], dtype=tl.float32)  # dL/d(score) of the pair (s, s)
        for rb in range(cb, L // BL):
            t, tv, b_r, mrow, rden, z = query_rows(b_ptr, mrow_ptr, rden_ptr, z_ptr, kc, rb, bh, S, L, BL)  # (BL,) each
            dpT = gram(v_ptr + bh * S * DHV, s, sv, dh_ptr + bh * S * DHV, t, tv, DHV, BV, BL, DOT_PREC)  # v_s . dh_t
            dT = causal_decay(t, tv, b_r, mrow, s, sv, b_c, i_c, True)  # (s, t)
            dsT = dT * (dpT * rden[None, :] + z[None, :])  # (BL, BL)
            same = s[:, None] == t[None, :]
            ds_ss += tl.sum(tl.where(same, dsT, 0.0), 1)
            dsT = tl.where(same, 0.0, dsT)
            qt = tile(q_ptr + bh * S * DHQK, t, offs_k, tv, mk, DHQK, 1)  # (BL, BK)
            acc += mm_rows(dsT, qt, DOT_PREC)
        dk = dk + scale * acc
        kp = tl.sum(kt.to(tl.float32) * dk, 1)  # (BL,) partial k.dk over this DHQK tile, pairs t > s
        q_own = tile(q_ptr + bh * S * DHQK, s, offs_k, sv, mk, DHQK, 1).to(tl.float32)  # (BL, BK) q_s
        dk += (scale * ds_ss)[:, None] * q_own
        store_tile(dk_ptr + bh * S * DHQK, cast(dk, dk_ptr.dtype.element_ty, DOT_PREC), s, offs_k, sv, mk, DHQK, 1)
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
        s, sv, b_c, i_c, w_k, st = _key_steps(g_ptr, ms_ptr, b_ptr, i_ptr, kc, cb, bh, S, NC, L, BL)  # (BL,) each
        offs_v = iv * BV + tl.arange(0, BV)
        mv = offs_v < DHV
        # (BL, BV) k dC_k, weighted
        dv = w_k[:, None] * times_state(k_ptr + bh * S * DHQK, s, sv, dcs_ptr + st * DHQK * DHV, offs_v, mv, DHV, 1,
                                        DHQK, BK, BL, BV, DOT_PREC)
        for rb in range(cb, L // BL):
            t, tv, b_r, mrow, rden, _ = query_rows(b_ptr, mrow_ptr, rden_ptr, rden_ptr, kc, rb, bh, S, L, BL)
            scT = gram(k_ptr + bh * S * DHQK, s, sv, q_ptr + bh * S * DHQK, t, tv, DHQK, BK, BL, DOT_PREC)  # k_s . q_t
            dT = causal_decay(t, tv, b_r, mrow, s, sv, b_c, i_c, True)  # (s, t)
            pT = dT * scT * (scale * rden[None, :])  # (BL, BL) score weights with 1/den_t folded in
            dh = tile(dh_ptr + bh * S * DHV, t, offs_v, tv, mv, DHV, 1)  # (BL, BV)
            dv += mm(cast(pT, dh.dtype, DOT_PREC), dh, DOT_PREC)
        store_tile(dv_ptr + bh * S * DHV, cast(dv, dv_ptr.dtype.element_ty, DOT_PREC), s, offs_v, sv, mv, DHV, 1)

    @triton.jit
    def chunk_mlstm_bwd_kernel(
        q_ptr, k_ptr,  # (BH, S, DHQK)
        v_ptr, dh_ptr,  # (BH, S, DHV)
        i_ptr,  # (BH, S)
        b_ptr, mrow_ptr, rden_ptr, z_ptr,  # (BH, S) fp32
        g_ptr,  # (BH, NC) fp32
        cs_ptr,  # (BH, NC + 1, DHQK, DHV) fp32 forward states
        ns_ptr,  # (BH, NC + 1, DHQK) fp32
        ms_ptr,  # (BH, NC + 1) fp32
        dcs_ptr,  # (BH, NC + 1, DHQK, DHV) fp32 state gradients
        dns_ptr,  # (BH, NC + 1, DHQK) fp32
        dq_ptr, dk_ptr,  # out (BH, S, DHQK)
        dv_ptr,  # out (BH, S, DHV)
        qpart_ptr,  # out (NK, BH, S) fp32: q.dq per DHQK tile, the pairs (t, s < t)
        kpart_ptr,  # out (NK, BH, S) fp32: k.dk per DHQK tile, the pairs (t > s, s)
        dpart_ptr,  # out (NK, BH, S) fp32: the pair (t, t)'s term of both, per DHQK tile
        scale, S, NC, BH, DHQK: tl.constexpr, DHV: tl.constexpr, L: tl.constexpr, BL: tl.constexpr,
        BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr,
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
                cs_ptr, ns_ptr, ms_ptr, dq_ptr, qpart_ptr, dpart_ptr,
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
        qpart_ptr, kpart_ptr, dpart_ptr,  # (NK, BH, S) fp32
        e_ptr,  # (BH, S) fp32: dL/dm_t through eps
        mrow_ptr,  # (BH, S) fp32
        i_ptr, f_ptr,  # (BH, S)
        m0_ptr,  # (BH,) fp32 (read when HAS_STATE)
        qfin_ptr,  # (BH,) fp32: sum(c_S * dc_S) + sum(n_S * dn_S)
        dmfin_ptr,  # (BH,) fp32: upstream dL/dm_S
        q0_ptr,  # (BH,) fp32: sum(c0 * dc0) + sum(n0 * dn0)
        di_ptr, df_ptr,  # out (BH, S) fp32
        dm0_ptr,  # out (BH,) fp32 (written when HAS_STATE)
        S, BH, NK: tl.constexpr, BT: tl.constexpr, HAS_STATE: tl.constexpr,
    ):
        """Gate gradients, one program per head: a forward scan of time in blocks of BT, then a
        backward one.

        With every stabilizer frozen, i_s enters only as e^{i_s} k_s and a logsigmoid(f_r) term
        multiplies exactly the (query t >= r, key s < r) pairs (keys include the initial state at
        s = 0, queries the final state at S + 1), hence
            di_s|frozen = k_s.dk_s,    dlogsig(f_r)|frozen = Q_0 + sum_{t<r} (k_t.dk_t - q_t.dq_t)
        with Q_0 = sum(c0 dc0) + sum(n0 dn0) (the pairs of the initial state), since the pairs of
        keys s < r less those of queries t < r are those that span r. Both sums leave out the pair
        (t, t), which enters q_t.dq_t and k_t.dk_t alike (qpart: the pairs s < t, kpart: t > s;
        dpart: the pair (t, t)'s term, added back for di). Why this form: with nearly closed forget
        gates (logsig(f) ~ -30) every spanning pair is ~e^{logsig(f)} small, and so is every term
        here, while the pair (t, t) and the final state's pair with the last key are not. The
        equal suffix form, sum_{t>=r} (q_t.dq_t - k_t.dk_t) + Q_{S+1}, subtracts those large terms
        in float32 and leaves their rounding (~1e-7 of them) in place of dlogsig(f).

        The stabilizers enter through eps at every step (E_t = -(dh_t.h_t) eps / den_t) and through
        the final state: dL/dm_S += dm_S - Q_{S+1}, Q_{S+1} = sum(c_S dc_S) + sum(n_S dn_S). That
        gradient D flows down m_t = max(logsig(f_t) + m_{t-1}, i_t): with c_t = [first branch],
        Dtot_t = D_t + c_{t+1} Dtot_{t+1}, di_t += (1 - c_t) Dtot_t, dlogsig(f_t) += c_t Dtot_t,
        dm0 = Q_0 + c_1 Dtot_1. Exact (up to ties of the max, measure zero).
        """
        bh = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BT)
        qfin = tl.load(qfin_ptr + bh)
        dmfin = tl.load(dmfin_ptr + bh)
        if HAS_STATE:
            m0 = tl.load(m0_ptr + bh).to(tl.float32)
            carry_pre = tl.load(q0_ptr + bh)  # Q_0 + sum_{t' < t0 - 1} (k.dk - q.dq), t0 the block's first step
        else:
            m0 = qfin * 0.0
            carry_pre = qfin * 0.0
        nb = (S + BT - 1) // BT
        for jb in range(nb):  # forward: dlogsig(f_t)|frozen, kept in df until the backward scan
            t = jb * BT + j  # (BT,) times, ascending
            tv = t < S
            # the terms of step t - 1, so that a cumsum is the sum over t' < t. (Not the inclusive
            # cumsum less step t's own term: the last step's holds the final state's pair with its
            # key, which is not small, and the difference would cancel all of dlogsig(f) there.)
            pv = tv & (t > 0)
            kq = tl.zeros([BT], dtype=tl.float32)
            for ik in range(NK):
                kq += tl.load(kpart_ptr + (ik * BH + bh) * S + t - 1, mask=pv, other=0.0)
                kq -= tl.load(qpart_ptr + (ik * BH + bh) * S + t - 1, mask=pv, other=0.0)
            kq = tl.where(pv, kq, 0.0)
            tl.store(df_ptr + bh * S + t, carry_pre + tl.cumsum(kq, 0), mask=tv)
            carry_pre += tl.sum(kq, 0)
        carry_d = qfin * 0.0  # c_{t0} Dtot_{t0} of the block after (t0 its first step)
        for jb in range(nb):  # backward: the stabilizer chain
            t = (nb - 1 - jb) * BT + (BT - 1 - j)  # (BT,) times, descending: j = 0 is the block's latest step
            tv = t < S
            kk = tl.zeros([BT], dtype=tl.float32)  # k_t.dk_t
            for ik in range(NK):
                kk += tl.load(kpart_ptr + (ik * BH + bh) * S + t, mask=tv, other=0.0)
                kk += tl.load(dpart_ptr + (ik * BH + bh) * S + t, mask=tv, other=0.0)
            ig = tl.load(i_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)
            fg = tl.load(f_ptr + bh * S + t, mask=tv, other=0.0).to(tl.float32)
            mprev = tl.load(mrow_ptr + bh * S + t - 1, mask=tv & (t > 0), other=0.0)
            mprev = tl.where(t > 0, mprev, m0)
            c_t = tl.where(logsigmoid(fg) + mprev >= ig, 1.0, 0.0)  # (BT,) m_t took the carried branch
            t1v = (t + 1) < S
            ig1 = tl.load(i_ptr + bh * S + t + 1, mask=t1v, other=0.0).to(tl.float32)
            fg1 = tl.load(f_ptr + bh * S + t + 1, mask=t1v, other=0.0).to(tl.float32)
            mt = tl.load(mrow_ptr + bh * S + t, mask=tv, other=0.0)
            c_next = tl.where(t1v & (logsigmoid(fg1) + mt >= ig1), 1.0, 0.0)  # c_{t+1}
            dd = tl.load(e_ptr + bh * S + t, mask=tv, other=0.0)
            dd += tl.where(t == S - 1, dmfin - qfin, 0.0)
            dd += tl.where(j == 0, carry_d, 0.0)
            a = tl.where(j == 0, 0.0, c_next)
            _, dtot = tl.associative_scan((a, dd), 0, _linear_recurrence_combine)  # (BT,) Dtot_t
            di = kk + (1.0 - c_t) * dtot
            dlf = tl.load(df_ptr + bh * S + t, mask=tv, other=0.0) + c_t * dtot
            df = dlf / (1.0 + tl.exp(fg))  # d logsigmoid(x)/dx = sigmoid(-x)
            tl.store(di_ptr + bh * S + t, di, mask=tv)
            tl.store(df_ptr + bh * S + t, df, mask=tv)
            carry_d = tl.sum(tl.where(j == BT - 1, c_t * dtot, 0.0), 0)
        if HAS_STATE:
            tl.store(dm0_ptr + bh, tl.load(q0_ptr + bh) + carry_d)

    # the kernels are interpreted when TRITON_INTERPRET=1 was set before triton.jit ran (import time)


def chunk_mlstm_bwd(
    q, k, v, i, f,  # (BH, S, DHQK) x2, (BH, S, DHV), (BH, S) x2
    c0, n0, m0,  # None or (BH, DHQK, DHV), (BH, DHQK), (BH,) fp32
    h,  # (BH, S, DHV) forward output
    b, g, amax, mrow, nq,  # saved forward gate tensors
    dh,  # (BH, S, DHV)
    dc_last, dn_last, dm_last,  # None or (BH, DHQK, DHV), (BH, DHQK), (BH,)
    p,  # ChunkMLSTMLaunch (chunk.py)
    eps: float,
):
    """Host launcher of the backward; returns dq, dk, dv, di, df (fp32 for the gates), dc0, dn0, dm0."""
    BH, S, DHQK = q.shape
    DHV = v.shape[-1]
    L, BL, BK, BV = p.chunk_size, p.block_t, p.block_dqk, p.block_dv
    NC = triton.cdiv(S, L)
    NK, NV = triton.cdiv(DHQK, BK), triton.cdiv(DHV, BV)
    dev = q.device
    prec = dot_precision(q.dtype, p.dot_precision)
    scale = DHQK**-0.5

    cs, ns, ms = chunk_mlstm_fwd_states(k, v, i, b, g, amax, c0, n0, m0, NC, p)  # recomputed, not stored

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
    dpart = torch.empty_like(qpart)  # (NK, BH, S)
    chunk_mlstm_bwd_kernel[(NC * (L // BL), 2 * NK + NV, BH)](
        q, k, v, dh, i, b, mrow, rden, z, g, cs, ns, ms, dcs, dns, dq, dk, dv, qpart, kpart, dpart,
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
        qpart, kpart, dpart, e, mrow, i, f, m0 if has_state else qfin, qfin, dmfin, q0, di, df, dm0,
        S, BH, NK=NK, BT=min(p.block_t_gates, dot_tile(S)), HAS_STATE=has_state,
    )
    return dq, dk, dv, di, df, dc0, dn0, (dm0 if has_state else None)


