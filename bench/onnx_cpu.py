"""Benchmark: onnxruntime CPU against PyTorch eager on the same xLSTM weights, beside physical floors.

For each model, one set of random weights is built in an OFFICIAL implementation and converted with
``xlstm_export.models.from_official``, so every framework runs the same function:

- paper models ("tiny"): NX-AI ``xlstm.xLSTMLMModel`` (sLSTM backend "vanilla"; prefill = its
  ``forward``, the parallel mLSTM form; decode = ``.step`` carrying its state dict);
- 7B-style models: transformers ``xLSTMForCausalLM`` (native chunkwise kernels, float32, its
  ``xLSTMCache`` carried between decode steps) and NX-AI ``xlstm.xlstm_large.model.xLSTMLarge``
  (native CPU kernels, mode "inference", return_last_states; the state tuple carried);
- ours: ``xLSTMLM`` eager (cell backend "torch") and its ONNX export run by onnxruntime
  (``xlstm_export.ort.OrtModel``, CPU provider), once through the standard-op function bodies
  (with onnxruntime's in-memory decode fast path for the mLSTM, ``OrtModel``'s default) and once
  with the native CPU cell kernels
  (``OrtModel(native_ops=True)``, :mod:`xlstm_export.ort_native`; needs a C++ compiler). Targets
  are judged on the faster onnxruntime row.

Measured, per model and batch size B, in interleaved rounds (every round: each framework's share of
the decode steps, then one prefill; a pause between frameworks lets the previous one's spinning
worker threads sleep), so that the slow drifts of a shared machine hit every framework alike:

- prefill tokens/s: one forward over (B, S) fresh sequences, logits for every position (and the
  final state where the framework returns one); median over the ``--repeats`` rounds;
- decode ms/step: one (B, 1) step carrying the state (B tokens per step); median (and 10th
  percentile) of ``--decode-steps`` steps after warm-up steps;
- ORT peak memory as S grows: a fresh subprocess per S runs one (B, S) prefill; its resident-set
  high-water mark (VmHWM, reset after the session is created) minus the resident set before the
  run, beside the size of the logits output it must hold;
- floors on this machine: decode = bytes of weights streamed per step (every parameter except the
  embedding table, of which only B rows are read) / read bandwidth (the faster of a numpy and a
  torch sum over 1 GiB of random float32, best of 15); when B tokens share a step the matmul
  FLOPs / matmul rate can be the larger floor, and the floor shown is the larger of the two.
  Prefill = matmul FLOPs of the forward (counted with ``torch.utils.flop_counter`` on our eager
  model: projections, LM head and the chunkwise cell) / matmul rate (the faster of a 2048^3
  float32 ``torch.mm`` and an onnxruntime MatMul at the same thread count). Beside them: the
  exported model's weight MatMuls alone in onnxruntime at M = B (what a decode step costs before
  cells, norms and small ops; as exported, and packed as the native kernels run them) and the bytes of recurrent state read and written per step.

Every framework uses the same thread count (``--threads``, default all cores):
``torch.set_num_threads`` and onnxruntime ``intra_op_num_threads``. A parity column gives each
peer's prefill logits against onnxruntime's (max abs error / max abs value).

    python bench/onnx_cpu.py                                  # everything, markdown to stdout
    python bench/onnx_cpu.py --models tiny --batch 1 --prefill-len 64 --no-memory   # smoke test
    python bench/onnx_cpu.py --out /tmp/onnx_cpu.md --json /tmp/onnx_cpu.json

Needs onnxruntime; the peers need transformers and xlstm (+ mlstm_kernels) and are skipped with a
message where missing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _report import cpu_name  # bench/_report.py (the script's folder is on sys.path)
from xlstm_export.models import from_official, xLSTMConfig
from xlstm_export.models.config import preset
from xlstm_export.testing import randomize_

# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[[], xLSTMConfig]] = {
    # paper xLSTM[2:1], byte vocabulary, ~0.4M parameters (the embedded default)
    "tiny": lambda: preset("tiny"),
    # 7B-style, ~0.3M parameters (transformers' per-token overhead regime)
    "tiny-large": lambda: preset("tiny-large"),
    # 7B-style, ~4.6M parameters: E=256, 4 blocks, 4 heads, vocab 2048
    "large-5m": lambda: xLSTMConfig(architecture="large", vocab_size=2048, embedding_dim=256,
                                    num_blocks=4, num_heads=4),
    # 7B-style, ~164M parameters: E=768, 12 blocks, 4 heads, GPT-2 sized vocab 50304
    "xlstm-large-160m": lambda: preset("xlstm-large-160m"),
}
DEFAULT_MODELS = ("tiny", "tiny-large", "large-5m", "xlstm-large-160m")
SMALL_MODELS = ("tiny", "tiny-large", "large-5m")  # framework overhead dominates: the 3x target
LARGE_MODEL = "xlstm-large-160m"  # the fastest-peer and 1.2x-floor targets
FASTER_THAN_EAGER = 3.0  # target: ORT at least this much faster than every eager peer (small models)
FLOOR_RATIO = 1.2  # target: ORT decode within this factor of the weight-streaming floor (large model)
ORT_NAME, NATIVE_NAME = "onnxruntime", "onnxruntime + native kernels"  # the two ways ORT runs the file
ROUND_BW_REPEATS = 3  # read-bandwidth probes per round (best of), for the same-round floor
SETTLE_S = 0.3  # pause between frameworks (spin-waiting worker threads go to sleep)
ROUND_WARMUP_S = 0.2  # untimed decode steps after the pause, before each framework's timed steps


def _nxai_paper(cfg: xLSTMConfig, context_length: int, seed: int):
    """NX-AI xLSTMLMModel with the function of our paper config ``cfg`` (sLSTM backend vanilla)."""
    from xlstm import (
        FeedForwardConfig,
        mLSTMBlockConfig,
        mLSTMLayerConfig,
        sLSTMBlockConfig,
        sLSTMLayerConfig,
        xLSTMLMModel,
        xLSTMLMModelConfig,
    )

    mlstm = mLSTMBlockConfig(mlstm=mLSTMLayerConfig(
        conv1d_kernel_size=cfg.conv1d_kernel_size, qkv_proj_blocksize=cfg.qkv_proj_blocksize,
        num_heads=cfg.num_heads, proj_factor=cfg.mlstm_proj_factor))
    slstm = sLSTMBlockConfig(
        slstm=sLSTMLayerConfig(backend="vanilla", num_heads=cfg.slstm_num_heads,
                               conv1d_kernel_size=cfg.slstm_conv1d_kernel_size),
        feedforward=FeedForwardConfig(proj_factor=cfg.ffn_proj_factor, act_fn="gelu"),
    ) if cfg.slstm_at else None
    ocfg = xLSTMLMModelConfig(
        mlstm_block=mlstm, slstm_block=slstm, context_length=context_length, num_blocks=cfg.num_blocks,
        embedding_dim=cfg.embedding_dim, slstm_at=list(cfg.slstm_at), vocab_size=cfg.vocab_size,
        tie_weights=cfg.tie_weights, bias=cfg.bias, add_post_blocks_norm=cfg.add_post_blocks_norm)
    torch.manual_seed(seed)
    model = xLSTMLMModel(ocfg).eval()
    randomize_(model, seed, norm_offset=True)
    return model


def _hf_large(cfg: xLSTMConfig, seed: int):
    """transformers xLSTMForCausalLM with the function of our 7B-style config (float32 kernels)."""
    from transformers import xLSTMConfig as HFConfig
    from transformers import xLSTMForCausalLM

    hcfg = HFConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embedding_dim, num_hidden_layers=cfg.num_blocks,
        num_heads=cfg.num_heads, qk_dim_factor=cfg.qk_dim_factor, v_dim_factor=cfg.v_dim_factor,
        ffn_proj_factor=cfg.ffn_proj_factor, ffn_round_up_to_multiple_of=cfg.ffn_round_up_to,
        gate_soft_cap=cfg.gate_soft_cap, output_logit_soft_cap=cfg.output_logit_soft_cap,
        norm_eps=cfg.norm_eps, eps=cfg.cell_eps, use_bias=cfg.bias, chunk_size=cfg.chunk_size,
        mode="inference", weight_mode="single", autocast_kernel_dtype="float32",
        inference_state_dtype="float32", return_last_states=True, use_cache=True,
    )
    torch.manual_seed(seed)
    model = xLSTMForCausalLM(hcfg).eval()
    randomize_(model, seed, norm_offset=False)
    return model


def _nxai_large(cfg: xLSTMConfig, hf_state: dict[str, torch.Tensor]):
    """NX-AI xLSTMLarge (native CPU kernels, inference mode) holding the transformers weights."""
    from xlstm.xlstm_large.model import xLSTMLarge, xLSTMLargeConfig

    ocfg = xLSTMLargeConfig(
        embedding_dim=cfg.embedding_dim, num_heads=cfg.num_heads, num_blocks=cfg.num_blocks,
        vocab_size=cfg.vocab_size, use_bias=cfg.bias, norm_eps=cfg.norm_eps,
        qk_dim_factor=cfg.qk_dim_factor, v_dim_factor=cfg.v_dim_factor,
        ffn_proj_factor=cfg.ffn_proj_factor, ffn_round_up_to_multiple_of=cfg.ffn_round_up_to,
        gate_soft_cap=cfg.gate_soft_cap, output_logit_soft_cap=cfg.output_logit_soft_cap,
        eps=cfg.cell_eps, chunk_size=cfg.chunk_size, weight_mode="single",
        chunkwise_kernel="chunkwise--native_autograd", sequence_kernel="native_sequence__native",
        step_kernel="native", mode="inference", return_last_states=True,
        autocast_kernel_dtype="float32", inference_state_dtype="float32",
    )
    model = xLSTMLarge(ocfg).eval()
    sd = {("embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in hf_state.items()}
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# runners: one small adapter per framework
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """prefill(ids) -> logits (numpy); decode_init(B) -> state; decode(tok, state) -> state."""

    name: str
    prefill: Callable[[np.ndarray], np.ndarray]
    decode_init: Callable[[int], Any]
    decode: Callable[[np.ndarray, Any], Any]
    note: str = ""


def _ours_runner(model) -> Runner:
    def prefill(ids):
        with torch.inference_mode():
            logits, _ = model(torch.from_numpy(ids))
        return logits.numpy()

    def decode(tok, state):
        with torch.inference_mode():
            return model(torch.from_numpy(tok), state)[1]

    return Runner("ours eager", prefill, lambda B: model.init_state(B), decode,
                  "xLSTMLM, cell backend torch (chunkwise prefill, recurrent step decode)")


def _ort_runner(path: Path, threads: int, native: bool = False) -> Runner:
    from xlstm_export.ort import OrtModel

    om = OrtModel(path, intra_op_threads=threads, native_ops=native)
    dec = om.decoder()
    how = ("OrtModel(native_ops=True): the mLSTM decode step (7B-style: the whole mLSTM layer), the "
           "sLSTM loop and the float32 weight MatMuls (packed, with the norms, SwiGLU, residual adds and "
           "logit soft cap around them folded in) as native CPU kernels" if native else
           "OrtModel: the cells through their standard-op bodies (the mLSTM's S == 1 step put in "
           "memory as onnxruntime's decode fast path)")
    note = how + "; prefill with .run, decode with .decoder() (state in IOBinding-bound buffers)"
    return Runner(NATIVE_NAME if native else ORT_NAME, lambda ids: om.run(ids)[0], om.init_state,
                  lambda tok, state: dec(tok, state)[1], note)


def _hf_runner(model) -> Runner:
    from transformers.models.xlstm.modeling_xlstm import xLSTMCache

    def prefill(ids):
        with torch.inference_mode():
            return model(torch.from_numpy(ids), use_cache=True).logits.numpy()

    def init(B):
        return xLSTMCache(model.config, B, dtype=torch.float32)

    def decode(tok, cache):
        with torch.inference_mode():
            return model(torch.from_numpy(tok), cache=cache, use_cache=True).cache

    return Runner("transformers", prefill, init, decode,
                  "xLSTMForCausalLM, native kernels float32; decode with its xLSTMCache")


def _nxai_large_runner(model) -> Runner:
    def prefill(ids):
        with torch.inference_mode():
            return model(torch.from_numpy(ids))[0].numpy()

    def decode(tok, state):
        with torch.inference_mode():
            return model(torch.from_numpy(tok), state)[1]

    return Runner("NX-AI xLSTMLarge", prefill, lambda B: None, decode,
                  "native kernels, mode inference, return_last_states; state tuple carried")


def _nxai_paper_runner(model) -> Runner:
    def prefill(ids):
        with torch.inference_mode():
            return model(torch.from_numpy(ids)).numpy()

    def decode(tok, state):
        with torch.inference_mode():
            return model.step(torch.from_numpy(tok), state)[1]

    return Runner("NX-AI xLSTMLMModel", prefill, lambda B: None, decode,
                  "forward = parallel mLSTM form (no state out); decode = .step with its state")


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    return statistics.median(_times(fn, repeats, warmup))


def _times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class _Decoder:
    """A runner's decode loop with its carried state; ``steps(n)`` returns the per-step seconds."""

    def __init__(self, r: Runner, B: int, vocab: int, seed: int):
        self.r, self.B, self.vocab = r, B, vocab
        self.rng = np.random.default_rng(seed)
        self.state = r.decode_init(B)

    def warm(self, seconds: float) -> None:
        """Untimed steps for at least ``seconds`` (at least one step)."""
        t_end = time.perf_counter() + seconds
        self.steps(1)
        while time.perf_counter() < t_end:
            self.steps(1)

    def steps(self, n: int) -> list[float]:
        times = []
        for _ in range(n):
            tok = self.rng.integers(0, self.vocab, (self.B, 1), dtype=np.int64)
            t0 = time.perf_counter()
            self.state = self.r.decode(tok, self.state)
            times.append(time.perf_counter() - t0)
        return times


