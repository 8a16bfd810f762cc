"""Random weights for tests and benchmarks: every parameter of a model filled so that every path
computes something (default inits zero the gate weights and recurrent kernels, which would hide a
swapped gate or a transposed matrix).

    model = xLSTMLM(preset("tiny")).eval()
    randomize_(model, seed=1)                                  # ours: norm weights are scales
    randomize_(official_paper_model, seed=1, norm_offset=True)  # NX-AI paper LayerNorm: offsets

Works on our :class:`~xlstm_export.models.xLSTMLM` and on the official models (NX-AI paper
``xLSTMLMModel``, ``xLSTMLarge``, transformers ``xLSTMForCausalLM``) by parameter name, without
importing them.
"""

from __future__ import annotations

import torch


def randomize_(model: torch.nn.Module, seed: int, *, norm_offset: bool = False) -> None:
    """Fill EVERY parameter of ``model`` with random values of a sensible scale, in place.

    - matrices (Linear, head-wise, conv, embedding): normal(0, 1/sqrt(fan_in)), fan_in = last dim;
    - norm weights: effective scale 1 + normal(0, 0.2) (stored as the offset when ``norm_offset``,
      the paper LayerNorm convention);
    - gate biases: input gate normal(0, 1), forget gate uniform(0.5, 4) per head, so memory lasts
      over the sequence (fused [i | f] biases split in halves);
    - paper sLSTM cells (official): recurrent kernel normal(0, 1/sqrt(DH)), biases per gate (i
      normal(0, 1), f uniform(0.5, 4), z and o normal(0, 0.5)), written through the official
      layout-agnostic proxies (``recurrent_kernel``, ``bias``: (NH, DH, G, DH) and (NH, G, DH));
    - everything else (biases, learnable_skip, our sLSTM's r and b by shape): as above by
      dimension, vectors normal(0, 0.5).
    """
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    slstm_cells = [m for m in model.modules() if type(m).__name__.startswith("sLSTMCell_")]
    cell_params = {id(p) for c in slstm_cells for p in c.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in cell_params:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(normal(p.shape, 0.2, 0.0 if norm_offset else 1.0))
            elif leaf == "bias" and "ifgate" in name:  # fused [i | f]
                nh = p.shape[0] // 2
                p.copy_(torch.cat([normal(nh, 1.0), uniform(nh, 0.5, 4.0)]))
            elif leaf == "bias" and "fgate" in name:
                p.copy_(uniform(p.shape, 0.5, 4.0))
            elif leaf == "bias" and "igate" in name:
                p.copy_(normal(p.shape, 1.0))
            elif p.dim() >= 2:
                p.copy_(normal(p.shape, p.shape[-1] ** -0.5))
            else:
                p.copy_(normal(p.shape, 0.5))
        for cell in slstm_cells:
            NH, DH = cell.config.num_heads, cell.config.head_dim
            cell.recurrent_kernel[:] = normal((NH, DH, 4, DH), DH**-0.5)  # [head, in, gate, out]
            cell.bias[:] = torch.stack(  # [head, gate, d]
                [normal((NH, DH), 1.0), uniform((NH, DH), 0.5, 4.0), normal((NH, DH), 0.5), normal((NH, DH), 0.5)],
                dim=1,
            )


__all__ = ["randomize_"]
