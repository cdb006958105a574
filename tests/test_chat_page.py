"""The web chat page end to end: headless Chromium, driven over the DevTools protocol (a pipe, no extra
package), types a Chinese question, sends it, waits for the streamed answer and saves a screenshot."""

import base64
import json
import os
import shutil
import subprocess
import time

import pytest

from .conftest import make_chat_run
from .test_serve import server  # noqa: F401  (a real uvicorn on the module's run_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bpe_dir):
    """A random chat run whose output layer knows only tokens that are whole characters: its answers
    are readable text (a random model would mostly pick special tokens, which the page never shows,
    or half characters), so the page has something to stream."""
    import torch

    from miniglm.checkpoint import save_checkpoint
    from miniglm.runs import load_model
    from miniglm.tokenizer import load_tokenizer

    run = make_chat_run(tmp_path_factory.mktemp("page"), bpe_dir, block_size=320, n_layer=2)
    tok, model = load_tokenizer(run / "tokenizer"), load_model(run)
    with torch.no_grad():  # tied embeddings: a zero row scores 0, below the best of the others
        for i in range(tok.vocab_size):
            piece = tok.token_bytes(i)
            try:
                whole = i not in tok.all_special_ids and bool(piece) and bool(piece.decode("utf-8").strip())
            except UnicodeDecodeError:
                whole = False
            if not whole:
                model.embeddings.weight[i] = 0
    state = json.loads((run / "ckpt" / "state.json").read_text())
    save_checkpoint(run / "ckpt", model, model.config, state)
    return run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)")


def _as_fds_3_and_4(read_end: int, write_end: int) -> None:
    """In the child, before exec: chromium expects its command pipe on fd 3 and its reply pipe on fd 4."""
    a, b = os.dup(read_end), os.dup(write_end)  # fresh numbers first, so neither dup2 closes the other
    os.dup2(a, 3)
    os.dup2(b, 4)


class Browser:
    """Chromium with --remote-debugging-pipe: JSON messages ended by NUL, commands on fd 3, replies on fd 4."""

    def __init__(self, profile: str):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "--window-size=1000,700", "about:blank"],
            pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: _as_fds_3_and_4(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id, self._buf, self.session = 0, b"", None

    def send(self, method: str, **params) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        while True:  # skip events until our reply
            while b"\0" not in self._buf:
                chunk = os.read(self._from_browser, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return result["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        os.close(self._to_browser)
        os.close(self._from_browser)


def wait_for(browser: Browser, expression: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.js(expression)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {expression}")


def open_page(browser: Browser, base: str, max_tokens: int) -> None:
    browser.open(base + "/")
    wait_for(browser, "document.readyState === 'complete' && !!document.getElementById('input')")
    browser.js("document.getElementById('key').value = 'sekret'")  # the test server wants an API key
    browser.js(f"document.getElementById('max_tokens').value = '{max_tokens}'")


def test_chat_page_streams_an_answer(server, tmp_path):  # noqa: F811
    base, _ = server
    browser = Browser(str(tmp_path / "profile"))
    try:
        open_page(browser, base, 24)
        browser.js("document.getElementById('input').value = '司徒沧霄的师父是谁？'")
        browser.js("document.getElementById('input').dispatchEvent("
                   "new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}))")
        info = wait_for(browser, "document.querySelector('.assistant.done')?.dataset.info")
        answer = browser.js("document.querySelector('.assistant').textContent")
        user = browser.js("document.querySelector('.user').textContent")
        assert user == "司徒沧霄的师父是谁？"
        assert "error" not in browser.js("document.querySelector('.assistant').className")
        assert answer and "\ufffd" not in answer  # streamed text, no broken characters
        assert info.split(" · ")[0] in ("stop", "length")
        assert browser.js("document.getElementById('send').disabled") is False  # ready for the next turn

        shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png")["data"])
        assert shot.startswith(b"\x89PNG")
        path = tmp_path / "chat_page.png"
        path.write_bytes(shot)
        if os.environ.get("MINIGLM_SCREENSHOT"):  # refresh the README's screenshot on request
            shutil.copy(path, os.environ["MINIGLM_SCREENSHOT"])
    finally:
        browser.close()


def test_stop_button_aborts_the_stream(server, tmp_path):  # noqa: F811
    base, _ = server
    browser = Browser(str(tmp_path / "profile"))
    try:
        open_page(browser, base, 250)
        browser.js("document.getElementById('input').value = '讲一个很长的故事'")
        browser.js("document.getElementById('form').requestSubmit()")
        wait_for(browser, "document.querySelector('.assistant').textContent.length > 0 || "
                          "document.querySelector('.assistant.done')")
        browser.js("document.getElementById('stop').click()")
        info = wait_for(browser, "document.querySelector('.assistant.done')?.dataset.info", timeout=20)
        assert info.split(" · ")[0] in ("stopped", "stop", "length")
    finally:
        browser.close()
