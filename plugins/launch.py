"""Launch parameters of the plugin kernels: grid, block, dynamic shared memory and the int32 arguments.

One function per op computes everything TensorRT (through ``aot_impl``) and the CuPy tests need to
launch ``plugins/*.cu``. They work on plain ints and on TensorRT's symbolic shape expressions
alike: the batch size B, the head count NH and the sequence length S may be symbolic (only
``+ - * //`` with the symbol on the left touch them), while the head dims (DQK, DV, DH) must be ints,
because they choose the shared-memory layout::

    >>> p = mlstm_launch(2, 4, 100, 256, 512)
    >>> p.grid, p.block, p.shared_mem
    ((16, 4, 2), (256, 1, 1), 134432)
    >>> p.extra_args  # B, NH, S, DQK, DV, chunk_size, bits of eps=1e-6
    (2, 4, 100, 256, 512, 64, 897988541)

The tile sizes below are set here and nowhere else: the kernels' header ``layout.cuh`` takes them
as -D flags (:func:`cuda_defines`, passed by ``build.py`` to nvcc and by the CPU tests to g++) and
refuses to compile without them. The shared-memory formulas are written twice, here and in
``layout.cuh`` (the kernels carve their shared memory by it); the CPU tests compile a host program
against that header to check both agree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from xlstm_export.contract import MLSTM

__all__ = [
    "LaunchParams", "MLSTM_EXTRA_ARGS", "SLSTM_EXTRA_ARGS", "MLSTM_THREADS", "MLSTM_CHUNK",
    "MLSTM_TILE_V", "MLSTM_STEP_V", "MLSTM_SLAB",
    "SLSTM_MAX_THREADS", "SMEM_OPTIN_BYTES", "MAX_THREADS_PER_BLOCK", "MAX_GRID_YZ", "float_bits",
    "mlstm_shared_bytes", "mlstm_launch", "slstm_threads", "slstm_shared_bytes", "slstm_r_rows",
    "slstm_launch", "check_limits", "max_mlstm_head_dim", "cuda_defines",
]

# ---- hardware limits (CUDA programming guide, "Technical Specifications per Compute Capability")
# Max dynamic shared memory per block after cudaFuncAttributeMaxDynamicSharedMemorySize opt-in.
SMEM_OPTIN_BYTES: dict[str, int] = {
    "sm_80": 163 * 1024,  # A100
    "sm_86": 99 * 1024,   # RTX 30xx, A10, A40
    "sm_87": 163 * 1024,  # Orin
    "sm_89": 99 * 1024,   # L4, L40, RTX 40xx
    "sm_90": 227 * 1024,  # H100, H200
}
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID_YZ = 65535

# ---- mlstm_fwd.cu tile sizes (layout.cuh's xlstm::mlstm::k*, through cuda_defines)
MLSTM_THREADS = 256  # kThreads
MLSTM_CHUNK = 64  # kChunk: chunk_size is clamped to it
MLSTM_TILE_V = 64  # kTileV: DV columns per block, chunk path
MLSTM_STEP_V = 32  # kStepV: DV columns per block, step path (S == 1); grid.x = ceil(DV / 32)
MLSTM_SLAB = 64  # kSlab: DQK rows streamed per pass

# Names of the int32 kernel arguments, in kernel order (the .cu entry points use these names).
MLSTM_EXTRA_ARGS = ("B", "NH", "S", "DQK", "DV", "chunk_size", "eps_bits")

# ---- slstm_fwd.cu (layout.cuh's xlstm::slstm::kMaxThreads, through cuda_defines)
SLSTM_MAX_THREADS = 1024  # kMaxThreads; DH <= SLSTM_MAX_THREADS (4 gate columns per thread at most)
SLSTM_EXTRA_ARGS = ("B", "NH", "S", "DH", "r_rows")


def cuda_defines() -> tuple[str, ...]:
    """The tile sizes as compiler flags ("-DXLSTM_MLSTM_THREADS=256", ...): ``layout.cuh`` reads
    its constants from them, so a tile size is changed here, in one line, for every build."""
    values = {"MLSTM_THREADS": MLSTM_THREADS, "MLSTM_CHUNK": MLSTM_CHUNK, "MLSTM_TILE_V": MLSTM_TILE_V,
              "MLSTM_STEP_V": MLSTM_STEP_V, "MLSTM_SLAB": MLSTM_SLAB, "SLSTM_MAX_THREADS": SLSTM_MAX_THREADS}
    return tuple(f"-DXLSTM_{name}={value}" for name, value in values.items())


@dataclass(frozen=True)
class LaunchParams:
    """One kernel launch. Entries are ints or symbolic expressions (TensorRT ``SymInt32``...)."""

    grid: tuple[Any, Any, Any]  # (x, y, z) blocks
    block: tuple[int, int, int]  # (x, y, z) threads
    shared_mem: int  # dynamic shared memory per block, bytes
    extra_args: tuple[Any, ...]  # int32 kernel arguments, between the input and output pointers

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]


def float_bits(x: float) -> int:
    """The IEEE-754 float32 bit pattern of ``x`` as a signed int32 (how eps travels to a kernel)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def _ceil_div(a: Any, b: int) -> Any:
    return (a + (b - 1)) // b  # symbol on the left: TensorRT expressions only overload __add__, ...


