"""The chat template: how a conversation becomes one token sequence, and which of its tokens are learned.

    <bos><|system|>You are Pip.<|end|><|user|>Hi!<|end|><|assistant|>Hello.<|end|><|user|>...

Every message is a role token, its text and `<|end|>`. The role and end tokens are special tokens, so no
text can forge them: message text is encoded with special-token strings read as plain characters.
Fine-tuning learns only what the assistant says: its text and the `<|end|>` after it, which is how the
model learns to stop (generation ends at `<|end|>`, the chat model's end of sequence). To generate a
reply, the conversation is rendered and `<|assistant|>` appended.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from scratchlm.chat.jinja import SCRATCHLM_TEMPLATE, check_template, render_guarded, render_template
from scratchlm.errors import UserError
from scratchlm.tokenizer import Tokenizer

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLES = tuple(ROLE_TOKENS)

Message = Mapping[str, str]


class MessageError(UserError):
    """A message that `check_messages` refuses. Besides the message for a file's reader, it holds
    `param`, the part at fault named as the OpenAI API names it ("messages[2].role"), and `problem`,
    what is wrong with it ("is 'bot'; expected one of ..."), for an API error."""

    def __init__(self, where: str, param: str, problem: str):
        head, _, field = param.partition(".")
        if field:
            subject = f"{head}: field '{field}'"
        else:
            subject = head if "[" in head else f"'{head}'"
        super().__init__(f"{where}: {subject} {problem}" if where else f"{subject} {problem}")
        self.param, self.problem = param, problem


# OpenAI's newer name for the system message.
ROLE_ALIASES = {"developer": "system"}


def check_messages(messages: object, where: str = "messages", *, api: bool = False) -> list[dict[str, str]]:
    """A list of {"role", "content"} dicts with known roles and string content, or MessageError (a
    UserError) naming `where` (left out when empty) and the message at fault. Returns plain dicts
    holding only role and content.

    Two shapes of the OpenAI API are read everywhere: the role "developer" as "system", and content given
    as a list of text parts (`[{"type": "text", "text": ...}]`) as their joined text. With `api`, an
    assistant message may also leave its content out (the API allows that), read as empty; in a file of
    chats that would be an empty reply to learn or to score against, so there it is refused."""
    if not isinstance(messages, list) or not messages:
        raise MessageError(where, "messages", "must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise MessageError(where, at, f"must be an object with 'role' and 'content', not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else None  # a list cannot be looked up
        if role not in ROLE_TOKENS:
            raise MessageError(where, f"{at}.role", f"is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if isinstance(content, list):
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise MessageError(where, f"{at}.content", "has a part that is not {\"type\": \"text\", "
                                   "\"text\": ...}; only text can be read")
            content = "".join(p["text"] for p in content)
        if content is None and api and role == "assistant":
            content = ""
        if not isinstance(content, str):
            what = "missing" if content is None else f"a {type(content).__name__}"
            raise MessageError(where, f"{at}.content", f"is {what}; expected text")
        out.append({"role": role, "content": content})
    return out


def has_chat_tokens(tokenizer: Tokenizer) -> bool:
    return all(t in tokenizer.special_tokens for t in CHAT_TOKENS)


def _require(tokenizer: Tokenizer) -> dict[str, int]:
    specials = tokenizer.special_tokens
    missing = [t for t in CHAT_TOKENS if t not in specials]
    if missing:
        raise UserError(f"the tokenizer lacks the chat tokens {' '.join(missing)}; add them with "
                        "scratchlm.chat.template.add_chat_tokens (scratchlm sft does) before rendering chats")
    return specials


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` with any special-token string in it read as ordinary characters, so a user
    who types `<|end|>` cannot end a turn or impersonate another role."""
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    out: list[int] = []
    while True:
        hits = [(text.find(s), s) for s in specials if s and s in text]
        if not hits:
            return out + (tokenizer.encode(text) if text else [])
        at = min(i for i, _ in hits)
        special = next(s for i, s in hits if i == at)  # the longest one starting there
        # Encoding its first character apart breaks the match; the rest is looked at again, since it
        # could itself begin another special string.
        out += (tokenizer.encode(text[:at]) if at else []) + tokenizer.encode(special[0])
        text = text[at + 1:]


