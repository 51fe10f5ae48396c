"""Jinja chat templates, the form in which Hugging Face and GGUF files carry a model's chat format.

`SCRATCHLM_TEMPLATE` is scratchlm's own template (chat/template.py) written in that form, for tools that
only read Jinja: with it, `transformers`' `apply_chat_template` on a scratchlm tokenizer folder gives the
ids of `render` and `render_prompt`. `render_template` renders any such template the way `transformers`
does (sandboxed Jinja with trim_blocks and lstrip_blocks, and the helpers templates expect:
`raise_exception`, `strftime_now`, a `tojson` that leaves non-ASCII text alone, and `{% generation %}`
blocks, which only matter to transformers' assistant masks and render their body here), so a model
imported with its template is prompted as its authors prompted it.

What a Jinja template cannot do is keep message text from forging special tokens: it only makes text,
and the tokenizer then reads every special-token string in that text as the special token. So a message
holding `<|end|>` is the one case where `SCRATCHLM_TEMPLATE` in transformers and `render` differ (`render`
encodes it as plain characters). `render_guarded` closes that hole for our own use of a template: the
special-token strings in the messages come back marked, to be encoded as plain characters.
"""
from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from scratchlm.errors import UserError

# scratchlm's template (see chat/template.py): `<bos>`, then per message its role token, its text and
# `<|end|>`; `<|assistant|>` asks for a reply. "developer" is OpenAI's newer name for the system role,
# and content given as a list of text parts is their joined text, as `check_messages` reads both.
SCRATCHLM_TEMPLATE = """\
{%- set role_tokens = {'system': '<|system|>', 'developer': '<|system|>', 'user': '<|user|>',
                       'assistant': '<|assistant|>'} -%}
{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}
{%- for message in messages -%}
    {%- if message['role'] not in role_tokens -%}
        {{- raise_exception('messages[' ~ loop.index0 ~ ']: the role ' ~ message['role'] ~
                            ' is not one of system, developer, user, assistant') -}}
    {%- endif -%}
    {{- role_tokens[message['role']] -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}
    {%- endif -%}
    {{- '<|end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}
"""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks what the assistant says, for transformers' assistant
    token masks. Rendering keeps its body, in a scope of its own as transformers' call block has."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _Refusal(jinja2.TemplateError):
    """What a template's `raise_exception` raises: its reason for refusing a conversation."""


def _raise_exception(message):
    raise _Refusal(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own filter escapes <, >, & and ' for HTML, which would change what a prompt says.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come inside downloaded model files: the sandbox keeps them from reaching Python's internals
    # or changing the messages they are given.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def check_template(template: object, where: str) -> None:
    """UserError naming `where` when `template` is not a Jinja template that parses."""
    if not isinstance(template, str):
        raise UserError(f"{where}: the chat template must be text (a Jinja template), not {type(template).__name__}")
    try:
        _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {_one_line(e.message)}); "
                        "fix or remove it") from None


def render_template(template: str, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                    bos_token: str | None = None, eos_token: str | None = None) -> str:
    """The text `template` makes of `messages`, as transformers' `apply_chat_template(tokenize=False)` makes
    it. A token left as None is undefined in the template, as transformers leaves a token the tokenizer
    lacks. UserError, one line, when the template refuses the conversation (its `raise_exception`) or
    fails on it."""
    check_template(template, "chat template")
    tokens = {name: t for name, t in (("bos_token", bos_token), ("eos_token", eos_token)) if t is not None}
    try:
        return _compile(template).render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **tokens)
    except _Refusal as e:
        raise UserError(f"the chat template refused this conversation: {_one_line(e)}") from None
    except Exception as e:  # the template's own code failed: an undefined name, a forbidden or bad operation
        raise UserError(f"the chat template failed on this conversation ({type(e).__name__}: {_one_line(e)})") from None


# Two Unicode noncharacters, which the standard sets aside for a program's internal use, fence the
# special-token strings found in message text while the template runs.
OPEN, CLOSE = "\ufdd0", "\ufdd1"


def _fence(value, pattern: re.Pattern):
    if isinstance(value, str):
        # Fences already in the text are dropped, so that a message cannot fence (and so hide) a template's own token.
        value = value.replace(OPEN, "").replace(CLOSE, "")
        return pattern.sub(lambda m: OPEN + m.group(0) + CLOSE, value)
    if isinstance(value, Mapping):
        return {k: _fence(v, pattern) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fence(v, pattern) for v in value]
    return value


def render_guarded(template: str, messages: Sequence[Mapping], guarded: Iterable[str],
                   add_generation_prompt: bool = False, bos_token: str | None = None,
                   eos_token: str | None = None) -> list[str]:
    """`render_template`'s text cut into pieces: the even ones are the template's text, each odd one a
    `guarded` string (a special token's) that came from a message, which the caller encodes as plain
    characters. A fence that the template cut apart (by slicing a message, say) leaves an empty odd piece,
    so the text on its two sides is still encoded apart and cannot join into a special token."""
    alternatives = "|".join(re.escape(s) for s in sorted(set(guarded), key=len, reverse=True) if s)
    if not alternatives:
        return [render_template(template, messages, add_generation_prompt, bos_token, eos_token)]
    pattern = re.compile(alternatives)
    text = render_template(template, _fence(list(messages), pattern), add_generation_prompt, bos_token, eos_token)
    pieces = re.split(f"{OPEN}({alternatives}){CLOSE}|[{OPEN}{CLOSE}]", text)
    return [p or "" for p in pieces]
