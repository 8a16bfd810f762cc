"""Compile the onnxruntime CPU custom-op library (``cpu_ops.cc``) with the system C++ compiler, cached.

The library holds float32 CPU kernels of the mLSTM decode step, of the 7B-style mLSTM layer and
of the sLSTM time loop (see ``cpu_cells.h``) and a matrix product over packed weights (``cpu_gemm.h``);
:mod:`xlstm_export.ort_native` swaps them into an exported model and registers the library with
an onnxruntime session::

    >>> from xlstm_export.plugins import cpu_build
    >>> path = cpu_build.library_path()      # compiled once per source / compiler / CPU, then cached

It needs only a C++17 compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++`` on PATH): the
library declares the few parts of onnxruntime's C ABI it uses itself (``ort_abi.h``) and links
against nothing but libc / libm / libstdc++. The build is ``-O3 -march=native`` (the inner loops
are written to auto-vectorize, the matrix product in GCC / Clang vector extensions), so the cache key includes the CPU's feature flags; the file lands
in ``<cache>/cpu/<hash>/`` (cache root as for the PTX, :func:`xlstm_export.plugins.build.cache_dir`),
written to a temporary name and renamed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

from xlstm_export.fsio import atomic_file

from .build import PLUGIN_DIR, cache_dir

__all__ = ["CXX_FLAGS", "SOURCES", "CompilerNotFoundError", "find_compiler", "library_path"]

SOURCES = ("cpu_ops.cc", "cpu_cells.h", "cpu_gemm.h", "cpu_vec.h", "ort_op.h", "ort_abi.h")  # the first is the translation unit
CXX_FLAGS = ("-std=c++17", "-O3", "-march=native", "-fPIC", "-shared", "-fvisibility=hidden",
             "-Wall", "-Wextra", "-Werror")
LIB_NAME = "libxlstm_cpu_ops.so"


class CompilerNotFoundError(RuntimeError):
    """No C++ compiler to build the onnxruntime CPU custom-op library with."""


def find_compiler() -> str:
    """Path of a C++ compiler ($CXX, c++, g++, clang++), or CompilerNotFoundError."""
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    raise CompilerNotFoundError(
        "no C++ compiler found: the native onnxruntime CPU kernels (plugins/cpu_ops.cc) are compiled "
        "on first use. Install one (e.g. `apt install g++`) or set CXX=/path/to/c++; without them, "
        "onnxruntime runs the models through their standard-op function bodies (native_ops=False).")


@functools.cache
def _compiler_version(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0] if out else cxx


def _cpu_flags() -> str:
    """The CPU feature flags -march=native compiles for (a cache shared across machines stays right)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _digest(cxx: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode())
        h.update((PLUGIN_DIR / name).read_bytes())
    h.update(" ".join(CXX_FLAGS).encode())
    h.update(_compiler_version(cxx).encode())
    h.update(_cpu_flags().encode())
    h.update(platform.machine().encode())
    return h.hexdigest()[:16]


def library_path(*, force: bool = False) -> Path:
    """Path of the compiled library for the current sources, compiler and CPU (built if missing)."""
    cxx = find_compiler()
    out = cache_dir() / "cpu" / _digest(cxx) / LIB_NAME
    if out.is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, mode=0o755) as tmp:  # atomic: a concurrent build never sees a partial library
        cmd = [cxx, *CXX_FLAGS, "-I", str(PLUGIN_DIR), str(PLUGIN_DIR / SOURCES[0]), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"building the onnxruntime CPU kernels failed ({proc.returncode}):\n"
                               f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
    return out
