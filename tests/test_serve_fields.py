"""The server's request model (issue 22): OpenAI fields honoured (logprobs, logit_bias, max_completion_tokens)
or refused with a 400 naming them, invalid text refused, an API key asked for and missing refuses to start,
and dropped clients leave no traceback in the log."""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from miniglm.chat import load_run

from .conftest import chat_run_fixture
from .test_serve import AUTH, running_server

ROOT = Path(__file__).resolve().parents[1]
MSGS = [{"role": "user", "content": "天下"}]

run_dir = chat_run_fixture(block_size=128, n_layer=1)


@pytest.fixture(scope="module")
def server(run_dir):
    with running_server(run_dir) as running:
        yield running[0]


def post(base: str, path: str, body, raw: bool = False) -> httpx.Response:
    content = body if raw else json.dumps(body).encode()
    return httpx.post(base + path, content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=60)


def chat(base: str, **fields) -> httpx.Response:
    return post(base, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, **fields})


def completion(base: str, **fields) -> httpx.Response:
    return post(base, "/v1/completions", {"prompt": "天下", "max_tokens": 2, **fields})


def assert_400(r: httpx.Response, param: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error", err
    assert err["param"] == param, err
    return err


# --- F: fields refused, metadata accepted ------------------------------------------------------------

REFUSED_CHAT = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("n", 2),
    ("stream_options", {"include_usage": True, "continuous_usage_stats": True}),
    ("modalities", ["text", "audio"]),
    ("reasoning_effort", "high"),
    ("echo", True),  # a completions field
    ("no_such_field", 1),
]
REFUSED_COMPLETIONS = [("echo", True), ("suffix", "。"), ("best_of", 3), ("presence_penalty", 1.0),
                       ("frequency_penalty", 0.1), ("logprobs", 6), ("logprobs", True), ("logprobs", -1),
                       ("top_logprobs", 2),
                       ("tools", [])]
ACCEPTED_CHAT = {"model": "anything", "user": "u1", "metadata": {"k": "v"}, "store": False, "n": 1, "seed": 3,
                 "stream": False, "stop": ["。"], "temperature": 0.7, "tools": [], "tool_choice": "none",
                 "response_format": {"type": "text"}, "presence_penalty": 0, "frequency_penalty": 0.0,
                 "parallel_tool_calls": True, "logprobs": False, "stream_options": {"include_usage": True}}
ACCEPTED_COMPLETIONS = {"model": "x", "user": "u", "echo": False, "suffix": None, "best_of": 1, "n": 1,
                        "presence_penalty": 0, "logprobs": False, "seed": 1}


@pytest.mark.parametrize(("field", "value"), REFUSED_CHAT, ids=[f"{f}={v!r}"[:40] for f, v in REFUSED_CHAT])
def test_unsupported_chat_fields_are_a_400_naming_them(server, field, value):
    param = "stream_options.continuous_usage_stats" if field == "stream_options" else field
    err = assert_400(chat(server, **{field: value}), param)
    assert param in err["message"]


@pytest.mark.parametrize(("field", "value"), REFUSED_COMPLETIONS, ids=[f"{f}={v!r}" for f, v in REFUSED_COMPLETIONS])
def test_unsupported_completions_fields_are_a_400_naming_them(server, field, value):
    assert_400(completion(server, **{field: value}), field)


def test_metadata_and_values_that_ask_for_nothing_are_accepted(server):
    r = chat(server, **ACCEPTED_CHAT)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None
    r = completion(server, **ACCEPTED_COMPLETIONS)
    assert r.status_code == 200, r.text


def test_content_parts_other_than_text_are_refused_not_dropped(server):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    parts = [{"type": "text", "text": "这是什么？"}, image]
    err = assert_400(chat(server, messages=[{"role": "user", "content": parts}]), "messages[0].content[1]")
    assert "image_url" in err["message"]
    assert_400(chat(server, messages=[{"role": "user", "content": ["text"]}]), "messages[0].content[0]")
    assert_400(chat(server, messages=[{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]),
               "messages[0].tool_calls")
    # text parts alone are the text
    r = chat(server, messages=[{"role": "user", "content": [{"type": "text", "text": "天"}, {"type": "text",
                                                                                             "text": "下"}]}],
             temperature=0)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == \
        chat(server, temperature=0).json()["choices"][0]["message"]["content"]


def test_max_completion_tokens_is_preferred_and_a_differing_max_tokens_is_a_400(server):
    body = {"messages": MSGS, "ignore_eos": True, "temperature": 0}
    r = post(server, "/v1/chat/completions", {**body, "max_completion_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = post(server, "/v1/chat/completions", {**body, "max_completion_tokens": 4, "max_tokens": 4})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    err = assert_400(post(server, "/v1/chat/completions", {**body, "max_completion_tokens": 3, "max_tokens": 9}),
                     "max_tokens")
    assert "max_completion_tokens" in err["message"]
    assert_400(post(server, "/v1/chat/completions", {**body, "max_completion_tokens": 0}), "max_completion_tokens")
    assert_400(post(server, "/v1/chat/completions", {**body, "max_completion_tokens": 10_000}),
               "max_completion_tokens")


# --- F: logit_bias ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ['{"1": NaN}', '{"1": Infinity}', '{"1": -Infinity}', '{"1": 101}', '{"1": "5"}',
                                 '{"1": true}', '{"abc": 1}', '{"-1": 1}', '{"400": 1}', '{"99999999999": 1}',
                                 '[1, 2]', '{"1.5": 1}'])
