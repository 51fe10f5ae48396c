"""The last step of `scratchlm sft`: the held-out conversations answered by greedy generation and scored
against their reference replies (exact match, token F1 and ROUGE-L, from eval/tasks.py). Validation
loss says how likely the reference is; these say whether the model actually says it."""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

from scratchlm.chat.template import Prompter
from scratchlm.eval import tasks
from scratchlm.files import atomic_write_text

ANSWERS_FILE = "heldout_answers.jsonl"


def held_out_examples(conversations: Sequence[Sequence[dict]], limit: int) -> list[tasks.Example]:
    """Each conversation up to its last assistant message: what comes before is the prompt, that message
    the reference."""
    out = []
    for i, conv in enumerate(conversations):
        last = max((j for j, m in enumerate(conv) if m["role"] == "assistant"), default=0)
        if last == 0:
            continue
        out.append(tasks.Example(line=i, messages=[dict(m) for m in conv[:last]], references=[conv[last]["content"]]))
        if len(out) == limit:
            break
    return out


def score_held_out(loaded, conversations: Sequence[Sequence[dict]], limit: int, max_new_tokens: int,
                   batch: int = 16) -> tuple[dict, list[dict]]:
    """Scores (percentages) and one row per example. A prompt too long for the context keeps its most
    recent messages, so that the answer still has `max_new_tokens` of room."""
    model, tokenizer = loaded.model, loaded.tokenizer
    examples = held_out_examples(conversations, limit)
    if not examples:
        return {}, []
    budget = max(1, model.config.context - max_new_tokens)
    prompter = Prompter(tokenizer)
    for e in examples:
        e.messages = prompter.fit(e.messages, budget)
    answers = tasks.generate_answers(model, tokenizer, examples, max_new_tokens, batch)
    refs = [e.references for e in examples]
    n = len(examples)
    scores = {"heldout_examples": n,
              "exact_match": 100 * sum(tasks.exact_match(a, r) for a, r in zip(answers, refs)) / n,
              "f1": 100 * sum(tasks.token_f1(a, r) for a, r in zip(answers, refs)) / n}
    # rouge-score is an optional dependency; the other scores stand without it.
    if importlib.util.find_spec("rouge_score") is not None:
        scores["rouge_l"] = tasks.rouge_l(answers, refs)
    details = [{"prompt": e.messages[-1]["content"], "prediction": a, "reference": e.references[0],
                "exact_match": tasks.exact_match(a, e.references)} for e, a in zip(examples, answers)]
    return scores, details


def record(run_dir: Path, scores: dict, details: list[dict]) -> None:
    """Add the scores to the final row of metrics.jsonl and write each answer to heldout_answers.jsonl."""
    run_dir = Path(run_dir)
    atomic_write_text(run_dir / ANSWERS_FILE, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    final = next((r for r in reversed(rows) if r.get("final")), None)
    if final is None:
        return
    final.update(scores)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
