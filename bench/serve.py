"""Serving: 1, 8 and 32 concurrent streaming clients against `miniglm serve` on loopback.

Reports aggregate tokens/s, time to first token and p50/p95 request latency. The server runs in this
process (uvicorn in a thread) on a run folder, or on a random-weight model of the demo's shape.

    .venv/bin/python bench/serve.py [--run runs/demo/sft] [--tokens 96] [--requests 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, record, table  # noqa: E402

from miniglm.chat import load_run  # noqa: E402
from miniglm.serve import create_app  # noqa: E402


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


def client(base: str, n_requests: int, tokens: int, out: list) -> None:
    with httpx.Client(timeout=600) as http:
        for i in range(n_requests):
            t0 = time.perf_counter()
            first, count = None, 0
            body = {"prompt": "司徒沧霄与蔡尘淑是至交好友。", "max_tokens": tokens, "stream": True,
                    "temperature": 1.0, "seed": i, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
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
                        first = first or time.perf_counter() - t0
            out.append({"ttft": first or 0.0, "latency": time.perf_counter() - t0, "tokens": count})


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default=None)
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per request (prompt + tokens <= context)")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    args = ap.parse_args()
    run_dir = Path(args.run) if args.run else random_run(Path(tempfile.mkdtemp(prefix="miniglm-serve-")))
    app = create_app(load_run(run_dir, "cpu"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while True:
        try:
            httpx.get(base + "/health")
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    rows = []
    for n in (1, 8, 32):
        results: list[dict] = []
        threads = [threading.Thread(target=client, args=(base, args.requests, args.tokens, results)) for _ in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lat = sorted(r["latency"] for r in results)
        total = sum(r["tokens"] for r in results)
        rows.append([n, len(results), f"{total / wall:,.0f}", f"{statistics.median(r['ttft'] for r in results):.3f}",
                     f"{statistics.median(lat):.2f}", f"{lat[min(len(lat) - 1, int(0.95 * len(lat)))]:.2f}"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    server.should_exit = True
    body = table(["clients", "requests", "aggregate tok/s", "TTFT p50 s", "latency p50 s", "latency p95 s"], rows)
    body += (f"\n\n{args.tokens} tokens per request (max_tokens with ignore_eos), streaming "
             f"/v1/completions, model: {run_dir}; torch threads {torch.get_num_threads()}")
    record("Serving (bench/serve.py)", body)


if __name__ == "__main__":
    main()
