"""The residual blocks: paper mLSTM and sLSTM blocks, and the xLSTM-7B ("large") block.

Each block maps (x (B, S, E), state dict) -> (x, new state dict). A block's state is a dict of
float32 tensors (float64 in a float64 model) whose keys are the tensor names of the model's state layout ("c", "n", "m",
"conv", "h"); the model prefixes them with the block index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .config import xLSTMConfig
from .layers import (
    CausalConv1d,
    GatedFFN,
    HeadwiseLinear,
    LayerNorm,
    MultiHeadLayerNorm,
    RMSNorm,
    SwiGLU,
    soft_cap,
)


def _mlstm_state_shapes(cfg: xLSTMConfig, batch: int) -> dict[str, tuple[int, ...]]:
    NH = cfg.num_heads
    DQK, DV = cfg.qk_dim // NH, cfg.v_dim // NH
    return {"c": (batch, NH, DQK, DV), "n": (batch, NH, DQK), "m": (batch, NH)}


def _conv_state_shapes(conv: CausalConv1d | None, batch: int) -> dict[str, tuple[int, ...]]:
    """A block's "conv" state: the last K-1 inputs (B, K-1, C); none without a conv."""
    return {} if conv is None else {"conv": (batch, conv.kernel_size - 1, conv.weight.shape[0])}


def _gate_bias_init(bias: torch.Tensor, num_heads: int, fgate: bool) -> None:
    """Forget gates open (3..6 across heads, so memory lasts), input gates near zero."""
    with torch.no_grad():
        if fgate:
            bias.copy_(torch.linspace(3.0, 6.0, num_heads).repeat_interleave(bias.numel() // num_heads))
        else:
            bias.normal_(0.0, 0.1)


class mLSTMBlock(nn.Module):
    """Paper mLSTM block (pre-up-projection): norm -> up -> conv -> q,k,v -> cell -> gate -> down."""

    def __init__(self, cfg: xLSTMConfig):
        super().__init__()
        E, inner, NH = cfg.embedding_dim, cfg.mlstm_inner_dim, cfg.num_heads
        self.cfg = cfg
        self.backend = cfg.backend
        self.norm = LayerNorm(E, cfg.norm_eps)
        self.proj_up = nn.Linear(E, 2 * inner, bias=cfg.bias)
        self.conv = CausalConv1d(inner, cfg.conv1d_kernel_size) if cfg.conv1d_kernel_size > 0 else None
        nblocks = inner // cfg.qkv_proj_blocksize
        self.q_proj = HeadwiseLinear(inner, nblocks, bias=cfg.bias)
        self.k_proj = HeadwiseLinear(inner, nblocks, bias=cfg.bias)
        self.v_proj = HeadwiseLinear(inner, nblocks, bias=cfg.bias)
        self.igate = nn.Linear(3 * inner, NH)  # reads cat(q, k, v)
        self.fgate = nn.Linear(3 * inner, NH)
        self.outnorm = MultiHeadLayerNorm(NH, inner // NH, cfg.norm_eps)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, E, bias=cfg.bias)
        nn.init.zeros_(self.igate.weight)
        nn.init.zeros_(self.fgate.weight)
        _gate_bias_init(self.igate.bias, NH, fgate=False)
        _gate_bias_init(self.fgate.bias, NH, fgate=True)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {**_mlstm_state_shapes(self.cfg, batch), **_conv_state_shapes(self.conv, batch)}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]):
        B, S, _ = x.shape
        NH = self.cfg.num_heads
        new_state = {}
        x_m, z = self.proj_up(self.norm(x)).chunk(2, dim=-1)  # (B, S, inner) each
        if self.conv is not None:
            x_c, new_state["conv"] = self.conv(x_m, state["conv"])
            x_c = F.silu(x_c)  # (B, S, inner)
        else:
            x_c = x_m
        q, k, v = self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m)  # (B, S, inner) each
        qkv = torch.cat([q, k, v], dim=-1)  # (B, S, 3*inner)
        i = self.igate(qkv).transpose(1, 2)  # (B, NH, S)
        f = self.fgate(qkv).transpose(1, 2)  # (B, NH, S)
        heads = lambda t: t.reshape(B, S, NH, -1).transpose(1, 2)  # (B, NH, S, DH)  # noqa: E731
        h, (c, n, m) = kernels.mlstm_cell(
            heads(q), heads(k), heads(v), i, f, (state["c"], state["n"], state["m"]),
            backend=self.backend, chunk_size=self.cfg.chunk_size, eps=self.cfg.cell_eps,
        )
        new_state.update(c=c, n=n, m=m)
        h = self.outnorm(h)  # (B, S, inner)
        h = (h + self.learnable_skip * x_c) * F.silu(z)
        return x + self.proj_down(h), new_state


