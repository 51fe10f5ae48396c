"""`scratchlm serve`: an OpenAI-compatible HTTP server and a web chat page, on the standard library.

    GET  /                      the chat page (static/index.html)
    GET  /health                {"status": "ok", ...}
    GET  /v1/models             the one model served
    POST /v1/completions        text in, text out; with `logprobs` and `echo`, scores (serve/api.py)
    POST /v1/chat/completions   messages in, a message out (the chat template, see chat/template.py)
    GET  /tokenizer_info        the tokenizer's special tokens and the context, as vLLM answers
    POST /tokenize, /detokenize text to token ids and back, as vLLM answers: with these, an evaluation
                                harness (lm-evaluation-harness's `local-completions`) needs no tokenizer

Both POST routes stream by server-sent events with `"stream": true`. Each HTTP connection gets a thread
(`ThreadingHTTPServer`) that checks the request, queues it with the engine and relays its events; the
engine's single worker thread is the only one that runs the model. No cross-origin (CORS) headers are
sent, so other web sites open in the user's browser cannot use the model; the page at `/` is same-origin.

Every error is JSON in OpenAI's shape, including those the standard library finds itself (a request line
or headers it cannot read, an unknown method). A connection that sends nothing for `idle_timeout` seconds
(30 by default) is closed, so idle or stalled clients cannot hold threads and sockets forever.
"""
from __future__ import annotations

import copy
import json
import queue
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from scratchlm.chat.template import Prompter
from scratchlm.errors import UserError
from scratchlm.infer.prompt import end_ids, plain_prompt
from scratchlm.serve.api import (
    ApiError,
    chunk_body,
    completion_body,
    completions_body,
    logprobs_body,
    new_id,
    parse_request,
    text_choice,
    usage_chunk,
)
from scratchlm.serve.engine import Busy, Engine

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 1 << 20
REPLY_TIMEOUT = 600.0   # seconds an HTTP thread waits for the next piece before giving up
IDLE_TIMEOUT = 30.0     # seconds a connection may stay silent (between requests or within one)


class ClientGone(ConnectionError):
    """The client closed its connection before sending the whole request."""


