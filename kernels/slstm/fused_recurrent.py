"""Fused recurrent sLSTM in Triton: the whole time loop in one launch, forward and backward.

Public functions (signatures fixed by the cell API in ``kernels/__init__.py``)::

    y, (h, c, n, m) = fused_recurrent_slstm(x, r, b, state=None)        # any S, autograd
    y, (h, c, n, m) = fused_recurrent_step_slstm(x, r, b, state)        # S == 1, forward only

    x: (B, NH, S, 4*DH)  gate pre-activations W x per head, gate-major [i | f | z | o], no bias
    r: (NH, DH, 4*DH)    recurrent weights: pre-activations(t) = x_t + h_{t-1} @ r[head] + b[head]
    b: (NH, 4*DH)        bias
    state: None or (h, c, n, m), each (B, NH, DH); float32 (other float dtypes are cast)
    y: (B, NH, S, DH) in the dtype of x; the final state is float32

Example::

    x = torch.randn(2, 4, 100, 4 * 64, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(4, 64, 4 * 64, device="cuda", dtype=torch.bfloat16) / 8
    b = torch.zeros(4, 4 * 64, device="cuda", dtype=torch.bfloat16)
    y, (h, c, n, m) = fused_recurrent_slstm(x, r, b)                     # y: (2, 4, 100, 64)

The cell (per head and step; the math of ``naive.py``)::

    ĩ, f̃, z̃, õ = x_t + h_{t-1} @ r + b;  a = logσ(f̃) + m_{t-1}
    m_t = ĩ where n_{t-1} == 0 (first step, as NX-AI's cell), else max(ĩ, a)
    i = exp(ĩ - m_t);  f = exp(min(a - m_t, 0))
    c_t = f c_{t-1} + i tanh(z̃);  n_t = f n_{t-1} + i;  h_t = σ(õ) c_t / n_t

Layout of the work:

- Forward: one program per (batch tile of BLOCK_B rows, head). The four (DH x DH) gate blocks
  of r[head] are loaded once, before the time loop, and stay on chip; each step is four
  (BLOCK_B x DH) @ (DH x DH) dots plus the pointwise cell, with the next step's x prefetched.
  BLOCK_B >= 16 because ``tl.dot`` needs M, N, K >= 16; a smaller batch is padded by masking,
  and so is a head dim that is not a power of two (or below 16).
- On chip means shared memory/registers: the four blocks take 4 DH^2 elements (128 KiB for
  bfloat16 at DH 128). Above ``SLSTMLaunchParams.max_r_bytes_on_chip`` (160 KiB; float32 at
  DH 128) they are re-read every step instead (from L2, where r stays; with tf32 or ieee products
  each gate block just before its product, see ``launch_meta``). DH <= 128 (``MAX_HEAD_DIM``).
- The recurrent matmul runs in the dtype of x (bfloat16/float16 operands, float32 accumulation;
  float32 inputs use 3xTF32 tensor-core products, float32 accuracy). All states and the cell math
  are float32.
- For the backward the forward saves the pre-activations of every step and the states
  (h, c, n, m) entering every step, all float32: 8 floats per (batch, head, step, unit). The
  backward recomputes the gates from them exactly as the forward computed them.
- Backward: one program per (batch tile, head) runs the reverse time loop in one launch with the
  transposed gate blocks of r on chip, writes d(pre-activations) of every step (that is dx) and
  the gradients of the initial state. The gradients of r and b are reductions over all steps and
  batch rows of those d(pre-activations) (dr = Σ_t h_{t-1}^T dx_t, db = Σ_t dx_t): they are done
  right after the kernel as one batched GEMM and one sum, fully parallel, instead of on the
  sequential critical path of the time loop.
- Step kernel (decoding, S == 1): no recurrence inside one call, so the programs also split the
  DH output units of each head; every program reads h_{t-1} whole and a (DH x BLOCK_N) slice of
  each gate block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from ...contract import SLSTM, check_inputs
from .._triton import DOT_MIN, dot_tile, interpreting, is_pow2, require_triton

try:
    import triton
    import triton.language as tl

    from .._tl import logsigmoid

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = [
    "SLSTMLaunchParams",
    "fused_recurrent_slstm",
    "fused_recurrent_step_slstm",
    "fused_recurrent_slstm_fwd",
    "fused_recurrent_slstm_bwd",
    "fused_recurrent_step_slstm_fwd",
]

MAX_HEAD_DIM = 128  # the four (DH x DH) gate blocks of r must stay on chip for the whole loop


@dataclass(frozen=True)
class SLSTMLaunchParams:
    """Launch parameters of the fused recurrent sLSTM kernels."""

    block_b: int = 16  # batch rows per program; >= 16 (tl.dot needs M >= 16), power of two
    num_warps: Optional[int] = None  # None: 4 up to DH 32, else 8 (16 when r is re-read per step)
    step_block_n: int = 32  # step kernel: output units per program (>= 16, power of two)
    # float32 inputs, recurrent matmul: "tf32x3" (three TF32 tensor-core products, float32
    # accuracy), "ieee" (CUDA-core FMAs; r at DH 128 then does not fit in shared memory) or
    # "tf32" (one product, ~1e-3 relative). The interpreter multiplies in float32 for all three.
    fp32_precision: Literal["tf32x3", "ieee", "tf32"] = "tf32x3"
    max_r_bytes_on_chip: int = 160 * 1024  # larger r (float32 at DH 128) is re-read from L2 per step

    def __post_init__(self):
        for name in ("block_b", "step_block_n"):
            v = getattr(self, name)
            if v < DOT_MIN or not is_pow2(v):
                raise ValueError(f"SLSTMLaunchParams.{name} must be a power of two >= {DOT_MIN}, got {v}")
        if self.fp32_precision not in ("tf32x3", "ieee", "tf32"):
            raise ValueError(f"SLSTMLaunchParams.fp32_precision must be 'tf32x3', 'ieee' or 'tf32', "
                             f"got {self.fp32_precision!r}")
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"SLSTMLaunchParams.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")

    def r_on_chip(self, block_dh: int, dtype: torch.dtype) -> bool:
        itemsize = torch.finfo(dtype).bits // 8
        return 4 * block_dh * block_dh * itemsize <= self.max_r_bytes_on_chip

    def warps_for(self, block_dh: int, r_on_chip: bool = True) -> int:
        if self.num_warps is not None:
            return self.num_warps
        if not r_on_chip:  # every step loads whole gate blocks: spread them over more threads
            return 16
        return 4 if block_dh <= 32 else 8


DEFAULT_PARAMS = SLSTMLaunchParams()


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _tanh(v):
        e = tl.exp(-2.0 * tl.abs(v))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(v >= 0.0, t, -t)

    @triton.jit
    def _dot_operand(v, DT: tl.constexpr, UPCAST: tl.constexpr):
        # round to the matmul dtype; UPCAST (interpreter + bfloat16 only) then widens the exact
        # bfloat16 values to float32 because the CPU interpreter cannot multiply bfloat16
        v = v.to(DT)
        if UPCAST:
            v = v.to(tl.float32)
        return v

    @triton.jit
    def _load4(p, stride, mask):
        """The four tiles at p + j * stride, j = 0..3 (gates i, f, z, o or states h, c, n, m), 0 off mask."""
        return (tl.load(p, mask=mask, other=0.0), tl.load(p + stride, mask=mask, other=0.0),
                tl.load(p + 2 * stride, mask=mask, other=0.0), tl.load(p + 3 * stride, mask=mask, other=0.0))

    @triton.jit
    def _store4(p, stride, a, b, c, d, mask):
        """Store a, b, c, d where _load4 reads them."""
        tl.store(p, a, mask=mask)
        tl.store(p + stride, b, mask=mask)
        tl.store(p + 2 * stride, c, mask=mask)
        tl.store(p + 3 * stride, d, mask=mask)

    @triton.jit
    def _load_state(h_ptr, c_ptr, n_ptr, m_ptr, off, mask):
        """(h, c, n, m) at off of four (B, NH, DH) tensors, as float32."""
        return (tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32),
                tl.load(c_ptr + off, mask=mask, other=0.0).to(tl.float32),
                tl.load(n_ptr + off, mask=mask, other=0.0).to(tl.float32),
                tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32))

    @triton.jit
    def _store_state(h_ptr, c_ptr, n_ptr, m_ptr, off, h, c, n, m, mask):
        """Store (h, c, n, m) where _load_state reads them."""
        tl.store(h_ptr + off, h, mask=mask)
        tl.store(c_ptr + off, c, mask=mask)
        tl.store(n_ptr + off, n, mask=mask)
        tl.store(m_ptr + off, m, mask=mask)

    @triton.jit
    def _load_gate_blocks(p, mask, DH: tl.constexpr, DT: tl.constexpr, UPCAST: tl.constexpr):
        # the four (BD, BD) gate blocks at p, p + DH, p + 2 DH, p + 3 DH (i, f, z, o)
        r_i, r_f, r_z, r_o = _load4(p, DH, mask)
        return (_dot_operand(r_i, DT, UPCAST), _dot_operand(r_f, DT, UPCAST), _dot_operand(r_z, DT, UPCAST),
                _dot_operand(r_o, DT, UPCAST))

    @triton.jit
    def _gate_block(p, mask, DT: tl.constexpr, UPCAST: tl.constexpr):
        """One (BD, BD) gate block at p as a dot operand (r streamed from L2: see _gate_dot)."""
        return _dot_operand(tl.load(p, mask=mask, other=0.0), DT, UPCAST)

    @triton.jit
    def _gate_dot(a, r_g, p, mask, acc, DT: tl.constexpr, UPCAST: tl.constexpr, R_EACH: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
        """a @ r_g + acc: r_g the gate block as given, or with R_EACH the block loaded at p just
        before its product (see ``launch_meta``)."""
        if R_EACH:
            r_g = _gate_block(p, mask, DT, UPCAST)
        return tl.dot(a, r_g, acc=acc, input_precision=DOT_PRECISION)

    @triton.jit
    def _batch_head_tile(B, NH: tl.constexpr, DH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DH: tl.constexpr):
        """This program's (batch tile, head) of the sequence kernels: the units offs_d (BD,), masks
        mask_d (BD,), mask_bd (BB, BD), mask_dd (BD, BD), and its rows of the flattened (B, NH)."""
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
        offs_d = tl.arange(0, BLOCK_DH)  # (BD,)
        mask_d = offs_d < DH
        mask_bd = (offs_b < B)[:, None] & mask_d[None, :]
        mask_dd = mask_d[:, None] & mask_d[None, :]
        return offs_d, mask_d, mask_bd, mask_dd, offs_b.to(tl.int64) * NH + tl.program_id(1)

    @triton.jit
    def _step_gate(p_x, p_bias, p_r, h_dot, mask_bn, mask_n, mask_kn, DT: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
        """One gate's pre-activation x + b + h_{t-1} r of the step kernel (pointers at that gate)."""
        g = tl.load(p_x, mask=mask_bn, other=0.0).to(tl.float32)
        g += tl.load(p_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        r_g = _dot_operand(tl.load(p_r, mask=mask_kn, other=0.0), DT, UPCAST)
        return tl.dot(h_dot, r_g, acc=g, input_precision=DOT_PRECISION)

    @triton.jit
    def _stabilizer(g_i, a, n):
        """m_t: i~ where n_{t-1} == 0 (the first step of a fresh sequence, as the official cell),
        else max(i~, a)."""
        return tl.where(n == 0.0, g_i, tl.maximum(g_i, a))

    @triton.jit
    def _slstm_pointwise(g_i, g_f, g_z, g_o, c, n, m):
        """One sLSTM cell step on (BLOCK_B, BLOCK_DH) float32 tiles -> (h, c, n, m)."""
        a = logsigmoid(g_f) + m  # log of the unstabilised forget gate times the old scale
        m_new = _stabilizer(g_i, a, n)
        i = tl.exp(g_i - m_new)
        f = tl.exp(tl.minimum(a - m_new, 0.0))  # <= 1: a no-op unless n == 0
        c_new = f * c + i * _tanh(g_z)
        n_new = f * n + i
        h_new = tl.sigmoid(g_o) * c_new / n_new
        return h_new, c_new, n_new, m_new

    @triton.jit
    def fused_recurrent_slstm_fwd_kernel(
        x,  # (B, NH, S, 4*DH) any float dtype
        r,  # (NH, DH, 4*DH) dot dtype (the dtype of x)
        b,  # (NH, 4*DH)
        h0, c0, n0, m0,  # (B, NH, DH) float32, read if USE_INITIAL_STATE
        y,  # (B, NH, S, DH) dtype of x
        hT, cT, nT, mT,  # (B, NH, DH) float32 final state
        states_all,  # (B, NH, 4, S, DH) float32: (h, c, n, m) entering each step, if SAVE
        gates_all,  # (B, NH, S, 4*DH) float32: pre-activations of each step, if SAVE
        B,  # batch size
        S,  # sequence length
        NH: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_DH: tl.constexpr,  # next power of two >= max(DH, 16)
        USE_INITIAL_STATE: tl.constexpr,
        SAVE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,  # interpreter + bfloat16: float32 products of the bfloat16 values
        R_ON_CHIP: tl.constexpr,  # load r once before the loop (else once per step, from L2)
        R_EACH: tl.constexpr,  # not R_ON_CHIP: load each gate block just before its product
    ):
        i_h = tl.program_id(1)
        offs_d, mask_d, mask_bd, mask_dd, row = _batch_head_tile(B, NH, DH, BLOCK_B, BLOCK_DH)

        # the four gate blocks r[head][:, g*DH:(g+1)*DH], on chip for the whole loop
        p_r = r + i_h * DH * 4 * DH + offs_d[:, None] * (4 * DH) + offs_d[None, :]  # (BD, BD)
        DT: tl.constexpr = r.dtype.element_ty
        if R_ON_CHIP:
            r_i, r_f, r_z, r_o = _load_gate_blocks(p_r, mask_dd, DH, DT, UPCAST)
        elif R_EACH:  # loaded in the loop, one block per product (_gate_dot); these stand in as arguments
            r_i, r_f, r_z, r_o = 0.0, 0.0, 0.0, 0.0
        p_bias = b + i_h * 4 * DH + offs_d  # (BD,)
        b_i, b_f, b_z, b_o = _load4(p_bias, DH, mask_d)  # (BD,) each
        b_i, b_f = b_i.to(tl.float32)[None, :], b_f.to(tl.float32)[None, :]  # (1, BD)
        b_z, b_o = b_z.to(tl.float32)[None, :], b_o.to(tl.float32)[None, :]

        p_state = row[:, None] * DH + offs_d[None, :]  # (BB, BD)
        if USE_INITIAL_STATE:
            h, c, n, m = _load_state(h0, c0, n0, m0, p_state, mask_bd)
        else:
            zero = tl.zeros([BLOCK_B, BLOCK_DH], dtype=tl.float32)
            h, c, n, m = zero, zero, zero, zero

        p_x = x + row[:, None] * S * 4 * DH + offs_d[None, :]  # (BB, BD), step 0, gate i
        p_y = y + row[:, None] * S * DH + offs_d[None, :]  # (BB, BD), step 0
        p_g = gates_all + row[:, None] * S * 4 * DH + offs_d[None, :]  # (BB, BD)
        p_sa = states_all + row[:, None] * 4 * S * DH + offs_d[None, :]  # (BB, BD), h, step 0

        x_i, x_f, x_z, x_o = _load4(p_x, DH, mask_bd)
        for t in range(S):
            # prefetch the next step's inputs; their latency hides behind this step's work
            # (clamped: the last step reloads itself, unused)
            xn_i, xn_f, xn_z, xn_o = _load4(p_x + tl.minimum(t + 1, S - 1) * 4 * DH, DH, mask_bd)

            if SAVE:
                _store4(p_sa + t * DH, S * DH, h, c, n, m, mask_bd)

            h_dot = _dot_operand(h, DT, UPCAST)  # (BB, BD)
            if not R_ON_CHIP:  # too large for shared memory: stream it from L2 every step
                if not R_EACH:  # all four at once (with R_EACH: each in _gate_dot)
                    r_i, r_f, r_z, r_o = _load_gate_blocks(p_r, mask_dd, DH, DT, UPCAST)
            g_i = _gate_dot(h_dot, r_i, p_r, mask_dd, x_i.to(tl.float32) + b_i, DT, UPCAST, R_EACH, DOT_PRECISION)
            g_f = _gate_dot(h_dot, r_f, p_r + DH, mask_dd, x_f.to(tl.float32) + b_f, DT, UPCAST, R_EACH,
                            DOT_PRECISION)
            g_z = _gate_dot(h_dot, r_z, p_r + 2 * DH, mask_dd, x_z.to(tl.float32) + b_z, DT, UPCAST, R_EACH,
                            DOT_PRECISION)
            g_o = _gate_dot(h_dot, r_o, p_r + 3 * DH, mask_dd, x_o.to(tl.float32) + b_o, DT, UPCAST, R_EACH,
                            DOT_PRECISION)
            if SAVE:
                _store4(p_g + t * 4 * DH, DH, g_i, g_f, g_z, g_o, mask_bd)

            h, c, n, m = _slstm_pointwise(g_i, g_f, g_z, g_o, c, n, m)
            tl.store(p_y + t * DH, h.to(y.dtype.element_ty), mask=mask_bd)
            x_i, x_f, x_z, x_o = xn_i, xn_f, xn_z, xn_o

        _store_state(hT, cT, nT, mT, p_state, h, c, n, m, mask_bd)

    @triton.jit
    def fused_recurrent_slstm_bwd_kernel(
        r,  # (NH, DH, 4*DH) dot dtype
        states_all,  # (B, NH, 4, S, DH) float32, states entering each step (from the forward)
        gates_all,  # (B, NH, S, 4*DH) float32 pre-activations (from the forward)
        dy,  # (B, NH, S, DH) any float dtype
        dhT, dcT, dnT, dmT,  # (B, NH, DH) float32 gradients of the final state
        dgates,  # (B, NH, S, 4*DH) float32 out: d(pre-activations) == dx
        dh0, dc0, dn0, dm0,  # (B, NH, DH) float32 out: gradients of the initial state
        B, S,  # batch size, sequence length
        NH: tl.constexpr, DH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DH: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, R_ON_CHIP: tl.constexpr, R_EACH: tl.constexpr,
    ):
        i_h = tl.program_id(1)
        offs_d, mask_d, mask_bd, mask_dd, row = _batch_head_tile(B, NH, DH, BLOCK_B, BLOCK_DH)

        # transposed gate blocks: rt_g[j, k] = r[head][k, g*DH + j]  (BD, BD), on chip
        p_rt = r + i_h * DH * 4 * DH + offs_d[None, :] * (4 * DH) + offs_d[:, None]
        DT: tl.constexpr = r.dtype.element_ty
        if R_ON_CHIP:
            rt_i, rt_f, rt_z, rt_o = _load_gate_blocks(p_rt, mask_dd, DH, DT, UPCAST)
        elif R_EACH:  # loaded in the loop, one block per product (_gate_dot); these stand in as arguments
            rt_i, rt_f, rt_z, rt_o = 0.0, 0.0, 0.0, 0.0

        p_state = row[:, None] * DH + offs_d[None, :]  # (BB, BD)
        dh, dc, dn, dm = _load_state(dhT, dcT, dnT, dmT, p_state, mask_bd)  # dL/dh_t... from later steps

        p_g = gates_all + row[:, None] * S * 4 * DH + offs_d[None, :]
        p_dg = dgates + row[:, None] * S * 4 * DH + offs_d[None, :]
        p_sa = states_all + row[:, None] * 4 * S * DH + offs_d[None, :]
        p_dy = dy + row[:, None] * S * DH + offs_d[None, :]

        # step S-1 prefetched; inside the loop the loads of step t-1 are issued first
        t = S - 1
        g_i, g_f, g_z, g_o = _load4(p_g + t * 4 * DH, DH, mask_bd)
        _, c_p, n_p, m_p = _load4(p_sa + t * DH, S * DH, mask_bd)  # states entering step t
        dy_t = tl.load(p_dy + t * DH, mask=mask_bd, other=0.0)
        for tt in range(S):
            t = S - 1 - tt
            tn = tl.maximum(t - 1, 0)  # the step loaded ahead (clamped: step 0 reloads itself)
            gn_i, gn_f, gn_z, gn_o = _load4(p_g + tn * 4 * DH, DH, mask_bd)
            _, cn_p, nn_p, mn_p = _load4(p_sa + tn * DH, S * DH, mask_bd)
            dyn_t = tl.load(p_dy + tn * DH, mask=mask_bd, other=0.0)

            # recompute the step exactly as the forward did
            a = logsigmoid(g_f) + m_p
            m_t = _stabilizer(g_i, a, n_p)
            ig = tl.exp(g_i - m_t)
            fg = tl.exp(tl.minimum(a - m_t, 0.0))
            zg = _tanh(g_z)
            og = tl.sigmoid(g_o)
            c_t = fg * c_p + ig * zg
            n_t = fg * n_p + ig

            dh_t = dh + dy_t.to(tl.float32)  # total dL/dh_t
            inv_n = 1.0 / n_t
            d_o = dh_t * c_t * inv_n * og * (1.0 - og)  # dL/dõ
            dc_t = dc + dh_t * og * inv_n  # total dL/dc_t
            dn_t = dn - dh_t * og * c_t * inv_n * inv_n  # total dL/dn_t
            d_z = dc_t * ig * (1.0 - zg * zg)  # dL/dz̃
            d_ig = dc_t * zg + dn_t  # dL/di (the gate value)
            d_fg = dc_t * c_p + dn_t * n_p  # dL/df
            dgi_direct = d_ig * ig  # through i = exp(ĩ - m_t), holding m_t
            # through f = exp(min(a - m_t, 0)), holding m_t (the cap passes the gradient at 0,
            # as torch.clamp does; it caps only where n == 0)
            da_direct = tl.where(a - m_t <= 0.0, d_fg * fg, 0.0)
            dm_t = dm - dgi_direct - da_direct  # total dL/dm_t
            # m_t = max(ĩ, a): the gradient goes to the larger one, split evenly on a tie
            # (as torch.maximum does); m_t = ĩ where n == 0
            sel = tl.where(g_i > a, 1.0, tl.where(g_i == a, 0.5, 0.0))
            sel = tl.where(n_p == 0.0, 1.0, sel)
            d_i = dgi_direct + dm_t * sel
            d_a = da_direct + dm_t * (1.0 - sel)
            d_f = d_a * tl.sigmoid(-g_f)  # d logσ(v)/dv = σ(-v)

            _store4(p_dg + t * 4 * DH, DH, d_i, d_f, d_z, d_o, mask_bd)

            # carries to step t-1: dL/dh_{t-1} = Σ_g d(g̃) @ r_g^T; c, n through f; m through a
            if not R_ON_CHIP:
                if not R_EACH:  # all four at once (with R_EACH: each in _gate_dot)
                    rt_i, rt_f, rt_z, rt_o = _load_gate_blocks(p_rt, mask_dd, DH, DT, UPCAST)
            dh = _gate_dot(_dot_operand(d_i, DT, UPCAST), rt_i, p_rt, mask_dd, None, DT, UPCAST, R_EACH,
                           DOT_PRECISION)
            dh = _gate_dot(_dot_operand(d_f, DT, UPCAST), rt_f, p_rt + DH, mask_dd, dh, DT, UPCAST, R_EACH,
                           DOT_PRECISION)
            dh = _gate_dot(_dot_operand(d_z, DT, UPCAST), rt_z, p_rt + 2 * DH, mask_dd, dh, DT, UPCAST, R_EACH,
                           DOT_PRECISION)
            dh = _gate_dot(_dot_operand(d_o, DT, UPCAST), rt_o, p_rt + 3 * DH, mask_dd, dh, DT, UPCAST, R_EACH,
                           DOT_PRECISION)
            dc = dc_t * fg
            dn = dn_t * fg
            dm = d_a

            g_i, g_f, g_z, g_o = gn_i, gn_f, gn_z, gn_o
            c_p, n_p, m_p, dy_t = cn_p, nn_p, mn_p, dyn_t

        _store_state(dh0, dc0, dn0, dm0, p_state, dh, dc, dn, dm, mask_bd)

    @triton.jit
    def fused_recurrent_step_slstm_fwd_kernel(
        x,  # (B, NH, 1, 4*DH)
        r,  # (NH, DH, 4*DH) dot dtype
        b,  # (NH, 4*DH)
        h0, c0, n0, m0,  # (B, NH, DH) float32, read if USE_INITIAL_STATE
        y,  # (B, NH, 1, DH) dtype of x
        hT, cT, nT, mT,  # (B, NH, DH) float32 new state
        B,
        NH: tl.constexpr,
        DH: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_DH: tl.constexpr,  # the whole (padded) h_{t-1}
        BLOCK_N: tl.constexpr,  # output units of this program
        USE_INITIAL_STATE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        i_b = tl.program_id(0)
        i_h = tl.program_id(1)
        i_n = tl.program_id(2)
        offs_b = i_b * BLOCK_B + tl.arange(0, BLOCK_B)  # (BB,)
        offs_k = tl.arange(0, BLOCK_DH)  # (BD,) units of h_{t-1}
        offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) units computed here
        mask_b = offs_b < B
        mask_k = offs_k < DH
        mask_n = offs_n < DH
        mask_bk = mask_b[:, None] & mask_k[None, :]  # (BB, BD)
        mask_bn = mask_b[:, None] & mask_n[None, :]  # (BB, BN)
        mask_kn = mask_k[:, None] & mask_n[None, :]  # (BD, BN)
        row = offs_b.to(tl.int64) * NH + i_h

        p_r = r + i_h * DH * 4 * DH + offs_k[:, None] * (4 * DH) + offs_n[None, :]  # (BD, BN)
        p_bias = b + i_h * 4 * DH + offs_n  # (BN,)
        p_x = x + row[:, None] * 4 * DH + offs_n[None, :]  # (BB, BN)
        p_sn = row[:, None] * DH + offs_n[None, :]  # (BB, BN)

        if USE_INITIAL_STATE:
            h = tl.load(h0 + row[:, None] * DH + offs_k[None, :], mask=mask_bk, other=0.0)  # (BB, BD) all of h
            _, c, n, m = _load_state(h0, c0, n0, m0, p_sn, mask_bn)  # (BB, BN) this program's units
        else:
            h = tl.zeros([BLOCK_B, BLOCK_DH], dtype=tl.float32)
            zero = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
            c, n, m = zero, zero, zero
        DT: tl.constexpr = r.dtype.element_ty
        h_dot = _dot_operand(h, DT, UPCAST)
        g_i = _step_gate(p_x, p_bias, p_r, h_dot, mask_bn, mask_n, mask_kn, DT, UPCAST, DOT_PRECISION)
        g_f = _step_gate(p_x + DH, p_bias + DH, p_r + DH, h_dot, mask_bn, mask_n, mask_kn, DT, UPCAST, DOT_PRECISION)
        g_z = _step_gate(p_x + 2 * DH, p_bias + 2 * DH, p_r + 2 * DH, h_dot, mask_bn, mask_n, mask_kn, DT, UPCAST,
                         DOT_PRECISION)
        g_o = _step_gate(p_x + 3 * DH, p_bias + 3 * DH, p_r + 3 * DH, h_dot, mask_bn, mask_n, mask_kn, DT, UPCAST,
                         DOT_PRECISION)

        h_new, c, n, m = _slstm_pointwise(g_i, g_f, g_z, g_o, c, n, m)
        tl.store(y + p_sn, h_new.to(y.dtype.element_ty), mask=mask_bn)
        _store_state(hT, cT, nT, mT, p_sn, h_new, c, n, m, mask_bn)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype, params: SLSTMLaunchParams) -> str:
    return params.fp32_precision if dtype == torch.float32 else "ieee"  # 16-bit: no choice to make


