"""The server against clients that break the rules, over real sockets: malformed lengths, bodies and
request lines get JSON errors in OpenAI's shape (never silence, never the standard library's HTML page);
clients that vanish or go quiet cost one log line and a closed connection, never a traceback; and the
server answers the next client afterwards. Also the `serve` command's flags, and the one message checker
that both chat files and the API use."""
from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time

import pytest
from tiny_chat import byte_tokenizer, make_run, tiny_model

import scratchlm
import scratchlm.loading
from scratchlm import cli
from scratchlm.chat.template import MessageError, check_messages
from scratchlm.errors import UserError
from scratchlm.serve.server import IDLE_TIMEOUT, make_server

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("hostile") / MODEL)


def start(run_dir, **options):
    loaded = scratchlm.load(run_dir)
    srv = make_server(loaded.model, loaded.tokenizer, MODEL, port=0, max_batch=2, **options)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop(srv):
    srv.shutdown()
    srv.server_close()
    srv.app.engine.stop()


@pytest.fixture
def server(run_dir):
    srv = start(run_dir)
    yield srv
    stop(srv)


def connect(srv, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.server_address[1]), timeout=timeout)


def exchange(srv, data: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Send raw bytes, read one HTTP response (a bare body without a status line fails here)."""
    with connect(srv) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.headers, resp.read()


def post(path: str, body: bytes, length: str | None = None) -> bytes:
    size = str(len(body)) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n").encode() + body


def openai_error(status, headers, body, want_status: int) -> dict:
    """The error object, after checking it has the shape OpenAI's API sends."""
    assert status == want_status, body
    assert headers["Content-Type"] == "application/json"
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return err


def still_serves(srv) -> None:
    status, _, body = exchange(srv, post("/v1/completions", json.dumps(
        {"model": MODEL, "prompt": "ok", "max_tokens": 2, "temperature": 0}).encode()))
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")


def wait_for_log(capsys, needle: str, timeout: float = 10) -> str:
    """What the server wrote to stderr, once `needle` is in it (the handler runs in its own thread)."""
    seen, deadline = "", time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        time.sleep(0.05)
        seen += capsys.readouterr().err
    return seen


# ---------------------------------------------------------------------------------- the request's length
@pytest.mark.parametrize("length", ["-5", "+5", "5_0", "0x10", "1e3", " ", "5, 5"])
def test_content_length_that_is_not_a_whole_number_gets_json_400(server, length):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 1}).encode()
    status, headers, raw = exchange(server, post("/v1/completions", body, length))
    err = openai_error(status, headers, raw, 400)
    assert "Content-Length" in err["message"] and headers["Connection"] == "close"
    still_serves(server)


def test_two_content_lengths_are_refused(server):
    body = b'{"model": "tiny-chat", "prompt": "hi"}'
    request = post("/v1/completions", body).replace(b"\r\n\r\n", f"\r\nContent-Length: {len(body) + 9}\r\n\r\n".encode())
    openai_error(*exchange(server, request), 400)


# ---------------------------------------------------------------------------------- bodies json cannot read
def test_deeply_nested_body_gets_json_400(server):
    status, headers, raw = exchange(server, post("/v1/chat/completions", b"[" * 200_000))
    assert "nested too deeply" in openai_error(status, headers, raw, 400)["message"]
    still_serves(server)


def test_a_number_too_long_to_convert_gets_json_400(server):
    body = b'{"model": "tiny-chat", "prompt": "hi", "max_tokens": ' + b"7" * 5000 + b"}"
    assert "not valid JSON" in openai_error(*exchange(server, post("/v1/completions", body)), 400)["message"]
    still_serves(server)


# ---------------------------------------------------------------------------------- what the stdlib refuses
@pytest.mark.parametrize("request_bytes, want", [
    (b"HELLO\r\n\r\n", 400),
    (b"\x00\x01\x02\xff\xfe\x80 garbage\r\n\r\n", 400),
    (b"GET / HTTP/one\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 505),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n", 431),
])
def test_requests_the_standard_library_refuses_get_json_errors(server, request_bytes, want):
    status, headers, raw = exchange(server, request_bytes)
    openai_error(status, headers, raw, want)
    assert b"<html" not in raw.lower() and headers["Connection"] == "close"
    still_serves(server)