def _settle() -> None:
    """Let the previous framework's worker threads stop spinning before the next is timed.

    torch's OpenMP workers and onnxruntime's pool spin-wait after work; on a 2-core machine a
    spinning pool of one framework would otherwise steal the cores of the next one.
    """
    time.sleep(SETTLE_S)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---------------------------------------------------------------------------------------------
# machine floors
# ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = cpu_name()
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024**2
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "loadavg": _loadavg()}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


@functools.lru_cache(maxsize=1)
def _probe_array() -> np.ndarray:
    """1 GiB of random float32, made once: the bandwidth probes read it."""
    return np.random.default_rng(0).standard_normal(1 << 28, dtype=np.float32)


def measure_bandwidth(repeats: int = 15) -> dict[str, float]:
    """Read bandwidth (GB/s): the best of a numpy sum and a torch sum over 1 GiB of random float32.

    Random data: an array of one repeated value can be deduplicated by the host (same-page merging)
    and then "reads" at cache speed. A floor is the best the machine does, so each figure is the
    fastest of ``repeats`` runs (the median is kept too: this machine's bandwidth drifts)."""
    a = _probe_array()
    t = torch.from_numpy(a)
    out = {}
    for name, fn in (("numpy_sum", a.sum), ("torch_sum", t.sum)):
        times = _times(fn, repeats, warmup=2)
        out[name] = a.nbytes / min(times) / 1e9
        out[name + "_median"] = a.nbytes / statistics.median(times) / 1e9
    b = np.empty_like(a)
    out["numpy_copy_rw"] = 2 * a.nbytes / min(_times(lambda: np.copyto(b, a), 5, warmup=1)) / 1e9
    out["read"] = max(out["numpy_sum"], out["torch_sum"])
    return out


