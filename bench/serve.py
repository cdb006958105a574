"""Serving: one streaming client against the engine alone, then 1, 8 and 32 concurrent clients, on loopback.

Side by side in one run, on the same model, prompt, sampling and token count: the engine's batch-1
tokens/s (Engine.stream) and one streaming client's tokens/s, both counted after the first token (time
to first token reported apart), best of --repeats interleaved pairs; then aggregate tokens/s, time to
first token and p50/p95 request latency for 1, 8 and 32 concurrent clients. The server is `miniglm
serve` in its own process (--batchers main,thread: beside it, the batcher in a thread of its own, as it
ran before) on a run folder, or on a random-weight model of the demo's shape; the engine runs in this
process, and the clients in another (a real client is another program).

--soak: `miniglm serve` in its own process under hostile but realistic traffic for --duration seconds:
64 streaming chat clients (over the default batch of 32, so some wait), a third of them disconnecting
mid-stream, 1 request in 10 malformed, one 5 MB body a minute. Checks that every good request gets
its whole answer (greedy answers identical each time), that no response is a 5xx, and records the
server's RSS growth and /health latency (polled from another process).

    .venv/bin/python bench/serve.py [--run runs/demo/sft] [--tokens 96] [--requests 2] [--repeats 3]
                                    [--batchers main,thread]
    .venv/bin/python bench/serve.py --soak --run runs/demo/sft [--duration 180] [--clients 64]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2 as httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, record, table  # noqa: E402

from miniglm.chat import load_run  # noqa: E402
from miniglm.engine import SamplingParams  # noqa: E402
from miniglm.serve import create_app, listen  # noqa: E402


def random_run(tmp: Path) -> Path:
    from miniglm.checkpoint import save_checkpoint
    from miniglm.config import load_config
    from miniglm.model import MiniGLM
    from miniglm.tokenizer import SPECIAL_TOKENS, train_bpe

    tok = train_bpe(["司徒沧霄与蔡尘淑是至交好友。" * 50, *SPECIAL_TOKENS], 300, tmp / "run" / "tokenizer")
    cfg = load_config(ROOT / "configs" / "demo.toml").model
    cfg.vocab_size, cfg.block_size = tok.vocab_size, 512
    torch.manual_seed(0)
    model = MiniGLM(cfg)
    save_checkpoint(tmp / "run" / "ckpt", model, cfg, {"step": 0})
    return tmp / "run"


PROMPT = "司徒沧霄与蔡尘淑是至交好友。"


def client(base: str, n_requests: int, tokens: int, out: list) -> None:
    """Stream n_requests completions one after another; per request its time to first text, latency,
    tokens and the seconds from its first text to its last."""
    with httpx.Client(timeout=600) as http:
        for i in range(n_requests):
            t0 = time.perf_counter()
            first = last = None
            count = 0
            body = {"prompt": PROMPT, "max_tokens": tokens, "stream": True, "temperature": 1.0, "seed": i,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            with http.stream("POST", base + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    sys.exit(f"HTTP {r.status_code}: {r.read().decode()}")
                for line in r.iter_lines():
                    if not line.startswith("data:") or line.endswith("[DONE]"):
                        continue
                    event = json.loads(line[5:])
                    if event.get("usage"):
                        count = event["usage"]["completion_tokens"]
                    elif event["choices"][0]["text"]:
                        last = time.perf_counter()
                        first = first or last
            out.append({"ttft": first - t0, "latency": time.perf_counter() - t0, "tokens": count,
                        "decode": last - first})


def clients(base: str, n: int, n_requests: int, tokens: int) -> tuple[float, list[dict]]:
    """n concurrent clients (threads of the process this runs in): the wall time and every request's figures."""
    results: list[dict] = []
    threads = [threading.Thread(target=client, args=(base, n_requests, tokens, results)) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def engine_stream(engine, prompt: list[int], tokens: int, seed: int) -> tuple[float, float]:
    """The engine alone at batch 1, as the server samples (temperature 1, a seed, no stop token): its
    tokens/s after the first text chunk, and the seconds to that chunk."""
    params = SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=seed)
    t0 = time.perf_counter()
    first = last = None
    for _ in engine.stream(prompt, params):
        last = time.perf_counter()
        first = first or last
    return (tokens - 1) / (last - first), first - t0


