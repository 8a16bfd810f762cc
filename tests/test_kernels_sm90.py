"""Shared memory of the Triton kernels compiled for Hopper (sm_90), without a GPU.

Triton refuses a launch whose kernel needs more shared memory than one block may have ("out of
resources: shared memory, Required: X, Hardware limit: Y"); on an H100/H200 that is 232448 bytes
(227 KiB). The interpreter never allocates shared memory, so the budget is checked here: each
kernel is compiled ahead of time for sm_90 with the launch parameters its launcher picks, and
the compiled kernel's ``metadata.shared`` (the figure the launcher compares with the device's) is
held against the limit. Compiling runs in a fresh process where TRITON_INTERPRET is unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the Triton kernels need the triton package")

H100_SMEM = 232448  # bytes of shared memory one H100/H200 block may use (227 KiB, opt-in)

# argv[1]: a JSON list of jobs; prints one JSON line per job: its name and the shared bytes
_SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from xlstm_export.kernels.mlstm import chunk as ck
from xlstm_export.kernels.slstm import fused_recurrent as sfr

TARGET = GPUTarget("cuda", 90, 32)
TT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def shared(fn, sig, constexprs, options):
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    except TypeError as e:  # another triton's ASTSource
        print(json.dumps({"api": str(e)}))
        sys.exit(0)
    return triton.compile(src, target=TARGET, options=options).metadata.shared


def slstm(kind, DH, dtype, fp32_precision):
    # as the launcher launches it (launch_meta), with this fp32_precision
    meta = sfr.launch_meta(kind, DH, getattr(torch, dtype), sfr.SLSTMLaunchParams(fp32_precision=fp32_precision))
    options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
    kernel = {"fwd": sfr.fused_recurrent_slstm_fwd_kernel, "bwd": sfr.fused_recurrent_slstm_bwd_kernel}[kind]
    consts = dict(meta, NH=4)
    if kind == "fwd":
        consts.update(USE_INITIAL_STATE=True, SAVE=True)
    low = {"x", "r", "b", "y", "dy"}  # pointers in the dtype of x; the rest float32
    sig = {a: "constexpr" if a in consts else "i32" if a in ("B", "S") else "*" + (TT[dtype] if a in low else "fp32")
           for a in kernel.arg_names}
    return shared(kernel, sig, consts, options)


def mlstm(S, DHQK, DHV, chunk_size, dtype, dot_precision):
    # every chunkwise kernel with the tiles chunk_mlstm_launch_params picks; the largest of them
    p = ck.chunk_mlstm_launch_params(S, DHQK, DHV, chunk_size)
    t = dict(DHQK=DHQK, DHV=DHV, L=p.chunk_size, BL=p.block_t, BK=p.block_dqk, BV=p.block_dv,
             DOT_PREC=dot_precision if dtype == "float32" else "ieee")
    opts = dict(num_warps=p.num_warps, num_stages=p.num_stages)
    io = ("q_ptr", "k_ptr", "v_ptr", "h_ptr", "dh_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "i_ptr", "f_ptr")
    jobs = [(ck.chunk_mlstm_fwd_state_kernel, dict(t, HAS_STATE=True)), (ck.chunk_mlstm_fwd_kernel, t),
            (ck.chunk_mlstm_bwd_state_kernel, dict(t, HAS_DFINAL=True)), (ck.chunk_mlstm_bwd_kernel, t)]
    most = 0
    for fn, consts in jobs:
        sig = {n: "constexpr" if n in consts else "*" + TT[dtype] if n in io else "*fp32" if n.endswith("_ptr")
               else "fp32" if n in ("scale", "eps") else "i32" for n in fn.arg_names}
        most = max(most, shared(fn, sig, consts, opts))
    return most


for job in json.loads(sys.argv[1]):
    op, args = job[0], job[1:]
    print(json.dumps({"job": job, "shared": {"slstm": slstm, "mlstm": mlstm}[op](*args)}), flush=True)
"""


def _compile(jobs, timeout):
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)], env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"compiling {len(jobs)} kernels for sm_90 took over {timeout} s")
    if proc.returncode != 0 and "ptxas" in proc.stderr and "No such file" in proc.stderr:
        pytest.skip("no ptxas for the NVIDIA backend here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if rows and "api" in rows[0]:
        pytest.skip(f"this triton's ASTSource API differs: {rows[0]['api']}")
    return {tuple(r["job"]): r["shared"] for r in rows}


def test_slstm_streamed_r_fits_hopper_shared_memory():
    """float32 at DH 128 re-reads r from L2 every step (R_ON_CHIP false). With tf32 or ieee
    products, loading the four gate blocks before the four products kept all four staged in
    shared memory at once (fwd 270336 bytes; bwd 294912 with triton 3.6, 270336 with 3.9): the kernels
    compiled but could not launch on an H100/H200. Each block is now loaded just before its
    product (R_EACH; fwd 73728, bwd 98304 bytes with triton 3.6). The default 3xTF32 keeps its
    four loads up front (65536 bytes: it splits the blocks in registers)."""
    jobs = [["slstm", kind, 128, "float32", prec] for kind in ("fwd", "bwd") for prec in ("tf32", "ieee")]
    got = _compile(jobs, timeout=300)
    assert len(got) == len(jobs), got
    over = {job: smem for job, smem in got.items() if smem > H100_SMEM}
    assert not over, f"shared memory over the H100/H200 limit of {H100_SMEM} bytes: {over}"


@pytest.mark.slow
def test_kernels_fit_hopper_shared_memory_at_model_shapes():
    """The launchers' choices at the model shapes: the mLSTM chunk kernels at their largest
    tiles (64 x 64 x 64: xLSTM-7B's heads DHQK 256, DHV 512; chunks of 64 and 256; 16-bit and the
    float32 precisions) and the sLSTM kernels at DH 64, 96, 128 in every dtype."""
    jobs = [["mlstm", 4096, 256, 512, L, dt, prec] for L in (64, 256)
            for dt, prec in (("bfloat16", "ieee"), ("float16", "ieee"), ("float32", "ieee"), ("float32", "tf32x3"))]
    jobs += [["slstm", kind, DH, dt, "tf32x3"] for kind in ("fwd", "bwd") for DH in (64, 96, 128)
             for dt in ("bfloat16", "float32")]
    got = _compile(jobs, timeout=900)
    assert len(got) == len(jobs), got
    over = {job: smem for job, smem in got.items() if smem > H100_SMEM}
    assert not over, f"shared memory over the H100/H200 limit of {H100_SMEM} bytes: {over}"