def measure_round_bandwidth() -> float:
    """Read bandwidth now (GB/s): a torch sum over the same 1 GiB, best of a few runs. Taken at the
    start of every round, so a decode time can be set against the floor of its own moment."""
    a = torch.from_numpy(_probe_array())
    return a.numel() * 4 / min(_times(a.sum, ROUND_BW_REPEATS, warmup=1)) / 1e9


def measure_matmul(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, float]:
    """float32 matmul rate (GFLOP/s) of an n x n x n product at ``threads`` threads: torch.mm and an
    onnxruntime MatMul (constant right operand, prepacked like the models' weights), each the
    fastest of ``repeats`` runs; the floor uses the faster of the two."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = {"torch_mm": 2 * n**3 / min(_times(lambda: torch.mm(a, b), repeats, warmup=2)) / 1e9}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"])], "mm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(b.numpy(), "b")])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
                                .SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"a": a.numpy()}
    _settle()
    out["ort_matmul"] = 2 * n**3 / min(_times(lambda: sess.run(None, feed), repeats, warmup=2)) / 1e9
    out["best"] = max(out["torch_mm"], out["ort_matmul"])
    return out


def measure_matmul_chain(path: Path, B: int, threads: int, steps: int, packed: bool = False) -> float:
    """Median seconds of the exported model's weight MatMuls ALONE at decode (M = B rows), in
    onnxruntime: every MatMul of the graph with a constant 2-D weight, the same initializers, fed
    from one (B, K) input. The rest of a decode step (cells, norms, small ops) is the difference.
    ``packed``: the same chain as the native kernels run it (PackedMatMul over packed weights)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [inits[n.input[1]] for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    k_max = max(w.dims[0] for w in weights)
    nodes, outs, extra = [], [], [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                                  numpy_helper.from_array(np.array([1], np.int64), "one")]
    for j, w in enumerate(weights):
        extra.append(numpy_helper.from_array(np.array([w.dims[0]], np.int64), f"k{j}"))
        nodes.append(helper.make_node("Slice", ["x", "zero", f"k{j}", "one"], [f"x{j}"]))
        nodes.append(helper.make_node("MatMul", [f"x{j}", w.name], [f"y{j}"]))
        outs.append(helper.make_tensor_value_info(f"y{j}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, k_max])],
                              outs, initializer=weights + extra)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    chain = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if packed:
        from xlstm_export import ort_native

        chain = ort_native.with_native_ops(chain, inplace=True, check_xlstm=False)
        ort_native.register(opts)
    sess = ort.InferenceSession(chain.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model, graph
    feed = {"x": np.random.default_rng(0).standard_normal((B, k_max), dtype=np.float32)}
    _settle()
    return _median_time(lambda: sess.run(None, feed), steps, warmup=5)


def count_flops(model, B: int, S: int) -> int:
    """Matmul FLOPs of our eager forward over (B, S) (projections, head and cell)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.zeros((B, S), dtype=torch.long)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(ids)
    return int(fc.get_total_flops())


def streamed_weight_bytes(model, B: int) -> int:
    """Bytes of parameters read per decode step: all but the embedding table (B rows of it)."""
    emb = model.embedding.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head.weight is emb:  # tied: the head reads the whole table anyway
        return total
    return total - emb.numel() * emb.element_size() + B * emb.shape[1] * emb.element_size()


# ---------------------------------------------------------------------------------------------
# ORT memory as S grows (one subprocess per S)
# ---------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(path: str, B: int, S: int, threads: int) -> None:
    """Runs in a fresh process: one (B, S) prefill; prints JSON with the RSS figures in MiB."""
    from xlstm_export.ort import OrtModel

    om = OrtModel(path, intra_op_threads=threads)
    vocab = om.vocab_size
    om.run(np.zeros((B, 1), np.int64))  # warm: kernels, arena for S = 1
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset the VmHWM high-water mark
    before = _status_kib("VmRSS")
    ids = np.random.default_rng(S).integers(0, vocab, (B, S), dtype=np.int64)
    logits, _ = om.run(ids)
    peak = _status_kib("VmHWM")
    print(json.dumps({"S": S, "B": B, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
                      "delta_mib": (peak - before) / 1024, "logits_mib": logits.nbytes / 2**20}))


def measure_memory(path: Path, B: int, seq_lens: list[int], threads: int) -> list[dict[str, float]]:
    rows = []
    for S in seq_lens:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", str(path), str(B), str(S),
               str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
        if res.returncode != 0:
            print(f"# memory child S={S} failed: {res.stderr.strip()[-500:]}", file=sys.stderr)
            break
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"#   memory S={S}: +{rows[-1]['delta_mib']:.1f} MiB", file=sys.stderr)
    return rows


# ---------------------------------------------------------------------------------------------
# one model
# ---------------------------------------------------------------------------------------------


def build(name: str, prefill_len: int, seed: int, workdir: Path, threads: int,
          peers: set[str]) -> tuple[Any, list[Runner], dict[str, str], Path]:
    """Our model (converted from the official one), its ONNX file, and every runner."""
    from xlstm_export.export import export_onnx

    cfg = MODELS[name]()
    runners: list[Runner] = []
    skipped: dict[str, str] = {}
    official = []
    if cfg.architecture == "paper":
        try:
            nx = _nxai_paper(cfg, context_length=max(prefill_len, 64), seed=seed)
            ours = from_official(nx)
            if "nxai" in peers:
                official.append(_nxai_paper_runner(nx))
        except ImportError as e:
            skipped["NX-AI xLSTMLMModel"] = f"xlstm not importable ({e})"
            torch.manual_seed(seed)
            from xlstm_export.models import xLSTMLM

            ours = xLSTMLM(cfg).eval()
        skipped["transformers"] = "no paper (mLSTM + sLSTM) architecture in transformers"
    else:
        try:
            hf = _hf_large(cfg, seed)
            ours = from_official(hf)
            if "transformers" in peers:
                official.append(_hf_runner(hf))
            try:
                if "nxai" in peers:
                    official.append(_nxai_large_runner(_nxai_large(cfg, hf.state_dict())))
            except ImportError as e:
                skipped["NX-AI xLSTMLarge"] = f"xlstm / mlstm_kernels not importable ({e})"
        except ImportError as e:
            skipped["transformers"] = f"transformers not importable ({e})"
            torch.manual_seed(seed)
            from xlstm_export.models import xLSTMLM

            ours = xLSTMLM(cfg).eval()
    ours.eval()
    path = workdir / f"{name}.onnx"
    export_onnx(ours, path, dtype="fp32", progress=False)
    runners.append(_ort_runner(path, threads))
    try:
        runners.append(_ort_runner(path, threads, native=True))
    except RuntimeError as e:  # no C++ compiler: the stock row still stands
        skipped[NATIVE_NAME] = str(e).splitlines()[0]
    if "ours" in peers:
        runners.append(_ours_runner(ours))
    runners.extend(official)
    return ours, runners, skipped, path


def bench_model(name: str, args, floors: dict[str, float], workdir: Path) -> dict[str, Any]:
    peers = set(args.peers)
    ours, runners, skipped, path = build(name, args.prefill_len, args.seed, workdir, args.threads, peers)
    gc.collect()
    gc.freeze()  # the models' Python objects out of the collector's way while timing
    vocab = ours.config.vocab_size
    out: dict[str, Any] = {"model": name, "params": ours.num_params(), "architecture": ours.config.architecture,
                           "skipped": skipped, "notes": {r.name: r.note for r in runners}, "rows": []}
    print(f"# {name}: {out['params'] / 1e6:.2f}M parameters; runners "
          f"{[r.name for r in runners]}", file=sys.stderr)
    for B in args.batch:
        S = args.prefill_len
        ids = np.random.default_rng(args.seed + B).integers(0, vocab, (B, S), dtype=np.int64)
        flops = count_flops(ours, B, S)
        flops_step = count_flops(ours, B, 1)
        wbytes = streamed_weight_bytes(ours, B)
        floor_prefill_s = flops / (floors["matmul_gflops"] * 1e9)
        floor_bw_s = wbytes / (floors["read_gbs"] * 1e9)
        floor_flop_step_s = flops_step / (floors["matmul_gflops"] * 1e9)
        rows = {r.name: {"B": B, "S": S, "framework": r.name} for r in runners}
        live, decoders, ref = [], {}, None
        for r in runners:  # parity + warm-up (onnxruntime first: the reference)
            row = rows[r.name]
            try:
                _settle()
                logits = r.prefill(ids)
                if ref is None:
                    ref = logits
                row["parity"] = _rel_err(logits, ref)
                decoders[r.name] = _Decoder(r, B, vocab, args.seed)
                decoders[r.name].steps(args.decode_warmup)
                live.append(r)
            except Exception as e:  # noqa: BLE001 -- a peer failing is a result, not a crash of the benchmark
                row["error"] = f"{type(e).__name__}: {e}"[:300]
        prefill_t: dict[str, list[float]] = {r.name: [] for r in live}
        decode_t: dict[str, list[float]] = {r.name: [] for r in live}
        round_ratio: dict[str, list[float]] = {r.name: [] for r in live}
        round_bw: list[float] = []
        per_round = max(1, -(-args.decode_steps // args.repeats))
        for _ in range(args.repeats):  # interleaved rounds: slow drifts of a shared machine hit all alike
            _settle()
            round_bw.append(measure_round_bandwidth())  # this round's floor (the host's bandwidth drifts)
            for r in live:
                _settle()
                decoders[r.name].warm(ROUND_WARMUP_S)  # untimed: this framework's threads up to speed
                steps = decoders[r.name].steps(per_round)
                decode_t[r.name] += steps
                round_ratio[r.name].append(statistics.median(steps) / (wbytes / (round_bw[-1] * 1e9)))
                t0 = time.perf_counter()
                r.prefill(ids)
                prefill_t[r.name].append(time.perf_counter() - t0)
        for r in live:
            rows[r.name]["prefill_tok_s"] = B * S / statistics.median(prefill_t[r.name])
            rows[r.name]["decode_ms"] = 1e3 * statistics.median(decode_t[r.name])
            rows[r.name]["decode_ms_p10"] = 1e3 * float(np.percentile(decode_t[r.name], 10))
            rows[r.name]["decode_round_floor_ratio"] = statistics.median(round_ratio[r.name])
        for r in runners:
            out["rows"].append(rows[r.name])
            print(f"#   B={B} {r.name}: {_fmt_row(rows[r.name])}", file=sys.stderr)
        matmuls_ms = 1e3 * measure_matmul_chain(path, B, args.threads, args.decode_steps)
        packed_ms = (1e3 * measure_matmul_chain(path, B, args.threads, args.decode_steps, packed=True)
                     if any(r.name == NATIVE_NAME for r in live) else None)
        out.setdefault("floors", []).append({
            "B": B, "S": S, "flops_prefill": flops, "flops_step": flops_step, "weight_bytes": wbytes,
            "prefill_tok_s": B * S / floor_prefill_s, "decode_bw_ms": 1e3 * floor_bw_s,
            "decode_flop_ms": 1e3 * floor_flop_step_s,
            "decode_ms": 1e3 * max(floor_bw_s, floor_flop_step_s),
            "state_bytes": ours.state_bytes(B), "ort_matmuls_ms": matmuls_ms,
            "packed_matmuls_ms": packed_ms, "round_read_gbs": round_bw,
        })
    if args.memory and name in args.memory_models:
        out["memory"] = measure_memory(path, args.memory_batch, args.memory_seq_lens, args.threads)
    del runners
    gc.unfreeze()
    gc.collect()
    return out


def _fmt_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return row["error"]
    return (f"prefill {row['prefill_tok_s']:.0f} tok/s, decode {row['decode_ms']:.3f} ms/step, "
            f"parity {row['parity']:.1e}")


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _best_ort(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The faster-decoding of the onnxruntime rows (as exported / with the native kernels)."""
    ort = [r for r in rows if r["framework"] in (ORT_NAME, NATIVE_NAME) and "error" not in r]
    return min(ort, key=lambda r: r["decode_ms"]) if ort else None


def targets(results: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(target, evidence, met) for every target the results speak to."""
    out = []
    for res in results:
        floors = {f["B"]: f for f in res.get("floors", [])}
        name = res["model"]
        for B in sorted(floors):
            rows = [r for r in res["rows"] if r["B"] == B and "error" not in r]
            ort = _best_ort(rows)
            eager = [r for r in rows if r["framework"] not in (ORT_NAME, NATIVE_NAME)]
            if ort is None or not eager:
                continue
            best_pf = max(eager, key=lambda r: r["prefill_tok_s"])
            best_dc = min(eager, key=lambda r: r["decode_ms"])
            pf_ratio = ort["prefill_tok_s"] / best_pf["prefill_tok_s"]
            dc_ratio = best_dc["decode_ms"] / ort["decode_ms"]
            if name == LARGE_MODEL:
                evidence = (f"{ort['framework']}: {ort['prefill_tok_s']:.0f} vs {best_pf['framework']} "
                            f"{best_pf['prefill_tok_s']:.0f} tok/s ({pf_ratio:.2f}x)")
                out.append((f"{name} B={B}: ORT prefill >= fastest eager peer", evidence, pf_ratio >= 1))
                evidence = (f"{ort['framework']}: {ort['decode_ms']:.2f} vs {best_dc['framework']} "
                            f"{best_dc['decode_ms']:.2f} ms/step ({dc_ratio:.2f}x)")
                out.append((f"{name} B={B}: ORT decode >= fastest eager peer", evidence, dc_ratio >= 1))
                fl = floors[B]["decode_bw_ms"]
                evidence = (f"{ort['framework']}: {ort['decode_ms']:.2f} ms vs floor {fl:.2f} ms "
                            f"({ort['decode_ms'] / fl:.2f}x; against each round's own floor, median "
                            f"{ort['decode_round_floor_ratio']:.2f}x)")
                out.append((f"{name} B={B}: ORT decode <= {FLOOR_RATIO}x weight-streaming floor", evidence,
                            ort["decode_ms"] <= FLOOR_RATIO * fl))
            elif name in SMALL_MODELS:
                evidence = (f"{ort['framework']}: {ort['decode_ms']:.3f} vs fastest {best_dc['framework']} "
                            f"{best_dc['decode_ms']:.3f} ms/step ({dc_ratio:.1f}x)")
                out.append((f"{name} B={B}: ORT decode >= {FASTER_THAN_EAGER:g}x faster than every eager peer",
                            evidence, dc_ratio >= FASTER_THAN_EAGER))
    return out


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    L = []
    m = meta["machine"]
    fl = meta["floors"]
    L.append(f"Date (UTC): {meta['date']}  ")
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.1f} GiB RAM; "
             f"Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}  ")
    L.append(f"Load average (1/5/15 min) at start: {m['loadavg']}; at end: {meta['loadavg_end']}  ")
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Threads: {meta['threads']} for every framework (torch.set_num_threads, onnxruntime "
             f"intra_op_num_threads; inter-op 1)  ")
    bw = fl["bandwidth"]
    L.append(f"Measured floors: read bandwidth {fl['read_gbs']:.1f} GB/s, best of 15 (numpy sum "
             f"{bw['numpy_sum']:.1f}, median {bw['numpy_sum_median']:.1f}; torch sum {bw['torch_sum']:.1f}, "
             f"median {bw['torch_sum_median']:.1f}; copy read+write {bw['numpy_copy_rw']:.1f}), float32 matmul "
             f"{fl['matmul_gflops']:.0f} GFLOP/s (2048^3: torch.mm {fl['matmul']['torch_mm']:.0f}, "
             f"onnxruntime MatMul {fl['matmul']['ort_matmul']:.0f})  ")
    L.append(f"Prefill: S = {meta['prefill_len']}, median of {meta['repeats']} runs; decode: median of "
             f"{meta['decode_steps']} steps after {meta['decode_warmup']} warm-up steps. Frameworks are "
             f"timed in {meta['repeats']} interleaved rounds (each round: every framework's share of the "
             f"decode steps, then one prefill), with a {SETTLE_S} s pause between frameworks and "
             f"{ROUND_WARMUP_S} s of untimed decode steps after it.")
    L.append("")
    for res in results:
        L.append(f"### {res['model']} ({res['architecture']}, {res['params'] / 1e6:.2f}M parameters)")
        L.append("")
        L.append("| B | framework | prefill tok/s | prefill floor | decode ms/step (p10) | decode floor | "
                 "speed-up of the faster ORT row (prefill / decode) | parity vs ORT |")
        L.append("|---|---|---|---|---|---|---|---|")
        floors = {f["B"]: f for f in res.get("floors", [])}
        for B in sorted(floors):
            f = floors[B]
            rows = [r for r in res["rows"] if r["B"] == B]
            ort = _best_ort(rows)
            for r in rows:
                if "error" in r:
                    L.append(f"| {B} | {r['framework']} | failed: {r['error']} | | | | | |")
                    continue
                if ort is not None and r is not ort:
                    sp = (f"{ort['prefill_tok_s'] / r['prefill_tok_s']:.2f}x / "
                          f"{r['decode_ms'] / ort['decode_ms']:.2f}x")
                else:
                    sp = "-"
                floor_dc = (f"{f['decode_ms']:.3f} ({'bw' if f['decode_bw_ms'] >= f['decode_flop_ms'] else 'flop'})")
                L.append(f"| {B} | {r['framework']} | {r['prefill_tok_s']:,.0f} | {f['prefill_tok_s']:,.0f} | "
                         f"{r['decode_ms']:.3f} ({r['decode_ms_p10']:.3f}) | {floor_dc} | {sp} | {r['parity']:.1e} |")
        L.append("")
        for B in sorted(floors):
            f = floors[B]
            L.append(f"B={B}: weights streamed per step {f['weight_bytes'] / 2**20:.1f} MiB -> "
                     f"{f['decode_bw_ms']:.3f} ms; step matmul {f['flops_step'] / 1e9:.3f} GFLOP -> "
                     f"{f['decode_flop_ms']:.3f} ms; prefill matmul {f['flops_prefill'] / 1e9:.2f} GFLOP; "
                     f"recurrent state {f['state_bytes'] / 2**20:.1f} MiB (read and written once per step: "
                     f"{2e3 * f['state_bytes'] / (meta['floors']['read_gbs'] * 1e9):.3f} ms); the exported "
                     f"model's weight MatMuls alone in onnxruntime: {f['ort_matmuls_ms']:.3f} ms/step"
                     + (f" (packed, as the native kernels run them: {f['packed_matmuls_ms']:.3f} ms/step)"
                        if f.get("packed_matmuls_ms") is not None else "") + "; read "
                     f"bandwidth at the start of each round {min(f['round_read_gbs']):.1f}-"
                     f"{max(f['round_read_gbs']):.1f} GB/s (median {statistics.median(f['round_read_gbs']):.1f}).  ")
        for k, v in res["skipped"].items():
            L.append(f"Not run: {k} — {v}.  ")
        for k, v in res["notes"].items():
            L.append(f"{k}: {v}.  ")
        if res.get("memory"):
            L.append("")
            L.append(f"onnxruntime peak memory of one prefill (B={res['memory'][0]['B']}), fresh process per S:")
            L.append("")
            L.append("| S | RSS before (MiB) | peak increase (MiB) | of which logits (MiB) | increase per token (KiB) |")
            L.append("|---|---|---|---|---|")
            for r in res["memory"]:
                L.append(f"| {r['S']} | {r['rss_before_mib']:.0f} | {r['delta_mib']:.1f} | {r['logits_mib']:.1f} | "
                         f"{1024 * r['delta_mib'] / (r['S'] * r['B']):.1f} |")
        L.append("")
    L.append("Targets:")
    L.append("")
    L.append("| target | evidence | met |")
    L.append("|---|---|---|")
    for t, ev, ok in targets(results):
        L.append(f"| {t} | {ev} | {'yes' if ok else 'NO'} |")
    L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="onnx_cpu.py",
        description="onnxruntime CPU vs PyTorch eager (ours, transformers, NX-AI xlstm) on the same "
                    "xLSTM weights: prefill tokens/s, decode ms/step, ORT memory vs S, beside the "
                    "machine's bandwidth and matmul floors. Markdown on stdout.")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(MODELS),
                   help="models to run (default: %(default)s)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    p.add_argument("--prefill-len", type=int, default=256, help="prefill length S (default: 256)")
    p.add_argument("--repeats", type=int, default=5,
                   help="interleaved rounds; each times one prefill per framework (default: 5)")
    p.add_argument("--decode-steps", type=int, default=100,
                   help="timed decode steps per framework, spread over the rounds (default: 100)")
    p.add_argument("--decode-warmup", type=int, default=10, help="untimed decode steps first (default: 10)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for every framework (default: all %(default)s cores)")
    p.add_argument("--peers", nargs="+", default=["ours", "transformers", "nxai"],
                   choices=["ours", "transformers", "nxai"], help="eager peers to run (default: all)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory sweep")
    p.add_argument("--memory-models", nargs="+", default=[LARGE_MODEL, "tiny"], choices=list(MODELS),
                   help="models whose ORT memory is swept (default: %(default)s)")
    p.add_argument("--memory-seq-lens", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192],
                   help="S values of the memory sweep (default: 256 .. 8192)")
    p.add_argument("--memory-batch", type=int, default=1, help="B of the memory sweep (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs seed (default: 0)")
    p.add_argument("--workdir", type=Path, default=None, help="where the .onnx files go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON here")
    p.add_argument("--memory-child", nargs=4, metavar=("ONNX", "B", "S", "THREADS"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.memory_child:
        path, B, S, threads = args.memory_child
        _memory_child(path, int(B), int(S), int(threads))
        return 0
    for name in ("batch", "threads", "prefill_len", "repeats", "decode_steps"):
        vals = getattr(args, name)
        if any(v < 1 for v in (vals if isinstance(vals, list) else [vals])):
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {vals}")
    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel work
        torch.set_num_interop_threads(1)

    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(), "threads": args.threads,
        "command": " ".join(["python bench/onnx_cpu.py", *(sys.argv[1:] if argv is None else argv)]),
        "prefill_len": args.prefill_len, "repeats": args.repeats, "decode_steps": args.decode_steps,
        "decode_warmup": args.decode_warmup,
    }
    print("# measuring floors", file=sys.stderr)
    bw = measure_bandwidth()
    mm = measure_matmul(args.threads)
    meta["floors"] = {"bandwidth": bw, "read_gbs": bw["read"], "matmul": mm, "matmul_gflops": mm["best"]}
    floors = {"read_gbs": bw["read"], "matmul_gflops": mm["best"]}
    print(f"# read {bw['read']:.1f} GB/s, matmul {floors['matmul_gflops']:.0f} GFLOP/s", file=sys.stderr)

    results = []
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx_cpu_")))
        workdir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            results.append(bench_model(name, args, floors, workdir))
    meta["loadavg_end"] = _loadavg()
    text = render(results, meta)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results,
                                         "targets": targets(results)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
