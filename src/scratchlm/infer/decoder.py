"""Token decoding with a KV cache: several prompts of different lengths at once, one token a step, each
row with its own sampling parameters, stop ids and length. It knows nothing of text (see `text.py`).

A batch is left-padded so that every row's last prompt token sits in the same column; the model hides
the padding (its `pad` argument), so each row is computed as if it were alone. Rows that finish leave
the batch, and their cache rows with them. Past the model's context, the cache is refilled with the most
recent three quarters of each row, so generation can run on for as long as asked with any position scheme.
The sampling rules themselves are in `sampling.py`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from scratchlm.errors import UserError
from scratchlm.infer.sampling import SamplingParams, sample_next


@dataclass
class Row:
    """One prompt's state. Its window, the tokens from `start` on, is what it attends to: it slides on
    the row's own schedule, so that a row computes the same thing in any batch as it would alone."""
    tokens: list[int]                       # prompt + generated
    params: SamplingParams
    generator: torch.Generator | None       # shared by every row of a batch given one SamplingParams
    start: int
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None        # "stop", "length", "cancelled"; None while it goes on

    @property
    def remaining(self) -> int:
        return self.params.max_new_tokens - len(self.output)


def _generator(params: SamplingParams) -> torch.Generator | None:
    return torch.Generator().manual_seed(params.seed) if params.seed is not None else None


def check_tokens(model: torch.nn.Module, ids: Sequence[int]) -> None:
    """Refuse a prompt holding a token the model has no embedding for. A converted model's tokenizer can
    spell a byte its source vocabulary lacked with an id past the model's table (see `scratchlm convert`)."""
    vocab = model.config.vocab_size
    bad = next((int(t) for t in ids if not 0 <= int(t) < vocab), None)
    if bad is not None:
        raise UserError(f"the prompt holds token {bad}, which this model (a vocabulary of {vocab}) has no "
                        f"embedding for: its tokenizer spells some text the model cannot read; leave that text out")


