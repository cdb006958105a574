"""`miniglm serve`: an OpenAI-compatible HTTP API and a web chat page (FastAPI + uvicorn).

  GET  /health               {"status": "ok"}
  GET  /v1/models            the run's model
  POST /v1/chat/completions  messages rendered with the run's chat template; stream=true sends SSE chunks
  POST /v1/completions       raw text continuation
  GET  /                     the chat page

Concurrent requests are decoded together by the Batcher; a client that disconnects stops its row.
The batcher hands each step's events to the event loop at once (Outbox: one wake-up per step), and a
stream writes what one wake-up brought as one event, framed ahead (only its text is encoded per event).
Requests past --max-batch wait in order for a free row (a stream is answered at once, its first chunk
then comes when its row starts). One request model (parse_request, REQUEST_FIELDS) reads every body:
each field is honoured, harmless metadata, or refused with a 400 naming it. Every error is OpenAI's JSON
error shape: 400 for malformed JSON, invalid text, unsupported or unknown fields, fields out of range
(engine.SamplingParams.validate) and prompts past the context, 401 for a wrong API key, 413 for a body
over --max-body, 500/503 for a failed row or a shutdown. A failure in one row ends that row only; a
shutdown (SIGTERM, Ctrl-C) ends every stream with an error event first. A client that goes away is
normal: nothing is logged (QuietDisconnects).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from miniglm.batcher import Batcher, Job
from miniglm.chat import LoadedRun, load_run
from miniglm.engine import Engine, SamplingError, SamplingParams
from miniglm.fileio import UserError
from miniglm.tokenizer import Tokenizer

PAGE = Path(__file__).with_name("chat_page.html")
MAX_BODY = 1 << 20  # bytes; a chat request is a few kB
API_NAMES = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}  # SamplingParams' names -> the API's


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(e: APIError) -> dict:
    kind = ("authentication_error" if e.status == 401 else "not_found_error" if e.status == 404
            else "invalid_request_error" if e.status < 500 else "api_error")
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


# --- the request model ------------------------------------------------------------------------------
# Every request field the server knows, in one place: what it does with each, and for a field it does not
# implement, the values that ask for nothing (accepted) — any other value is a 400 naming the field, as
# OpenAI answers a field it does not know. A field not in this table is a 400 too ("unrecognized").
HONOURED = "honoured"  # read and acted on (checked for type and range)
METADATA = "accepted"  # harmless metadata: no effect on the answer
REFUSED = "refused"  # a 400 unless its value asks for nothing (null, false, 0, [], "none", ...)


@dataclass(frozen=True)
class Field:
    where: str  # "chat", "completions" or "both"
    treatment: str  # HONOURED, METADATA or REFUSED
    inert: Callable[[Any], bool] | None = None  # REFUSED: the values that ask for nothing
    why: str = "is not supported"


def _null(v) -> bool:
    return v is None


def _false(v) -> bool:
    return v is None or v is False


def _zero(v) -> bool:  # NaN is not 0: refused
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


def _no_list(v) -> bool:
    return v is None or v == []


def _none_choice(v) -> bool:
    return v is None or v == "none"


def _one(v) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1)


REQUEST_FIELDS: dict[str, Field] = {
    # the prompt
    "messages": Field("chat", HONOURED),
    "prompt": Field("completions", HONOURED),
    # sampling (SamplingParams.validate checks each range; top_k, repetition_penalty, ignore_eos and
    # skip_special_tokens are vLLM's extensions)
    "max_completion_tokens": Field("both", HONOURED),
    "max_tokens": Field("both", HONOURED),  # beside max_completion_tokens: must be the same number
    "temperature": Field("both", HONOURED),
    "top_p": Field("both", HONOURED),
    "top_k": Field("both", HONOURED),
    "repetition_penalty": Field("both", HONOURED),
    "stop": Field("both", HONOURED),
    "seed": Field("both", HONOURED),
    "logit_bias": Field("both", HONOURED),
    "logprobs": Field("both", HONOURED),  # chat: true/false; completions: 0..5 (the legacy shape)
    "top_logprobs": Field("chat", HONOURED),
    "ignore_eos": Field("both", HONOURED),
    "skip_special_tokens": Field("both", HONOURED),
    "n": Field("both", REFUSED, _one, "must be 1: one choice per request"),
    # the response's form
    "stream": Field("both", HONOURED),
    "stream_options": Field("both", HONOURED),  # include_usage
    # metadata
    "model": Field("both", METADATA),  # one model per server: any name answers with it
    "user": Field("both", METADATA),
    "metadata": Field("chat", METADATA),
    "store": Field("chat", METADATA),
    "service_tier": Field("both", METADATA),
    "prompt_cache_key": Field("chat", METADATA),
    "safety_identifier": Field("chat", METADATA),
    "parallel_tool_calls": Field("chat", METADATA),  # tools are refused: nothing to call in parallel
    # not implemented: refused unless they ask for nothing
    "tools": Field("chat", REFUSED, _no_list, "is not supported: this server has no tool calling"),
    "tool_choice": Field("chat", REFUSED, _none_choice, "is not supported: this server has no tool calling"),
    "functions": Field("chat", REFUSED, _no_list, "is not supported: this server has no function calling"),
    "function_call": Field("chat", REFUSED, _none_choice, "is not supported: this server has no function calling"),
    "response_format": Field("chat", REFUSED, lambda v: v is None or v == {"type": "text"},
                             'is not supported except {"type": "text"}: no JSON or schema mode'),
    "presence_penalty": Field("both", REFUSED, _zero, "is not supported (0 only); repetition_penalty is"),
    "frequency_penalty": Field("both", REFUSED, _zero, "is not supported (0 only); repetition_penalty is"),
    "echo": Field("completions", REFUSED, _false, "is not supported: the answer never repeats the prompt"),
    "suffix": Field("completions", REFUSED, lambda v: v is None or v == "", "is not supported: no insertion"),
    "best_of": Field("completions", REFUSED, _one, "must be 1: one candidate per request"),
    "modalities": Field("chat", REFUSED, lambda v: v is None or v == ["text"], 'is not supported except ["text"]'),
    "audio": Field("chat", REFUSED, _null, "is not supported: text only"),
    "prediction": Field("chat", REFUSED, _null, "is not supported"),
    "reasoning_effort": Field("chat", REFUSED, _null, "is not supported: not a reasoning model"),
    "verbosity": Field("chat", REFUSED, _null, "is not supported"),
    "web_search_options": Field("chat", REFUSED, _null, "is not supported: no web search"),
}
# the keys of one message: role and content are read; the rest ask for nothing or are metadata
MESSAGE_FIELDS: dict[str, Field] = {
    "role": Field("chat", HONOURED),
    "content": Field("chat", HONOURED),  # a string, or text parts ({"type": "text", "text": ...}) only
    "name": Field("chat", METADATA),
    "refusal": Field("chat", REFUSED, _null),
    "tool_calls": Field("chat", REFUSED, _no_list, "is not supported: this server has no tool calling"),
    "function_call": Field("chat", REFUSED, _null, "is not supported: this server has no function calling"),
    "audio": Field("chat", REFUSED, _null, "is not supported: text only"),
    "annotations": Field("chat", REFUSED, _no_list),
}
MAX_TOP_LOGPROBS = {"chat": 20, "completions": 5}  # OpenAI's limits
LOGIT_BIAS_LIMIT = 100.0


@dataclass
class APIRequest:
    """A request body parsed and checked: what the handlers use. Sampling settings are checked once the
    prompt's length is known (sampling_from)."""
    body: dict
    chat: bool
    messages: list[dict] | None = None
    prompt: str | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    top_logprobs: int | None = None  # None: no logprobs; else how many alternatives per token
    logit_bias: dict[int, float] | None = None


