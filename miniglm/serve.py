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
then comes when its row starts). Every error is OpenAI's JSON error shape: 400 for malformed JSON,
fields out of range (engine.SamplingParams.validate) and prompts past the context, 401 for a wrong API
key, 413 for a body over --max-body, 500/503 for a failed row or a shutdown. A failure in one row
ends that row only; a shutdown (SIGTERM, Ctrl-C) ends every stream with an error event first.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import threading
import time
from collections import deque
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from miniglm.batcher import Batcher, Job
from miniglm.chat import LoadedRun, load_run
from miniglm.engine import SamplingError, SamplingParams
from miniglm.fileio import UserError
from miniglm.model import MiniGLM
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


def _field(body: dict, key: str, default):
    value = body.get(key)
    return default if value is None else value


def _flag(body: dict, key: str, default: bool = False) -> bool:
    value = _field(body, key, default)
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false", key)
    return value


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
    max_tokens = _field(body, "max_tokens", _field(body, "max_completion_tokens", min(256, room)))
    params = SamplingParams(max_new_tokens=max_tokens, temperature=_field(body, "temperature", 1.0),
                            top_p=_field(body, "top_p", 1.0), top_k=_field(body, "top_k", 0),
                            repetition_penalty=_field(body, "repetition_penalty", 1.0),
                            stop_strings=[stop] if isinstance(stop, str) else stop, seed=body.get("seed"),
                            skip_special_tokens=_flag(body, "skip_special_tokens", True))
    try:
        params.validate(vocab_size)
    except SamplingError as e:
        name = API_NAMES.get(e.field, e.field)
        raise APIError(400, f"'{name}' {e.rule}", name) from None
    if params.max_new_tokens < 1:
        raise APIError(400, "'max_tokens' must be an integer >= 1", "max_tokens")
    if prompt_len + params.max_new_tokens > block_size:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({params.max_new_tokens}) is past this "
                            f"model's context of {block_size} tokens", "max_tokens", "context_length_exceeded")
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
        content = m.get("content")
        if isinstance(content, list):  # the content-parts form: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", "messages")
    return out