def batcher_stream(engine, prompt: list[int], tokens: int, seed: int) -> float:
    """The server's Batcher alone, in this process on its main thread with the engine's step, no HTTP: its
    tokens/s after the first text event. Between the engine's and one stream's, it tells the batcher's
    bookkeeping apart from the server's (event loop, SSE, socket)."""
    from miniglm.batcher import Batcher, Job

    times: list[float] = []
    batcher = Batcher(engine.model, engine.tokenizer, thread=False, step=engine.forward_step)

    def on_event(event: dict) -> None:
        if "delta" in event:
            times.append(time.perf_counter())
        if "done" in event or "error" in event:
            batcher.running = False  # the loop ends after this step (stop() would wait on itself)
    batcher.submit(Job(prompt, SamplingParams(max_new_tokens=tokens, temperature=1.0, seed=seed), on_event))
    batcher.run()
    return (len(times) - 1) / (times[-1] - times[0])


QUESTIONS = ["蔡义是哪个门派的？", "南宫静骏属于哪一派？", "司徒沧霄的师父是谁？", "谁是古墓派的掌门？"]
MSGS = '"messages": [{"role": "user", "content": "你好"}]'
MALFORMED = [  # each must get a 400 in OpenAI's shape, and nobody else may notice
    f'{{{MSGS}, "temperature": NaN}}', f'{{{MSGS}, "seed": 100000000000000000000000}}',
    f'{{{MSGS}, "top_p": 1.5}}', f'{{{MSGS}, "top_k": 100000000}}', f'{{{MSGS}, "temperature": -1}}',
    f'{{{MSGS}, "max_tokens": "many"}}', f'{{{MSGS}, "stream_options": "yes", "stream": true}}',
    f'{{{MSGS}, "stop": {json.dumps(["x"] * 50)}}}', '{"messages": "hi"}', "[" * 50_000, "{not json",
]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def poll_health(base: str, stop, out) -> None:
    """In its own process, so that the 64 client threads' GIL does not count as server latency."""
    lat, waiting = [], 0
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = http.get(base + "/health")
            lat.append(time.perf_counter() - t0)
            waiting = max(waiting, r.json()["waiting"])
            time.sleep(0.05)
    out.put((lat, waiting))


