"""Tokens to text as generation goes: UTF-8 characters split over tokens are held back until whole, and
stop strings end a row before they are shown. `TextStream` does it for one sequence of tokens,
`stream_text` for a token iterator, `TextBatch` for every row of a `BatchDecoder`."""
from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence

import torch

from scratchlm.infer.decoder import BatchDecoder
from scratchlm.infer.sampling import SamplingParams


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
    a stop string, "length" for max_new_tokens, "cancelled"); its piece may be empty."""

    def __init__(self, model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]):
        self._decoder = BatchDecoder(model, prompts, params)
        self._tokenizer = tokenizer
        self._texts = [TextStream(tokenizer, row.params.stop) for row in self._decoder.rows]

    @property
    def done(self) -> bool:
        return self._decoder.done

    @property
    def active(self) -> list[int]:
        """The rows still generating."""
        return list(self._decoder.active)

    def finish_reason(self, row: int) -> str | None:
        """Why the row ended; None while it goes on."""
        return self._decoder.rows[row].finish_reason

    def completion_tokens(self, row: int) -> int:
        """Tokens generated for the row, including any that hold a stop string."""
        return len(self._decoder.rows[row].output)

    def cancel(self, row: int) -> None:
        self._decoder.finish(row, "cancelled")

    def add(self, prompt: Sequence[int], params: SamplingParams) -> int:
        row = self._decoder.add(prompt, params)
        self._texts.append(TextStream(self._tokenizer, params.stop))
        return row

    def step(self) -> list[tuple[int, str, str | None]]:
        out = []
        for r, t, reason in self._decoder.step():
            text = self._texts[r]
            piece = text.push(t) if t is not None else ""
            if text.stopped:
                self._decoder.finish(r, "stop")
                reason = self._decoder.rows[r].finish_reason = "stop"
            elif reason:
                piece += text.close()
            if piece or reason:
                out.append((r, piece, reason))
        return out