def _field(body: dict, key: str, default):
    value = body.get(key)
    return default if value is None else value


def _flag(body: dict, key: str, default: bool = False, param: str | None = None) -> bool:
    value = _field(body, key, default)
    if not isinstance(value, bool):
        raise APIError(400, f"'{param or key}' must be true or false", param or key)
    return value


def _printable(name: str) -> str:
    return name.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(name, str) else repr(name)


def check_text(body) -> None:
    """Every string in the body (keys too) is valid Unicode text, or a 400 naming where it is not. Python's
    json reads lone surrogates ("\\ud800"), which no tokenizer can encode and no reply can carry."""
    todo = [(body, "")]  # a stack, not recursion: bodies may be nested deep
    while todo:
        value, path = todo.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{_printable(k)}" if path else _printable(k)
                _check_string(k, sub)
                todo.append((v, sub))
        elif isinstance(value, list):
            todo.extend((v, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path)


def _check_string(s: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"'{path or 'body'}' is not valid text: a lone surrogate (U+{ord(s[e.start]):04X}) "
                            f"at character {e.start}", path or None, "invalid_text") from None


def check_fields(obj: dict, table: dict[str, Field], where: str, prefix: str = "") -> None:
    """Each key of obj is known for this endpoint, and a field this server does not implement asks for nothing."""
    for key, value in obj.items():
        param = prefix + key
        spec = table.get(key)
        if spec is None or spec.where not in ("both", where):
            raise APIError(400, f"unrecognized request argument '{param}'"
                                + (f" (a {spec.where} field)" if spec else ""), param, "unknown_parameter")
        if spec.treatment == REFUSED and not spec.inert(value):
            raise APIError(400, f"'{param}' {spec.why}", param, "unsupported_parameter")


def parse_request(body: dict, chat: bool, vocab_size: int) -> APIRequest:
    """The request model: a JSON body -> what the handlers use, or a 400 in OpenAI's shape naming the field."""
    where = "chat" if chat else "completions"
    check_text(body)
    check_fields(body, REQUEST_FIELDS, where)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", "model")
    req = APIRequest(body, chat, stream=_flag(body, "stream"), ignore_eos=_flag(body, "ignore_eos"))
    if chat:
        req.messages = parse_messages(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        req.prompt = prompt
    options = _field(body, "stream_options", {})
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    for key in options:
        if key != "include_usage":
            raise APIError(400, f"'stream_options.{key}' is not supported (include_usage is)",
                           f"stream_options.{key}", "unsupported_parameter")
    req.include_usage = _flag(options, "include_usage", param="stream_options.include_usage")
    req.top_logprobs = _logprobs(body, chat)
    req.logit_bias = _logit_bias(body, vocab_size)
    return req


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: logprobs true (+ top_logprobs 0..20); completions: logprobs 0..5. None: no logprobs."""
    limit = MAX_TOP_LOGPROBS["chat" if chat else "completions"]
    value = body.get("logprobs")
    if chat:
        on = _flag(body, "logprobs")
        top = body.get("top_logprobs")
        if top is None:
            return 0 if on else None
        if not (isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= limit):
            raise APIError(400, f"'top_logprobs' must be an integer from 0 to {limit}", "top_logprobs")
        if not on:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return top
    if value is None or value is False:
        return None
    if not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit):
        raise APIError(400, f"'logprobs' must be an integer from 0 to {limit}", "logprobs")
    return value


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float] | None:
    """{"token id": bias}: ids of this model's vocabulary, biases from -100 to 100, added to the logits."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must be an object of token ids to numbers", "logit_bias")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise APIError(400, f"'logit_bias' has {json.dumps(key)}: not a token id of this model "
                                f"(0 to {vocab_size - 1})", "logit_bias")
        if not (_is_finite(value) and -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT):
            raise APIError(400, f"'logit_bias' of token {key} must be a number from -100 to 100", "logit_bias")
        out[int(key)] = float(value)
    return out or None


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def sampling_from(body: dict, prompt_len: int, block_size: int, vocab_size: int) -> SamplingParams:
    """The request's sampling settings, each checked for type and range, or a 400 naming the field."""
    room = block_size - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {block_size}",
                       "messages", "context_length_exceeded")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, "only n=1 is supported", "n")
    stop = _field(body, "stop", [])
    # max_completion_tokens is OpenAI's name now; max_tokens the older one: one of them, or both the same
    new, old = body.get("max_completion_tokens"), body.get("max_tokens")
    if new is not None and old is not None and (type(new) is not type(old) or new != old):
        raise APIError(400, f"'max_tokens' ({json.dumps(old)}) differs from 'max_completion_tokens' "
                            f"({json.dumps(new)}): send one of them", "max_tokens")
    name = "max_completion_tokens" if new is not None else "max_tokens"
    max_tokens = new if new is not None else _field(body, "max_tokens", min(256, room))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=_field(body, "temperature", 1.0),
                            top_p=_field(body, "top_p", 1.0), top_k=_field(body, "top_k", 0),
                            repetition_penalty=_field(body, "repetition_penalty", 1.0),
                            stop_strings=[stop] if isinstance(stop, str) else stop, seed=body.get("seed"),
                            skip_special_tokens=_flag(body, "skip_special_tokens", True))
    try:
        params.validate(vocab_size)
    except SamplingError as e:
        field_name = {**API_NAMES, "max_new_tokens": name}.get(e.field, e.field)
        raise APIError(400, f"'{field_name}' {e.rule}", field_name) from None
    if params.max_new_tokens < 1:
        raise APIError(400, f"'{name}' must be an integer >= 1", name)
    if prompt_len + params.max_new_tokens > block_size:
        raise APIError(400, f"prompt ({prompt_len} tokens) + {name} ({params.max_new_tokens}) is past this "
                            f"model's context of {block_size} tokens", name, "context_length_exceeded")
    return params


