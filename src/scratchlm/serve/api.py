"""The OpenAI API's request and response shapes: checking a request, and building the JSON answers.

Requests are checked field by field; a bad one becomes an `ApiError`, sent as OpenAI sends errors:
`{"error": {"message", "type", "param", "code"}}` with a 4xx status. Besides OpenAI's sampling fields,
`top_k`, `min_p` and `repetition_penalty` are accepted as extensions (as vLLM and llama.cpp do).

`/v1/completions` takes what evaluation harnesses send: a prompt as text or token ids, several prompts in
one request (one choice each), `logprobs` (each token's log-probability and the `logprobs` likeliest
tokens at its place, at most 5) and `echo` (the prompt comes back in front of the completion, with its
tokens' log-probabilities; `max_tokens` 0 then scores the prompt alone).
"""
from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from scratchlm.chat.template import MessageError, check_messages
from scratchlm.infer.sampling import MAX_STOP_STRINGS, SAMPLING, SamplingParams

MAX_N = 1
MAX_LOGPROBS = 5     # OpenAI's limit for completions
MAX_PROMPTS = 64     # prompts in one /v1/completions request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _number(body: Mapping, name: str, default: float, low: float, high: float, *, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}", name)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value}", name)
    return float(value)


def _integer(body: Mapping, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


@dataclass
class Request:
    model: str
    stream: bool
    include_usage: bool
    params: SamplingParams
    max_tokens: int | None            # None: up to the end of the context
    prompts: list[str | list[int]] | None = None   # /v1/completions: texts or token ids, one choice each
    messages: list[dict] | None = None  # /v1/chat/completions
    logprobs: int | None = None       # /v1/completions: how many likeliest tokens to list per place
    echo: bool = False                # /v1/completions: the prompt, scored, in front of the completion

    @property
    def scored(self) -> bool:
        return self.logprobs is not None or self.echo


def parse_request(body: object, chat: bool, model_id: str) -> Request:
    if not isinstance(body, Mapping):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the id listed by GET /v1/models", "model")
    if model != model_id:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{model_id}'", "model",
                       "model_not_found")
    n = _integer(body, "n", 1, 1, 128)
    if n > MAX_N:
        raise ApiError(400, f"'n' > {MAX_N} is not supported; send several requests", "n")
    unsupported = ("logprobs", "top_logprobs") if chat else ("top_logprobs",)
    for name in unsupported + ("tools", "functions", "logit_bias", "suffix"):
        value = body.get(name)
        if value not in (None, False, 0, [], {}):
            where = " on /v1/chat/completions (use /v1/completions)" if name in ("logprobs", "top_logprobs") else ""
            raise ApiError(400, f"'{name}' is not supported by this server{where}", name)
    echo = body.get("echo") or False
    if chat and echo:
        raise ApiError(400, "'echo' is not supported on /v1/chat/completions (use /v1/completions)", "echo")
    if not isinstance(echo, bool):
        raise ApiError(400, f"'echo' must be true or false, got {echo!r}", "echo")
    logprobs = None if chat else _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if echo and body.get(max_name) == 0:
        max_tokens = 0    # score the prompt, write nothing
    else:
        max_tokens = _integer(body, max_name, None, 1, 1_000_000)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty' (1 is off)", name)
    default = SAMPLING["serve"]
    params = SamplingParams(
        max_new_tokens=max_tokens or 0,
        temperature=_number(body, "temperature", default.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", default.top_p, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", default.top_k, 0, 1_000_000),
        min_p=_number(body, "min_p", default.min_p, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", default.repetition_penalty, 0.0, 10.0, low_open=True),
        seed=_integer(body, "seed", default.seed, 0, 2**63 - 1),
        stop=tuple(stop),
    )
    req = Request(model, stream, bool(options.get("include_usage")), params, max_tokens, logprobs=logprobs, echo=echo)
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        req.prompts = _prompts(body.get("prompt"))
        if stream and (len(req.prompts) > 1 or req.scored):
            what = "several prompts" if len(req.prompts) > 1 else "'logprobs' or 'echo'"
            raise ApiError(400, f"'stream' with {what} is not supported; send \"stream\": false", "stream")
    return req


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(prompt: object) -> list[str | list[int]]:
    """A prompt as OpenAI takes it: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError(400, f"'prompt' holds {len(prompt)} prompts; send at most {MAX_PROMPTS} per request", "prompt")
        return list(prompt)
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")


def _messages(messages: object) -> list[dict]:
    try:
        return check_messages(messages, "", api=True)
    except MessageError as e:
        raise ApiError(400, f"'{e.param}' {e.problem}", e.param) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                    chat: bool) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def completions_body(rid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    """A /v1/completions answer with one choice per prompt, each made by `text_choice`."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def text_choice(index: int, text: str, finish: str, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def logprobs_body(pieces: list[str], values: list[float | None], tops: list[dict | None], start: int = 0) -> dict:
    """OpenAI's completions `logprobs` object: each token's text, its log-probability (None for the first
    token of a prompt, which nothing predicts), the likeliest tokens at its place, and where its text begins."""
    offsets, at = [], start
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chunk_body(rid: str, model: str, created: int, text: str | None, finish: str | None, chat: bool,
               role: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
