"""scratchlm as a model of EleutherAI's lm-evaluation-harness, so any of the harness's tasks can score a
run folder:

    python -m scratchlm.eval.harness --model scratchlm --model_args checkpoint=RUN --tasks TASKS ...

takes the same arguments as `lm_eval` (it is `lm_eval` with the `scratchlm` model registered: the harness
looks models up in its own table and has no plugin entry point, so plain `lm_eval` cannot know about it).
In Python, importing this module registers the model for `lm_eval.simple_evaluate(model="scratchlm", ...)`.

The three request types run on the same code as `scratchlm eval`: `loglikelihood` pairs are split into
tokens as the harness splits them and scored in batches that share each context's prefill;
`loglikelihood_rolling` scores a text in disjoint windows of the model's context, the first token
predicted from the empty prompt (`<bos>`, or a line break); `generate_until` decodes greedily to the
first stop string. Model arguments: checkpoint (required), device (auto), batch_size (examples scored
together, 16), max_gen_toks (256).
"""
from __future__ import annotations

import sys

try:
    import lm_eval.models  # noqa: F401  (the harness's own models, registered before ours)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise ImportError("the lm-evaluation-harness bridge needs lm-eval: pip install 'scratchlm[eval]'") from e

from scratchlm.errors import UserError
from scratchlm.eval.loglik import (
    ContinuationTooLong,
    OutsideVocabulary,
    empty_prompt,
    encode_pair,
    greedy_completions,
    loglikelihoods,
    rolling_pairs,
)

NAME = "scratchlm"


class ScratchLM(LM):
    def __init__(self, checkpoint: str | None = None, device: str | None = "auto", batch_size: int | str = 16,
                 max_gen_toks: int | str = 256, max_batch_size: int | str | None = None, **unknown):
        super().__init__()
        from scratchlm.loading import load
        from scratchlm.runtime import pick_device

        if unknown:
            raise UserError(f"--model_args: scratchlm takes checkpoint, device, batch_size and max_gen_toks, "
                            f"not {', '.join(unknown)}")
        if not checkpoint:
            raise UserError("--model_args checkpoint=RUN: name the run or checkpoint folder to evaluate")
        loaded = load(checkpoint, pick_device(device or "auto"))
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.batch = int(batch_size) if str(batch_size).isdigit() else 16   # "auto": the engine sizes batches
        self.max_gen_toks = int(max_gen_toks)

    @property
    def max_length(self) -> int:
        return self.model.config.context

    def _score(self, pairs, bar):
        try:
            return loglikelihoods(self.model, pairs, max_batch=self.batch, on_done=lambda done: bar.update(len(done)))
        except (ContinuationTooLong, OutsideVocabulary) as e:
            raise UserError(f"lm-eval {e}") from None

    def _requests(self, requests, what: str, disable_tqdm: bool):
        from tqdm import tqdm

        return tqdm(total=len(requests), desc=f"scratchlm {what}", disable=disable_tqdm)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, context, continuation) for context, continuation in
                 (r.args for r in requests)]
        with self._requests(requests, "loglikelihood", disable_tqdm) as bar:
            scores = self._score(pairs, bar)
        out = [(s.logprob, s.greedy) for s in scores]
        for r, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        prefix = empty_prompt(self.tokenizer)
        pairs, owner = [], []
        for n, r in enumerate(requests):
            mine = rolling_pairs(self.tokenizer.encode(r.args[0]), prefix, self.max_length)
            pairs += mine
            owner += [n] * len(mine)
        with self._requests(pairs, "loglikelihood_rolling", disable_tqdm) as bar:
            scores = self._score(pairs, bar)
        totals = [0.0] * len(requests)
        for n, s in zip(owner, scores):
            totals[n] += s.logprob
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}
        for n, r in enumerate(requests):
            groups.setdefault(self._settings(r.args[1] if len(r.args) > 1 else {}), []).append(n)
        out: list[str] = [""] * len(requests)
        with self._requests(requests, "generate_until", disable_tqdm) as bar:
            for (until, max_new), members in groups.items():
                prompts = [self.tokenizer.encode(requests[n].args[0]) or empty_prompt(self.tokenizer) for n in members]
                try:
                    texts, _ = greedy_completions(self.model, self.tokenizer, prompts, until, max_new, batch=self.batch,
                                                  on_done=bar.update)
                except OutsideVocabulary as e:
                    raise UserError(f"lm-eval {e}") from None
                for n, text in zip(members, texts):
                    out[n] = text
                    self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    def _settings(self, kwargs: dict) -> tuple[tuple[str, ...], int]:
        """(stop strings, new tokens) of a generate_until request; sampling is refused, not ignored."""
        kwargs = dict(kwargs)
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise UserError("generate_until: scratchlm's harness model decodes greedily; the task asks for sampling")
        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        return until, int(kwargs.pop("max_gen_toks", self.max_gen_toks))


# A lazy entry (module path, not the class): importing this module twice, as a module and as __main__,
# registers the same thing twice, which the registry allows.
if NAME not in model_registry:
    model_registry.register(NAME, target=f"{__name__.replace('__main__', 'scratchlm.eval.harness')}:ScratchLM")


def main() -> None:
    """`lm_eval`'s command line, with the scratchlm model registered."""
    from lm_eval.__main__ import cli_evaluate

    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
