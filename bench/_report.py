"""What the benchmarks share for their reports: the CPU's name, and how the kernel benchmarks print
a table and append it to a markdown file (bench/RESULTS.md)."""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name with its family and model numbers (/proc/cpuinfo), else the machine type.
    The numbers tell apart the generations a VM's generic name hides ("AMD EPYC": family 25 is
    Zen 3 / Zen 4, family 26 Zen 5), and the figures of this folder differ between them."""
    with contextlib.suppress(OSError):
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if not key.strip():
                break  # the first processor's block only
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            ids = ", ".join(f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields)
            return fields["model name"] + (f" ({ids})" if ids else "")
    return platform.machine() or "unknown"


def report(table: str, write: str | None, title: str, script: str, argv: list[str] | None) -> int:
    """Print ``table``; with ``write`` append it under ``## {title}`` with the command that made it."""
    print(table)
    if write:
        cmd = f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(write, "a") as fh:
            fh.write(f"\n## {title}\n\nCommand: `{cmd.strip()}`\n\n{table}\n")
    return 0