class BatchDecoder:
    """Generates for several prompts at once, one `step()` at a time.

    `params` is one SamplingParams for every row (one random generator, seeded once) or a list with one
    per row (each row with its own generator, so a seeded row samples the same tokens whichever batch it
    is in). A row ends at a stop id (not returned), at `max_new_tokens`, or when `finish(row)` is called.
    `rows[r]` holds row r's tokens, output and finish reason; `active` lists the rows still generating,
    in their order in the batch, which is also the order of the cache's rows.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]):
        if not prompts:
            raise ValueError("no prompts to generate from")
        self.model = model
        self.device = next(model.parameters()).device
        self.context = model.config.context
        self.shared = isinstance(params, SamplingParams)
        if self.shared:
            params, generators = [params] * len(prompts), [_generator(params)] * len(prompts)
        elif len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sets of sampling parameters")
        else:
            generators = [_generator(p) for p in params]
        self.rows = [self._row(prompt, p, g) for prompt, p, g in zip(prompts, params, generators)]
        self.active = [r for r, row in enumerate(self.rows) if row.finish_reason is None]
        # (active rows, vocab): which tokens each row holds, for the repetition penalty; None when unused
        self.seen = self._seen(self.active) if any(p.repetition_penalty != 1.0 for p in params) else None
        self.cache = None
        self.pad: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.refill = True        # the cache must be rebuilt from every row's window before sampling

    def _row(self, prompt: Sequence[int], params: SamplingParams, generator: torch.Generator | None) -> Row:
        if len(prompt) == 0:
            raise ValueError("every prompt must hold at least one token")
        check_tokens(self.model, prompt)
        tokens = [int(t) for t in prompt]
        return Row(tokens, params, generator, start=max(0, len(tokens) - self.context),
                   finish_reason=None if params.max_new_tokens > 0 else "length")

    @property
    def done(self) -> bool:
        return not self.active

    def _seen(self, rows: list[int]) -> torch.Tensor:
        vocab = self.model.config.vocab_size
        seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            seen[i, [t for t in self.rows[r].tokens if 0 <= t < vocab]] = True
        return seen

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Let one more prompt join between steps (continuous batching); returns its row. Only the new
        prompt is run, into the running cache, when it fits in the columns the cache already has; a longer
        one has every row's cache rebuilt at the next step (a prefill of the whole batch)."""
        row = self._row(prompt, params, _generator(params))
        r = len(self.rows)
        self.rows.append(row)
        self.shared = False  # from now on each row samples with its own parameters
        if row.finish_reason is not None:
            return r
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
        window = self.rows[r].tokens[self.rows[r].start:]
        length, head = self.cache.length, len(window) - 1
        if head > length:
            return False
        remaining = max(self.rows[q].remaining for q in self.active)
        capacity = max(self.cache.capacity, min(self.context, length + remaining))
        one, offset = self.model.new_cache(1, capacity), length - head
        pad = torch.tensor([offset], device=self.device)
        if head:
            one.length = offset  # so its positions are the columns it will sit in
            self.model(torch.tensor([window[:-1]], device=self.device), cache=one, pad=pad, last_only=True)
        cache = self.cache
        if capacity > cache.capacity:
            grown = [t.new_zeros(t.shape[:3] + (capacity, t.shape[4])) for t in (cache.k, cache.v)]
            for new, old in zip(grown, (cache.k, cache.v)):
                new[:, :, :, :length] = old[:, :, :, :length]
            cache.k, cache.v = grown
        cache.k = torch.cat([cache.k, one.k], dim=1)
        cache.v = torch.cat([cache.v, one.v], dim=1)
        pads = self.pad if self.pad is not None else torch.zeros(len(self.active) - 1, dtype=torch.long,
                                                                 device=self.device)
        self.pad = torch.cat([pads, pad]) if offset or self.pad is not None else None
        return True

    def finish(self, row: int, reason: str = "stop") -> None:
        """End a row early (a stop string, a client gone); its cache row is freed at once."""
        if row in self.active:
            self.rows[row].finish_reason = reason
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
        windows = [self.rows[r].tokens[self.rows[r].start:] for r in self.active]
        longest = max(map(len, windows))
        pads = [longest - len(t) for t in windows]
        batch = torch.tensor([[0] * p + t for p, t in zip(pads, windows)], device=self.device)
        self.pad = torch.tensor(pads, device=self.device) if any(pads) else None
        # Room for what this batch can still reach rather than a whole context: the model allocates the
        # cache zeroed, and zeroing a context's worth was most of the time to the first token (SmolLM2's
        # 8192 positions are 377 MB a row). The last token picked is never fed back: one position less.
        reach = longest + max(self.rows[r].remaining for r in self.active) - 1
        self.cache = self.model.new_cache(len(windows), max(1, min(self.context, reach)))
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
            last = torch.tensor([[self.rows[r].tokens[-1]] for r in self.active], device=self.device)
            self.logits = self.model(last, cache=self.cache, pad=self.pad)[:, -1]
        picks = self._sample()
        self.logits = None
        events, ended = [], set()
        for i, (r, t) in enumerate(zip(self.active, picks)):
            row = self.rows[r]
            if t in row.params.stop_ids:
                row.finish_reason = "stop"
                events.append((r, None, "stop"))
                ended.add(r)
                continue
            row.tokens.append(t)
            row.output.append(t)
            if self.seen is not None and 0 <= t < self.seen.shape[1]:
                self.seen[i, t] = True
            if row.remaining <= 0:
                row.finish_reason = "length"
                ended.add(r)
            events.append((r, t, row.finish_reason))
        if ended:
            self._drop(ended)
        if self.active and self.cache.length >= self.cache.capacity:
            # A row whose window fills the context restarts it from its last three quarters (not all of
            # it, which leaves room for a quarter context of cheap one-token steps before the next refill);
            # the other rows keep their windows. All are run again, since the padding changes.
            keep = max(1, self.context * 3 // 4)
            for r in self.active:
                row = self.rows[r]
                if len(row.tokens) - 1 - row.start >= self.context:
                    row.start = len(row.tokens) - keep
            self.refill = True
        return events

    def _sample(self) -> list[int]:
        if self.shared:
            first = self.rows[self.active[0]]
            return sample_next(self.logits, first.params, first.generator, self.seen).tolist()
        out = []
        for i, r in enumerate(self.active):
            seen = self.seen[i:i + 1] if self.seen is not None else None
            row = self.rows[r]
            out.append(int(sample_next(self.logits[i:i + 1], row.params, row.generator, seen)))
        return out
