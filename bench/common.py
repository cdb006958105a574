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


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm", "aten::addmm_", "aten::baddbmm")


def profile_shares(prof, groups: dict[str, tuple[str, ...]] | None = None, top: int = 4) -> tuple[dict, str, int]:
    """Where a torch.profiler run's time went: the shares of the aten ops' own CPU time in matrix products,
    attention (any op named *attention*), each extra group (a name -> substrings of op names) and the rest;
    the `top` largest of the rest as text; and how many aten ops ran."""
    groups = {"matmul": MATMUL_OPS, "attention": ("attention",), **(groups or {})}
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    share = dict.fromkeys(groups, 0.0)
    rest = []
    for e in events:
        kind = next((g for g, names in groups.items()
                     if (e.key in names if g == "matmul" else any(n in e.key for n in names))), None)
        if kind:
            share[kind] += e.self_cpu_time_total / total
        else:
            rest.append(e)
    share["other"] = 1 - sum(share.values())
    rest.sort(key=lambda e: -e.self_cpu_time_total)
    largest = ", ".join(f"{e.key[6:]} {e.self_cpu_time_total / total:.0%}" for e in rest[:top])
    return share, largest, sum(e.count for e in events)
