"""Compile the CUDA kernels of ``plugins/*.cu`` to PTX (nvcc), cache it, and read PTX entry signatures.

The TensorRT plugins (:mod:`.tensorrt_plugins`) bake PTX into the engine, and the GPU tests launch
the same PTX through CuPy, so PTX is the one artifact::

    >>> from xlstm_export.plugins import build
    >>> text = build.ptx("mLSTM", "sm_80")                 # compiled once, then cached
    >>> [p.type for p in build.entry_params(text, "mlstm_fwd_kernel_f32")][:3]
    ['.u64', '.u64', '.u64']

Where the PTX comes from, first match wins:

1. ``plugins/ptx/<stem>.<arch>.<hash>.ptx`` shipped in the package (gitignored; written by
   ``python -m xlstm_export.plugins.build --ship``). ``<hash>`` covers the sources and the flags,
   so a stale file is never picked up.
2. the user cache ``$XLSTM_EXPORT_CACHE`` or ``$XDG_CACHE_HOME/xlstm_export`` or
   ``~/.cache/xlstm_export``, under ``ptx/<hash>/<stem>.<arch>.ptx``;
3. a fresh ``nvcc -ptx`` (written to a temp file, then renamed into the cache).

nvcc is taken from ``$XLSTM_NVCC``, then ``PATH``, then ``$CUDA_HOME/bin``, then the
``nvidia-cuda-nvcc`` wheel. PTX from nvcc 13 needs an R580+ driver to JIT; for older drivers build
with an older nvcc (``XLSTM_NVCC=/path/to/cuda-12/bin/nvcc``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from xlstm_export.fsio import atomic_file

from . import launch

__all__ = [
    "ARCHS", "KERNELS", "NVCC_FLAGS", "STRICT_FLAGS", "NvccNotFoundError", "PtxParam", "find_nvcc",
    "nvcc_version", "source_hash", "cache_dir", "shipped_path", "build_ptx", "build_all", "ptx",
    "kernel_name", "entry_names", "entry_params", "select_arch",
]

PLUGIN_DIR = Path(__file__).resolve().parent
SHIPPED_DIR = PLUGIN_DIR / "ptx"
SOURCES = {"mLSTM": "mlstm_fwd.cu", "sLSTM": "slstm_fwd.cu"}  # op -> translation unit
HEADERS = ("common.cuh", "layout.cuh")
ARCHS = ("sm_80", "sm_90")  # PTX targets; sm_80 PTX also JIT-compiles on sm_86/89/90/100+
# -O3 and IEEE float math (no --use_fast_math: the references are plain float32).
NVCC_FLAGS = ("-std=c++17", "-O3", "-lineinfo")
# With XLSTM_NVCC_STRICT=1 (the CPU tests set it) every nvcc warning is an error.
STRICT_FLAGS = ("-Werror", "all-warnings")


def _flags(strict: bool | None = None) -> tuple[str, ...]:
    """nvcc flags: NVCC_FLAGS, the tile sizes of :mod:`.launch` (-D; part of every hash, so a
    changed tile size never picks up stale PTX), and STRICT_FLAGS under XLSTM_NVCC_STRICT=1."""
    strict = os.environ.get("XLSTM_NVCC_STRICT") == "1" if strict is None else strict
    return NVCC_FLAGS + launch.cuda_defines() + (STRICT_FLAGS if strict else ())

# op -> T dtype name -> extern "C" entry point (see the .cu files)
KERNELS: dict[str, dict[str, str]] = {
    "mLSTM": {"float32": "mlstm_fwd_kernel_f32", "float16": "mlstm_fwd_kernel_f16",
              "bfloat16": "mlstm_fwd_kernel_bf16"},
    "sLSTM": {"float32": "slstm_fwd_kernel_f32", "float16": "slstm_fwd_kernel_f16",
              "bfloat16": "slstm_fwd_kernel_bf16"},
}


class NvccNotFoundError(RuntimeError):
    """No nvcc to compile the plugin kernels with."""


def _nvcc_candidates() -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("XLSTM_NVCC")
    if env:
        out.append(Path(env))
    which = shutil.which("nvcc")
    if which:
        out.append(Path(which))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append(Path(os.environ[var]) / "bin" / "nvcc")
    out.append(Path("/usr/local/cuda/bin/nvcc"))
    # the nvidia-cuda-nvcc wheels: nvidia/cuda_nvcc/bin/nvcc (cu12) or nvidia/cu13/bin/nvcc (cu13)
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        for root in getattr(nvidia, "__path__", []):
            out.extend(Path(root).glob("*/bin/nvcc"))
    except ImportError:
        pass
    return out


def find_nvcc() -> str:
    """Path of a working nvcc, or NvccNotFoundError saying how to get one."""
    for cand in _nvcc_candidates():
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    raise NvccNotFoundError(
        "nvcc not found: it compiles the xLSTM plugin kernels (plugins/*.cu) to PTX. Install the CUDA "
        "toolkit or `pip install nvidia-cuda-nvcc-cu12` (or -cu13), put nvcc on PATH or set "
        "XLSTM_NVCC=/path/to/nvcc; or ship prebuilt PTX with `python -m xlstm_export.plugins.build "
        "--ship` on a machine that has nvcc."
    )


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    """The "release X.Y, VX.Y.Z" line of ``nvcc --version``."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    lines = [ln for ln in out.splitlines() if "release" in ln]
    return lines[-1].strip() if lines else out.strip().splitlines()[-1]