def _upcast(dtype: torch.dtype) -> bool:
    # the CPU interpreter multiplies bfloat16 as raw 16-bit integers: widen the (exact) values
    return dtype == torch.bfloat16 and interpreting()


def launch_meta(kind: str, DH: int, dtype: torch.dtype, params: Optional[SLSTMLaunchParams] = None) -> dict:
    """Compile-time constants and launch options of a kernel ("fwd", "bwd" or "step") for head
    dim DH and matmul dtype ``dtype`` (the launchers use it; so does the ahead-of-time compile
    check in the tests)."""
    params = params or DEFAULT_PARAMS
    block_dh = dot_tile(DH)
    meta = dict(DH=DH, BLOCK_B=params.block_b, BLOCK_DH=block_dh,
                DOT_PRECISION=_dot_precision(dtype, params), UPCAST=_upcast(dtype),
                num_stages=1)  # no software pipelining: loads are prefetched by hand
    if kind == "step":
        meta.update(BLOCK_N=min(params.step_block_n, block_dh), num_warps=4)
    else:
        on_chip = params.r_on_chip(block_dh, dtype)
        # r streamed from L2 (not on chip): 3xTF32 splits each loaded block in registers, so the four
        # loads can all go out before the four products; other products stage their operands in
        # shared memory as loaded, and four staged blocks would not fit (float32 at DH 128: 4 x 64
        # KiB, 270-295 KiB with the rest, over an H100/H200's 227 KiB): those load each block just
        # before its product (R_EACH), one staged block at a time
        each = not on_chip and meta["DOT_PRECISION"] != "tf32x3"
        meta.update(R_ON_CHIP=on_chip, R_EACH=each, num_warps=params.warps_for(block_dh, on_chip))
    return meta


