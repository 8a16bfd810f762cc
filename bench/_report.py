"""What the benchmarks share for their reports: the CPU's name, and how the kernel benchmarks print
a table and append it to a markdown file (bench/RESULTS.md)."""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else the machine type."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine() or "unknown"


def report(table: str, write: str | None, title: str, script: str, argv: list[str] | None) -> int:
    """Print ``table``; with ``write`` append it under ``## {title}`` with the command that made it."""
    print(table)
    if write:
        cmd = f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(write, "a") as fh:
            fh.write(f"\n## {title}\n\nCommand: `{cmd.strip()}`\n\n{table}\n")
    return 0
