"""`scratchlm chat`: talk to a model in the terminal.

Replies stream as they are generated, and are at most a context long. The conversation is trimmed from
its oldest turns so that it always fits the context with room for the reply. Ctrl-C stops a reply (what
was shown stays in the conversation) without leaving; Ctrl-C or Ctrl-D at the prompt leaves.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator

import torch

from scratchlm.chat.template import Prompter
from scratchlm.errors import UserError
from scratchlm.infer.generate import stream
from scratchlm.infer.prompt import read_prompt
from scratchlm.infer.sampling import SAMPLING, SamplingParams
from scratchlm.infer.text import stream_text

HELP = """commands:
  /reset               forget the conversation
  /system TEXT         set the system message (/system alone clears it)
  /params              show the sampling parameters
  /params KEY=VALUE..  change them, e.g. /params temperature=0.5 top_k=40 seed=none
  /help                this text
  /quit                leave (so do Ctrl-D and Ctrl-C at the prompt)"""

SETTABLE = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")


def parse_params(params: SamplingParams, assignments: list[str]) -> SamplingParams:
    """A copy of `params` with `key=value` assignments applied and checked (UserError on a bad one)."""
    changes: dict = {}
    for item in assignments:
        key, eq, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in SETTABLE:
            raise UserError(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(SETTABLE)}")
        raw = raw.strip()
        try:
            if key == "seed":
                changes[key] = None if raw.lower() in ("none", "") else int(raw)
            elif key in ("max_new_tokens", "top_k"):
                changes[key] = int(raw)
            else:
                changes[key] = float(raw)
        except ValueError:
            raise UserError(f"{key}: {raw!r} is not a number") from None
    return dataclasses.replace(params, **changes).check()


class ChatSession:
    def __init__(self, model: torch.nn.Module, tokenizer, params: SamplingParams = SAMPLING["chat"],
                 system: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.prompter = Prompter(tokenizer)
        self.notice = self.use(params.check())   # what the chat says about the parameters, if anything
        self.system = system
        self.messages: list[dict[str, str]] = []

    def use(self, params: SamplingParams) -> str:
        """Sample with `params` from now on. A reply longer than the context would push the conversation
        it answers out of the model's view, so max_new_tokens past the context is capped there: returns the
        line saying so, or ""."""
        context = self.model.config.context
        note = ""
        if params.max_new_tokens > context:
            note = (f"(max_new_tokens {params.max_new_tokens} is more than the context: replies stop after "
                    f"{context} tokens)")
            params = dataclasses.replace(params, max_new_tokens=context)
        self.params = params
        return note

    def command(self, line: str) -> str:
        """Run a /command and return what to print."""
        name, _, arg = line.strip().partition(" ")
        if name == "/reset":
            self.messages = []
            return "(conversation cleared)"
        if name == "/system":
            self.system = arg.strip()
            return f"(system message: {self.system})" if self.system else "(system message cleared)"
        if name == "/params":
            note = self.use(parse_params(self.params, arg.split())) if arg.strip() else ""
            return " ".join(f"{k}={getattr(self.params, k)}" for k in SETTABLE) + (f"\n{note}" if note else "")
        if name in ("/help", "/?"):
            return HELP
        raise UserError(f"unknown command {name}; /help lists them")

    def prompt_ids(self) -> list[int]:
        context = self.model.config.context
        # Keep room for the reply, but never more than half the context: a long history matters more.
        budget = context - min(self.params.max_new_tokens, context // 2)
        system = [{"role": "system", "content": self.system}] if self.system else []
        kept = self.prompter.fit(system + self.messages, budget)
        return self.prompter.prompt(kept)

    def reply(self, text: str) -> Iterator[str]:
        """Add the user's message and stream the answer; the answer joins the conversation even when the
        stream is interrupted, as far as it got."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except UserError:  # a template that refuses the conversation: it goes on without this message
            self.messages.pop()
            raise
        params = dataclasses.replace(self.params, stop_ids=self.prompter.stop_ids, stop=self.prompter.stop_strings)
        pieces: list[str] = []
        try:
            for piece in stream_text(self.tokenizer, stream(self.model, ids, params),
                                     stop=params.stop):
                pieces.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def run(session: ChatSession, read: Callable[[str], str] = input, write: Callable[[str], object] = sys.stdout.write,
        flush: Callable[[], object] = sys.stdout.flush) -> None:
    """The read-reply loop: `read` raises EOFError (Ctrl-D) or KeyboardInterrupt (Ctrl-C) to leave."""
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        except UnicodeDecodeError:
            write("error: that line is not UTF-8 text\n")
            continue
        if not line.strip():
            continue
        if line.strip() in ("/quit", "/exit"):
            return
        try:
            line = read_prompt(line, escapes=False, flag="that line")
            if line.startswith("/"):
                write(session.command(line) + "\n")
                continue
        except UserError as e:
            write(f"error: {e}\n")
            continue
        write("bot> ")
        flush()
        try:
            for piece in session.reply(line):
                write(piece)
                flush()
            write("\n")
        except KeyboardInterrupt:
            write(" [stopped]\n")
        except UserError as e:
            write(f"error: {e}\n")


def chat(checkpoint: str, device: str = "auto", system: str = "", params: SamplingParams = SAMPLING["chat"]) -> None:
    from scratchlm.loading import load
    from scratchlm.runtime import pick_device

    loaded = load(checkpoint, pick_device(device))
    session = ChatSession(loaded.model, loaded.tokenizer, params, system)
    kind = "chat model" if session.prompter.templated else "base model (no chat tokens: plain transcript prompts)"
    print(f"{loaded.checkpoint} · {kind} · context {loaded.model.config.context}. /help for commands.")
    if session.notice:
        print(session.notice)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    run(session)