def test_head_of_a_refused_request_has_no_body(server):
    with connect(server) as sock:
        sock.sendall(b"HEAD / HTTP/9.9\r\nHost: x\r\n\r\n")
        resp = http.client.HTTPResponse(sock, method="HEAD")
        resp.begin()
        assert resp.status == 505 and resp.read() == b""


# ---------------------------------------------------------------------------------- clients that vanish
def test_client_closing_mid_body_costs_one_log_line_not_a_traceback(server, capsys):
    for _ in range(3):
        with connect(server) as sock:
            sock.sendall(post("/v1/completions", b'{"model": ', "1000"))
        err = wait_for_log(capsys, "10 of 1000 bytes")
        assert "Traceback" not in err and "Error" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "connection dropped" in lines[0], err
    still_serves(server)


def test_client_resetting_before_its_answer_leaves_no_traceback(server, capsys):
    for _ in range(5):
        sock = connect(server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.sendall(post("/v1/completions", b"{not json"))
        sock.close()
    still_serves(server)
    time.sleep(0.5)
    assert "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------- idle connections
def closed_by_server_after(sock: socket.socket) -> float:
    start = time.monotonic()
    assert sock.recv(1) == b""  # EOF: the server closed it (the socket's own timeout would raise instead)
    return time.monotonic() - start


def test_idle_connections_are_closed(run_dir):
    srv = start(run_dir, idle_timeout=0.5)
    try:
        with connect(srv) as sock:  # never says anything
            assert 0.3 < closed_by_server_after(sock) < 8
        with connect(srv) as sock:  # stops halfway through its headers
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            assert 0.3 < closed_by_server_after(sock) < 8
        with connect(srv) as sock:  # promises a body and sends only part of it
            sock.sendall(post("/v1/completions", b'{"model"', "100"))
            assert 0.3 < closed_by_server_after(sock) < 8
        with connect(srv) as sock:  # keeps a finished keep-alive connection open
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
            assert 0.3 < closed_by_server_after(sock) < 8
        still_serves(srv)
    finally:
        stop(srv)


def test_idle_timeout_default_is_documented_and_settable(server):
    assert server.idle_timeout == IDLE_TIMEOUT == 30
    args = cli.build_parser().parse_args(["serve", "--checkpoint", "x"])
    assert args.idle_timeout == IDLE_TIMEOUT
    assert cli.build_parser().parse_args(["serve", "--checkpoint", "x", "--idle-timeout", "5"]).idle_timeout == 5


# ---------------------------------------------------------------------------------- the serve command's flags
@pytest.mark.parametrize("flags, named", [
    (["--port", "99999"], "--port"), (["--port", "-1"], "--port"), (["--port", "65536"], "--port"),
    (["--idle-timeout", "0"], "--idle-timeout"), (["--idle-timeout", "nan"], "--idle-timeout"),
    (["--max-batch", "0"], "--max-batch"),
])
def test_bad_serve_flags_are_one_line_and_exit_2(run_dir, capsys, monkeypatch, flags, named):
    # Refused before a model is loaded: loading fails the test (and a server that started anyway would
    # serve forever rather than fail).
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded despite a bad flag")

    monkeypatch.setattr(scratchlm.loading, "load", no_loading)
    assert cli.main(["serve", "--checkpoint", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_make_server_checks_its_port_too(run_dir):
    loaded = scratchlm.load(run_dir)
    for port in (99999, -1):
        with pytest.raises(UserError, match="--port must be a port number from 0 to 65535"):
            make_server(loaded.model, loaded.tokenizer, MODEL, port=port)


# ---------------------------------------------------------------------------------- requests that reach code
def chat(srv, body: dict) -> tuple[int, http.client.HTTPMessage, bytes]:
    return exchange(srv, post("/v1/chat/completions", json.dumps({"model": MODEL, "max_tokens": 2, **body}).encode()))


def test_history_no_trimming_can_fit_gets_json_400(server):
    # The page's trim_history with room for one prompt token: nothing fits, which is the client's to fix.
    messages = [{"role": "user", "content": "hello there"}]
    err = openai_error(*chat(server, {"messages": messages, "max_tokens": 63, "trim_history": True}), 400)
    assert "cannot hold" in err["message"]
    still_serves(server)


def test_a_bug_in_preparing_a_request_gets_json_500_and_the_server_goes_on(server, monkeypatch, capsys):
    def broken(body, chat):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.app, "prepare", broken)
    openai_error(*chat(server, {"messages": [{"role": "user", "content": "hi"}]}), 500)
    assert "RuntimeError: boom" in wait_for_log(capsys, "boom")  # a bug keeps its traceback in the log
    monkeypatch.undo()
    still_serves(server)


# ---------------------------------------------------------------------------------- one message checker
def test_api_messages_in_openai_shapes_are_read_as_the_template_reads_them(server):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": ""},
             {"role": "user", "content": "Hi there"}]
    shaped = [{"role": "developer", "content": "Be brief."}, {"role": "assistant", "content": None},
              {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    answers = []
    for messages in (plain, shaped):
        status, _, raw = chat(server, {"messages": messages, "temperature": 0})
        assert status == 200, raw
        answers.append(json.loads(raw))
    assert answers[0]["usage"] == answers[1]["usage"]
    assert answers[0]["choices"][0]["message"] == answers[1]["choices"][0]["message"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hi", "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": ["user"], "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], "messages[1].content"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ([{"role": "user", "content": None}], "messages[0].content"),
])
def test_bad_api_messages_name_their_param(server, messages, param):
    err = openai_error(*chat(server, {"messages": messages}), 400)
    assert err["param"] == param and err["message"].startswith(f"'{param}' ")


def test_files_get_the_same_checks_with_their_location():
    where = "chats.jsonl, line 3"
    got = check_messages([{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "user", "content": "c"}], where)
    assert got == [{"role": "system", "content": "ab"}, {"role": "user", "content": "c"}]
    with pytest.raises(MessageError, match=r"^chats\.jsonl, line 3: messages\[0\]: field 'role' is \['x'\]") as e:
        check_messages([{"role": ["x"], "content": "a"}], where)
    assert e.value.param == "messages[0].role"
    # An assistant turn without content is an API shape only; in a file it would be an empty reply to learn.
    with pytest.raises(MessageError, match=r"messages\[1\]: field 'content' is missing"):
        check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": None}], where)
    assert check_messages([{"role": "assistant", "content": None}], api=True) == [{"role": "assistant", "content": ""}]


def test_a_prompt_token_the_model_has_no_embedding_for_is_a_400(tmp_path):
    """A byte tokenizer (264 ids) over a model of 150: what a converted model whose source vocabulary
    lacked some bytes looks like. The request is refused in its own thread; the engine goes on."""
    from scratchlm.config import RunConfig
    from scratchlm.train.checkpoint import save_checkpoint

    model, cfg = tiny_model(150), RunConfig()
    cfg.model = model.config
    byte_tokenizer().save(tmp_path / "tokenizer")
    cfg.save(tmp_path / "config.toml")
    save_checkpoint(tmp_path, 1, model, None, {"tokens": 0})
    srv = start(tmp_path)
    try:
        body = json.dumps({"model": MODEL, "prompt": "caf\u00e9", "max_tokens": 1}).encode()
        error = openai_error(*exchange(srv, post("/v1/completions", body)), 400)
        assert "no embedding" in error["message"]
        ok = json.dumps({"model": MODEL, "prompt": "ab", "max_tokens": 1}).encode()
        assert exchange(srv, post("/v1/completions", ok))[0] == 200
    finally:
        stop(srv)