def sse(obj: dict) -> str:
    """One server-sent event holding a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


DELTA = "\x00delta\x00"  # stands for a text event's delta while its frame is built (see respond)


class Outbox:
    """Events from the batcher thread to one event loop, handed over once per decode step: the loop wakes
    once per step, not once per token per request, and a request gets the events of every step since its
    last wake-up as one list (a stream then writes them as one event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: deque[tuple[asyncio.Queue, dict]] = deque()  # appended by the batcher thread
        self.scheduled = False

    def put(self, queue: asyncio.Queue, event: dict) -> None:
        self.events.append((queue, event))

    def wake(self) -> None:
        """The batcher thread, after a step: have the loop deliver what is waiting (once, however many steps)."""
        if self.events and not self.scheduled:
            self.scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _deliver(self) -> None:
        self.scheduled = False  # first: an event put while this runs schedules the next delivery
        batches: dict[asyncio.Queue, list[dict]] = {}
        while self.events:
            queue, event = self.events.popleft()
            batches.setdefault(queue, []).append(event)
        for queue, events in batches.items():
            queue.put_nowait(events)


def longest_token(tok: Tokenizer) -> int | None:
    """The most bytes one token covers, or None if the tokenizer cannot say. A character is at least one
    byte, so a text of more than block_size * this many characters is past the context for sure, and is
    refused without tokenizing it."""
    longest = 1
    for i in range(tok.vocab_size):
        try:
            b = tok.token_bytes(i)
        except Exception:  # tiktoken's vocabulary has unused ids
            continue
        if b is None:
            return None
        longest = max(longest, len(b))
    return longest


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        check_fields(m, MESSAGE_FIELDS, "chat", f"messages[{i}].")
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: text parts only (an image is refused, not dropped)
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    kind = p.get("type") if isinstance(p, dict) and isinstance(p.get("type"), str) else None
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", "
                                        f"\"text\": ...}}) are supported" + (f", not {kind!r}" if kind else ""),
                                   f"messages[{i}].content[{j}]", "unsupported_content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", "messages")
    return out


