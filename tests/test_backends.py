"""Backend choice: the Triton kernels inside the whole model match the PyTorch reference, and a
forced Triton backend on CPU without the interpreter fails with one clear message."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from xlstm_export.kernels import triton_available
from xlstm_export.models import xLSTMConfig, xLSTMLM

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
    pytest.mark.usefixtures("poison_empty"),
]

# Head dims >= 16 (tl.dot's minimum on GPUs): mLSTM inner 64 / 2 heads = 32, sLSTM 32 / 2 = 16.
CONFIG = xLSTMConfig(
    architecture="paper", vocab_size=61, embedding_dim=32, num_blocks=2, num_heads=2,
    slstm_at=[1], slstm_num_heads=2, chunk_size=16, backend="torch",
)
LARGE = xLSTMConfig(architecture="large", vocab_size=61, embedding_dim=64, num_blocks=1, num_heads=2,
                    chunk_size=16, backend="torch")

# float32: the kernels reorder the chunkwise sums; 1e-4 relative as for the kernels themselves.
RTOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(model: xLSTMLM, ids: torch.Tensor, state=None):
    model.zero_grad()
    logits, new_state = model(ids[:, :-1], state)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss = loss + 1e-3 * sum(v.square().mean() for v in new_state.values())
    loss.backward()
    return logits.detach(), {k: v.detach() for k, v in new_state.items()}, {
        n: p.grad.clone() for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("config", [CONFIG, LARGE], ids=["paper-msm", "large"])
def test_model_triton_matches_torch_forward_and_backward(config):
    torch.manual_seed(0)
    ref = xLSTMLM(config).train()
    with torch.no_grad():  # every parameter random, gates included
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tri = xLSTMLM(dataclasses.replace(config, backend="triton")).train()
    tri.load_state_dict(ref.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 20))  # S = 19 after the shift: not a chunk multiple
    state = ref.init_state(2)
    state = {k: torch.randn_like(v) * 0.3 if not k.endswith(".n") else torch.rand_like(v) + 0.5 for k, v in state.items()}
    l_ref, s_ref, g_ref = _run(ref, ids, state)
    l_tri, s_tri, g_tri = _run(tri, ids, state)
    assert _rel(l_tri, l_ref) < RTOL
    for k in s_ref:
        assert _rel(s_tri[k], s_ref[k]) < RTOL, k
    for n in g_ref:
        assert _rel(g_tri[n], g_ref[n]) < RTOL, n


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from xlstm_export.models import xLSTMLM, preset\n"
        "m = xLSTMLM(preset('tiny', backend='triton'))\n"
        "try:\n"
        "    m(torch.zeros(1, 3, dtype=torch.long))\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout
