"""Fault injection: run a miniglm command killed at its N-th write (MINIGLM_TEST_KILL_AT=N, os._exit(137)
in fileio._write_point), check what it left, rerun it, and compare with an uninterrupted run.

    python -m tests.killpoints SPECS.json RESULTS.json      (test_writers.py runs it)

A spec: {"name", "argv", "out", "prev_argv": argv or null, "run": bool, "max_points": int}. "prev_argv"
writes the previous output the killed run replaces; "run" marks a growing run folder (train, finetune),
where only the sets inside it are checked after a kill. One process imports everything once and forks a
child per command run, so each kill really ends a process and each run costs no start-up.

That process never runs a command itself, so it never initialises CUDA: a child forked from a process that
has cannot use the GPU ("Cannot re-initialize CUDA in forked subprocess"). Every run, the uninterrupted one
too, is a child that sets CUDA up for itself. Should an import have initialised CUDA all the same (a forked
probe sees it), each child is a fresh `python -m tests.killpoints --child` process instead: slower, as
each imports everything again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING = {"seconds", "mb_per_s", "written", "time", "tok_per_s", "generation_seconds"}  # differ run to run
LEFTOVER = re.compile(r"^\..+\.(\d+\.\w+\.tmp|old)$")  # .NAME.PID.RANDOM.tmp, .NAME.old


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def normalize(name: str, data: bytes) -> bytes:
    """The bytes compared: JSON without its timing fields, everything else as it is."""
    if name.endswith(".jsonl"):
        return b"\n".join(json.dumps(_strip(json.loads(x))).encode() for x in data.splitlines() if x.strip())
    if name.endswith(".json") or name == ".miniglm":
        return json.dumps(_strip(json.loads(data))).encode()
    return data


def snapshot(root: Path) -> dict[str, bytes] | None:
    if root.is_file():
        return {".": root.read_bytes()}
    if not root.exists():
        return None
    return {str(p.relative_to(root)): normalize(p.name, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def old_of(out: Path) -> Path:
    return out.with_name(f".{out.name[:80]}.old")


def leftovers(out: Path) -> list[str]:
    """Temporary files and old versions of the output, beside it or inside it."""
    stem = f".{out.name[:80]}."
    found = [p for p in out.parent.iterdir() if p.name.startswith(stem) and LEFTOVER.match(p.name)]
    if out.is_dir():
        found += [p for p in out.rglob(".*") if LEFTOVER.match(p.name)]
    return sorted(str(p) for p in found)


def incomplete_sets(out: Path) -> list[str]:
    """Marked sets whose files are not exactly those their marker lists: a half-written set."""
    if not out.is_dir():
        return []
    bad = []
    for marker in out.rglob(".miniglm"):
        files = json.loads(marker.read_text()).get("files")
        folder = marker.parent
        have = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.name != ".miniglm")
        if files is not None and have != files:
            bad.append(f"{folder}: has {have}, its marker lists {files}")
    return bad


FORK = True  # main() sets it: False when a forked child could not use CUDA


def child_main(argv: list[str], kill_at: int | None, log: Path, count: Path | None) -> int:
    """In the child: cli.main(argv), its output in LOG, killed at write KILL_AT (os._exit(137)); COUNT gets the
    number of write points it passed. Its exit status."""
    code = 1
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        os.environ.pop("MINIGLM_TEST_KILL_AT", None)
        if kill_at is not None:
            os.environ["MINIGLM_TEST_KILL_AT"] = str(kill_at)
        from miniglm import cli, fileio

        code = cli.main(argv)
        if count is not None:
            count.write_text(str(fileio._writes))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return code or 0


def run_child(argv: list[str], kill_at: int | None, log: Path, count: Path | None = None) -> int:
    """cli.main(argv) in a child process (forked, or a fresh one when FORK is off); its exit status (137:
    killed at the write point)."""
    t0 = time.perf_counter()
    if FORK:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = child_main(argv, kill_at, log, count)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    else:
        child = [sys.executable, "-m", "tests.killpoints", "--child", str(log), str(kill_at or ""), str(count or ""),
                 *argv]
        code = subprocess.run(child).returncode
    print(f"{log.parent.name} {log.stem}: exit {code}, {time.perf_counter() - t0:.2f}s", file=sys.stderr, flush=True)
    return code


def run_counted(argv: list[str], log: Path) -> tuple[int, int]:
    """An uninterrupted run in a child: (exit status, the number of write points it passed)."""
    count = log.with_suffix(".count")
    code = run_child(argv, None, log, count)
    return code, int(count.read_text()) if code == 0 else 0


def fork_can_use_cuda() -> bool:
    """Whether a child forked now could initialise CUDA: false once this process has touched it."""
    pid = os.fork()
    if pid == 0:
        import torch

        os._exit(1 if torch.cuda._is_in_bad_fork() else 0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def reset(out: Path, prev: Path | None) -> None:
    """Back to the state before the killed run: the previous output alone."""
    for p in [out, *[p for p in out.parent.iterdir() if p.name.startswith(f".{out.name[:80]}.")]]:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if prev is not None and prev.is_dir():
        shutil.copytree(prev, out)
    elif prev is not None and prev.is_file():
        shutil.copyfile(prev, out)


def pick(count: int, most: int) -> list[int]:
    if count <= most:
        return list(range(1, count + 1))
    return sorted({round(1 + i * (count - 1) / (most - 1)) for i in range(most)})


def check(spec: dict, work: Path) -> dict:
    out, name = Path(spec["out"]), spec["name"]
    logs = work / name.replace(" ", "_")
    logs.mkdir()
    failures: list[str] = []

    def fail(msg: str, log: Path) -> None:
        failures.append(f"{msg}\n{log.read_text()[-2000:]}")

    # The previous output (kept aside), then the uninterrupted run over it: the reference.
    prev = None
    reset(out, None)
    if spec.get("prev_argv"):
        if run_counted(spec["prev_argv"], logs / "prev.log")[0] != 0:
            fail("the previous run failed", logs / "prev.log")
            return {"points": 0, "tested": [], "failures": failures}
        prev = work / f"prev-{logs.name}"
        shutil.move(out, prev)
    reset(out, prev)
    code, count = run_counted(spec["argv"], logs / "ref.log")
    if code != 0:
        fail("the uninterrupted run failed", logs / "ref.log")
        return {"points": 0, "tested": [], "failures": failures}
    ref, prev_snap = snapshot(out), snapshot(prev) if prev is not None else None
    tested = pick(count, spec.get("max_points", 12))
    for n in tested:
        reset(out, prev)
        log = logs / f"kill{n}.log"
        rc = run_child(spec["argv"], n, log)
        if rc != 137:
            fail(f"kill at write {n} of {count}: exit {rc}, expected 137", log)
            continue
        if not spec.get("run"):
            now, old = snapshot(out), snapshot(old_of(out))
            if not (now in (prev_snap, ref) or (now is None and old in (None, prev_snap))):
                fail(f"kill at write {n}: the output is neither the previous one, nor absent, nor complete", log)
        failures += [f"kill at write {n}: {m}" for m in incomplete_sets(out)]
        rc = run_child(spec["argv"], None, log)
        if rc != 0:
            fail(f"kill at write {n}: the rerun failed with exit {rc}", log)
            continue
        if snapshot(out) != ref:
            a, b = snapshot(out) or {}, ref or {}
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            fail(f"kill at write {n}: the rerun differs from an uninterrupted run in {diff}", log)
        if leftovers(out):
            fail(f"kill at write {n}: left behind {leftovers(out)}", log)
        failures += [f"kill at write {n}, rerun: {m}" for m in incomplete_sets(out)]
    return {"points": count, "tested": tested, "failures": failures}


def preload() -> None:
    """What the commands import, imported once before the forks (a child starts with it loaded); nothing that
    touches CUDA."""
    import torch

    torch.set_num_threads(1)
    import gguf  # noqa: F401
    import jieba
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from miniglm import cli, evaluate, export, finetune, hf, lora, metrics, report, train  # noqa: F401

    jieba.setLogLevel(60)
    jieba.initialize()  # its dictionary, for ROUGE in eval


def main(specs_path: str, results_path: str) -> None:
    global FORK
    specs = json.loads(Path(specs_path).read_text())
    if os.environ.get("KILLPOINTS_ONLY"):  # debugging one command
        specs = [s for s in specs if s["name"] == os.environ["KILLPOINTS_ONLY"]]
    preload()
    FORK = fork_can_use_cuda()
    if not FORK:
        print("killpoints: CUDA was initialised while importing: each run starts a fresh process", file=sys.stderr)

    results = {}
    with tempfile.TemporaryDirectory() as work:
        for spec in specs:
            results[spec["name"]] = check(spec, Path(work))
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "--child":  # --child LOG KILL_AT COUNT ARGV...: one run in a fresh process
        log, kill_at, count, *argv = sys.argv[2:]
        sys.exit(child_main(argv, int(kill_at) if kill_at else None, Path(log), Path(count) if count else None))
    main(*sys.argv[1:])
