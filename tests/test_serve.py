"""The server against the official `openai` client and raw HTTP: what comes back must be what the
library generates for the same prompt, streamed or not, alone or with other requests in flight; bad
requests get OpenAI-shaped errors and the server keeps serving."""
from __future__ import annotations

import http.client
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from tiny_chat import make_run, one_thread

import scratchlm
from scratchlm.chat.template import Prompter
from scratchlm.infer.generate import complete
from scratchlm.infer.sampling import SamplingParams
from scratchlm.serve.server import make_server

openai = pytest.importorskip("openai")

@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve") / "tiny-chat")


@pytest.fixture
def server(run_dir):
    loaded = scratchlm.load(run_dir)
    srv = make_server(loaded.model, loaded.tokenizer, "tiny-chat", port=0, max_batch=4)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.loaded = loaded
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.app.engine.stop()


def client(srv):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused", max_retries=0,
                         timeout=30)


def raw(srv, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=30)
    payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def library(srv, prompt_ids, **params):
    """What the library itself generates for this prompt, for comparison with the HTTP answers."""
    return complete(srv.loaded.model, srv.loaded.tokenizer, prompt_ids, SamplingParams(**params))


def test_binds_to_loopback_by_default(server):
    assert server.server_address[0] == "127.0.0.1"
    from scratchlm.cli import build_parser
    assert build_parser().parse_args(["serve", "--checkpoint", "x"]).host == "127.0.0.1"


