"""The client for an OpenAI-compatible chat API: options, retries with back-off, the worker pool and the
run's summary. A retryable error (429, 5xx, a time-out, a lost connection) is retried with back-off; an item
that still fails is recorded and the run goes on; an error retrying cannot fix stops the run.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from miniglm.fileio import UserError
from miniglm.sft.prompts import SYSTEM_PROMPT

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
RETRY_STATUS = {408, 409, 429}  # plus every 5xx
FATAL_HINTS = {
    400: "the server rejected the request; check --model and the options",
    401: "check the API key in ${env}",
    403: "the key may not have access to this model",
    404: "check --base-url (usually ends in /v1) and --model",
}


@dataclass
class ClientOptions:
    base_url: str = DEFAULT_BASE_URL
    model: str = DEFAULT_MODEL
    api_key_env: str = "OPENAI_API_KEY"
    system_prompt: str = SYSTEM_PROMPT
    temperature: float = 0.7
    concurrency: int = 4
    timeout: float = 60.0  # seconds per request
    max_retries: int = 5  # per request, and again per item for malformed answers
    base_delay: float = 1.0  # back-off: base_delay * 2**attempt, with jitter, capped at max_delay
    max_delay: float = 30.0


@dataclass
class Summary:
    step: str
    done: int = 0  # items (requests' worth of work) finished in this run
    written: int = 0  # records appended to the output
    skipped: int = 0  # items already in the output from an earlier run
    duplicates: int = 0  # near-duplicate questions (and repeated chunks) dropped
    rejected: int = 0  # malformed entries dropped from otherwise valid answers
    failed: int = 0  # items given up after the retries; a rerun tries them again
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    failures: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class APIFatalError(UserError):
    """An API error that retrying cannot fix (400, 401, 403, 404, ...): the run stops."""


class _Failed(Exception):
    """One item gave up after its retries; the run goes on."""


class _Stopped(Exception):
    """The run is stopping (fatal error elsewhere, Ctrl-C): abandon this item quietly."""


def make_client(opts: ClientOptions) -> Any:
    key = os.environ.get(opts.api_key_env, "").strip()
    if not key:
        raise UserError(f"environment variable {opts.api_key_env} is not set: export your API key in it (any "
                        f"non-empty value for a local server without keys) or name another with --api-key-env")
    from openai import OpenAI

    # max_retries=0: we retry ourselves, with back-off shared by the threads and counted in the summary
    return OpenAI(base_url=opts.base_url, api_key=key, max_retries=0, timeout=opts.timeout)


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Exponential back-off with jitter (half fixed, half random) so threads do not retry in lockstep;
    a server's Retry-After raises the floor, everything stays under cap."""
    d = min(cap, base * 2 ** attempt)
    d = d / 2 + random.uniform(0, d / 2)
    return min(cap, max(d, retry_after or 0.0))


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


def _one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


class Session:
    """One client shared by the worker threads, with our retries, usage counting and a stop flag."""

    def __init__(self, client: Any, opts: ClientOptions, summary: Summary):
        self.client, self.opts, self.summary = client, opts, summary
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def count(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self.summary, k, getattr(self.summary, k) + v)

    def _sleep(self, attempt: int, retry_after: float | None = None) -> None:
        self.count(retries=1)
        if self.stop.wait(backoff_delay(attempt, self.opts.base_delay, self.opts.max_delay, retry_after)):
            raise _Stopped

    def _fatal(self, status: int, message: str) -> APIFatalError:
        hint = FATAL_HINTS.get(status, "retrying will not help").replace("{env}", self.opts.api_key_env)
        return APIFatalError(f"{self.opts.base_url}: HTTP {status} ({_one_line(message)}); {hint}")

    def chat(self, prompt: str) -> str:
        """One completion, retried on 429, 5xx, connection errors and time-outs; other 4xx stop the run."""
        import openai

        messages = [{"role": "user", "content": prompt}]
        if self.opts.system_prompt:
            messages.insert(0, {"role": "system", "content": self.opts.system_prompt})
        reason, retry_after = "", None
        for attempt in range(self.opts.max_retries + 1):
            if attempt:
                self._sleep(attempt - 1, retry_after)
            if self.stop.is_set():
                raise _Stopped
            retry_after = None
            self.count(requests=1)
            try:
                resp = self.client.chat.completions.create(
                    model=self.opts.model, messages=messages, temperature=self.opts.temperature)
            except openai.APIStatusError as e:
                if e.status_code not in RETRY_STATUS and e.status_code < 500:
                    raise self._fatal(e.status_code, e.message) from None
                reason, retry_after = f"HTTP {e.status_code}", _retry_after(e.response.headers)
                continue
            except openai.APITimeoutError:
                reason = f"timed out after {self.opts.timeout:g}s"
                continue
            except openai.APIError as e:  # connection refused/reset, unreadable response
                reason = _one_line(e)
                continue
            usage = getattr(resp, "usage", None)
            if usage is not None:
                self.count(prompt_tokens=usage.prompt_tokens or 0, completion_tokens=usage.completion_tokens or 0,
                           total_tokens=usage.total_tokens or 0)
            choices = getattr(resp, "choices", None) or []
            return (choices[0].message.content or "") if choices else ""
        raise _Failed(f"{reason} (gave up after {self.opts.max_retries + 1} attempts)")

    def ask(self, prompt: str, parse: Callable[[str], T | None]) -> T:
        """chat() until `parse` accepts the answer: a malformed answer is asked again, up to max_retries times."""
        for attempt in range(self.opts.max_retries + 1):
            if attempt:
                self.count(retries=1)
            result = parse(self.chat(prompt))
            if result is not None:
                return result
        raise _Failed(f"no valid answer in {self.opts.max_retries + 1} tries")


def run_items(session: Session, items: list[tuple[str, Any]], work: Callable[[str, Any], None], desc: str,
         progress: bool) -> None:
    """Run work(key, item) on a thread pool of `concurrency`; a failed item is recorded, a fatal error stops all."""
    from tqdm import tqdm

    def guarded(key: str, item: Any) -> None:
        try:
            work(key, item)
        except _Failed as e:
            with session.lock:
                session.summary.failed += 1
                session.summary.failures.append(f"{key}: {e}")
        except _Stopped:
            pass
        except BaseException:
            session.stop.set()  # at once, before this thread takes the next queued item
            raise

    bar = tqdm(total=len(items), desc=desc, unit="item", disable=None if progress else True)
    pool = ThreadPoolExecutor(max_workers=max(1, session.opts.concurrency))
    try:
        for fut in as_completed([pool.submit(guarded, key, item) for key, item in items]):
            fut.result()
            bar.update()
    except BaseException:
        session.stop.set()  # queued items never start; in-flight ones end at their next retry
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()


def format_summary(s: Summary) -> str:
    lines = [f"{s.step}: {s.done} done ({s.written} records written), {s.skipped} already done, "
             f"{s.duplicates} duplicates dropped, {s.rejected} malformed entries dropped, {s.failed} failed",
             f"tokens: {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion = {s.total_tokens:,} total "
             f"in {s.requests} requests ({s.retries} retries)"]
    lines += [f"  failed {f}" for f in s.failures[:20]]
    if s.failed > 20:
        lines.append(f"  ... and {s.failed - 20} more")
    if s.failed:
        lines.append("rerun the same command to retry the failed items")
    return "\n".join(lines)