class QuietDisconnects:
    """A client that goes away mid-body or mid-stream is normal, not an error: nothing is logged (Starlette
    would log a ClientDisconnect traceback per dropped client). Its row, if it had one, is freed by respond.
    At shutdown, a request still sending its body when uvicorn's grace runs out is cancelled: it gets a 503,
    and the log uvicorn's one line ("Cancel 1 running task(s)"), not a CancelledError traceback."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except ClientDisconnect:
            pass
        except asyncio.CancelledError:
            if scope["type"] != "http" or not getattr(self.state, "closing", False):
                raise
            if not started:
                body = json.dumps(error_body(APIError(503, "the server is shutting down"))).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})


def usage(done: dict) -> dict:
    return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}


class Logprobs:
    """One request's logprobs, in the chat shape ({"content": [{token, logprob, bytes, top_logprobs}]})
    or the legacy completions shape ({tokens, token_logprobs, top_logprobs, text_offset}). token_info: a
    token's text and bytes (Service.token_info)."""

    def __init__(self, chat: bool, token_info: Callable[[int], tuple[str, list[int]]]):
        self.chat, self.offset, self.token_info = chat, 0, token_info
        self.decoder = codecs.getincrementaldecoder("utf-8")("ignore")  # text_offset counts whole characters

    def shape(self, entries: list[tuple]) -> dict:
        token_info = self.token_info

        def lp(x: float) -> float:  # JSON has no -inf: OpenAI's floor for the unlikeliest tokens
            return x if math.isfinite(x) else -9999.0

        if self.chat:
            def one(i, x):
                text, raw = token_info(i)
                return {"token": text, "logprob": lp(x), "bytes": raw}

            return {"content": [{**one(t, x), "top_logprobs": [one(i, y) for i, y in top]}
                                for t, x, top in entries], "refusal": None}
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, x, top in entries:
            text, raw = token_info(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp(x))
            out["top_logprobs"].append({token_info(i)[0]: lp(y) for i, y in top})
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(bytes(raw)))
        return out