def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == ["tiny-chat"]
    assert client(server).models.retrieve("tiny-chat").id == "tiny-chat"
    status, body = raw(server, "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_completions_round_trip_streamed_and_not(server):
    c, tok = client(server), server.loaded.tokenizer
    want = library(server, tok.encode("Hello"), max_new_tokens=12, temperature=0, stop_ids=(tok.eos_id,))
    got = c.completions.create(model="tiny-chat", prompt="Hello", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == 5 and got.usage.completion_tokens == want.completion_tokens
    chunks = list(c.completions.create(model="tiny-chat", prompt="Hello", max_tokens=12, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    # Seeded sampling is the library's seeded sampling.
    want = library(server, tok.encode("Hello"), max_new_tokens=12, temperature=1.0, top_p=0.9, seed=4,
                   stop_ids=(tok.eos_id,))
    got = c.completions.create(model="tiny-chat", prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=4)
    assert got.choices[0].text == want.text


def test_chat_round_trip_streamed_and_not(server):
    c = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompter = Prompter(server.loaded.tokenizer)
    want = library(server, prompter.prompt(messages), max_new_tokens=10, temperature=0, stop_ids=prompter.stop_ids)
    got = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(prompter.prompt(messages))
    stream = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens
    # A stop string cuts the reply before it, as the library does.
    stop = want.text[3:5]
    got = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0, stop=[stop])
    assert got.choices[0].message.content == want.text[:want.text.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_bad_requests_get_openai_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny-chat", prompt="x" * 70, max_tokens=5)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 64" in e.value.message
    with pytest.raises(openai.BadRequestError, match="context length"):
        c.completions.create(model="tiny-chat", prompt="hi", max_tokens=1000)
    for bad in (-1, 0, 10**12):
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            c.completions.create(model="tiny-chat", prompt="hi", max_tokens=bad)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="tiny-chat", prompt="hi", temperature=7)
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
        c.chat.completions.create(model="tiny-chat", messages=[{"role": "wizard", "content": "hi"}])
    status, body = raw(server, "POST", "/v1/chat/completions", b"{not json")
    err = json.loads(body)["error"]
    assert status == 400 and "not valid JSON" in err["message"] and err["type"] == "invalid_request_error"
    status, body = raw(server, "POST", "/v1/completions", {"model": "tiny-chat", "prompt": "hi", "max_tokens": "lots"})
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"
    status, body = raw(server, "POST", "/v1/completions", ["not", "an", "object"])
    assert status == 400 and "JSON object" in json.loads(body)["error"]["message"]
    status, _ = raw(server, "GET", "/v1/chat/completions")
    assert status == 405
    status, body = raw(server, "GET", "/v2/nothing")
    assert status == 404 and "error" in json.loads(body)
    # A body over the limit is refused from its Content-Length alone, before it is sent.
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n\r\n")
    assert sock.recv(64).startswith(b"HTTP/1.1 413")
    sock.close()
    # After all that, it still serves.
    assert c.completions.create(model="tiny-chat", prompt="ok", max_tokens=3, temperature=0).choices[0].text is not None


def test_concurrent_requests_get_what_each_would_get_alone(server):
    c, tok = client(server), server.loaded.tokenizer
    prompts = [f"Prompt number {i} " + "x" * i for i in range(10)]
    wants = [library(server, tok.encode(p), max_new_tokens=15, temperature=0, stop_ids=(tok.eos_id,)).text
             for p in prompts]

    def ask(i):
        if i % 2:
            chunks = c.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=15, temperature=0, stream=True)
            return "".join(ch.choices[0].text for ch in chunks)
        return c.completions.create(model="tiny-chat", prompt=prompts[i], max_tokens=15, temperature=0).choices[0].text

    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(ask, range(10))) == wants
    assert server.app.engine.served >= 10


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(server):
    body = json.dumps({"model": "tiny-chat", "prompt": "Hello", "max_tokens": 50, "stream": True}).encode()
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        sock.close()
    got = client(server).completions.create(model="tiny-chat", prompt="Hello", max_tokens=5, temperature=0)
    assert got.usage.completion_tokens <= 5


# ---- what evaluation harnesses send: log-probabilities, echo, token ids, several prompts ----------------


def forward_logp(srv, ids):
    """log P(next token) at every place of `ids`, from one plain forward pass of the model."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(srv.loaded.model(torch.tensor([ids]))[0].float(), dim=-1)


def post(srv, body):
    status, data = raw(srv, "POST", "/v1/completions", {"model": "tiny-chat", **body})
    return status, json.loads(data)


def test_echo_scores_the_prompt_by_hand(server):
    tok = server.loaded.tokenizer
    ids = tok.encode("ROMEO. Hello")
    status, body = post(server, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2})
    assert status == 200 and body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0,
                                               "total_tokens": len(ids)}
    choice = body["choices"][0]
    lp, logp = choice["logprobs"], forward_logp(server, ids)
    assert choice["text"] == "ROMEO. Hello" and lp["tokens"] == list("ROMEO. Hello")
    assert lp["text_offset"] == list(range(len(ids))) and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(logp[i - 1, ids[i]]), abs=1e-5)
        values, tokens = logp[i - 1].topk(2)
        assert lp["top_logprobs"][i] == pytest.approx({tok.decode([int(t)]): float(v) for t, v in zip(tokens, values)},
                                                      abs=1e-5)
    # text prompts are scored the same way; without logprobs, echo only puts the prompt in front
    status, again = post(server, {"prompt": "ROMEO. Hello", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert again["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    want = library(server, ids, max_new_tokens=3, temperature=0, stop_ids=(tok.eos_id,))
    status, plain = post(server, {"prompt": "ROMEO. Hello", "max_tokens": 3, "echo": True, "temperature": 0})
    assert plain["choices"][0] == {"index": 0, "text": "ROMEO. Hello" + want.text, "logprobs": None,
                                   "finish_reason": want.finish_reason}


def test_logprobs_of_a_greedy_completion_through_the_openai_client(server):
    tok = server.loaded.tokenizer
    ids = tok.encode("Hello")
    want = library(server, ids, max_new_tokens=6, temperature=0, stop_ids=(tok.eos_id,))
    got = client(server).completions.create(model="tiny-chat", prompt="Hello", max_tokens=6, temperature=0, logprobs=1)
    choice = got.choices[0]
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    from scratchlm.infer.generate import generate

    new = generate(server.loaded.model, ids, SamplingParams(6, temperature=0, stop_ids=(tok.eos_id,)))
    logp = forward_logp(server, ids + new)
    assert choice.logprobs.tokens == [tok.decode([t]) for t in new]
    assert choice.logprobs.text_offset[0] == len("Hello")
    for i, (t, value, top) in enumerate(zip(new, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs)):
        assert value == pytest.approx(float(logp[len(ids) + i - 1, t]), abs=1e-5)
        assert top == {tok.decode([t]): pytest.approx(value)}      # greedy: the likeliest token is the one taken


def test_several_prompts_come_back_in_order(server):
    tok = server.loaded.tokenizer
    prompts = ["Hello", tok.encode("ROMEO."), "x"]
    status, body = post(server, {"prompt": prompts, "max_tokens": 4, "temperature": 0})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, body["choices"]):
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        assert choice["text"] == library(server, ids, max_new_tokens=4, temperature=0, stop_ids=(tok.eos_id,)).text
    assert body["usage"]["prompt_tokens"] == 5 + 6 + 1


@pytest.mark.parametrize("body, param, message", [
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "between 1"),                 # 0 needs echo
    ({"prompt": "hi", "max_tokens": 2, "logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"prompt": "hi", "max_tokens": 2, "logprobs": 1, "stream": True}, "stream", "not supported"),
    ({"prompt": ["a", "b"], "max_tokens": 2, "stream": True}, "stream", "several prompts"),
    ({"prompt": [1, 10**6], "max_tokens": 2}, "prompt", "token id 1000000"),
    ({"prompt": [], "max_tokens": 2}, "prompt", "list of token ids"),
    ({"prompt": "hi", "echo": "yes"}, "echo", "true or false"),
    ({"prompt": "x" * 65, "max_tokens": 0, "echo": True, "logprobs": 1}, "prompt", "maximum context length is 64"),
])
def test_scoring_requests_that_cannot_be_served_are_refused(server, body, param, message):
    status, answer = post(server, body)
    assert status == 400 and answer["error"]["param"] == param and message in answer["error"]["message"]


def test_a_prompt_as_long_as_the_context_can_be_scored(server):
    status, body = post(server, {"prompt": "x" * 64, "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200 and len(body["choices"][0]["logprobs"]["tokens"]) == 64
    status, body = raw(server, "POST", "/v1/chat/completions", {"model": "tiny-chat", "logprobs": True,
                                                                 "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "use /v1/completions" in json.loads(body)["error"]["message"]


def test_tokenizer_endpoints_for_harnesses(server):
    tok = server.loaded.tokenizer
    status, body = raw(server, "POST", "/tokenize", {"prompt": "Hi <eos>", "add_special_tokens": False})
    ids = json.loads(body)["tokens"]
    assert status == 200 and ids == tok.encode("Hi <eos>") and ids[-1] == tok.special_tokens["<eos>"]
    status, body = raw(server, "POST", "/detokenize", {"tokens": ids})
    assert json.loads(body) == {"prompt": "Hi <eos>"}
    status, body = raw(server, "GET", "/tokenizer_info")
    info = json.loads(body)
    # a chat model's end of sequence is the end of a reply (chat.template.with_chat_roles)
    assert info["eos_token"] == "<|end|>" and info["bos_token"] == "<bos>" and info["model_max_length"] == 64
    status, body = raw(server, "POST", "/detokenize", {"tokens": [10**7]})
    assert status == 400 and json.loads(body)["error"]["param"] == "tokens"