def _static(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a static int (it chooses the kernel's shared-memory layout), "
                        f"got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------------------------------------
# xlstm::mLSTM
# ---------------------------------------------------------------------------------------------


def mlstm_shared_bytes(dqk: int) -> int:
    """Dynamic shared memory of one mLSTM block (== 4 * smem_floats(dqk) in mlstm_fwd.cu)."""
    dqk = _static("DQK", dqk)
    dqkp = -(-dqk // MLSTM_SLAB) * MLSTM_SLAB
    floats = (dqkp * (MLSTM_TILE_V + 1)  # C tile + n
              + 2 * MLSTM_CHUNK * (MLSTM_SLAB + 1)  # q, k slabs (padded rows)
              + MLSTM_CHUNK * (MLSTM_CHUNK + 1)  # scores (padded rows)
              + MLSTM_CHUNK * MLSTM_TILE_V  # v tile
              + 6 * MLSTM_CHUNK + 8)  # gate terms + scalars
    return 4 * floats


def mlstm_launch(B: Any, NH: Any, S: Any, DQK: int, DV: int, *, chunk_size: int = 64,
                 eps: float = 1e-6) -> LaunchParams:
    """Launch of ``mlstm_fwd_kernel_*`` for q, k (B, NH, S, DQK), v (B, NH, S, DV).

    grid (ceil(DV / 32), NH, B), 256 threads; extra args (B, NH, S, DQK, DV, chunk_size, eps bits).
    """
    DQK, DV = _static("DQK", DQK), _static("DV", DV)
    for name, value in (("chunk_size", chunk_size), ("eps", eps)):  # the op spec's ranges
        MLSTM.attr(name).validate(MLSTM.qualname, value, argument=True)
    # chunk_size beyond the on-chip chunk only changes rounding (the math does not depend on it)
    chunk = min(chunk_size, MLSTM_CHUNK)
    return LaunchParams(
        grid=(_ceil_div(DV, MLSTM_STEP_V), NH, B),
        block=(MLSTM_THREADS, 1, 1),
        shared_mem=mlstm_shared_bytes(DQK),
        extra_args=(B, NH, S, DQK, DV, chunk, float_bits(eps)),
    )


def max_mlstm_head_dim(smem_limit: int) -> int:
    """Largest DQK (a multiple of 64) whose mLSTM block fits in ``smem_limit`` bytes."""
    dqk = MLSTM_SLAB
    while mlstm_shared_bytes(dqk + MLSTM_SLAB) <= smem_limit:
        dqk += MLSTM_SLAB
    return dqk


# ---------------------------------------------------------------------------------------------
# xlstm::sLSTM
# ---------------------------------------------------------------------------------------------


def slstm_threads(dh: int) -> int:
    """Threads per sLSTM block: one per gate column, rounded to warps, at most 1024."""
    dh = _static("DH", dh)
    return min(-(-4 * dh // 32) * 32, SLSTM_MAX_THREADS)


def slstm_shared_bytes(dh: int, r_rows: int, itemsize: int) -> int:
    """Dynamic shared memory of one sLSTM block (== smem_bytes(...) in slstm_fwd.cu)."""
    return 4 * (4 * dh + dh) + r_rows * 4 * dh * itemsize


def slstm_r_rows(dh: int, itemsize: int, smem_limit: int) -> int:
    """Rows of r[head] (each 4*DH elements of ``itemsize`` bytes) kept in shared memory."""
    free = smem_limit - slstm_shared_bytes(dh, 0, itemsize)
    if free < 0:
        raise ValueError(f"xlstm::sLSTM: DH={dh} needs {slstm_shared_bytes(dh, 0, itemsize)} bytes of "
                         f"shared memory for its state alone; the limit is {smem_limit}")
    return max(0, min(dh, free // (4 * dh * itemsize)))


def slstm_launch(B: Any, NH: Any, S: Any, DH: int, *, itemsize: int, smem_limit: int) -> LaunchParams:
    """Launch of ``slstm_fwd_kernel_*`` for x (B, NH, S, 4*DH) with ``itemsize``-byte elements.

    grid (NH, B), min(4*DH, 1024) threads; extra args (B, NH, S, DH, r_rows). As much of r[head]
    as fits under ``smem_limit`` stays in shared memory (all of it unless float32 at large DH).
    """
    DH = _static("DH", DH)
    if DH > SLSTM_MAX_THREADS:
        raise ValueError(f"xlstm::sLSTM: DH={DH} is above the supported {SLSTM_MAX_THREADS} "
                         "(one thread per hidden unit)")
    if itemsize not in (2, 4):
        raise ValueError(f"xlstm::sLSTM: itemsize must be 2 (fp16/bf16) or 4 (fp32), got {itemsize}")
    r_rows = slstm_r_rows(DH, itemsize, smem_limit)
    return LaunchParams(
        grid=(NH, B, 1),
        block=(slstm_threads(DH), 1, 1),
        shared_mem=slstm_shared_bytes(DH, r_rows, itemsize),
        extra_args=(B, NH, S, DH, r_rows),
    )


# ---------------------------------------------------------------------------------------------
# limits
# ---------------------------------------------------------------------------------------------


def check_limits(params: LaunchParams, *, smem_limit: int, op: str = "kernel") -> LaunchParams:
    """Raise ValueError naming the limit when ``params`` cannot launch; return ``params``.

    Symbolic grid entries are not checked (TensorRT bounds them by the optimization profile).
    """
    if params.threads > MAX_THREADS_PER_BLOCK:
        raise ValueError(f"{op}: {params.threads} threads per block exceed {MAX_THREADS_PER_BLOCK}")
    if params.shared_mem > smem_limit:
        raise ValueError(f"{op}: needs {params.shared_mem} bytes of shared memory per block, the device "
                         f"allows {smem_limit} (see SMEM_OPTIN_BYTES; use smaller head dims or a GPU "
                         "with more shared memory)")
    for axis, n in zip("yz", params.grid[1:]):
        if isinstance(n, int) and not 1 <= n <= MAX_GRID_YZ:
            raise ValueError(f"{op}: grid.{axis} = {n} is outside [1, {MAX_GRID_YZ}]")
    if isinstance(params.grid[0], int) and params.grid[0] < 1:
        raise ValueError(f"{op}: grid.x = {params.grid[0]} must be >= 1")
    for a in params.extra_args:
        if isinstance(a, int) and not -(2**31) <= a < 2**31:
            raise ValueError(f"{op}: kernel argument {a} does not fit int32")
    return params
