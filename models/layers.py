"""Building blocks shared by the blocks of both architectures: norms, conv, projections, FFNs.

Norm weights are stored as the effective scale (initialised to 1); the NX-AI paper code stores
LayerNorm weights as an offset from 1, which the converters add back.

Dtypes: every layer computes in the dtype it is given. The RMS / multi-head norms reduce in
``compute_dtype(x.dtype)``: float32 for float32 / float16 / bfloat16 inputs, float64 for float64;
conv states are kept in that dtype too (float32, or float64 for a float64 model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms' reductions and of recurrent states for a model computing in ``dtype``:
    float64 stays float64, everything narrower runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap); the identity when cap is None or <= 0."""
    if cap is None or cap <= 0:
        return x
    return cap * torch.tanh(x / cap)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim with an optional bias (the paper model's blocks use none)."""

    def __init__(self, dim: int, eps: float, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (the xLSTM-7B norm), reduced in float32 (float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim)
        dt = compute_dtype(x.dtype)
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dt)).to(x.dtype)


class MultiHeadLayerNorm(nn.Module):
    """Per-head LayerNorm (GroupNorm with one group a head) over head-first cell outputs.

    Input (B, NH, S, DH), output (B, S, NH * DH): the layout the next projection wants.
    Reductions run in float32 (float64 for float64 inputs).
    """

    def __init__(self, num_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.ones(num_heads * head_dim))
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, NH, S, DH)
        B, NH, S, DH = h.shape
        dt = compute_dtype(h.dtype)
        hf = h.to(dt).transpose(1, 2)  # (B, S, NH, DH)
        hf = F.layer_norm(hf, (DH,), eps=self.eps)
        y = hf.reshape(B, S, NH * DH) * self.weight.to(dt)  # (B, S, NH*DH)
        return y.to(h.dtype)


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: the input is split into `num_blocks` blocks, each projected on
    its own (NX-AI ``LinearHeadwiseExpand``). weight: (num_blocks, out_per_block, in_per_block)."""

    def __init__(self, dim: int, num_blocks: int, bias: bool = False):
        super().__init__()
        self.num_blocks = num_blocks
        block = dim // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, block, block))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        nn.init.normal_(self.weight, std=(2.0 / (5.0 * block)) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, dim)
        D = x.shape[-1]
        # one batched MatMul over the blocks (not an einsum): y[.., n, :] = W[n] x[.., n, :].
        # onnxruntime runs the exported Transpose-MatMul-Transpose ~2x faster than Einsum at prefill
        # and torch's bmm path is the same one einsum takes.
        xb = x.reshape(-1, self.num_blocks, D // self.num_blocks).transpose(0, 1)  # (nb, B*S, blk)
        y = torch.matmul(xb, self.weight.transpose(1, 2))  # (nb, B*S, blk)
        y = y.transpose(0, 1).reshape(x.shape)  # (B, S, dim)
        return y if self.bias is None else y + self.bias


class CausalConv1d(nn.Module):
    """Causal depthwise conv over time with an explicit state of the last K-1 inputs.

    The state makes pieces equal the whole: y = conv(cat(state, x)), new state = last K-1 inputs.
    A zero state is the start of a sequence (the same as the official left zero-padding).
    """

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))  # (C, 1, K) as nn.Conv1d
        self.bias = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.weight, std=kernel_size**-0.5)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (B, S, C); state: (B, K-1, C) in compute_dtype(x.dtype)
        K = self.kernel_size
        xs = torch.cat([state.to(x.dtype), x], dim=1)  # (B, K-1+S, C)
        # y_t = bias + sum_k w[:, k] * xs_{t+k}: the depthwise conv as K shifted products. Same math
        # as F.conv1d(groups=C), but no Conv node: depthwise Conv is slow on CPU (onnxruntime and
        # torch alike, ~3x at decode). Slice bounds are constants (negative ends), so the exported
        # graph computes no shapes for them.
        w = self.weight[:, 0, :]  # (C, K)
        y = xs[:, : 1 - K] * w[:, 0] if K > 1 else xs * w[:, 0]  # (B, S, C)
        for k in range(1, K):
            y = y + (xs[:, k : k + 1 - K] if k < K - 1 else xs[:, k:]) * w[:, k]  # (B, S, C)
        sdt = compute_dtype(x.dtype)
        new_state = xs[:, 1 - K :].to(sdt) if K > 1 else xs[:, :0].to(sdt)  # (B, K-1, C)
        return y + self.bias, new_state


class GatedFFN(nn.Module):
    """Paper sLSTM-block FFN: proj_up to 2*F, act(gate) * up, proj_down. GELU by default."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool):
        super().__init__()
        self.ffn_dim = ffn_dim
        self.proj_up = nn.Linear(dim, 2 * ffn_dim, bias=bias)
        self.proj_down = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, E)
        gate, up = self.proj_up(x).split(self.ffn_dim, dim=-1)  # (B, S, F) each
        return self.proj_down(F.gelu(gate) * up)


class SwiGLU(nn.Module):
    """xLSTM-7B FFN: proj_down(silu(proj_up_gate(x)) * proj_up(x))."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool):
        super().__init__()
        self.proj_up_gate = nn.Linear(dim, ffn_dim, bias=bias)
        self.proj_up = nn.Linear(dim, ffn_dim, bias=bias)
        self.proj_down = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, E)
        return self.proj_down(F.silu(self.proj_up_gate(x)) * self.proj_up(x))