def test_bad_logit_bias_is_a_400(server, raw):
    body = '{"messages": [{"role": "user", "content": "x"}], "logit_bias": ' + raw + "}"
    assert_400(post(server, "/v1/chat/completions", body.encode(), raw=True), "logit_bias")


def test_logit_bias_steers_sampling(server, run_dir):
    tok = load_run(run_dir, "cpu").engine.tokenizer
    (tian,) = tok.encode("天")
    for path, body in (("/v1/chat/completions", {"messages": MSGS}), ("/v1/completions", {"prompt": "天下"})):
        for temperature in (0, 1.0):  # greedy and sampled rows alike
            r = post(server, path, {**body, "max_tokens": 6, "ignore_eos": True, "temperature": temperature,
                                    "seed": 5, "logit_bias": {str(tian): 100}})
            choice = r.json()["choices"][0]
            assert (choice.get("message") or {}).get("content", choice.get("text")) == "天" * 6, r.text
    # -100 on the greedy answer's first token: another first token
    plain = post(server, "/v1/completions", {"prompt": "天下", "max_tokens": 1, "temperature": 0, "logprobs": 0,
                                             "ignore_eos": True}).json()["choices"][0]["logprobs"]["tokens"][0]
    first = tok.encode(plain)[0] if not plain.startswith("bytes:") else None
    if first is not None:
        r = post(server, "/v1/completions", {"prompt": "天下", "max_tokens": 1, "temperature": 0, "logprobs": 0,
                                             "ignore_eos": True, "logit_bias": {str(first): -100}})
        assert r.json()["choices"][0]["logprobs"]["tokens"][0] != plain


# --- F: logprobs --------------------------------------------------------------------------------------