def render(tokenizer: Tokenizer, messages: Sequence[Message], bos: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether training learns it (assistant text and
    the `<|end|>` closing it)."""
    specials = _require(tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    if bos and tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        mask.append(False)
    for m in messages:
        learn = m["role"] == "assistant"
        text = encode_text(tokenizer, m["content"])
        ids += [specials[ROLE_TOKENS[m["role"]]], *text, specials[END]]
        mask += [False] + [learn] * (len(text) + 1)
    return ids, mask


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message], bos: bool = True) -> list[int]:
    """Token ids that ask for the next assistant message: the conversation, then `<|assistant|>`."""
    ids, _ = render(tokenizer, messages, bos)
    return ids + [tokenizer.special_tokens[ASSISTANT]]


def render_text(messages: Sequence[Message], bos: str = "<bos>") -> str:
    """The conversation as text in the template (for reading and for checks: encoding this string gives
    `render`'s ids when no message holds a special-token string)."""
    return bos + "".join(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}" for m in messages)


def stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Where a reply ends: `<|end|>`; `<eos>`, for a model taught that instead; and a role token, which
    could only begin a new message (an undertrained model sometimes skips the `<|end|>`)."""
    specials = tokenizer.special_tokens
    own = [specials[t] for t in (END, "<eos>", USER, SYSTEM, ASSISTANT) if t in specials]
    return tuple(dict.fromkeys(own + list(tokenizer.stop_ids)))


def fit_history(tokenizer: Tokenizer, messages: Sequence[Message], budget: int,
                prompt: Callable[[Sequence[Message]], list[int]] | None = None) -> list[dict[str, str]]:
    """The conversation cut so that its prompt fits in `budget` tokens. What goes first: the oldest
    messages (a history then restarts at a user message), then the system message; if the last message
    alone is still too long, the front of its text (the end of what was said is what the reply follows)."""
    messages = [dict(m) for m in messages]
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]

    prompt = prompt or (lambda ms: render_prompt(tokenizer, ms))

    def fits(ms: list) -> bool:
        return len(prompt(ms)) <= budget

    while len(rest) > 1 and not fits(system + rest):
        rest = rest[1:]
        while len(rest) > 1 and rest[0]["role"] != "user":
            rest = rest[1:]
    if fits(system + rest):
        return system + rest
    if not rest or fits(rest):
        return rest
    last = rest[0]
    room = budget - len(prompt([{**last, "content": ""}]))
    ids = encode_text(tokenizer, last["content"])
    # Decoding a cut that falls inside a character and encoding again can cost a token or two more.
    while room > 0:
        cut = [{**last, "content": tokenizer.decode(ids[-room:])}]
        if fits(cut):
            return cut
        room -= 1
    raise UserError(f"a context of {budget} tokens cannot hold even an empty message")


PLAIN_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def renders_as_scratchlm(template: str) -> bool:
    """Whether a Jinja chat template writes conversations as scratchlm's template does (then scratchlm's
    own rendering, which keeps message text from forging special tokens, is used in its place)."""
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    try:
        return (render_template(template, probe, False, "<bos>") == render_text(probe)
                and render_template(template, probe[:2], True, "<bos>") == render_text(probe[:2]) + ASSISTANT)
    except UserError:
        return False


class Prompter:
    """Prompts for a chat with any model. Three kinds, in this order of preference:

    - the tokenizer's own Jinja chat template (`tokenizer.chat_template`, as a model imported from Hugging
      Face or GGUF carries), unless it is scratchlm's: rendered as transformers renders it, and encoded with
      the template's special tokens read as such while those in message text stay plain characters. As in
      transformers, nothing is added to the rendered text: the template writes the `<bos>` if the model wants one;
    - scratchlm's template above, when the tokenizer has the chat tokens;
    - else a plain transcript ("User: ...", "Assistant: ...") that a base model can at least continue,
      stopped where it starts to write the user's next line."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        if template is not None:
            check_template(template, "the tokenizer's chat_template")
        self.jinja = template if template and not renders_as_scratchlm(template) else None
        self.templated = self.jinja is not None or has_chat_tokens(tokenizer)
        self._end_id = self._template_end() if self.jinja else None

    def _token(self, name: str) -> str | None:
        i = getattr(self.tokenizer, f"{name}_id", None)
        return None if i is None else self.tokenizer.id_to_bytes(i).decode("utf-8", "replace")

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        return render_template(self.jinja, messages, add_generation_prompt, self._token("bos"), self._token("eos"))

    def _template_end(self) -> int | None:
        """The special token the template writes right after an assistant message, which ends a reply
        (`<|im_end|>` in ChatML, `<|eot_id|>` in Llama 3), or None if it writes none there."""
        reply = "scratchlm probe reply"
        try:
            text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}], False)
        except UserError:
            return None
        after = text[text.rfind(reply) + len(reply):] if reply in text else ""
        ends = [(len(s), i) for s, i in self.tokenizer.special_tokens.items() if s and after.startswith(s)]
        return max(ends)[1] if ends else None

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        if self.jinja:
            pieces = render_guarded(self.jinja, messages, self.tokenizer.special_tokens, True,
                                    self._token("bos"), self._token("eos"))
            ids: list[int] = []
            for k, piece in enumerate(pieces):
                if piece:
                    ids += encode_text(self.tokenizer, piece) if k % 2 else self.tokenizer.encode(piece)
            return ids
        if self.templated:
            return render_prompt(self.tokenizer, messages)
        text = "".join(f"{PLAIN_NAMES[m['role']]}: {m['content']}\n" for m in messages) + "Assistant:"
        return encode_text(self.tokenizer, text)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        if self.jinja:
            tok = self.tokenizer
            ids = [*(getattr(tok, "stop_ids", None) or ()), tok.eos_id, self._end_id]
            return tuple(dict.fromkeys(i for i in ids if i is not None))
        if self.templated:
            return stop_ids(self.tokenizer)
        return tuple(self.tokenizer.stop_ids)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.templated else ("\nUser:", "\nSystem:")

    def fit(self, messages: Sequence[Message], budget: int) -> list[dict[str, str]]:
        return fit_history(self.tokenizer, messages, budget, self.prompt)