def soak_client(base: str, idx: int, deadline: float, tokens: int, counter, stats: Counter, greedy: dict,
                lock: threading.Lock) -> None:
    leaver = idx % 3 == 0  # a third of the clients leave mid-stream
    with httpx.Client(timeout=300) as http:
        while time.time() < deadline:
            n = next(counter)
            if n % 10 == 9:
                r = http.post(base + "/v1/chat/completions", content=MALFORMED[n // 10 % len(MALFORMED)].encode())
                ok = r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
                with lock:
                    stats["malformed 400" if ok else f"malformed got {r.status_code}"] += 1
                    stats["5xx"] += r.status_code >= 500
                continue
            q = QUESTIONS[n % len(QUESTIONS)]
            temperature = 0.0 if n % 2 else 0.8
            body = {"messages": [{"role": "user", "content": q}], "max_tokens": tokens, "stream": True,
                    "temperature": temperature, "seed": n}
            text, finish, done, error = "", None, False, None
            with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    with lock:
                        stats[f"good got {r.status_code}"] += 1
                        stats["5xx"] += r.status_code >= 500
                    continue
                chunks = 0
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            error = ev["error"]["message"]
                            continue
                        choice = ev["choices"][0]
                        text += choice["delta"].get("content") or ""
                        finish = choice["finish_reason"] or finish
                        chunks += 1
                        if leaver and chunks == 4:
                            break
            with lock:
                if leaver and chunks >= 4 and not done:
                    stats["left mid-stream"] += 1
                elif done and finish in ("stop", "length") and error is None:
                    stats["good complete"] += 1
                    if temperature == 0:
                        first = greedy.setdefault(q, text)
                        stats["greedy same as the first" if text == first else "greedy DIFFERENT"] += 1
                else:
                    stats["good INCOMPLETE"] += 1
                    print(f"incomplete: finish={finish} done={done} error={error}", flush=True)


def big_bodies(base: str, deadline: float, stats: Counter, lock: threading.Lock) -> None:
    """One 5 MB body a minute: refused with a 413 before it is read."""
    while True:
        r = httpx.post(base + "/v1/chat/completions", content=b" " * (5 << 20), timeout=60)
        with lock:
            stats["5 MB body 413" if r.status_code == 413 else f"5 MB body got {r.status_code}"] += 1
            stats["5xx"] += r.status_code >= 500
        if time.time() + 60 > deadline:
            return
        time.sleep(60)


def start_server(run_dir: Path, batcher: str = "main") -> tuple[subprocess.Popen, str]:
    """A server in its own process and its base URL. batcher "main": `miniglm serve` (decoding on its main
    thread); "thread": the app with its batcher in a thread of its own, uvicorn on the main thread (how
    `miniglm serve` ran before 2026-11-30, and how the tests run it); "src=DIR": `miniglm serve` from the
    source tree DIR (e.g. a git worktree of an older commit), to compare versions in one run."""
    cmd = ["-m", "miniglm.cli", "serve", "--run", str(run_dir), "--port", "0", "--device", "cpu"]
    src = Path(batcher[4:]).resolve() if batcher.startswith("src=") else ROOT
    if batcher == "thread":
        cmd = [__file__, "--serve-threaded", str(run_dir)]
    proc = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, text=True, cwd=src,
                            env={**os.environ, "PYTHONPATH": str(src)})
    line = proc.stdout.readline()
    if not line.startswith("serving"):
        sys.exit(f"the server did not start: {line}")
    return proc, line.split(" on ")[1].split()[0]


def serve_threaded(run_dir: str) -> None:
    import uvicorn

    sock = listen("127.0.0.1", 0)
    app = create_app(load_run(run_dir, "cpu"))
    print(f"serving {run_dir} on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


def soak(args: argparse.Namespace) -> None:
    run_dir = Path(args.run) if args.run else random_run(Path(tempfile.mkdtemp(prefix="miniglm-serve-")))
    proc, base = start_server(run_dir)
    rss0 = rss_mb(proc.pid)
    stop, out = multiprocessing.Event(), multiprocessing.Queue()
    poller = multiprocessing.Process(target=poll_health, args=(base, stop, out))
    poller.start()
    stats, greedy, lock, counter = Counter(), {}, threading.Lock(), itertools.count()
    deadline = time.time() + args.duration
    threads = [threading.Thread(target=soak_client, args=(base, i, deadline, args.tokens, counter, stats, greedy,
                                                          lock)) for i in range(args.clients)]
    threads.append(threading.Thread(target=big_bodies, args=(base, deadline, stats, lock)))
    t0 = time.time()
    for t in threads:
        t.start()
    peak = rss0
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mb(proc.pid))
        time.sleep(1)
    wall = time.time() - t0
    rss1 = rss_mb(proc.pid)
    stop.set()
    lat, waiting = out.get()
    poller.join()
    proc.send_signal(signal.SIGTERM)
    t1 = time.time()
    proc.wait(timeout=30)
    exit_s = time.time() - t1
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(dict(stats), flush=True)
    rows = [[f"{wall:.0f}", args.clients, stats["good complete"], stats["good INCOMPLETE"], stats["left mid-stream"],
             stats["malformed 400"], stats["5 MB body 413"], stats["5xx"],
             f"{stats['greedy same as the first']}/{stats['greedy same as the first'] + stats['greedy DIFFERENT']}",
             waiting, f"{rss0:.0f} → {rss1:.0f} (peak {peak:.0f})", f"{rss1 - rss0:+.0f}",
             f"{statistics.median(lat) * 1000:.1f}", f"{p99 * 1000:.1f}", f"{lat[-1] * 1000:.0f}", f"{exit_s:.1f}"]]
    body = table(["s", "clients", "good complete", "good incomplete", "left mid-stream", "malformed → 400",
                  "5 MB → 413", "5xx", "greedy identical", "max waiting", "server RSS MB", "RSS growth MB",
                  "/health p50 ms", "/health p99 ms", "/health max ms", "SIGTERM exit s"], rows)
    other = {k: v for k, v in stats.items() if "got" in k}
    body += (f"\n\n`miniglm serve` (default --max-batch 32) in its own process; {args.clients} streaming chat clients "
             f"(threads of one process, max_tokens {args.tokens}, greedy and sampled alternately), a third leaving "
             f"after 4 chunks, 1 request in 10 malformed ({len(MALFORMED)} kinds), a 5 MB body a minute; "
             f"/health polled every 50 ms from another process; model: {run_dir}"
             + (f"; unexpected statuses: {other}" if other else ""))
    record("Serving soak (bench/serve.py --soak)", body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--tokens", type=int, default=None,
                    help="tokens per request (default 96; --soak: 48)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--repeats", type=int, default=3, help="engine / one-stream pairs; each figure is the best")
    ap.add_argument("--batchers", default="main",
                    help="servers side by side, comma-separated: main (`miniglm serve`), thread (the batcher in "
                         "a thread, as before), src=DIR (`miniglm serve` from another source tree, e.g. a worktree "
                         "of an older commit)")
    ap.add_argument("--soak", action="store_true", help="the robustness soak instead of the throughput table")
    ap.add_argument("--duration", type=float, default=180, help="--soak: seconds of traffic")
    ap.add_argument("--clients", type=int, default=64, help="--soak: streaming clients")
    ap.add_argument("--serve-threaded", metavar="RUN", help=argparse.SUPPRESS)  # start_server's "thread"
    args = ap.parse_args()
    if args.serve_threaded:
        return serve_threaded(args.serve_threaded)
    if args.soak:
        args.tokens = args.tokens or 48
        return soak(args)
    args.tokens = args.tokens or 96
    run_dir = Path(args.run) if args.run else random_run(Path(tempfile.mkdtemp(prefix="miniglm-serve-")))
    engine = load_run(run_dir, "cpu").engine  # decoding on this process's main thread, as `miniglm generate`
    prompt = engine.tokenizer.encode(PROMPT)
    batchers = args.batchers.split(",")
    servers = {b: start_server(run_dir, b) for b in batchers}
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            for _, base in servers.values():  # warm-up: the client's imports, each server's first request
                pool.apply(clients, (base, 1, 1, 8))
            engine_stream(engine, prompt, 8, 0)
            batcher_stream(engine, prompt, 8, 0)
            e_runs, b_runs, s_runs = [], [], {b: [] for b in batchers}
            for rep in range(args.repeats):  # interleaved, so that all see the same machine
                e_runs.append(engine_stream(engine, prompt, args.tokens, rep))
                b_runs.append(batcher_stream(engine, prompt, args.tokens, rep))
                for b, (_, base) in servers.items():
                    s_runs[b] += pool.apply(clients, (base, 1, 1, args.tokens))[1]
            e_tok_s, e_first = max(e_runs)
            one_rows = []
            for b in batchers:
                s = max(s_runs[b], key=lambda r: (r["tokens"] - 1) / r["decode"])
                s_tok_s = (s["tokens"] - 1) / s["decode"]
                one_rows.append([b, f"{e_tok_s:,.0f}", f"{max(b_runs):,.0f} ({max(b_runs) / e_tok_s:.2f})",
                                 f"{s_tok_s:,.0f}", f"{s_tok_s / e_tok_s:.2f}",
                                 f"{e_first:.3f}", f"{statistics.median(r['ttft'] for r in s_runs[b]):.3f}"])
                print(" | ".join(map(str, one_rows[-1])), flush=True)
            rows = []
            for n in (1, 8, 32):
                for b, (_, base) in servers.items():
                    wall, results = pool.apply(clients, (base, n, args.requests, args.tokens))
                    lat = sorted(r["latency"] for r in results)
                    p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
                    total = sum(r["tokens"] for r in results)
                    rows.append([b, n, len(results), f"{total / wall:,.0f}",
                                 f"{statistics.median(r['ttft'] for r in results):.3f}",
                                 f"{statistics.median(lat):.2f}", f"{p95:.2f}"])
                    print(" | ".join(map(str, rows[-1])), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    body = table(["batcher", "engine b=1 tok/s", "Batcher alone, no HTTP (/ engine)", "one stream tok/s",
                  "stream / engine", "engine first chunk s",
                  "stream TTFT s (p50)"], one_rows)
    body += "\n\n" + table(["batcher", "clients", "requests", "aggregate tok/s", "TTFT p50 s", "latency p50 s",
                             "latency p95 s"], rows)
    body += (f"\n\n{args.tokens} tokens per request (max_tokens with ignore_eos, temperature 1, a seed), streaming "
             f"/v1/completions; each server in its own process (batcher main: `miniglm serve`; thread: the batcher "
             f"in a thread of its own), the clients in another; tokens/s of one stream and of the engine (in this "
             f"process, on its main thread) count from the first text to the last (best of {args.repeats} "
             f"interleaved rounds); model: {run_dir}; torch threads {torch.get_num_threads()}")
    record("Serving (bench/serve.py)", body)


if __name__ == "__main__":
    main()