class sLSTMBlock(nn.Module):
    """Paper sLSTM block: norm -> conv(i,f) -> head-wise W -> cell -> group norm, then a gated FFN."""

    def __init__(self, cfg: xLSTMConfig):
        super().__init__()
        E, NH = cfg.embedding_dim, cfg.slstm_num_heads
        DH = E // NH
        self.cfg = cfg
        self.backend = cfg.backend
        self.norm = LayerNorm(E, cfg.norm_eps)
        k = cfg.slstm_conv1d_kernel_size
        self.conv = CausalConv1d(E, k) if k > 0 else None
        # W for the gates, block-diagonal per head; i and f read the conv branch, z and o read x.
        self.igate = HeadwiseLinear(E, NH)
        self.fgate = HeadwiseLinear(E, NH)
        self.zgate = HeadwiseLinear(E, NH)
        self.ogate = HeadwiseLinear(E, NH)
        self.r = nn.Parameter(torch.randn(NH, DH, 4 * DH) / math.sqrt(DH))  # h_{t-1} @ r[head]
        self.b = nn.Parameter(torch.zeros(NH, 4 * DH))  # gate-major [i | f | z | o]
        with torch.no_grad():
            self.b[:, DH : 2 * DH] = torch.linspace(3.0, 6.0, NH)[:, None]
        self.group_norm = MultiHeadLayerNorm(NH, DH, cfg.norm_eps)
        self.ffn_norm = LayerNorm(E, cfg.norm_eps)
        self.ffn = GatedFFN(E, cfg.ffn_dim, bias=cfg.bias)

    def _gate_preacts(self, x_c: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        """W x for the four gates, per head, gate-major: (NH, B*S, 4*DH) = [i | f | z | o].

        i and f read the conv branch x_c, z and o the normed input xn, each through its own
        block-diagonal (head-wise) weight. Two batched MatMuls over the heads, each with two gates'
        weights side by side, give the cell's layout directly (no stack / 5-D permute).
        """
        NH = self.cfg.slstm_num_heads
        heads = lambda t: t.reshape(-1, NH, t.shape[-1] // NH).transpose(0, 1)  # (NH, B*S, DH)  # noqa: E731
        w_if = torch.cat([self.igate.weight, self.fgate.weight], dim=1).transpose(1, 2)  # (NH, DH, 2*DH)
        w_zo = torch.cat([self.zgate.weight, self.ogate.weight], dim=1).transpose(1, 2)  # (NH, DH, 2*DH)
        return torch.cat([heads(x_c) @ w_if, heads(xn) @ w_zo], dim=-1)  # (NH, B*S, 4*DH)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        NH = self.cfg.slstm_num_heads
        DH = self.cfg.embedding_dim // NH
        return {**{t: (batch, NH, DH) for t in ("h", "c", "n", "m")}, **_conv_state_shapes(self.conv, batch)}

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]):
        B, S, _ = x.shape
        NH = self.cfg.slstm_num_heads
        new_state = {}
        xn = self.norm(x)
        if self.conv is not None:
            x_c, new_state["conv"] = self.conv(xn, state["conv"])
            x_c = F.silu(x_c)
        else:
            x_c = xn
        gates = self._gate_preacts(x_c, xn).reshape(NH, B, S, -1).transpose(0, 1)  # (B, NH, S, 4*DH)
        y, (h, c, n, m) = kernels.slstm_cell(
            gates, self.r.to(gates.dtype), self.b.to(gates.dtype),
            (state["h"], state["c"], state["n"], state["m"]), backend=self.backend,
        )
        new_state.update(h=h, c=c, n=n, m=m)
        x = x + self.group_norm(y)  # (B, S, E)
        return x + self.ffn(self.ffn_norm(x)), new_state


class LargeBlock(nn.Module):
    """xLSTM-7B block: RMSNorm -> mLSTM layer -> residual; RMSNorm -> SwiGLU -> residual."""

    def __init__(self, cfg: xLSTMConfig):
        super().__init__()
        E, NH = cfg.embedding_dim, cfg.num_heads
        self.cfg = cfg
        self.backend = cfg.backend
        self.norm_mlstm = RMSNorm(E, cfg.norm_eps)
        self.q = nn.Linear(E, cfg.qk_dim, bias=cfg.bias)
        self.k = nn.Linear(E, cfg.qk_dim, bias=cfg.bias)
        self.v = nn.Linear(E, cfg.v_dim, bias=cfg.bias)
        self.ogate_preact = nn.Linear(E, cfg.v_dim, bias=cfg.bias)
        self.igate_preact = nn.Linear(E, NH)
        self.fgate_preact = nn.Linear(E, NH)
        self.multihead_norm = MultiHeadLayerNorm(NH, cfg.v_dim // NH, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.v_dim, E, bias=cfg.bias)
        self.norm_ffn = RMSNorm(E, cfg.norm_eps)
        self.ffn = SwiGLU(E, cfg.ffn_dim, bias=cfg.bias)
        _gate_bias_init(self.igate_preact.bias, NH, fgate=False)
        _gate_bias_init(self.fgate_preact.bias, NH, fgate=True)

    def state_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return _mlstm_state_shapes(self.cfg, batch)

    def forward(self, x: torch.Tensor, state: dict[str, torch.Tensor]):
        B, S, _ = x.shape
        NH, cap = self.cfg.num_heads, self.cfg.gate_soft_cap
        xn = self.norm_mlstm(x)
        heads = lambda t: t.reshape(B, S, NH, -1).transpose(1, 2)  # (B, NH, S, D)  # noqa: E731
        q, k, v = heads(self.q(xn)), heads(self.k(xn)), heads(self.v(xn))
        # i and f in one product: one soft cap, one transpose (fewer small ops at decode)
        w_if = torch.cat([self.igate_preact.weight, self.fgate_preact.weight])  # (2*NH, E)
        b_if = torch.cat([self.igate_preact.bias, self.fgate_preact.bias])  # (2*NH,)
        i, f = soft_cap(F.linear(xn, w_if, b_if), cap).transpose(1, 2).split(NH, dim=1)  # (B, NH, S) each
        h, (c, n, m) = kernels.mlstm_cell(
            q, k, v, i, f, (state["c"], state["n"], state["m"]),
            backend=self.backend, chunk_size=self.cfg.chunk_size, eps=self.cfg.cell_eps,
        )
        h = self.multihead_norm(h) * torch.sigmoid(self.ogate_preact(xn))  # (B, S, v_dim)
        x = x + self.out_proj(h)
        x = x + self.ffn(self.norm_ffn(x))
        return x, {"c": c, "n": n, "m": m}
