"""Shared bits of the benchmarks: where the data is, and how results are recorded."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# MINIGLM_BENCH_RESULTS: record elsewhere (bench/gpu.sh writes its records under $OUT; its dry run, to a temp folder)
RESULTS = Path(os.environ.get("MINIGLM_BENCH_RESULTS") or Path(__file__).with_name("RESULTS.md"))


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
    """Print a result and append it to bench/RESULTS.md (or $MINIGLM_BENCH_RESULTS) with the machine and date."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    text = f"\n## {title}\n\n{stamp}, {machine()}\n\n{body}\n"
    print(text)
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(text)


def copy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """The machine's memory copy bandwidth in GB/s (bytes read + bytes written, as STREAM's copy counts
    them): the best of a few copies of an `mb` MB fp32 tensor, with torch's current thread count."""
    import time

    import torch

    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9