def fused_recurrent_slstm_fwd(
    x: torch.Tensor,  # (B, NH, S, 4*DH) contiguous
    r: torch.Tensor,  # (NH, DH, 4*DH) contiguous, dtype of x
    b: torch.Tensor,  # (NH, 4*DH) contiguous
    state: Optional[Sequence[torch.Tensor]],  # None or 4 x (B, NH, DH) float32 contiguous
    save_for_backward: bool,
    params: Optional[SLSTMLaunchParams] = None,  # None: DEFAULT_PARAMS (read at call time)
):
    """Launch the forward kernel.

    Returns y (B, NH, S, DH), final (h, c, n, m) 4 x (B, NH, DH) float32, and when
    ``save_for_backward`` the states entering every step (B, NH, 4, S, DH) and the
    pre-activations (B, NH, S, 4*DH), both float32 (else None, None).
    """
    params = params or DEFAULT_PARAMS
    B, NH, S, G = x.shape
    DH = G // 4
    y = torch.empty(B, NH, S, DH, device=x.device, dtype=x.dtype)
    final = [torch.empty(B, NH, DH, device=x.device, dtype=torch.float32) for _ in range(4)]
    if save_for_backward:
        states_all = torch.empty(B, NH, 4, S, DH, device=x.device, dtype=torch.float32)
        gates_all = torch.empty(B, NH, S, 4 * DH, device=x.device, dtype=torch.float32)
    else:  # never touched by the kernel (SAVE=False); any pointer will do
        states_all = gates_all = y
    init = state if state is not None else (y, y, y, y)
    grid = (triton.cdiv(B, params.block_b), NH)
    fused_recurrent_slstm_fwd_kernel[grid](
        x, r, b, *init, y, *final, states_all, gates_all, B, S, NH=NH,
        USE_INITIAL_STATE=state is not None, SAVE=save_for_backward,
        **launch_meta("fwd", DH, r.dtype, params),
    )
    if not save_for_backward:
        states_all = gates_all = None
    return y, tuple(final), states_all, gates_all