class App:
    """What the handlers share: the model's name and limits, the prompt builder and the engine."""

    def __init__(self, model, tokenizer, model_id: str, max_batch: int = 8, max_queue: int = 64):
        self.model_id, self.tokenizer = model_id, tokenizer
        self.context, self.vocab = model.config.context, model.config.vocab_size
        self.prompter = Prompter(tokenizer)
        self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "scratchlm",
                "context_length": self.context, "chat_template": self.prompter.templated}

    def prepare(self, body: object, chat: bool):
        """The checked request and, per prompt, its ids and sampling parameters; or an ApiError."""
        req = parse_request(body, chat, self.model_id)
        if chat:
            if isinstance(body, dict) and body.get("trim_history") is True:
                # An extension for the web page: drop the oldest turns rather than refuse a long chat.
                budget = self.context - (req.max_tokens or self.context // 2)
                if budget > 0:
                    req.messages = self.prompter.fit(req.messages, budget)
            prompt, params = self.prompter.prompt(req.messages), req.params
            params.stop_ids = self.prompter.stop_ids
            params.stop = tuple(dict.fromkeys(params.stop + self.prompter.stop_strings))
            return req, [(prompt, self._sized(params, prompt, req, "messages"))]
        work = []
        for n, prompt in enumerate(req.prompts):
            if isinstance(prompt, str):
                ids, stops = plain_prompt(self.tokenizer, prompt)
            else:
                bad = next((t for t in prompt if not 0 <= t < self.vocab), None)
                if bad is not None:
                    raise ApiError(400, f"'prompt' holds the token id {bad}; this model's ids run from 0 to "
                                        f"{self.vocab - 1}", "prompt")
                ids, stops = list(prompt), end_ids(self.tokenizer)
            params = copy.copy(req.params)   # each prompt has its own stop ids and length
            params.stop_ids = stops
            work.append((ids, self._sized(params, ids, req, "prompt")))
        return req, work

    def _sized(self, params, prompt: list[int], req, kind: str):
        """`params` with max_new_tokens filled in (as asked, or the rest of the context); an ApiError when
        the prompt and the tokens asked for do not fit the context."""
        room = self.context - len(prompt)
        need = req.max_tokens if req.max_tokens is not None else 1
        if len(prompt) + need > self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {len(prompt) + need} tokens ({len(prompt)} in the {kind}, {need} in the "
                                "completion). Please reduce the length of the "
                                f"{kind} or completion.", kind, "context_length_exceeded")
        params.max_new_tokens = req.max_tokens if req.max_tokens is not None else room
        return params

    def tokens(self, body: object, encode: bool) -> dict:
        """/tokenize: {"prompt"} -> {"tokens", "count", "max_model_len"}; /detokenize: {"tokens"} -> {"prompt"}.
        Text is encoded as a prompt is (special-token strings are the special tokens); nothing is added."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if encode:
            text = body.get("prompt")
            if not isinstance(text, str):
                raise ApiError(400, "'prompt' must be a string", "prompt")
            ids = self.tokenizer.encode(text)
            return {"tokens": ids, "count": len(ids), "max_model_len": self.context}
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                0 <= t < self.tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"'tokens' must be a list of token ids from 0 to {self.tokenizer.vocab_size - 1}",
                           "tokens")
        return {"prompt": self.tokenizer.decode(ids)}

    def piece(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token], errors="replace").decode("utf-8", "replace")

    def choice(self, index: int, req, prompt: str | list[int], prompt_len: int, text: str, last) -> dict:
        """One /v1/completions choice: the completion (after the prompt, with `echo`) and, when asked, its
        tokens' log-probabilities (the prompt's too, with `echo`)."""
        prompt_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)
        logprobs = None
        if req.logprobs is not None:
            s, first = last.scores, 0 if req.echo else prompt_len
            tops = [None if top is None else {self.piece(t): v for t, v in top} for top in s.tops[first:]]
            logprobs = logprobs_body([self.piece(t) for t in s.ids[first:]], s.values[first:], tops,
                                     0 if req.echo else len(prompt_text))
        return text_choice(index, (prompt_text if req.echo else "") + text, last.finish_reason, logprobs)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "scratchlm"
    # A request line that cannot be parsed leaves the request at this version; the standard library's
    # HTTP/0.9 would answer its error with a bare body, without a status line or headers.
    default_request_version = "HTTP/1.1"

    @property
    def app(self) -> App:
        return self.server.app

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # applied to the socket by StreamRequestHandler.setup
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError as e:  # the client is gone: nothing to answer, and no bug to trace
            BaseHTTPRequestHandler.log_message(self, "connection dropped: %s", str(e) or type(e).__name__)

    def log_message(self, format, *args):  # noqa: A002  (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (a request it cannot parse, an unknown method), as JSON."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True  # the rest of an unreadable request cannot be told from the next one
        kind = "server_error" if code >= 500 else "invalid_request_error"
        self._error(ApiError(code, message or self.responses.get(code, ("error",))[0], kind=kind))

    # ------------------------------------------------------------------ plumbing
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _error(self, err: ApiError) -> None:
        self._json(err.status, err.body())

    def _read_json(self) -> object:
        lengths = self.headers.get_all("Content-Length") or []
        # Until the body's length is known, where this request ends and the next begins is not.
        closing, self.close_connection = self.close_connection, True
        if not lengths:
            raise ApiError(411, "a Content-Length header is required")
        length = lengths[0].strip()
        if len(lengths) > 1 or not (length.isascii() and length.isdigit()):
            raise ApiError(400, "the request needs one Content-Length header holding a whole number of bytes")
        n = int(length)
        if n > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        if len(raw) < n:
            raise ClientGone(f"the request body ended after {len(raw)} of {n} bytes")
        self.close_connection = closing
        try:
            return json.loads(raw)
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
        except ValueError as e:  # also bad UTF-8, and numbers too long to convert
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    # ------------------------------------------------------------------ routes
    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        app = self.app
        if path in ("/", "/index.html"):
            self._send(200, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
        elif path == "/health":
            self._json(200, {"status": "ok", "model": app.model_id, "queued": app.engine.queued,
                             "generating": app.engine.busy_rows, "served": app.engine.served})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [app.model_card()]})
        elif path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if name == app.model_id:
                self._json(200, app.model_card())
            else:
                self._error(ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found"))
        elif path == "/tokenizer_info":
            tok = app.tokenizer
            names = {i: s for s, i in tok.special_tokens.items()}
            self._json(200, {"eos_token": names.get(tok.eos_id), "bos_token": names.get(tok.bos_id),
                             "pad_token": names.get(tok.special_tokens.get("<pad>")), "model_max_length": app.context,
                             "chat_template": None})
        elif path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            self._error(ApiError(405, f"{path} takes POST, not GET"))
        else:
            self._error(ApiError(404, f"no route {path}; see /v1/models, /v1/completions, /v1/chat/completions"))

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path in ("/tokenize", "/detokenize"):
            try:
                self._json(200, self.app.tokens(self._read_json(), path == "/tokenize"))
            except ApiError as e:
                self._error(e)
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self.close_connection = True  # the unread body would otherwise be read as the next request
            self._error(ApiError(404, f"no POST route {path}; POST to /v1/completions or /v1/chat/completions"))
            return
        chat = path == "/v1/chat/completions"
        jobs = []
        try:
            body = self._read_json()
        except ApiError as e:
            self._error(e)
            return
        try:
            req, work = self.app.prepare(body, chat)
            for ids, params in work:
                jobs.append(self.app.engine.submit(ids, params, top=req.logprobs))
        except ApiError as e:
            self._error(e)
            return
        except UserError as e:  # e.g. a history that no trimming fits in the context
            self._error(ApiError(400, str(e)))
            return
        except Busy as e:
            for job in jobs:
                job.cancel()
            self._error(ApiError(503, f"the server is busy ({e}); retry shortly", kind="server_error",
                                 code="overloaded"))
            return
        except Exception as e:  # a bug: still answer (and keep serving), with the traceback in the log
            traceback.print_exc()
            self._error(ApiError(500, f"the server failed on this request ({type(e).__name__})",
                                 kind="server_error"))
            return
        try:
            if req.stream:
                self._stream(jobs[0], req, len(work[0][0]), chat)
            else:
                self._whole(jobs, req, work, chat)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, socket.timeout, queue.Empty):
            self.close_connection = True
        finally:
            for job in jobs:
                job.cancel()  # a no-op once it is done; otherwise frees its batch row

    def _whole(self, jobs, req, work, chat: bool) -> None:
        replies = []
        for job in jobs:
            pieces, last = [], None
            for event in job.stream(timeout=REPLY_TIMEOUT):
                pieces.append(event.text)
                last = event
            if last.error:
                self._error(ApiError(500, last.error, kind="server_error"))
                return
            replies.append(("".join(pieces), last))
        rid = new_id("chatcmpl" if chat else "cmpl")
        prompt_tokens = sum(len(ids) for ids, _ in work)
        completion_tokens = sum(last.completion_tokens for _, last in replies)
        if chat:
            text, last = replies[0]
            self._json(200, completion_body(rid, req.model, text, last.finish_reason, prompt_tokens, completion_tokens,
                                            chat))
            return
        choices = [self.app.choice(n, req, prompt, len(ids), text, last)
                   for n, (prompt, (ids, _), (text, last)) in enumerate(zip(req.prompts, work, replies))]
        self._json(200, completions_body(rid, req.model, choices, prompt_tokens, completion_tokens))

    def _stream(self, job, req, prompt_tokens: int, chat: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())

        def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        if chat:
            send(chunk_body(rid, req.model, created, None, None, chat, role=True))
        for event in job.stream(timeout=REPLY_TIMEOUT):
            if event.error:
                send({"error": ApiError(500, event.error, kind="server_error").body()["error"]})
                break
            if event.text:
                send(chunk_body(rid, req.model, created, event.text, None, chat))
            if event.finish_reason:
                send(chunk_body(rid, req.model, created, None if chat else "", event.finish_reason, chat))
                if req.include_usage:
                    send(usage_chunk(rid, req.model, created, prompt_tokens, event.completion_tokens, chat))
        send("[DONE]")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    verbose = False
    # socketserver's default backlog of 5 resets the sixth client that connects at the same moment; the
    # engine queues requests itself, so the listen queue only has to hold a burst of connections.
    request_queue_size = 128

    def __init__(self, address, handler, app: App, idle_timeout: float = IDLE_TIMEOUT):
        super().__init__(address, handler)
        self.app, self.idle_timeout = app, idle_timeout


def check_options(port: int, max_batch: int, idle_timeout: float) -> None:
    """UserError naming the flag, before a model is loaded for nothing."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be a port number from 0 to 65535 (0: any free one), got {port}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise UserError(f"--max-batch must be a whole number >= 1, got {max_batch}")
    if not isinstance(idle_timeout, (int, float)) or not 0 < idle_timeout < float("inf"):
        raise UserError(f"--idle-timeout must be a number of seconds > 0, got {idle_timeout}")


