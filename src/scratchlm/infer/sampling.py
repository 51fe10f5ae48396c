"""Choosing the next token from the model's logits: greedy, temperature, top-k, top-p, min-p and a
repetition penalty, in that order.

Each filter sets the logits of the tokens it drops to -inf; sampling then draws from the softmax of
what is left, so the kept tokens keep their relative probabilities. Min-p compares each token with the
most likely one, a ratio that renormalising does not change, so it gives the same set whether it runs
before or after top-k and top-p.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import torch

from scratchlm.errors import UserError

MAX_STOP_STRINGS = 16
MAX_SEED = 2**64 - 1   # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    max_new_tokens: int = 200
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()    # generation ends at these tokens, which are not returned
    min_p: float = 0.0                # 0: off; keep tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0   # 1: off; above 1, tokens already in the sequence become less likely
    stop: tuple[str, ...] = ()        # stop strings: text generation ends before the first one

    def __post_init__(self):
        self.check()

    def check(self) -> SamplingParams:
        """Raise UserError naming the first value out of range; return self so calls can chain. Every
        construction runs it; call it again after changing a field."""
        def bad(name: str, why: str):
            raise UserError(f"sampling parameter {name} = {getattr(self, name)!r}: {why}")

        def whole(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not whole(self.max_new_tokens) or self.max_new_tokens < 0:
            bad("max_new_tokens", "must be a whole number >= 0")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, "must be a number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 is greedy)")
        if not whole(self.top_k) or self.top_k < 0:
            bad("top_k", "must be a whole number >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 is off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 is off)")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 is off)")
        if self.seed is not None and (not whole(self.seed) or not 0 <= self.seed <= MAX_SEED):
            bad("seed", "must be a whole number from 0 to 2**64 - 1")
        if len(self.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", f"must be at most {MAX_STOP_STRINGS} non-empty strings")
        return self

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


# Each entry point's defaults, in one place so that they differ on purpose. A chat reply is sampled more
# cautiously (lower temperature, nucleus, a repetition penalty) than free text; the short rows are for
# samples a person reads at a glance. The server starts from the dataclass's defaults, which are OpenAI's
# (temperature 1, no filters); its length is the request's max_tokens or what is left of the context.
SAMPLING = {
    "generate": SamplingParams(max_new_tokens=200, temperature=0.8),
    "chat": SamplingParams(max_new_tokens=256, temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1),
    "rate": SamplingParams(max_new_tokens=80, temperature=0.8, top_k=50),
    "demo": SamplingParams(max_new_tokens=120, temperature=0.8, top_k=50),
    "train_sample": SamplingParams(max_new_tokens=48, temperature=0.8, top_k=50, seed=0),
    "serve": SamplingParams(),
}


def sampling_for(entry: str, **given) -> SamplingParams:
    """`entry`'s row of SAMPLING with the values given in place of its own (None: keep the row's);
    UserError when a value is out of range."""
    return dataclasses.replace(SAMPLING[entry], **{k: v for k, v in given.items() if v is not None})


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL paper's penalty on tokens in `seen` (B, V) bool: a positive logit is divided by the
    penalty and a negative one multiplied, so either way the token loses probability."""
    if penalty == 1.0:
        return logits
    logits = logits.float()
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """float32 logits (B, V) divided by the temperature, with -inf on every token the filters drop."""
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if params.top_k and params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # A token goes when the tokens ranked above it already reach top_p; the first always stays.
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    if params.min_p > 0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p), without forming the softmax.
        floor = logits.max(dim=-1, keepdim=True).values + math.log(params.min_p)
        logits = logits.masked_fill(logits < floor, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); `seen` (B, V) marks the tokens the
    repetition penalty applies to."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