def fused_recurrent_slstm_bwd(
    r: torch.Tensor,  # (NH, DH, 4*DH) contiguous, dot dtype
    states_all: torch.Tensor,  # (B, NH, 4, S, DH) float32
    gates_all: torch.Tensor,  # (B, NH, S, 4*DH) float32
    dy: torch.Tensor,  # (B, NH, S, DH) contiguous
    dstate: Sequence[torch.Tensor],  # 4 x (B, NH, DH) float32 contiguous
    params: Optional[SLSTMLaunchParams] = None,  # None: DEFAULT_PARAMS (read at call time)
):
    """Launch the backward kernel and reduce dr, db.

    Returns dgates (B, NH, S, 4*DH) float32 (== dx), dr (NH, DH, 4*DH) float32,
    db (NH, 4*DH) float32 and the initial-state gradients 4 x (B, NH, DH) float32.
    """
    params = params or DEFAULT_PARAMS
    B, NH, S, G = gates_all.shape
    DH = G // 4
    dgates = torch.empty_like(gates_all)
    dinit = [torch.empty(B, NH, DH, device=r.device, dtype=torch.float32) for _ in range(4)]
    grid = (triton.cdiv(B, params.block_b), NH)
    fused_recurrent_slstm_bwd_kernel[grid](
        r, states_all, gates_all, dy, *dstate, dgates, *dinit, B, S, NH=NH,
        **launch_meta("bwd", DH, r.dtype, params),
    )
    # dr[head] = Σ_{b,t} h_{t-1}^T d(pre-activations)_t: one batched GEMM over all steps
    h_prev = states_all[:, :, 0].permute(1, 3, 0, 2).reshape(NH, DH, B * S)  # (NH, DH, B*S)
    dg = dgates.permute(1, 0, 2, 3).reshape(NH, B * S, G)  # (NH, B*S, 4*DH)
    if r.dtype == torch.bfloat16:  # bfloat16 operands as in the forward, float32 accumulation
        dr = torch.bmm(h_prev.to(r.dtype), dg.to(r.dtype)).float()  # (NH, DH, 4*DH)
    else:  # float32 (float16 too: a sum over B*S steps may overflow its range)
        dr = torch.bmm(h_prev, dg)  # (NH, DH, 4*DH)
    db = dgates.sum(dim=(0, 2))  # (NH, 4*DH)
    return dgates, dr, db, tuple(dinit)