def make_server(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8000,
                max_batch: int = 8, max_queue: int = 64, idle_timeout: float = IDLE_TIMEOUT) -> Server:
    """A server bound to (host, port) with its engine started; port 0 picks a free one. Call
    `serve_forever()` (e.g. in a thread), then `shutdown()` and `app.engine.stop()`."""
    check_options(port, max_batch, idle_timeout)
    app = App(model, tokenizer, model_id, max_batch, max_queue)
    try:
        server = Server((host, port), Handler, app, idle_timeout)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    app.engine.start()
    return server


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          model_id: str | None = None, max_batch: int = 8, verbose: bool = False,
          idle_timeout: float = IDLE_TIMEOUT) -> None:
    """Load a checkpoint and serve it until Ctrl-C."""
    from scratchlm.loading import load
    from scratchlm.runtime import pick_device

    check_options(port, max_batch, idle_timeout)
    loaded = load(checkpoint, pick_device(device))
    name = model_id or loaded.checkpoint.parent.parent.name
    server = make_server(loaded.model, loaded.tokenizer, name, host, port, max_batch, idle_timeout=idle_timeout)
    server.verbose = verbose
    where = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}"
    print(f"serving {name} (context {loaded.model.config.context}) at {where}/  (OpenAI API at {where}/v1)",
          flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("note: listening beyond this machine; there is no authentication", file=sys.stderr, flush=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        server.shutdown()
        server.server_close()
        server.app.engine.stop()