def source_hash(nvcc_ver: str = "", flags: tuple[str, ...] | None = None) -> str:
    """sha256 (16 hex digits) of the kernel sources and headers, ``flags`` (default: the build's,
    tile sizes included) and ``nvcc_ver``."""
    flags = _flags(strict=False) if flags is None else flags
    h = hashlib.sha256()
    for name in sorted({*SOURCES.values(), *HEADERS}):
        h.update(name.encode())
        h.update((PLUGIN_DIR / name).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(nvcc_ver.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """Root of the user cache for compiled PTX."""
    env = os.environ.get("XLSTM_EXPORT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xlstm_export"


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unsupported PTX target {arch!r}; expected one of {ARCHS}")
    return arch


def _compile(nvcc: str, src: Path, arch: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a concurrent build never sees a partial file; 0644 as the cache may be shared
    with atomic_file(out, mode=0o644) as tmp:
        cmd = [nvcc, "-ptx", f"-arch=compute_{arch[3:]}", *_flags(), "-I", str(PLUGIN_DIR), str(src), "-o",
               str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({proc.returncode}) for {src.name} [{arch}]:\n"
                               f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def build_ptx(op: str, arch: str, *, force: bool = False) -> Path:
    """Path of the PTX of ``op`` ("mLSTM" / "sLSTM") for ``arch``: shipped, cached or freshly built."""
    _check_arch(arch)
    if op not in SOURCES:
        raise KeyError(f"unknown op {op!r}; known: {sorted(SOURCES)}")
    src = PLUGIN_DIR / SOURCES[op]
    stem = src.stem
    shipped = shipped_path(op, arch)
    if not force and shipped.is_file():
        return shipped
    nvcc = find_nvcc()
    digest = source_hash(nvcc_version(nvcc), _flags())
    out = cache_dir() / "ptx" / digest / f"{stem}.{arch}.ptx"
    if force or not out.is_file():
        _compile(nvcc, src, arch, out)
    return out


def build_all(archs: tuple[str, ...] = ARCHS, *, force: bool = False) -> dict[tuple[str, str], Path]:
    """Build every (op, arch) in parallel (nvcc is single-threaded); {(op, arch): path}."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(op, arch) for op in SOURCES for arch in archs]
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        paths = list(pool.map(lambda j: build_ptx(*j, force=force), jobs))
    return dict(zip(jobs, paths))


def shipped_path(op: str, arch: str) -> Path:
    """Where a packaged PTX of ``op`` / ``arch`` for the current sources would be."""
    return SHIPPED_DIR / f"{Path(SOURCES[op]).stem}.{arch}.{source_hash('')}.ptx"


@functools.lru_cache(maxsize=None)
def _ptx_text(path: str, mtime: float) -> str:
    return Path(path).read_text(encoding="utf-8")


def ptx(op: str, arch: str) -> str:
    """PTX text of ``op`` for ``arch`` (see :func:`build_ptx`)."""
    path = build_ptx(op, arch)
    return _ptx_text(str(path), path.stat().st_mtime)


def kernel_name(op: str, dtype: str) -> str:
    """extern "C" entry point of ``op`` for element type ``dtype`` ("float32"/"float16"/"bfloat16")."""
    try:
        return KERNELS[op][dtype]
    except KeyError:
        raise KeyError(f"no kernel for op {op!r} and dtype {dtype!r}; known: "
                       f"{ {k: sorted(v) for k, v in KERNELS.items()} }") from None


def select_arch(major: int, minor: int = 0) -> str:
    """PTX target for a device of compute capability ``major.minor`` (sm_90 PTX needs >= 9.0)."""
    if (major, minor) < (8, 0):
        raise ValueError(f"compute capability {major}.{minor} is not supported (need >= 8.0: "
                         "bfloat16 and the shared-memory sizes of the kernels)")
    return "sm_90" if (major, minor) >= (9, 0) else "sm_80"


# ---------------------------------------------------------------------------------------------
# PTX entry signatures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PtxParam:
    name: str  # e.g. "mlstm_fwd_kernel_f32_param_0"
    type: str  # ".u64" (pointers), ".u32" / ".s32" (int), ...

    @property
    def is_pointer(self) -> bool:  # nvcc passes every pointer as a 64-bit integer parameter
        return self.type in (".u64", ".b64", ".s64")

    @property
    def is_int32(self) -> bool:
        return self.type in (".u32", ".s32", ".b32")


_ENTRY_RE = re.compile(r"\.entry\s+([A-Za-z_$][\w$]*)\s*\(([^)]*)\)", re.S)
_PARAM_RE = re.compile(r"\.param\s+((?:\.\w+\s+)*?)(\.[usb]\d+|\.f\d+)\s+(?:\.ptr\s+(?:\.\w+\s+)*)?([\w$]+)")


def entry_names(ptx_text: str) -> list[str]:
    """Names of every ``.entry`` (kernel) in ``ptx_text``, in file order."""
    return [m.group(1) for m in _ENTRY_RE.finditer(ptx_text)]


def entry_params(ptx_text: str, name: str) -> list[PtxParam]:
    """The parameter list of kernel ``name`` as declared in the PTX (order and types)."""
    for m in _ENTRY_RE.finditer(ptx_text):
        if m.group(1) == name:
            body = m.group(2)
            params = []
            for chunk in body.split(","):
                chunk = chunk.strip()
                if not chunk:
                    continue
                pm = _PARAM_RE.search(chunk)
                if pm is None:
                    raise ValueError(f"cannot parse PTX parameter {chunk!r} of {name}")
                params.append(PtxParam(pm.group(3), pm.group(2)))
            return params
    raise KeyError(f"no .entry {name!r} in the PTX; entries: {entry_names(ptx_text)}")


# ---------------------------------------------------------------------------------------------
# CLI: python -m xlstm_export.plugins.build [--ship] [--force]
# ---------------------------------------------------------------------------------------------


def ship(force: bool = False) -> list[Path]:
    """Build every (op, arch) and copy it to ``plugins/ptx/`` for packaging."""
    SHIPPED_DIR.mkdir(exist_ok=True)
    nvcc = find_nvcc()
    digest = source_hash(nvcc_version(nvcc), _flags())
    out = []
    for op in SOURCES:
        for arch in ARCHS:
            built = cache_dir() / "ptx" / digest / f"{Path(SOURCES[op]).stem}.{arch}.ptx"
            if force or not built.is_file():
                _compile(nvcc, PLUGIN_DIR / SOURCES[op], arch, built)
            dst = shipped_path(op, arch)
            shutil.copyfile(built, dst)
            out.append(dst)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m xlstm_export.plugins.build", description=__doc__.splitlines()[0])
    p.add_argument("--ship", action="store_true", help="also copy the PTX to plugins/ptx/ for packaging")
    p.add_argument("--force", action="store_true", help="recompile even if cached")
    args = p.parse_args(argv)
    try:
        paths = ship(args.force) if args.ship else list(build_all(force=args.force).values())
    except (NvccNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