def add_chat_tokens(tokenizer: Tokenizer, model: nn.Module | None = None,
                    tokens: Sequence[str] = CHAT_TOKENS) -> tuple[Tokenizer, list[str]]:
    """A tokenizer with the special tokens it lacks appended (after its last id), and the names added.
    With a model, its embedding (and output head) grows to match, in place: see `resize_vocab`."""
    have = tokenizer.special_tokens
    added = [t for t in tokens if t not in have]
    if not added:
        if model is not None and model.config.vocab_size < tokenizer.vocab_size:
            resize_vocab(model, tokenizer.vocab_size, [])
        return with_chat_roles(tokenizer), []
    vocab = tokenizer.vocab
    specials = dict(have)
    for t in added:
        specials[t] = len(vocab)
        vocab[len(vocab)] = t.encode("utf-8")
    new = Tokenizer(vocab, tokenizer.merges, specials, uncased=tokenizer.uncased).with_roles(**tokenizer.roles)
    if model is not None:
        resize_vocab(model, max(new.vocab_size, model.config.vocab_size), [specials[t] for t in added],
                     known=tokenizer.vocab_size)
    return with_chat_roles(new), added


def with_chat_roles(tokenizer: Tokenizer) -> Tokenizer:
    """A tokenizer with scratchlm's chat tokens, set up for the world outside scratchlm: its Jinja chat
    template (`SCRATCHLM_TEMPLATE`, which renders the ids `render` gives) and `<|end|>` as its end of
    sequence, since every reply ends there, with `<eos>` kept as a second stop token. Exports write both,
    so transformers and llama.cpp format a conversation as the model was trained and stop where it does.
    A tokenizer that already carries a template, or lacks the chat tokens, is returned as it is."""
    if tokenizer.chat_template is not None or not has_chat_tokens(tokenizer):
        return tokenizer
    end = tokenizer.special_tokens[END]
    stops = [end] + [i for i in (tokenizer.eos_id,) if i is not None and i != end]
    return tokenizer.with_roles(eos=end, eos_list=stops, chat_template=SCRATCHLM_TEMPLATE)


@torch.no_grad()
def resize_vocab(model: nn.Module, vocab_size: int, new_ids: Sequence[int], known: int | None = None) -> None:
    """Give `model` `vocab_size` rows of token embedding and output head, in place, keeping weight tying.

    The rows of `new_ids` start as the mean of the rows of the `known` first ids (the tokens the model was
    trained on): a new token then looks like an average token instead of a random vector of the wrong
    scale, and the output head gives it an average logit, so the first fine-tuning steps do not see it
    as a near-certain or near-impossible next token."""
    emb, head = model.tok_emb, model.lm_head
    tied = head.weight is emb.weight
    old_n, dim = emb.weight.shape
    known = min(known or old_n, old_n)

    def grow(weight: torch.Tensor) -> torch.Tensor:
        out = weight.new_zeros(max(vocab_size, old_n), weight.shape[1])
        out[:old_n] = weight
        mean = weight[:known].mean(dim=0)
        for i in new_ids:
            out[i] = mean
        return out[:vocab_size]

    def grown(table: nn.Embedding) -> nn.Embedding:
        new = nn.Embedding(vocab_size, table.weight.shape[1], device=table.weight.device, dtype=table.weight.dtype)
        new.weight.copy_(grow(table.weight))
        new.weight.requires_grad_(table.weight.requires_grad)
        return new

    new_emb = model.tok_emb = grown(emb)
    for k, table in enumerate(model.value_embeds):  # the value tables are indexed by token id too
        model.value_embeds[k] = grown(table)
    if tied:
        model.lm_head.weight = new_emb.weight
    else:
        new_head = nn.Linear(dim, vocab_size, bias=False, device=head.weight.device, dtype=head.weight.dtype)
        new_head.weight.copy_(grow(head.weight))
        new_head.weight.requires_grad_(head.weight.requires_grad)
        model.lm_head = new_head
    model.config.vocab_size = vocab_size