# --------------------------------------------------------------------------------------------
# autograd Function
# --------------------------------------------------------------------------------------------
class FusedRecurrentSLSTMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, b, h0, c0, n0, m0, save):
        # x (B, NH, S, 4DH); r (NH, DH, 4DH); b (NH, 4DH); h0..m0 (B, NH, DH) float32 or None;
        # save: whether a backward can follow (grad mode on and an input requires grad)
        has_state = h0 is not None
        state = (h0, c0, n0, m0) if has_state else None
        r_dot = r.to(x.dtype).contiguous()  # the recurrent matmul runs in the dtype of x
        y, final, states_all, gates_all = fused_recurrent_slstm_fwd(
            x, r_dot, b, state, save_for_backward=save
        )
        if save:
            ctx.save_for_backward(r_dot, states_all, gates_all)
        ctx.has_state = has_state
        ctx.dtypes = (x.dtype, r.dtype, b.dtype)
        return (y, *final)

    @staticmethod
    def backward(ctx, dy, dhT, dcT, dnT, dmT):
        r_dot, states_all, gates_all = ctx.saved_tensors
        x_dtype, r_dtype, b_dtype = ctx.dtypes
        dstate = [d.float().contiguous() for d in (dhT, dcT, dnT, dmT)]
        dgates, dr, db, dinit = fused_recurrent_slstm_bwd(
            r_dot, states_all, gates_all, dy.contiguous(), dstate
        )
        dx = dgates.to(x_dtype)
        dinit = dinit if ctx.has_state else (None, None, None, None)
        return (dx, dr.to(r_dtype), db.to(b_dtype), *dinit, None)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------
