"""The measurements under every benchmark score: how likely a model finds a continuation after a context
(`loglikelihoods`), and what it writes after a prompt when it always takes its most likely token
(`greedy_completions`).

Text pairs become tokens as lm-evaluation-harness makes them (`encode_pair`), so that the two agree to
the example: whitespace at the end of a context goes with the continuation (" Paris" after "is", as in
running text), the pair is encoded whole and the continuation is what follows the context's own tokens.
A pair longer than the model's context loses context tokens from the left, and says how many.

Requests that share a context share its prefill: the context runs through the model once, into a KV
cache that is copied once per continuation, and the continuations then run together on top of it. A
multiple-choice question with eleven answers costs one pass over its prompt instead of eleven. Only the
positions that predict a continuation token go through the output head.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scratchlm.runtime import eval_mode

Pair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class Score:
    logprob: float     # sum over the continuation's tokens of log P(token | everything before it)
    greedy: bool       # each continuation token was the model's most likely next token
    tokens: int        # continuation tokens
    cut: int = 0       # context tokens dropped from the left to fit the model's context


class ContinuationTooLong(ValueError):
    """A continuation that cannot fit the model's context even with no context before it."""

    def __init__(self, index: int, tokens: int, window: int):
        super().__init__(f"request {index}: a continuation of {tokens} tokens is longer than the model's context "
                         f"({window})")
        self.index, self.tokens, self.window = index, tokens, window


class OutsideVocabulary(ValueError):
    """A token the model has no embedding for: a byte its source vocabulary lacked (`scratchlm convert`
    gives such bytes ids past the model's), which the model cannot read."""

    def __init__(self, index: int, token: int, tokenizer=None):
        what = f"token {token}"
        if tokenizer is not None:
            what = repr(tokenizer.decode_bytes([token], errors="replace"))
        super().__init__(f"request {index}: {what} is a token the model has no embedding for")
        self.index, self.token, self.what = index, token, what


def check_vocabulary(model, sequences: Sequence[Sequence[int]], tokenizer=None) -> None:
    """OutsideVocabulary for the first sequence holding a token past the model's embedding table."""
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is None:
        return
    for i, ids in enumerate(sequences):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise OutsideVocabulary(i, bad, tokenizer)


def empty_prompt(tokenizer) -> list[int]:
    """What a model reads when there is nothing before: `<bos>`, or a line break for a tokenizer without it."""
    from scratchlm.infer.prompt import plain_prompt

    return plain_prompt(tokenizer, "")[0]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-evaluation-harness splits a pair. An empty context becomes
    `empty_prompt`; a continuation that BPE merged into the context's last token is encoded on its own."""
    if not context:
        prefix, ids = empty_prompt(tokenizer), tokenizer.encode(continuation)
        if len(prefix) == 1 and ids and ids[0] == prefix[0]:  # it already starts with the start token
            return ids[:1], ids[1:]
        return prefix, ids
    trail = len(context) - len(context.rstrip())
    if trail:
        context, continuation = context[:-trail], context[-trail:] + continuation
    ctx = tokenizer.encode(context)
    rest = tokenizer.encode(context + continuation)[len(ctx):]
    return ctx, rest or tokenizer.encode(continuation)


def fit(context: Sequence[int], continuation: Sequence[int], window: int) -> tuple[list[int], int]:
    """The context tokens that fit before `continuation` in a `window`-token model (the model reads the
    context and all but the last continuation token), and how many were cut from its left."""
    keep = window + 1 - len(continuation)
    cut = max(0, len(context) - keep)
    return list(context[cut:]), cut


def rolling_pairs(ids: Sequence[int], prefix: Sequence[int], window: int) -> list[tuple[list[int], list[int]]]:
    """A long text as pairs that score each of its tokens once, `window` at a time, each with as much of
    the text before it as fits (lm-evaluation-harness's disjoint rolling windows); the first token is
    predicted from `prefix`."""
    tokens, pairs = list(prefix) + list(ids), []
    for start in range(0, len(ids), window):
        pairs.append((tokens[:len(prefix) + start], list(ids[start:start + window])))
    return pairs


@torch.inference_mode()
def loglikelihoods(model: torch.nn.Module, pairs: Sequence[Pair], *, batch_tokens: int = 8192, max_batch: int = 64,
                   on_done: Callable[[list[int]], None] | None = None) -> list[Score]:
    """A Score per (context ids, continuation ids) pair, computed in batches of about `batch_tokens` cached
    positions. `on_done` hears the indices of the pairs each batch finished. A model without a KV cache
    (`new_cache`) reads each pair whole instead."""
    window = model.config.context
    check_vocabulary(model, [list(ctx) + list(cont) for ctx, cont in pairs])
    fitted, cuts = [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"request {i}: the context and the continuation must each hold a token")
        if len(cont) > window:
            raise ContinuationTooLong(i, len(cont), window)
        kept, cut = fit(ctx, cont, window)
        fitted.append((tuple(kept), list(cont)))
        cuts.append(cut)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(fitted):
        groups.setdefault(ctx, []).append(i)
    # Longest first: a batch holds work of about one length, so little of it is padding.
    order = sorted(groups.items(), key=lambda g: -(len(g[0]) + max(len(fitted[i][1]) for i in g[1])))
    results: list[Score | None] = [None] * len(pairs)
    cached = hasattr(model, "new_cache")
    with eval_mode(model):
        for batch in _batches(order, fitted, window, batch_tokens, max_batch):
            scored = _score_cached(model, batch, fitted) if cached else _score_whole(model, batch, fitted)
            for i, (logprob, greedy) in scored.items():
                results[i] = Score(logprob, greedy, len(fitted[i][1]), cuts[i])
            if on_done:
                on_done(sorted(scored))
    return results  # type: ignore[return-value]