def create_app(run: LoadedRun, api_key: str | None = None, max_batch: int = 32, max_body: int = MAX_BODY,
               batcher_thread: bool = True):
    """The app; its batcher decodes in a thread of its own, or (batcher_thread=False) in the caller's
    app.state.batcher.run(), as serve() runs it."""
    from fastapi import Request as Request

    if not isinstance(run.engine.model, MiniGLM):  # continuous batching drives MiniGLM's own KV cache
        raise UserError(f"{run.name}: serve runs MiniGLM models; for a Hugging Face run, `miniglm merge RUN --out DIR` "
                        "and serve DIR with vLLM or `transformers serve` (generate and chat work on it as it is)")
    outboxes: dict[asyncio.AbstractEventLoop, Outbox] = {}  # one per event loop (uvicorn runs one)

    def wake() -> None:
        for outbox in list(outboxes.values()):
            outbox.wake()

    batcher = Batcher(run.engine.model, run.engine.tokenizer, max_batch, on_step=wake,
                      thread=batcher_thread, step=run.engine.forward_step)

    @asynccontextmanager
    async def lifespan(_):
        yield
        batcher.stop()

    app = FastAPI(title="miniglm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    model_name = run.name
    block_size = run.engine.model.config.block_size
    vocab_size = run.engine.tokenizer.vocab_size
    per_token = longest_token(run.engine.tokenizer)
    max_chars = block_size * per_token if per_token else max_body

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

    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        """The JSON body, refused past max_body bytes before it is held in memory: by its Content-Length,
        or while it streams in (a chunked body)."""
        check_key(request)
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

    def check_length(chars: int, param: str) -> None:
        if chars > max_chars:
            raise APIError(400, f"the prompt has {chars:,} characters, past this model's context of {block_size} "
                                "tokens", param, "context_length_exceeded")

    def start(prompt: list[int], params: SamplingParams) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        outbox = outboxes.get(loop) or outboxes.setdefault(loop, Outbox(loop))
        queue: asyncio.Queue = asyncio.Queue()  # lists of events: what one or more steps gave this request
        req = Job(prompt, params, lambda ev: outbox.put(queue, ev))
        batcher.submit(req)
        return req, queue

    def usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    async def respond(request: Request, body: dict, prompt: list[int], stops: list[int], chat: bool):
        params = sampling_from(body, len(prompt), block_size, vocab_size)
        params.stop_ids = [] if _flag(body, "ignore_eos") else sorted(set(stops))  # vLLM's extension, for benchmarks
        stream = _flag(body, "stream")
        options = _field(body, "stream_options", {})
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options")
        include_usage = _flag(options, "include_usage")
        req, queue = start(prompt, params)
        cid = ("chatcmpl-" if chat else "cmpl-") + req.id
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish}
            return {"id": cid, "object": kind + (".chunk" if chat else ""), "created": created, "model": model_name,
                    "choices": [choice]}

        if not stream:
            text, done = "", None
            try:
                while done is None:
                    for ev in await queue.get():
                        if "error" in ev:
                            raise APIError(ev.get("status", 500), ev["error"])
                        text += ev.get("delta", "")
                        if ev.get("done"):
                            done = ev
            finally:
                req.cancelled = done is None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            choice["finish_reason"] = done["finish_reason"]
            return JSONResponse({"id": cid, "object": kind, "created": created, "model": model_name,
                                 "choices": [choice], "usage": usage(done)})

        # Every text event is the same JSON but for its delta: frame it once, encode only the delta per event.
        head, tail = sse(chunk(DELTA, None)).split(json.dumps(DELTA), 1)

        async def events():
            ended = False
            try:
                if chat:
                    yield sse(chunk(None, None, first=True))
                while not ended:
                    # One body write per wake-up: the text of every step since the last one as one event,
                    # then the row's end (its finish and usage, or an error) if it ended.
                    delta, end = "", []
                    for ev in await queue.get():
                        if "error" in ev:  # the row failed, or the server is shutting down
                            end.append(sse(error_body(APIError(ev.get("status", 500), ev["error"]))))
                        else:
                            delta += ev.get("delta", "")
                        if ev.get("done"):
                            end.append(sse(chunk(None, ev["finish_reason"])))
                            if include_usage:
                                end.append(sse({**chunk(None, None), "choices": [], "usage": usage(ev)}))
                    ended = bool(end)
                    if ended:
                        end.append("data: [DONE]\n\n")
                    yield (head + json.dumps(delta, ensure_ascii=False) + tail if delta else "") + "".join(end)
            finally:
                if not ended:  # the client went away: free its row
                    req.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": len(batcher.active), "waiting": len(batcher.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                             "owned_by": "miniglm", "max_model_len": block_size}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = parse_messages(body)
        check_length(sum(len(m["content"]) for m in messages), "messages")
        ids, stops = run.prompt(messages)
        return await respond(request, body, ids, stops, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        check_length(len(prompt), "prompt")
        tok = run.engine.tokenizer
        return await respond(request, body, tok.encode(prompt), [tok.eot_id], chat=False)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", model_name)

    return app


class Server(uvicorn.Server):
    """uvicorn's server, but a shutdown first ends every row in flight and waiting (a stream gets a final
    error event, a plain request a 503), so open connections close at once instead of holding the exit."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await asyncio.to_thread(self.config.app.state.batcher.stop, 2)
        await super().shutdown(sockets)


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
    print(f"serving {run_dir} on http://{host}:{port} (OpenAI API under /v1, chat page at /)", flush=True)
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
        thread = threading.Thread(target=run_server, name="uvicorn")
        thread.start()
        batcher.run()  # decoding on the main thread, where the model was loaded (see Batcher)
        thread.join()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    for signum in caught[:1]:  # end as the signal would have ended us (Ctrl-C: "interrupted", 130)
        signal.raise_signal(signum)