def _check_inputs(x, r, b, state, name: str, step: bool = False):
    """The op's input check (xlstm_export.contract; states of any float dtype are cast to float32)
    plus this kernel's capability: DH <= MAX_HEAD_DIM. Returns the state as float32 or None."""
    DH = check_inputs(SLSTM, name, (x, r, b), state, state_dtypes=None, step=step)[3]
    if DH > MAX_HEAD_DIM:
        raise ValueError(f"{name}: head dim DH={DH} > {MAX_HEAD_DIM} is not supported by the fused kernel "
                         "(its four DH x DH gate blocks must stay on chip); use the 'torch' backend")
    require_triton(name, x.device)
    return None if state is None else [s.float().contiguous() for s in state]


def fused_recurrent_slstm(
    x: torch.Tensor,  # (B, NH, S, 4*DH)
    r: torch.Tensor,  # (NH, DH, 4*DH)
    b: torch.Tensor,  # (NH, 4*DH)
    state: Optional[Sequence[torch.Tensor]] = None,  # None or (h, c, n, m), each (B, NH, DH)
):
    """sLSTM over a whole sequence with the fused Triton kernels (differentiable).

    Returns ``y`` (B, NH, S, DH) in the dtype of x and the final state ``(h, c, n, m)``, each
    (B, NH, DH) float32. Gradients flow to x, r, b and the initial state. See the module
    docstring for the math and layout.
    """
    st = _check_inputs(x, r, b, state, "fused_recurrent_slstm")
    h0, c0, n0, m0 = st if st is not None else (None, None, None, None)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, r, b, *(st or ())))
    y, h, c, n, m = FusedRecurrentSLSTMFunction.apply(
        x.contiguous(), r.contiguous(), b.contiguous(), h0, c0, n0, m0, save
    )
    return y, (h, c, n, m)


