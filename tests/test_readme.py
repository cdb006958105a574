"""The README's commands, run in order as a new user would, so the README cannot drift from the code.

Every command of the README's ```bash blocks runs as written, in a scratch folder laid out like a
checkout (configs/, bench/, examples/ linked; ../shared beside it), except:
- a command whose trailing comment carries a marker (`# needs: network`, `# needs: gpu`,
  `# needs: llama-extra`, `# long`) is skipped with that reason;
- the fast settings: `runs/demo` is made first by a tiny `miniglm demo` (DEMO_ARGS), and every
  `miniglm train` gets FAST_TRAIN appended (a handful of steps), so the whole file runs in about a minute;
- `miniglm serve` is started in a subprocess on a free port, probed with a chat request, and stopped.
`miniglm` commands run in-process through `main(argv)` (a process each would cost seconds of imports);
anything else (printf, echo) runs in bash. An unmarked command that fails fails the test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from miniglm.cli import main
from tests.helpers import free_port

from .conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"#\s*(needs: (?:network|gpu|llama-extra)|long)\b")
DEMO_ARGS = ["demo", "--out", "runs/demo", "--characters", "40", "--bios", "4", "--vocab-size", "400",
             "--questions", "20", "--set", "model.n_layer=1", "--set", "model.n_embd=64", "--set", "model.n_head=2",
             "--set", "model.n_kv_head=1", "--set", "batch_size=8", "--set", "eval_every=40",
             "--set-pretrain", "max_steps=40", "--set-sft", "max_steps=40"]
FAST_TRAIN = ["--set", "max_steps=4", "--set", "eval_every=4", "--set", "eval_batches=1", "--set", "batch_size=2"]


def readme_commands(text: str) -> list[str]:
    """The commands of the ```bash blocks in order: continuation lines joined, comment lines dropped."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1].rstrip() + " "
                continue
            commands.append(pending + line.strip())
            pending = ""
    return commands


def expand(command: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), command)


def run_serve(argv: list[str]) -> None:
    """Start `miniglm serve` on a free port, ask it one question, stop it."""
    port = free_port()
    argv = [a for a in argv]
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    proc = subprocess.Popen([sys.executable, "-m", "miniglm.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.1)
        body = json.dumps({"messages": [{"role": "user", "content": "司徒沧霄的师父是谁？"}], "max_tokens": 16})
        req = urllib.request.Request(f"{url}/v1/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert reply["usage"]["completion_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def check_answer(argv: list[str], out: str) -> None:
    """generate / chat / eval must answer something, not only run (eval: the demo's run; the README's
    LoRA run has had a handful of steps here and may well answer nothing)."""
    if argv[0] == "generate" and "--jsonl" in argv:
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert rows and all(r["completion_tokens"] > 0 for r in rows), out
    elif argv[0] == "generate":
        assert out.strip(), "no answer printed"
    elif argv[0] == "chat":
        assert re.search(r"模型: \S", out), out
    elif argv[0] == "eval" and argv[1] not in ("ppl", "classify") and argv[argv.index("--run") + 1] == "runs/demo/sft":
        run = Path("runs/demo/sft")
        preds = [json.loads(line)["prediction"] for line in (run / "eval" / "predictions.jsonl").open()]
        assert any(p.strip() for p in preds), "every prediction is empty"


def run_miniglm(argv: list[str], stdin: str | None, capsys, monkeypatch) -> str:
    if argv[0] == "train":
        argv = [*argv, *FAST_TRAIN]
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"exit {code}: {err.strip().splitlines()[-1:] if err.strip() else out[-500:]}"
    return out


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    if not (SHARED / "data").exists():
        pytest.skip(f"{SHARED / 'data'} is absent: the README's commands read it")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("configs", "bench", "examples"):
        if (ROOT / name).exists():
            (repo / name).symlink_to(ROOT / name)
    (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return repo


def test_readme_commands_run_in_order(workspace, capsys, monkeypatch, one_thread):
    t0 = time.perf_counter()
    assert main(DEMO_ARGS) == 0
    demo_s = time.perf_counter() - t0
    capsys.readouterr()
    variables: dict[str, str] = {}
    ran, skipped, transcript = [], [], []
    for command in readme_commands((ROOT / "README.md").read_text(encoding="utf-8")):
        if marker := MARKER.search(command):
            skipped.append((command, marker.group(1)))
            transcript.append(f"  skipped ({marker.group(1)})  {command}")
            continue
        command = expand(command, variables)
        if m := re.fullmatch(r"(\w+)=(\S+)(\s+#.*)?", command):
            variables[m.group(1)] = m.group(2)
            continue
        stdin = None
        if m := re.fullmatch(r"echo (\"[^\"]*\"|\S+) \| (miniglm .*)", command):
            stdin, command = shlex.split(m.group(1))[0] + "\n", m.group(2)
        argv = shlex.split(command, comments=True)
        t0 = time.perf_counter()
        try:
            if argv[:2] == ["miniglm", "serve"]:
                run_serve(argv[1:])
            elif argv[0] == "miniglm":
                check_answer(argv[1:], run_miniglm(argv[1:], stdin, capsys, monkeypatch))
            else:
                done = subprocess.run(command, shell=True, executable="/bin/bash", capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
        except AssertionError as e:
            raise AssertionError(f"README command failed: {command}\n{e}") from None
        ran.append((time.perf_counter() - t0, command))
        transcript.append(f"  exit 0  {ran[-1][0]:5.1f}s  {command}")
    with capsys.disabled():
        print(f"\nREADME: {len(ran)} commands ran, {len(skipped)} skipped "
              f"({', '.join(sorted({m for _, m in skipped}))}); the tiny demo {demo_s:.1f}s; slowest:")
        for seconds, command in sorted(ran, reverse=True)[:5]:
            print(f"  {seconds:5.1f}s  {command[:100]}")
        if os.environ.get("MINIGLM_README_TRANSCRIPT"):  # every command in order, with its exit status
            print("\n".join(transcript))
    assert len(ran) >= 25
