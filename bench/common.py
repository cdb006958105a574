"""Shared bits of the benchmarks: where the data is, and how results are recorded."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, body: str) -> None:
    """Print a result and append it to bench/RESULTS.md with the machine and date."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"\n## {title}\n\n{stamp}, {machine()}\n\n{body}\n"
    print(text)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(text)