def test_chat_logprobs_in_openais_shape(server, run_dir):
    """Chat logprobs: one entry per new token, each with its top alternatives, the model's own distribution
    (log_softmax of its logits); greedy picks the top one. The stream carries the same entries."""
    import torch

    from .test_serve import client

    r = client(server).chat.completions.create(model="run", messages=MSGS, max_tokens=6, temperature=0,
                                               logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for e in content:
        assert len(e.top_logprobs) == 3 and e.token == e.top_logprobs[0].token
        assert e.logprob == e.top_logprobs[0].logprob <= 0
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.token == bytes(e.bytes).decode() or e.token.startswith("bytes:")
    # the first token's logprob is the model's own, from a plain forward pass
    run = load_run(run_dir, "cpu")
    ids, _ = run.prompt(MSGS)
    with torch.no_grad():
        logits = run.engine.model(torch.tensor([ids]))[0][0, -1].float()
    expect = torch.log_softmax(logits, -1)
    top = torch.topk(expect, 3)
    assert math.isclose(content[0].logprob, top.values[0].item(), rel_tol=1e-4, abs_tol=1e-4)
    # streamed: the same entries, spread over the chunks
    stream = client(server).chat.completions.create(model="run", messages=MSGS, max_tokens=6, temperature=0,
                                                    logprobs=True, top_logprobs=3, stream=True,
                                                    extra_body={"ignore_eos": True})
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert all(math.isclose(a.logprob, b.logprob, abs_tol=1e-5) for a, b in zip(streamed, content, strict=True))
    # logprobs without alternatives; top_logprobs out of range or without logprobs
    r = chat(server, logprobs=True, max_tokens=3, ignore_eos=True)
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(e["top_logprobs"] == [] for e in entries)
    assert_400(chat(server, logprobs=True, top_logprobs=21), "top_logprobs")
    assert_400(chat(server, top_logprobs=2), "top_logprobs")
    assert_400(chat(server, logprobs=1), "logprobs")


def test_completions_logprobs_in_the_legacy_shape(server):
    r = completion(server, logprobs=2, max_tokens=5, ignore_eos=True, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert all(len(top) <= 2 and max(top.values()) == x for top, x in zip(lp["top_logprobs"], lp["token_logprobs"],
                                                                           strict=True))
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    streamed = []
    with httpx.stream("POST", server + "/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "天下", "max_tokens": 5, "ignore_eos": True, "temperature": 0, "logprobs": 2,
                            "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                streamed += (choice["logprobs"] or {}).get("tokens", [])
    assert streamed == lp["tokens"]


# --- C: invalid text ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "system", "content": "\\udfff"}, {"role": "user", '
                             '"content": "x"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"]}', "stop[0]"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "user": "\\udc80"}', "user"),
    ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt": ["\\ud800"]}', "prompt[0]"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, path, raw, param):
    err = assert_400(post(server, path, raw.encode(), raw=True), param)
    assert err["code"] == "invalid_text"


def test_invalid_bytes_in_the_body_are_a_400(server):
    # a surrogate encoded as UTF-8 bytes (CESU-8): json's bytes reader lets it through as a lone surrogate
    raw = b'{"prompt": "a\xed\xa0\x80b"}'
    assert_400(post(server, "/v1/completions", raw, raw=True), "prompt")
    r = post(server, "/v1/completions", b'{"prompt": "a\xff\xfeb"}', raw=True)  # not UTF-8 at all
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = post(server, "/v1/completions", b'{"prompt": "x", "\\ud800": 1}', raw=True)  # in a key
    assert r.status_code == 400 and r.json()["error"]["param"] == "\\ud800"
    # and the server goes on serving
    assert completion(server).status_code == 200


# --- G: an API key asked for must be there ------------------------------------------------------------

@pytest.mark.parametrize(("args", "env", "says"), [
    (["--api-key-env", "MINIGLM_TEST_KEY"], {}, "MINIGLM_TEST_KEY"),
    (["--api-key-env", "MINIGLM_TEST_KEY"], {"MINIGLM_TEST_KEY": ""}, "MINIGLM_TEST_KEY"),
    (["--api-key-env", "MINIGLM_TEST_KEY"], {"MINIGLM_TEST_KEY": "  "}, "MINIGLM_TEST_KEY"),
    (["--api-key", ""], {}, "--api-key"),
    ([], {"MINIGLM_API_KEY": ""}, "MINIGLM_API_KEY"),
])
def test_an_api_key_asked_for_and_empty_refuses_to_start(run_dir, monkeypatch, capsys, args, env, says):
    from miniglm import cli, serve

    monkeypatch.delenv("MINIGLM_API_KEY", raising=False)
    monkeypatch.delenv("MINIGLM_TEST_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(serve, "serve", lambda *a, **k: pytest.fail("the server started"))
    assert cli.main(["serve", "--run", str(run_dir), "--port", "0", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("miniglm: error:") and says in err, err


@pytest.mark.parametrize(("args", "env", "key"), [
    (["--api-key-env", "MINIGLM_TEST_KEY"], {"MINIGLM_TEST_KEY": "k1"}, "k1"),
    (["--api-key", "k2"], {"MINIGLM_API_KEY": "other"}, "k2"),
    ([], {"MINIGLM_API_KEY": "k3"}, "k3"),
    ([], {}, None),  # nothing asked for: open (serve logs a line saying so)
])
def test_the_api_key_comes_from_the_option_that_asked(run_dir, monkeypatch, args, env, key):
    from miniglm import cli, serve

    monkeypatch.delenv("MINIGLM_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = []
    monkeypatch.setattr(serve, "serve", lambda run, host, port, api_key, *rest: got.append(api_key))
    assert cli.main(["serve", "--run", str(run_dir), "--port", "0", *args]) == 0
    assert got == [key]


# --- L: dropped clients are normal --------------------------------------------------------------------

def raw_request(port: int, body: bytes, length: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body)
    return s


def test_dropped_clients_leave_no_traceback(run_dir):
    """Clients that close mid-stream (FIN or RST) and mid-body, then a shutdown with a body half sent: the
    server keeps serving, and its log has no traceback: the open-server line, uvicorn's one line for the
    request it cancels at shutdown, and `interrupted`."""
    env = {k: v for k, v in os.environ.items() if k != "MINIGLM_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "miniglm.cli", "serve", "--run", str(run_dir), "--port", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving"), line
        base = line.split(" on ")[1].split()[0]
        port = int(base.rsplit(":", 1)[1])
        stream = json.dumps({"messages": MSGS, "max_tokens": 100, "stream": True, "ignore_eos": True}).encode()
        for rst in (False, True, False, True):
            s = raw_request(port, stream)
            got = b""
            while not re.search(rb'"content": ?"[^"]', got):  # the stream has started sending text
                got += s.recv(4096)
            if rst:  # an abortive close: RST, not FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
            s = raw_request(port, b'{"messages": [{"role": "us', length=500)  # mid-body
            time.sleep(0.1)
            s.close()
        time.sleep(0.5)
        health = httpx.get(base + "/health").json()
        assert health["active"] == 0 and health["waiting"] == 0
        r = httpx.post(base + "/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200  # no key: open
        held = raw_request(port, b'{"messages": [', length=500)  # still sending its body at shutdown
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        held.close()
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "ClientDisconnect" not in err and "CancelledError" not in err, err
    assert lines[0].startswith("miniglm: no API key") and lines[-1] == "miniglm: interrupted", err
    assert len(lines) <= 3, err  # + at most uvicorn's "Cancel 1 running task(s)" for the held body


def test_the_printed_url_brackets_an_ipv6_host():
    from miniglm.serve import base_url

    assert base_url("::1", 8000) == "http://[::1]:8000" and base_url("127.0.0.1", 80) == "http://127.0.0.1:80"
