"""Sampling from a model with a KV cache: one prompt or a batch of prompts of different lengths,
token by token, with stop tokens, stop strings and streaming.

A batch is left-padded so that every row's last prompt token sits in the same column; the model hides
the padding (its `pad` argument), so each row is computed as if it were alone. Rows that finish leave
the batch, and their cache rows with them. Past the model's context, the cache is refilled with the most
recent three quarters of each row, so generation can run on for as long as asked with any position scheme.

The sampling rules themselves are in `sampling.py`; text (UTF-8 pieces, stop strings) in `TextStream`.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from scratchlm.infer.sampling import (  # noqa: F401  (re-exported: the historical home of these names)
    SamplingParams,
    apply_repetition_penalty,
    filter_logits,
    sample_next,
)


class BatchDecoder:
    """Generates for several prompts at once, one `step()` at a time.

    `params` is one SamplingParams for every row (one random generator, seeded once) or a list with one
    per row (each row with its own generator, so a seeded row samples the same tokens whichever batch it
    is in). A row ends at a stop id (not returned), at `max_new_tokens`, or when `finish(row)` is called.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]):
        if not prompts:
            raise ValueError("no prompts to generate from")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt must hold at least one token")
        n = len(prompts)
        self.model = model
        self.device = next(model.parameters()).device
        self.context = model.config.context
        self.shared = isinstance(params, SamplingParams)
        self.params = [params] * n if self.shared else list(params)
        if len(self.params) != n:
            raise ValueError(f"{n} prompts but {len(self.params)} sets of sampling parameters")
        if self.shared:
            gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
            self.generators = [gen] * n
        else:
            self.generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                               for p in self.params]
        self.tokens = [[int(t) for t in p] for p in prompts]     # prompt + generated, per row
        # Each row attends to its tokens from start[r] on: its window, which slides on its own schedule
        # so that a row computes the same thing in any batch as it would alone.
        self.start = [max(0, len(p) - self.context) for p in self.tokens]
        self.outputs: list[list[int]] = [[] for _ in range(n)]
        self.finish_reason: list[str | None] = [None if p.max_new_tokens > 0 else "length" for p in self.params]
        self.active = [r for r in range(n) if self.finish_reason[r] is None]   # row of each batch position
        # (active rows, vocab): which tokens each row holds, for the repetition penalty; None when unused
        self.seen = self._seen(self.active) if any(p.repetition_penalty != 1.0 for p in self.params) else None
        self.cache = None
        self.pad: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.refill = True        # the cache must be rebuilt from every row's window before sampling

    @property
    def done(self) -> bool:
        return not self.active

    def _seen(self, rows: list[int]) -> torch.Tensor:
        vocab = self.model.config.vocab_size
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            seen[i, [t for t in self.tokens[r] if 0 <= t < vocab]] = True
        return seen

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Let one more prompt join between steps (continuous batching); returns its row. Only the new
        prompt is run, into the running cache, when it fits in the columns the cache already has; a longer
        one has every row's cache rebuilt at the next step (a prefill of the whole batch)."""
        if len(prompt) == 0:
            raise ValueError("every prompt must hold at least one token")
        r = len(self.tokens)
        self.tokens.append([int(t) for t in prompt])
        self.start.append(max(0, len(prompt) - self.context))
        self.outputs.append([])
        self.params.append(params)
        self.generators.append(torch.Generator().manual_seed(params.seed) if params.seed is not None else None)
        self.shared = False  # from now on each row samples with its own parameters
        if params.max_new_tokens <= 0:
            self.finish_reason.append("length")
            return r
        self.finish_reason.append(None)
        if self.seen is None and params.repetition_penalty != 1.0:
            self.seen = self._seen(self.active)
        self.active.append(r)
        if self.seen is not None:
            self.seen = torch.cat([self.seen, self._seen([r])])
        if self.refill or self.cache is None or not self._join(r):
            self.refill = True
        return r

    @torch.inference_mode()
    def _join(self, r: int) -> bool:
        """Put row r's window, all but its last token, in the last columns of the running cache, left-padded
        as a prefill would have placed it; the next step feeds that last token along with the other rows'.
        False when the window is longer than the cache so far. Rebuilding the whole batch instead runs every
        other row's tokens again at each arrival: with 16 clients sending 630-token prompts to the server,
        that was three quarters of its time."""
        window = self.tokens[r][self.start[r]:]
        length, head = self.cache.length, len(window) - 1
        if head > length:
            return False
        remaining = max(self.params[q].max_new_tokens - len(self.outputs[q]) for q in self.active)
        capacity = max(self.cache.capacity, min(self.context, length + remaining))
        row, offset = self.model.new_cache(1, capacity), length - head
        pad = torch.tensor([offset], device=self.device)
        if head:
            row.length = offset  # so its positions are the columns it will sit in
            self.model(torch.tensor([window[:-1]], device=self.device), cache=row, pad=pad, last_only=True)
        cache = self.cache
        if capacity > cache.capacity:
            grown = [t.new_zeros(t.shape[:3] + (capacity, t.shape[4])) for t in (cache.k, cache.v)]
            for new, old in zip(grown, (cache.k, cache.v)):
                new[:, :, :, :length] = old[:, :, :, :length]
            cache.k, cache.v = grown
        cache.k = torch.cat([cache.k, row.k], dim=1)
        cache.v = torch.cat([cache.v, row.v], dim=1)
        pads = self.pad if self.pad is not None else torch.zeros(len(self.active) - 1, dtype=torch.long,
                                                                 device=self.device)
        self.pad = torch.cat([pads, pad]) if offset or self.pad is not None else None
        return True

    def finish(self, row: int, reason: str = "stop") -> None:
        """End a row early (a stop string, a client gone); its cache row is freed at once."""
        if row in self.active:
            self.finish_reason[row] = reason
            self._drop({row})

    def _drop(self, rows: set[int]) -> None:
        keep = [i for i, r in enumerate(self.active) if r not in rows]
        self.active = [self.active[i] for i in keep]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self.seen is not None:
            self.seen = self.seen[index]
        if not self.active or self.refill:
            # A pending refill rebuilds all three, and a cache awaiting it may not hold the newest rows.
            self.cache = self.logits = self.pad = None
            return
        if self.logits is not None:
            self.logits = self.logits[index]
        if self.pad is not None:
            self.pad = self.pad[index]
            if not self.pad.any():
                self.pad = None
        if self.cache is not None:
            self.cache.k = self.cache.k.index_select(1, index)
            self.cache.v = self.cache.v.index_select(1, index)

    def _prefill(self) -> None:
        """Run every active row's window through a fresh cache, left-padded to the longest."""
        rows = [self.tokens[r][self.start[r]:] for r in self.active]
        longest = max(map(len, rows))
        pads = [longest - len(t) for t in rows]
        batch = torch.tensor([[0] * p + t for p, t in zip(pads, rows)], device=self.device)
        self.pad = torch.tensor(pads, device=self.device) if any(pads) else None
        # Room for what this batch can still reach rather than a whole context: the model allocates the
        # cache zeroed, and zeroing a context's worth was most of the time to the first token (SmolLM2's
        # 8192 positions are 377 MB a row). The last token picked is never fed back: one position less.
        reach = longest + max(self.params[r].max_new_tokens - len(self.outputs[r]) for r in self.active) - 1
        self.cache = self.model.new_cache(len(rows), max(1, min(self.context, reach)))
        self.logits = self.model(batch, cache=self.cache, pad=self.pad, last_only=True)[:, -1]

    # Inference mode rather than no_grad: it also skips the version counting and view tracking of every
    # op, which in a one-token step, dozens of small ops a layer, is a measurable share of the time.
    @torch.inference_mode()
    def step(self) -> list[tuple[int, int | None, str | None]]:
        """Sample one token for every active row. Returns (row, token, finish reason) per row that was
        active: token None when the row ended on a stop id, reason None while the row goes on."""
        if not self.active:
            return []
        if self.refill:
            self._prefill()
            self.refill = False
        elif self.logits is None:
            last = torch.tensor([[self.tokens[r][-1]] for r in self.active], device=self.device)
            self.logits = self.model(last, cache=self.cache, pad=self.pad)[:, -1]
        picks = self._sample()
        self.logits = None
        events, ended = [], set()
        for i, (r, t) in enumerate(zip(self.active, picks)):
            p = self.params[r]
            if t in p.stop_ids:
                self.finish_reason[r] = "stop"
                events.append((r, None, "stop"))
                ended.add(r)
                continue
            self.tokens[r].append(t)
            self.outputs[r].append(t)
            if self.seen is not None and 0 <= t < self.seen.shape[1]:
                self.seen[i, t] = True
            if len(self.outputs[r]) >= p.max_new_tokens:
                self.finish_reason[r] = "length"
                ended.add(r)
            events.append((r, t, self.finish_reason[r]))
        if ended:
            self._drop(ended)
        if self.active and self.cache.length >= self.cache.capacity:
            # A row whose window fills the context restarts it from its last three quarters (not all of
            # it, which leaves room for a quarter context of cheap one-token steps before the next refill);
            # the other rows keep their windows. All are run again, since the padding changes.
            keep = max(1, self.context * 3 // 4)
            for r in self.active:
                if len(self.tokens[r]) - 1 - self.start[r] >= self.context:
                    self.start[r] = len(self.tokens[r]) - keep
            self.refill = True
        return events

    def _sample(self) -> list[int]:
        if self.shared:
            r0 = self.active[0]
            return sample_next(self.logits, self.params[r0], self.generators[r0], self.seen).tolist()
        out = []
        for i, r in enumerate(self.active):
            seen = self.seen[i:i + 1] if self.seen is not None else None
            out.append(int(sample_next(self.logits[i:i + 1], self.params[r], self.generators[r], seen)))
        return out


def stream_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> Iterator[list[tuple[int, int | None, str | None]]]:
    """Yield each step's (row, token, finish reason) events; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        decoder = BatchDecoder(model, prompts, params)
        while not decoder.done:
            yield decoder.step()
    finally:
        model.train(was_training)


def generate_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams]) -> list[list[int]]:
    """New token ids for each prompt (without the prompt, without the stop id)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    for events in stream_batch(model, prompts, params):
        for r, t, _ in events:
            if t is not None:
                outputs[r].append(t)
    return outputs


def stream(model: torch.nn.Module, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield new token ids one at a time; stops after `max_new_tokens` or at a stop id (not yielded)."""
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    for events in stream_batch(model, [prompt], params):
        for _, t, _ in events:
            if t is not None:
                yield t


def generate(model: torch.nn.Module, prompt: list[int], params: SamplingParams) -> list[int]:
    return list(stream(model, prompt, params))


class TextStream:
    """Token ids in, text out, as soon as it is safe to show: bytes of an unfinished UTF-8 character are
    held back, and so is any tail that could be the start of a stop string. When a stop string appears,
    the text before it is released and `stopped` turns true; the stop string itself is never shown."""

    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.buffer = ""       # decoded text not yet released
        self.text = ""         # text released so far
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.buffer += self.decoder.decode(self.tokenizer.decode_bytes([token], errors="replace"))
        return self._release(final=False)

    def close(self) -> str:
        """The held-back rest, at the end of generation."""
        if self.stopped:
            return ""
        self.buffer += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # Released text never ends in a possible start of a stop string, so one can only begin in the buffer.
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer, self.stopped = self.buffer[:min(hits)], "", True
        elif final:
            out, self.buffer = self.buffer, ""
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
            cut = len(self.buffer) - hold
            out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        self.text += out
        return out


def stream_text(tokenizer, ids: Iterator[int], stop: Iterable[str] = ()) -> Iterator[str]:
    """Text pieces as tokens arrive, holding back bytes that do not yet form a whole UTF-8 character;
    with `stop`, ends (and closes `ids`, which ends its generation) before the first stop string."""
    text = TextStream(tokenizer, stop)
    try:
        for i in ids:
            piece = text.push(i)
            if piece:
                yield piece
            if text.stopped:
                return
        rest = text.close()
        if rest:
            yield rest
    finally:
        if hasattr(ids, "close"):
            ids.close()


class TextBatch:
    """A BatchDecoder that speaks text: each `step()` gives (row, text piece, finish reason) events, with
    stop strings honoured per row. A row's last event carries its finish reason ("stop" for a stop id or
    a stop string, "length" for max_new_tokens); its piece may be empty."""

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]):
        self.decoder = BatchDecoder(model, prompts, params)
        self.tokenizer = tokenizer
        self.texts = [TextStream(tokenizer, p.stop) for p in self.decoder.params]

    @property
    def done(self) -> bool:
        return self.decoder.done

    def cancel(self, row: int) -> None:
        self.decoder.finish(row, "cancelled")

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        row = self.decoder.add(prompt, params)
        self.texts.append(TextStream(self.tokenizer, params.stop))
        return row

    def step(self) -> list[tuple[int, str, str | None]]:
        out = []
        for r, t, reason in self.decoder.step():
            text = self.texts[r]
            piece = text.push(t) if t is not None else ""
            if text.stopped:
                self.decoder.finish(r, "stop")
                reason = self.decoder.finish_reason[r] = "stop"
            elif reason:
                piece += text.close()
            if piece or reason:
                out.append((r, piece, reason))
        return out

    def completion_tokens(self, row: int) -> int:
        return len(self.decoder.outputs[row])


@dataclass
class Completion:
    text: str
    finish_reason: str          # "stop" (a stop id or stop string) | "length"
    prompt_tokens: int
    completion_tokens: int      # tokens generated, including any that hold the stop string


def stream_completions(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                       params: SamplingParams | Sequence[SamplingParams]) -> Iterator[tuple[int, str, str | None]]:
    """TextBatch events as a generator; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        batch = TextBatch(model, tokenizer, prompts, params)
        while not batch.done:
            yield from batch.step()
    finally:
        model.train(was_training)


def complete_batch(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams]) -> list[Completion]:
    """The whole completion of each prompt, as text without any stop string."""
    was_training = model.training
    model.eval()
    try:
        batch = TextBatch(model, tokenizer, prompts, params)
        pieces: list[list[str]] = [[] for _ in prompts]
        while not batch.done:
            for r, piece, _ in batch.step():
                pieces[r].append(piece)
    finally:
        model.train(was_training)
    return [Completion("".join(pieces[r]), batch.decoder.finish_reason[r] or "length", len(p),
                       batch.completion_tokens(r)) for r, p in enumerate(prompts)]


def complete(model: torch.nn.Module, tokenizer, prompt: Sequence[int], params: SamplingParams) -> Completion:
    return complete_batch(model, tokenizer, [prompt], params)[0]