def _batches(order, fitted, window: int, batch_tokens: int, max_batch: int):
    """Groups in batches of at most `max_batch` contexts and about `batch_tokens` cached positions, each
    batch's longest context and longest continuation together within the model's context."""
    batch, rows, ctx_len, tail_len = [], 0, 0, 0
    for ctx, members in order:
        tail = max(len(fitted[i][1]) for i in members) - 1
        c, t = max(ctx_len, len(ctx)), max(tail_len, tail)
        if batch and ((rows + len(members)) * (c + t) > batch_tokens or len(batch) >= max_batch or c + t > window):
            yield batch
            batch, rows, c, t = [], 0, len(ctx), tail
        batch.append((ctx, members))
        rows, ctx_len, tail_len = rows + len(members), c, t
    if batch:
        yield batch


def _gather(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    logp = F.log_softmax(logits.float(), dim=-1)
    return float(logp.gather(-1, targets[:, None]).sum()), bool((logp.argmax(-1) == targets).all())


def _score_cached(model, batch, fitted) -> dict[int, tuple[float, bool]]:
    """Every context of the batch prefilled at once (left-padded), its cache rows repeated per continuation,
    then every continuation but its last token run on top, right-padded: a causal model's real tokens never
    see the padding after them."""
    device = next(model.parameters()).device
    longest = max(len(ctx) for ctx, _ in batch)
    pads = [longest - len(ctx) for ctx, _ in batch]
    x = torch.tensor([[0] * p + list(ctx) for p, (ctx, _) in zip(pads, batch)], device=device)
    pad = torch.tensor(pads, device=device) if any(pads) else None
    members = [i for _, ms in batch for i in ms]
    tails = max(len(fitted[i][1]) for i in members) - 1
    cache = model.new_cache(len(batch), longest + max(tails, 0) or 1)
    first = model(x, cache=cache, pad=pad, last_only=True)[:, -1]
    out = {}
    if tails == 0:
        for row, (_, ms) in enumerate(batch):
            for i in ms:
                out[i] = _gather(first[row:row + 1], torch.tensor(fitted[i][1], device=device))
        return out
    index = torch.tensor([row for row, (_, ms) in enumerate(batch) for _ in ms], device=device)
    cache.k, cache.v = cache.k.index_select(1, index), cache.v.index_select(1, index)
    rest = [fitted[i][1][:-1] for i in members]
    y = torch.tensor([r + [0] * (tails - len(r)) for r in rest], device=device)
    logits = model(y, cache=cache, pad=None if pad is None else pad[index])
    for r, i in enumerate(members):
        cont = fitted[i][1]
        rows = torch.cat([first[index[r]][None], logits[r, :len(cont) - 1]])
        out[i] = _gather(rows, torch.tensor(cont, device=device))
    return out


def _score_whole(model, batch, fitted) -> dict[int, tuple[float, bool]]:
    """Each pair as one row, context and continuation together, right-padded."""
    device = next(model.parameters()).device
    members = [i for _, ms in batch for i in ms]
    rows = [list(fitted[i][0]) + fitted[i][1][:-1] for i in members]
    width = max(map(len, rows))
    logits = model(torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device))
    out = {}
    for r, i in enumerate(members):
        ctx, cont = fitted[i]
        out[i] = _gather(logits[r, len(ctx) - 1:len(ctx) - 1 + len(cont)], torch.tensor(cont, device=device))
    return out


def greedy_completions(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]], stop: Sequence[str],
                       max_new_tokens: int, *, batch: int = 16,
                       on_done: Callable[[int], None] | None = None) -> tuple[list[str], list[int]]:
    """Each prompt's greedy continuation as text, ended before the first of `stop` (or at the tokenizer's
    end token, or after `max_new_tokens`), and how many prompt tokens were cut from the left so that prompt
    and continuation fit the model's context."""
    from scratchlm.infer.generate import complete_batch
    from scratchlm.infer.prompt import end_ids
    from scratchlm.infer.sampling import MAX_STOP_STRINGS, SamplingParams

    check_vocabulary(model, prompts, tokenizer)
    room = max(1, model.config.context - max_new_tokens)
    kept = [list(p[-room:]) for p in prompts]
    cuts = [len(p) - len(k) for p, k in zip(prompts, kept)]
    params = SamplingParams(max_new_tokens, temperature=0.0, stop=tuple(dict.fromkeys(s for s in stop if s))[:MAX_STOP_STRINGS],
                            stop_ids=end_ids(tokenizer))
    texts: list[str] = []
    for start in range(0, len(kept), batch):
        texts += [c.text for c in complete_batch(model, tokenizer, kept[start:start + batch], params)]
        if on_done:
            on_done(len(kept[start:start + batch]))
    return texts, cuts