@dataclass
class Reply:
    """One request's response in OpenAI's shape: a whole body, or the chunks of a stream."""
    id: str  # chatcmpl-... or cmpl-...
    chat: bool
    model: str
    logprobs: Logprobs | None  # None: no logprobs asked for
    created: int

    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def chunk(self, delta: str | None, finish: str | None, first: bool = False, entries: list | None = None) -> dict:
        if self.chat:
            d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d}
        else:
            choice = {"index": 0, "text": delta or ""}
        choice["logprobs"] = self.logprobs.shape(entries) if entries else None
        choice["finish_reason"] = finish
        return {"id": self.id, "object": self.kind() + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model, "choices": [choice]}

    def whole(self, text: str, done: dict, entries: list) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if self.chat
                  else {"index": 0, "text": text})
        choice["logprobs"] = self.logprobs.shape(entries) if self.logprobs else None
        choice["finish_reason"] = done["finish_reason"]
        return {"id": self.id, "object": self.kind(), "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage(done)}


async def whole_reply(reply: Reply, job: Job, queue: asyncio.Queue) -> JSONResponse:
    """A request that does not stream: its row's events to the end, then one body."""
    text, done, entries = "", None, []
    try:
        while done is None:
            for ev in await queue.get():
                if "error" in ev:
                    raise APIError(ev.get("status", 500), ev["error"])
                if "logprob" in ev:
                    entries.append(ev["logprob"])
                text += ev.get("delta", "")
                if ev.get("done"):
                    done = ev
    finally:
        job.cancelled = done is None
    return JSONResponse(reply.whole(text, done, entries))


def stream_reply(reply: Reply, job: Job, queue: asyncio.Queue, include_usage: bool) -> StreamingResponse:
    """A stream: one SSE event per wake-up of the event loop, then the row's end and [DONE]."""
    # Every text event is the same JSON but for its delta: frame it once, encode only the delta per event.
    head, tail = sse(reply.chunk(DELTA, None)).split(json.dumps(DELTA), 1)

    async def events():
        ended = False
        try:
            if reply.chat:
                yield sse(reply.chunk(None, None, first=True))
            while not ended:
                # One body write per wake-up: the text of every step since the last one as one event,
                # then the row's end (its finish and usage, or an error) if it ended.
                delta, end, entries = "", [], []
                for ev in await queue.get():
                    if "error" in ev:  # the row failed, or the server is shutting down
                        end.append(sse(error_body(APIError(ev.get("status", 500), ev["error"]))))
                    elif "logprob" in ev:
                        entries.append(ev["logprob"])
                    else:
                        delta += ev.get("delta", "")
                    if ev.get("done"):
                        end.append(sse(reply.chunk(None, ev["finish_reason"])))
                        if include_usage:
                            end.append(sse({**reply.chunk(None, None), "choices": [], "usage": usage(ev)}))
                ended = bool(end)
                if ended:
                    end.append("data: [DONE]\n\n")
                if entries:  # logprobs asked for: the whole chunk (not the framed one) holds them
                    text = sse(reply.chunk(delta, None, entries=entries))
                else:
                    text = head + json.dumps(delta, ensure_ascii=False) + tail if delta else ""
                yield text + "".join(end)
        finally:
            if not ended:  # the client went away: free its row
                job.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's JSON error shape, whatever raised it."""
    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e), status_code=e.status)

    @app.exception_handler(HTTPException)  # Starlette's own: 404, 405
    async def _http_error(_, e: HTTPException):
        return JSONResponse(error_body(APIError(e.status_code, str(e.detail))), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(UserError)  # e.g. a chat template that cannot render these messages
    async def _user_error(_, e: UserError):
        return JSONResponse(error_body(APIError(400, str(e))), status_code=400)

    @app.exception_handler(Exception)  # a bug: still JSON in the same shape (the traceback goes to the log)
    async def _unexpected(_, e: Exception):
        return JSONResponse(error_body(APIError(500, f"internal error ({type(e).__name__})")), status_code=500)


class Service:
    """What the endpoints share: the run, its batcher and the event loops' outboxes, the limits (API key,
    body size, context), and the steps of a request from its body to its reply."""

    def __init__(self, run: LoadedRun, api_key: str | None, max_batch: int, max_body: int, batcher_thread: bool):
        if not isinstance(run.engine, Engine):  # continuous batching drives MiniGLM's own KV cache
            raise UserError(f"{run.name}: serve runs MiniGLM models; for a Hugging Face run, `miniglm merge RUN "
                            "--out DIR` and serve DIR with vLLM or `transformers serve` (generate and chat work on "
                            "it as it is)")
        self.run, self.api_key, self.max_body = run, api_key, max_body
        self.outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}  # one per event loop (uvicorn runs one)
        self.batcher = Batcher(run.engine.model, run.engine.tokenizer, max_batch, on_step=self.wake,
                               thread=batcher_thread, step=run.engine.forward_step)
        self.model_name = run.name
        self.block_size = run.engine.model.config.block_size
        self.vocab_size = run.engine.tokenizer.vocab_size
        per_token = longest_token(run.engine.tokenizer)
        self.max_chars = self.block_size * per_token if per_token else max_body
        self.tokens: dict[int, tuple[str, list[int]]] = {}  # token_info's, by id

    def wake(self) -> None:
        for outbox in list(self.outboxes.values()):
            outbox.wake()

    def check_key(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key")

    async def read_body(self, request: Request) -> dict:
        """The JSON body, refused past max_body bytes before it is held in memory: by its Content-Length,
        or while it streams in (a chunked body)."""
        self.check_key(request)
        max_body = self.max_body
        too_big = APIError(413, f"the request body is over the limit of {max_body:,} bytes", code="body_too_large")
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise APIError(400, "bad Content-Length")
        if length is not None and int(length) > max_body:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body:
                raise too_big
        try:
            body = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: brackets nested thousands deep
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def check_length(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise APIError(400, f"the prompt has {chars:,} characters, past this model's context of "
                                f"{self.block_size} tokens", param, "context_length_exceeded")

    def token_info(self, i: int) -> tuple[str, list[int]]:
        """A token's text and bytes, as OpenAI's logprobs give them: bytes that are not whole characters
        (part of a character a byte-level BPE split) as "bytes:\\xe4\\xb8"."""
        if i not in self.tokens:
            tok = self.run.engine.tokenizer
            try:
                raw = tok.token_bytes(i)
            except Exception:  # an id this tokenizer does not use
                raw = None
            raw = tok.decode([i]).encode("utf-8", "replace") if raw is None else raw
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self.tokens[i] = (text, list(raw))
        return self.tokens[i]

    def start(self, prompt: list[int], params: SamplingParams, req: APIRequest) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        outbox = self.outboxes.get(loop) or self.outboxes.setdefault(loop, Outbox(loop))
        queue: asyncio.Queue = asyncio.Queue()  # lists of events: what one or more steps gave this request
        job = Job(prompt, params, lambda ev: outbox.put(queue, ev), logit_bias=req.logit_bias,
                  top_logprobs=req.top_logprobs)
        self.batcher.submit(job)
        return job, queue

    async def respond(self, req: APIRequest, prompt: list[int], stops: list[int]):
        params = sampling_from(req.body, len(prompt), self.block_size, self.vocab_size)
        params.stop_ids = [] if req.ignore_eos else sorted(set(stops))  # vLLM's extension, for benchmarks
        job, queue = self.start(prompt, params, req)
        logprobs = Logprobs(req.chat, self.token_info) if req.top_logprobs is not None else None
        reply = Reply(("chatcmpl-" if req.chat else "cmpl-") + job.id, req.chat, self.model_name, logprobs,
                      int(time.time()))
        if not req.stream:
            return await whole_reply(reply, job, queue)
        return stream_reply(reply, job, queue, req.include_usage)


def create_app(run: LoadedRun, api_key: str | None = None, max_batch: int = 32, max_body: int = MAX_BODY,
               batcher_thread: bool = True):
    """The app; its batcher decodes in a thread of its own, or (batcher_thread=False) in the caller's
    app.state.batcher.run(), as serve() runs it."""
    from fastapi import Request as Request

    service = Service(run, api_key, max_batch, max_body, batcher_thread)
    batcher = service.batcher

    @asynccontextmanager
    async def lifespan(_):
        yield
        batcher.stop()

    app = FastAPI(title="miniglm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    app.state.closing = False  # Server.shutdown sets it
    app.add_middleware(QuietDisconnects, state=app.state)  # inside Starlette's error middleware (it would log)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "active": len(batcher.active),
                "waiting": len(batcher.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_key(request)
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                             "owned_by": "miniglm", "max_model_len": service.block_size}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await service.read_body(request), True, service.vocab_size)
        service.check_length(sum(len(m["content"]) for m in req.messages), "messages")
        ids, stops = run.prompt(req.messages)
        return await service.respond(req, ids, stops)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_request(await service.read_body(request), False, service.vocab_size)
        service.check_length(len(req.prompt), "prompt")
        tok = run.engine.tokenizer
        return await service.respond(req, tok.encode(req.prompt), [tok.eot_id])

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", service.model_name)

    return app


class Server(uvicorn.Server):
    """uvicorn's server, but a shutdown first ends every row in flight and waiting (a stream gets a final
    error event, a plain request a 503), so open connections close at once instead of holding the exit."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.config.app.state.closing = True
        await asyncio.to_thread(self.config.app.state.batcher.stop, 2)
        await super().shutdown(sockets)


def base_url(host: str, port: int) -> str:
    """The server's address as a URL: an IPv6 host in brackets (http://[::1]:8000, not http://::1:8000)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserError saying why not (a port out of range or in use, a bad host)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a port is a number from 0 to 65535")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it every
        # response written in two parts (headers, then body) waits ~40 ms on the client's delayed ACK
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", max_batch: int = 32, int8: bool = False, max_body: int = MAX_BODY) -> None:
    if max_batch < 1 or max_body < 1:
        raise UserError("--max-batch and --max-body must be at least 1")
    sock = listen(host, port)  # before loading the model: a port in use fails at once
    try:
        app = create_app(load_run(run_dir, device, int8=int8), api_key, max_batch, max_body, batcher_thread=False)
    except BaseException:  # a damaged run: let the port go with the error
        sock.close()
        raise
    port = sock.getsockname()[1]
    # the graceful timeout is a backstop: rows end at once on shutdown, but a client may not read its stream
    # lifespan off: Server.shutdown stops the batcher, and a forced exit (a second Ctrl-C) would otherwise
    # leave the lifespan task to be cancelled with a logged traceback
    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off"))
    batcher: Batcher = app.state.batcher
    caught: list[int] = []

    def run_server() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # however uvicorn ends, the decoding loop ends with it
            batcher.stop(0)

    def on_signal(signum: int, _frame) -> None:  # uvicorn handles signals only on the main thread: here
        caught.append(signum)
        server.force_exit = server.should_exit  # a second Ctrl-C: do not wait for open connections
        server.should_exit = True

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        # announced once uvicorn's logging is set up and the handlers are in: a Ctrl-C at once no longer lands
        # inside logging's configuration (a traceback from its lock)
        print(f"serving {run_dir} on {base_url(host, port)} (OpenAI API under /v1, chat page at /)", flush=True)
        if api_key is None:
            print("miniglm: no API key (--api-key, --api-key-env NAME or MINIGLM_API_KEY): anyone who can reach "
                  f"{base_url(host, port)} can use the API", file=sys.stderr, flush=True)
        thread = threading.Thread(target=run_server, name="uvicorn")
        thread.start()
        batcher.run()  # decoding on the main thread, where the model was loaded (see Batcher)
        thread.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for signum in caught[:1]:  # end as the signal would have ended us (Ctrl-C: "interrupted", 130)
        signal.raise_signal(signum)
