"""The web chat page: served at `/`, and driven in headless Chromium (Debian's `chromium`) through the
DevTools protocol over a pipe, with nothing but the standard library. A message typed into the page
must come back as the reply the library generates for the same conversation."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import threading
import time

import pytest
from tiny_chat import make_run, one_thread

import scratchlm
from scratchlm.chat.template import Prompter
from scratchlm.infer.generate import complete
from scratchlm.infer.sampling import SamplingParams
from scratchlm.serve.server import make_server


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture
def server(tmp_path):
    loaded = scratchlm.load(make_run(tmp_path / "web-chat"))
    srv = make_server(loaded.model, loaded.tokenizer, "web-chat", port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.loaded = loaded
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.app.engine.stop()


def test_page_is_served_with_its_controls(server):
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/") as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    for needle in ('id="input"', 'id="send"', 'id="stop"', 'id="temperature"', 'id="top_p"', 'id="top_k"',
                   'id="min_p"', 'id="repetition_penalty"', 'id="max_tokens"', "/v1/chat/completions", "stream: true"):
        assert needle in html


class DevTools:
    """Chromium's DevTools protocol over --remote-debugging-pipe: JSON messages ending in a NUL byte,
    written to the browser's fd 3 and read from its fd 4."""

    def __init__(self, binary: str, profile: str):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def wire_fds():
            # Copies above 10 first, so that neither end can be overwritten while the other moves to 3 or 4.
            up = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]
            os.dup2(up[0], 3)
            os.dup2(up[1], 4)

        # pass_fds names the descriptors the child keeps once wire_fds has run: 3 and 4.
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=wire_fds)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer, self.next_id, self.session = b"", 0, None

    def call(self, method: str, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.navigate", url=url)

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:  # the page may still be loading
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self.to_chrome)
        os.close(self.from_chrome)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_chat_in_headless_chromium(server, tmp_path):
    browser = DevTools(CHROMIUM, str(tmp_path / "profile"))
    try:
        browser.open(f"http://127.0.0.1:{server.server_address[1]}/")
        browser.wait_for("document.body.dataset.state === 'idle'")
        assert "web-chat" in browser.js("document.getElementById('model').textContent")
        browser.js("document.getElementById('temperature').value = '0'")

        def say(text: str) -> str:
            before = browser.js("document.querySelectorAll('.msg').length")
            browser.js(f"document.getElementById('input').value = {json.dumps(text)};"
                       "document.getElementById('form').requestSubmit(); true")
            browser.wait_for(f"document.querySelectorAll('.msg').length === {before + 2} && "
                             "document.body.dataset.state === 'idle'")
            bubbles = browser.js("[...document.querySelectorAll('.msg')].map(e => [e.className, e.firstChild ? "
                                 "e.firstChild.textContent : ''])")
            assert bubbles[-2] == ["msg user", text] and bubbles[-1][0] == "msg assistant", bubbles
            return bubbles[-1][1]

        # What the page asks for: its sampling settings, max_tokens capped at half the context, and the
        # oldest turns dropped to make room.
        loaded, prompter = server.loaded, Prompter(server.loaded.tokenizer)
        params = SamplingParams(max_new_tokens=32, temperature=0, top_k=50, top_p=0.95, repetition_penalty=1.1,
                                stop_ids=prompter.stop_ids)
        history = []
        for text in ("Hello there", "And again?"):
            reply = say(text)
            history.append({"role": "user", "content": text})
            want = complete(loaded.model, loaded.tokenizer, prompter.prompt(prompter.fit(history, 64 - 32)), params)
            assert reply == want.text
            history.append({"role": "assistant", "content": reply})
        browser.js("document.getElementById('reset').click(); true")
        assert browser.js("document.querySelectorAll('.msg').length") == 0
    finally:
        browser.close()
