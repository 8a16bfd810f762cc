"""How the kernel benchmarks print a table and append it to a markdown file (bench/RESULTS.md)."""

from __future__ import annotations

import sys


def report(table: str, write: str | None, title: str, script: str, argv: list[str] | None) -> int:
    """Print ``table``; with ``write`` append it under ``## {title}`` with the command that made it."""
    print(table)
    if write:
        cmd = f"python {script} " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(write, "a") as fh:
            fh.write(f"\n## {title}\n\nCommand: `{cmd.strip()}`\n\n{table}\n")
    return 0
