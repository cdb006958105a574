"""`miniglm serve`: an OpenAI-compatible HTTP API and a web chat page (FastAPI + uvicorn).

  GET  /health               {"status": "ok"}
  GET  /v1/models            the run's model
  POST /v1/chat/completions  messages rendered with the run's chat template; stream=true sends SSE chunks
  POST /v1/completions       raw text continuation
  GET  /                     the chat page

Concurrent requests are decoded together by the Batcher; a client that disconnects stops its row.
Errors use OpenAI's error shape: 400 for malformed JSON or fields and prompts past the context,
401 for a wrong API key.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from miniglm.batcher import Batcher, Job
from miniglm.chat import LoadedRun, load_run
from miniglm.engine import SamplingParams
from miniglm.fileio import UserError
from miniglm.model import MiniGLM

PAGE = Path(__file__).with_name("chat_page.html")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(e: APIError) -> dict:
    kind = "invalid_request_error" if e.status == 400 else "authentication_error" if e.status == 401 else "api_error"
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def _number(body: dict, key: str, kind: type, default, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise APIError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise APIError(400, f"'{key}' must be between {lo} and {hi}", key)
    return kind(value)


def _flag(body: dict, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"'{key}' must be true or false", key)
    return value


def sampling_from(body: dict, prompt_len: int, block_size: int) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "'stop' must be a string or a list of strings", "stop")
    room = block_size - prompt_len
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {block_size}",
                       "messages", "context_length_exceeded")
    max_tokens = _number(body, "max_tokens", int, None, 1) or _number(body, "max_completion_tokens", int, None, 1)
    if max_tokens is None:
        max_tokens = min(256, room)
    if prompt_len + max_tokens > block_size:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) is past this model's "
                            f"context of {block_size} tokens", "max_tokens", "context_length_exceeded")
    if _number(body, "n", int, 1, 1, 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    return SamplingParams(max_new_tokens=max_tokens, temperature=_number(body, "temperature", float, 1.0, 0, 2),
                          top_p=_number(body, "top_p", float, 1.0, 0, 1), top_k=_number(body, "top_k", int, 0, 0),
                          repetition_penalty=_number(body, "repetition_penalty", float, 1.0, 0.01),
                          stop_strings=stop, seed=_number(body, "seed", int, None),
                          skip_special_tokens=_flag(body, "skip_special_tokens", True))


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


def create_app(run: LoadedRun, api_key: str | None = None, max_batch: int = 32):
    from fastapi import Request as Request

    if not isinstance(run.engine.model, MiniGLM):  # continuous batching drives MiniGLM's own KV cache
        raise UserError(f"{run.name}: serve runs MiniGLM models; for a Hugging Face run, `miniglm merge RUN --out DIR` "
                        "and serve DIR with vLLM or `transformers serve` (generate and chat work on it as it is)")
    batcher = Batcher(run.engine.model, run.engine.tokenizer, run.engine.device, max_batch)

    @asynccontextmanager
    async def lifespan(_):
        yield
        batcher.stop()

    app = FastAPI(title="miniglm", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher
    model_name = run.name
    block_size = run.engine.model.config.block_size

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(error_body(e), status_code=e.status)

    async def read_body(request: Request) -> dict:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def start(prompt: list[int], params: SamplingParams) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = Job(prompt, params, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        batcher.submit(req)
        return req, queue

    def usage(done: dict) -> dict:
        return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

    async def respond(request: Request, body: dict, prompt: list[int], stops: list[int], chat: bool):
        params = sampling_from(body, len(prompt), block_size)
        params.stop_ids = [] if body.get("ignore_eos") else sorted(set(stops))  # vLLM's extension, for benchmarks
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
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
                    ev = await queue.get()
                    if "error" in ev:
                        raise APIError(500, ev["error"])
                    if "delta" in ev:
                        text += ev["delta"]
                    if ev.get("done"):
                        done = ev
            finally:
                req.cancelled = done is None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            choice["finish_reason"] = done["finish_reason"]
            return JSONResponse({"id": cid, "object": kind, "created": created, "model": model_name,
                                 "choices": [choice], "usage": usage(done)})

        async def events():
            finished = False
            try:
                if chat:
                    yield f"data: {json.dumps(chunk(None, None, first=True), ensure_ascii=False)}\n\n"
                while True:
                    ev = await queue.get()
                    if "error" in ev:
                        yield f"data: {json.dumps({'error': {'message': ev['error'], 'type': 'api_error'}})}\n\n"
                        break
                    if "delta" in ev:
                        yield f"data: {json.dumps(chunk(ev['delta'], None), ensure_ascii=False)}\n\n"
                    if ev.get("done"):
                        finished = True
                        yield f"data: {json.dumps(chunk(None, ev['finish_reason']), ensure_ascii=False)}\n\n"
                        if include_usage:
                            last = {**chunk(None, None), "choices": [], "usage": usage(ev)}
                            yield f"data: {json.dumps(last)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:  # the client went away: free its row
                    req.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "active": len(batcher.active), "waiting": len(batcher.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                             "owned_by": "miniglm", "max_model_len": block_size}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        ids, stops = run.prompt(parse_messages(body))
        return await respond(request, body, ids, stops, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", "prompt")
        tok = run.engine.tokenizer
        return await respond(request, body, tok.encode(prompt), [tok.eot_id], chat=False)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", model_name)

    return app


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", max_batch: int = 32, int8: bool = False) -> None:
    import uvicorn

    app = create_app(load_run(run_dir, device, int8=int8), api_key, max_batch)
    print(f"serving {run_dir} on http://{host}:{port} (OpenAI API under /v1, chat page at /)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