def fused_recurrent_step_slstm_fwd(
    x: torch.Tensor,  # (B, NH, 1, 4*DH) contiguous
    r: torch.Tensor,  # (NH, DH, 4*DH) contiguous, dtype of x
    b: torch.Tensor,  # (NH, 4*DH) contiguous
    state: Optional[Sequence[torch.Tensor]],  # None or 4 x (B, NH, DH) float32 contiguous
    params: Optional[SLSTMLaunchParams] = None,  # None: DEFAULT_PARAMS (read at call time)
):
    """Launch the step kernel. Returns y (B, NH, 1, DH) and the new (h, c, n, m) float32."""
    params = params or DEFAULT_PARAMS
    B, NH, _, G = x.shape
    DH = G // 4
    y = torch.empty(B, NH, 1, DH, device=x.device, dtype=x.dtype)
    new = [torch.empty(B, NH, DH, device=x.device, dtype=torch.float32) for _ in range(4)]
    init = state if state is not None else (y, y, y, y)
    meta = launch_meta("step", DH, r.dtype, params)
    grid = (triton.cdiv(B, params.block_b), NH, triton.cdiv(DH, meta["BLOCK_N"]))
    fused_recurrent_step_slstm_fwd_kernel[grid](
        x, r, b, *init, y, *new, B, NH=NH, USE_INITIAL_STATE=state is not None, **meta,
    )
    return y, tuple(new)


def fused_recurrent_step_slstm(
    x: torch.Tensor,  # (B, NH, 1, 4*DH)
    r: torch.Tensor,  # (NH, DH, 4*DH)
    b: torch.Tensor,  # (NH, 4*DH)
    state: Optional[Sequence[torch.Tensor]],  # (h, c, n, m), each (B, NH, DH); None: zeros
):
    """One sLSTM step (S == 1) for decoding; forward only (no autograd: inputs are detached).

    Returns ``y`` (B, NH, 1, DH) in the dtype of x and the new state ``(h, c, n, m)``, each
    (B, NH, DH) float32. ``state=None`` is the all-zero state (a fresh sequence).
    """
    st = _check_inputs(x, r, b, state, "fused_recurrent_step_slstm", step=True)
    x = x.detach().contiguous()
    r_dot = r.detach().to(x.dtype).contiguous()  # the matmul runs in the dtype of x
    st = [t.detach() for t in st] if st is not None else None
    return fused_recurrent_step_slstm_fwd(x, r_dot, b.detach().contiguous(), st)
