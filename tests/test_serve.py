import json
import threading
import time
from contextlib import contextmanager

import httpx2 as httpx
import pytest

from miniglm.batcher import Batcher, Job
from miniglm.chat import load_run
from miniglm.engine import Engine, SamplingParams
from tests.helpers import favours_special_tokens

from .conftest import chat_run_fixture, make_chat_run

run_dir = chat_run_fixture(block_size=320, n_layer=2)


@contextmanager
def running_server(run_dir, api_key="sekret"):
    """A real uvicorn on a loopback port (base URL, app), stopped on leaving."""
    import uvicorn

    from miniglm.serve import create_app, listen

    app = create_app(load_run(run_dir, "cpu"), api_key=api_key)
    sock = listen("127.0.0.1", 0)  # the server's own: TCP_NODELAY on its connections
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if httpx.get(base + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield base, app
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(run_dir):
    """A real uvicorn on a loopback port, stopped after the module."""
    with running_server(run_dir) as running:
        yield running


def client(base, key="sekret"):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=30)


def test_models_and_health(server):
    base, _ = server
    assert httpx.get(base + "/health").json()["status"] == "ok"
    models = client(base).models.list()
    assert [m.id for m in models.data] == ["run"]
    assert "<html" in httpx.get(base + "/").text


def test_chat_plain_and_streaming_agree(server, run_dir):
    base, _ = server
    c = client(base)
    msgs = [{"role": "user", "content": "司徒沧霄的师父是谁？"}]
    r = c.chat.completions.create(model="run", messages=msgs, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    stream = c.chat.completions.create(model="run", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = [ch for ch in stream]
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text and "\ufffd" not in streamed
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # the same as the engine alone, with the run's template
    run = load_run(run_dir, "cpu")
    ids, stops = run.prompt(msgs)
    alone = run.engine.generate([ids], SamplingParams(max_new_tokens=12, stop_ids=stops))[0]
    assert alone.text == text


def test_chinese_text_intact_through_completions(server):
    base, _ = server
    c = client(base)
    r = c.completions.create(model="run", prompt="话说天下大势，", max_tokens=10, temperature=0)
    s = "".join(ch.choices[0].text for ch in c.completions.create(model="run", prompt="话说天下大势，",
                                                                 max_tokens=10, temperature=0, stream=True))
    assert s == r.choices[0].text


def test_errors_in_openai_shape(server):
    from openai import AuthenticationError, BadRequestError

    base, _ = server
    with pytest.raises(AuthenticationError):
        client(base, key="wrong").chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(BadRequestError, match="context"):
        client(base).chat.completions.create(model="run", messages=[{"role": "user", "content": "长" * 300}])
    with pytest.raises(BadRequestError, match="temperature"):
        client(base).chat.completions.create(model="run", messages=[{"role": "user", "content": "x"}],
                                             temperature=9)
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(base + "/v1/chat/completions", json={"messages": "hi"}, headers={"Authorization": "Bearer sekret"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_disconnect_stops_generation(server):
    base, app = server
    batcher = app.state.batcher
    with httpx.stream("POST", base + "/v1/chat/completions", headers={"Authorization": "Bearer sekret"},
                      json={"messages": [{"role": "user", "content": "天下"}], "max_tokens": 80, "stream": True,
                            "stop": ["never-appears"], "temperature": 1.0, "seed": 1}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    for _ in range(100):
        if not batcher.active:
            break
        time.sleep(0.05)
    assert not batcher.active


@pytest.mark.parametrize("graphs", [False, True])  # True: the static step CUDA replays as graphs (CPU: no graph)
def test_joining_mid_decode_gives_the_same_tokens(run_dir, graphs):
    run = load_run(run_dir, "cpu")
    eng: Engine = run.engine
    tok = eng.tokenizer
    a_prompt = tok.encode("天下大势，分久必合")
    b_prompt = tok.encode("司徒沧霄与蔡尘淑是至交好友。司徒沧霄惯用的兵器是")
    params = SamplingParams(max_new_tokens=30)
    alone_a = eng.generate([a_prompt], params)[0].ids
    alone_b = eng.generate([b_prompt], SamplingParams(max_new_tokens=20))[0].ids
    server = Engine(eng.model, tok, graphs=graphs)
    batcher = Batcher(server.model, tok, step=server.forward_step)  # as the server: DecodeStep over padded rows
    done = {}
    events = threading.Event()

    def on(name):
        def handle(ev):
            if ev.get("done"):
                done[name] = ev
                events.set()
        return handle

    a = batcher.submit(Job(a_prompt, params, on("a")))
    while batcher.steps < 5:  # let A decode a few steps, then B joins (with a longer prompt than A's)
        time.sleep(0.001)
    b = batcher.submit(Job(b_prompt, SamplingParams(max_new_tokens=20), on("b")))
    deadline = time.time() + 30
    while len(done) < 2 and time.time() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert a.row.ids == alone_a and b.row.ids == alone_b


def test_sft_generate_against_the_server(server, tmp_path, monkeypatch):
    """The SFT-data generator talks to this server like to any OpenAI-compatible API."""
    from miniglm.sft.client import ClientOptions
    from miniglm.sft.synth import generate_answers

    base, _ = server
    monkeypatch.setenv("MINIGLM_TEST_KEY", "sekret")
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"question": q}, ensure_ascii=False)
                                                for q in ["黄蓉是谁？", "司徒沧霄是哪里人？"]), encoding="utf-8")
    opts = ClientOptions(base_url=base + "/v1", model="run", api_key_env="MINIGLM_TEST_KEY", timeout=30,
                         max_retries=1, base_delay=0.01, max_delay=0.1)
    summary = generate_answers(tmp_path / "q.jsonl", tmp_path / "a.jsonl", options=opts, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(r["question"] for r in rows) == ["司徒沧霄是哪里人？", "黄蓉是谁？"]
    assert summary.failed == 0 and summary.total_tokens > 0


@pytest.mark.parametrize("graphs", [False, True])
def test_batch_compacts_when_positions_run_out(bpe_dir, tmp_path, graphs):
    """A row that joins late sits behind padding; when the shared positions reach the context, the
    padding every row shares is dropped and decoding goes on, with the same tokens as alone."""
    run = load_run(make_chat_run(tmp_path, bpe_dir, block_size=48, n_layer=1), "cpu")
    eng, tok = run.engine, run.engine.tokenizer
    a_prompt, b_prompt = tok.encode("天下大势"), tok.encode("江湖")
    pa, pb = SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30)
    alone_a = eng.generate([a_prompt], pa)[0].ids
    alone_b = eng.generate([b_prompt], pb)[0].ids
    server = Engine(eng.model, tok, graphs=graphs)
    batcher = Batcher(server.model, tok, step=server.forward_step)
    done = []
    a = batcher.submit(Job(a_prompt, pa, lambda ev: ev.get("done") and done.append("a")))
    while batcher.steps < 20:
        time.sleep(0.001)
    b = batcher.submit(Job(b_prompt, pb, lambda ev: ev.get("done") and done.append("b")))
    deadline = time.time() + 30
    while len(done) < 2 and time.time() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert a.row.ids == alone_a and b.row.ids == alone_b
    assert len(a_prompt) + 20 + len(b.row.ids) > 48  # B outlived the shared positions: a compaction happened


def test_ignore_eos_runs_to_max_tokens(server):
    base, _ = server
    r = httpx.post(base + "/v1/completions", headers={"Authorization": "Bearer sekret"},
                   json={"prompt": "天下", "max_tokens": 25, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 25


def test_skip_special_tokens_field(bpe_dir):
    """The API's skip_special_tokens (vLLM's field): special tokens are left out of the text unless it is false."""
    from miniglm.serve import APIError, sampling_from
    from miniglm.tokenizer import load_tokenizer

    assert sampling_from({}, 4, 64, 400).skip_special_tokens
    assert not sampling_from({"skip_special_tokens": False}, 4, 64, 400).skip_special_tokens
    with pytest.raises(APIError, match="skip_special_tokens"):
        sampling_from({"skip_special_tokens": "no"}, 4, 64, 400)

    tok = load_tokenizer(bpe_dir)
    batcher = Batcher(favours_special_tokens(tok), tok)
    texts, finished = {}, threading.Event()

    def on(name):
        def handle(ev):
            if ev.get("done"):
                texts[name] = ev["text"]
                if len(texts) == 2:
                    finished.set()
        return handle

    prompt = tok.encode("天下大势")
    skip = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)  # a seed whose sample has some
    keep = SamplingParams(max_new_tokens=30, temperature=1.0, seed=1, skip_special_tokens=False)
    a = batcher.submit(Job(prompt, skip, on("skip")))
    batcher.submit(Job(prompt, keep, on("keep")))
    finished.wait(30)
    batcher.stop()
    assert set(a.row.ids) & tok.all_special_ids  # the model did produce some
    # a character the length limit cut short is dropped, not shown as U+FFFD
    assert "<|" not in texts["skip"] and texts["keep"] == tok.decode(a.row.ids).removesuffix("\ufffd")


AUTH = {"Authorization": "Bearer sekret"}
STREAM_PROMPTS = ["天下大势，分久必合", "司徒沧霄与蔡尘淑是至交好友。", "话说天下", "江湖"]


def stream_text(base: str, prompt: str, tokens: int, out: dict) -> None:
    """Stream one greedy completion; out[prompt] = (its text, its events)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    text, events = "", []
    with httpx.stream("POST", base + "/v1/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                events.append(ev)
                if "choices" in ev:
                    text += ev["choices"][0]["text"]
    out[prompt] = (text, events)


def test_bad_requests_hurt_no_one(server, run_dir, one_thread):
    """4 greedy streams decode while bad requests arrive: each bad one gets its own 4xx in OpenAI's
    shape, the 4 streams end with the text they give alone, and /health stays responsive."""
    base, _ = server
    eng = load_run(run_dir, "cpu").engine
    alone = {p: eng.generate([eng.tokenizer.encode(p)], SamplingParams(max_new_tokens=60))[0].text
             for p in STREAM_PROMPTS}
    msgs = '"messages": [{"role": "user", "content": "hi"}]'
    bad = {  # raw bodies: NaN and Infinity are not JSON, but Python's json reads them
        "temperature": f'{{{msgs}, "temperature": NaN}}',
        "top_p": f'{{{msgs}, "top_p": Infinity}}',
        "seed": f'{{{msgs}, "seed": 100000000000000000000000}}',
        "top_k": f'{{{msgs}, "top_k": 100000000}}',
        "max_tokens": f'{{{msgs}, "max_tokens": "10"}}',
        "stop": f'{{{msgs}, "stop": {json.dumps(["x"] * 100)}}}',
        "stream_options": f'{{{msgs}, "stream_options": "yes"}}',
        None: "[" * 100_000,
    }
    results: dict = {}
    health: list[float] = []
    streaming = threading.Event()
    streaming.set()

    def poll_health() -> None:
        with httpx.Client() as http:  # one connection: time the server, not the client's setup
            while streaming.is_set():
                t0 = time.perf_counter()
                assert http.get(base + "/health").status_code == 200
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)

    threads = [threading.Thread(target=stream_text, args=(base, p, 60, results)) for p in STREAM_PROMPTS]
    threads.append(threading.Thread(target=poll_health))
    for t in threads:
        t.start()
    while not app_active(server):
        time.sleep(0.01)
    for param, body in bad.items():
        r = httpx.post(base + "/v1/chat/completions", content=body.encode(), headers=AUTH)
        err = r.json()["error"]
        assert r.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param, r.text
    for body in (b" " * (5 << 20), iter([b" " * (1 << 16)] * 80)):  # by Content-Length; chunked, as it arrives
        r = httpx.post(base + "/v1/chat/completions", content=body, headers=AUTH)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = httpx.get(base + "/no-such-page")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    for t in threads[:-1]:
        t.join()
    streaming.clear()
    threads[-1].join()
    assert {p: text for p, (text, _) in results.items()} == alone
    assert all(events[-1]["choices"][0]["finish_reason"] == "length" for _, events in results.values())
    # median: ~2 ms; 40+ ms is Nagle's algorithm waiting on delayed ACKs (a socket without TCP_NODELAY)
    assert sorted(health)[len(health) // 2] < 0.02, f"/health took {sorted(health)}"
    assert max(health) < 0.1, f"/health took {max(health):.3f}s ({len(health)} calls: {sorted(health)[-5:]})"


def app_active(server) -> bool:
    return bool(server[1].state.batcher.active)


def test_a_failing_row_ends_alone(run_dir, one_thread):
    """A row whose sampling fails (NaN temperature, past the server's check) or whose seed cannot seed
    ends with an error event; the greedy rows beside it give the tokens they give alone."""
    eng = load_run(run_dir, "cpu").engine
    tok = eng.tokenizer
    prompts = [tok.encode(p) for p in STREAM_PROMPTS[:2]]
    alone = [eng.generate([p], SamplingParams(max_new_tokens=30))[0].ids for p in prompts]
    batcher = Batcher(eng.model, tok)
    events: dict = {}

    def on(name):
        return lambda ev: events.setdefault(name, []).append(ev)

    good = [batcher.submit(Job(p, SamplingParams(max_new_tokens=30), on(i))) for i, p in enumerate(prompts)]
    while batcher.steps < 3:
        time.sleep(0.001)
    batcher.submit(Job(prompts[0], SamplingParams(temperature=float("nan")), on("nan")))
    batcher.submit(Job(prompts[1], SamplingParams(temperature=1.0, seed=10**23), on("seed")))
    deadline = time.time() + 30
    while not all(events.get(k) and ("done" in events[k][-1] or "error" in events[k][-1])
                  for k in (0, 1, "nan", "seed")) and time.time() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert [j.row.ids for j in good] == alone
    assert "probability tensor" in events["nan"][-1]["error"] and "error" in events["seed"][-1]


def test_ctrl_c_twice_ends_with_one_line(run_dir):
    """Ctrl-C, then Ctrl-C again at once (a forced exit): `miniglm: interrupted`, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "miniglm.cli", "serve", "--run", str(run_dir), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().startswith("serving")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)  # apart, so that each runs the handler (at once they would coalesce into one)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    # 130, or killed by SIGINT itself when the second one lands after the first has ended it (as a shell sees it)
    assert proc.returncode in (130, -signal.SIGINT), proc.returncode
    assert "Traceback" not in err and err.strip().endswith("miniglm: interrupted"), err


def test_sigterm_with_streams_in_flight_exits_quickly(run_dir):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "miniglm.cli", "serve", "--run", str(run_dir), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line
        base = line.split(" on ")[1].split()[0]
        results: dict = {}
        threads = [threading.Thread(target=stream_text, args=(base, p, 250, results), daemon=True)
                   for p in STREAM_PROMPTS]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while time.time() < deadline and httpx.get(base + "/health").json()["active"] < len(threads):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        t0 = time.time()
        proc.wait(timeout=10)
        assert time.time() - t0 < 5
        for t in threads:
            t.join(timeout=5)
        # every stream in flight ended with an error event saying why; a short one may have reached its
        # 250 tokens between the last /health and the signal (they decode fast here): it ends as usual
        ends = [events[-1] for _, events in results.values()]
        cut = [e for e in ends if "error" in e]
        assert cut and all("error" in e or e["choices"][0]["finish_reason"] == "length" for e in ends), ends
    finally:
        proc.kill()


def test_outbox_hands_over_once_per_step():
    """Events of several steps put before the loop runs reach the request as one list, after one wake-up."""
    import asyncio

    from miniglm.serve import Outbox

    loop = asyncio.new_event_loop()
    try:
        outbox, queue = Outbox(loop), asyncio.Queue()
        scheduled = []
        loop.call_soon_threadsafe = lambda fn: scheduled.append(fn)  # count the hand-overs
        for step in range(3):
            outbox.put(queue, {"delta": str(step)})
            outbox.wake()
        assert len(scheduled) == 1
        scheduled[0]()
        assert queue.get_nowait() == [{"delta": "0"}, {"delta": "1"}, {"delta": "2"}] and queue.empty()
        outbox.put(queue, {"done": True})
        outbox.wake()
        assert len(scheduled) == 2
    finally:
        loop.close()


def test_unseeded_rows_sample_together(run_dir, one_thread):
    """Rows without a seed sample in one call beside a greedy row (alone-identical) and a seeded one."""
    eng = load_run(run_dir, "cpu").engine
    tok = eng.tokenizer
    prompt = tok.encode(STREAM_PROMPTS[0])
    alone = eng.generate([prompt], SamplingParams(max_new_tokens=20))[0].ids
    batcher = Batcher(eng.model, tok)
    done = threading.Semaphore(0)

    def on(ev):
        if ev.get("done"):
            done.release()

    free = [batcher.submit(Job(prompt, SamplingParams(max_new_tokens=20, temperature=1.0), on)) for _ in range(3)]
    greedy = batcher.submit(Job(prompt, SamplingParams(max_new_tokens=20), on))
    seeded = batcher.submit(Job(prompt, SamplingParams(max_new_tokens=20, temperature=1.0, seed=3), on))
    for _ in range(5):
        assert done.acquire(timeout=30)
    batcher.stop()
    assert greedy.row.ids == alone and all(len(j.row.ids) == 20 or j.row.finish_reason == "stop" for j in free)
    assert seeded.row.ids == eng.generate([prompt], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3))[0].ids
