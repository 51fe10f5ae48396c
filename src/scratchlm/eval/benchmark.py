"""Benchmark tasks run on a model: examples rendered with their shots into prompts, scored, and summed up
as accuracy next to chance.

A `Task` is a list of examples and a way to turn example i, shown after the examples `shots`, into an
`Item`, one of four kinds:

    choice     one prompt, several continuations: the most likely one is the pick (by the sum of its
               tokens' log-probabilities, or their mean per token where the task says so, as CORE does)
    schema     several prompts, one continuation: the prompt under which it is most likely is the pick
    lm         one prompt, one continuation: right when greedy decoding would write the continuation
               exactly, i.e. each of its tokens is the model's most likely next token
    generate   one prompt and reference answers: the greedy continuation, reduced by the task's
               `answer` function, must equal one of them

Few-shot examples are drawn for each example with `random.Random(f"{seed}/{index}")` from the other examples
of its pool (its subtask), never the example itself. `--limit N` scores a fixed sample of N examples,
drawn with `random.Random(seed)`. Every example's prompt, choices, scores, pick and gold go to the
per-example rows, so any accuracy can be audited line by line.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from scratchlm.errors import UserError
from scratchlm.eval.loglik import (
    ContinuationTooLong,
    OutsideVocabulary,
    empty_prompt,
    encode_pair,
    greedy_completions,
    loglikelihoods,
)

DEFAULT_SEED = 1234


@dataclass
class Item:
    kind: str                                   # "choice", "schema", "lm" or "generate"
    contexts: list[str]                         # one prompt, or one per option (schema)
    continuations: list[str]                    # the choices, the continuation, or the references
    gold: int = 0
    grades: list[float] | None = None           # choice: the credit each pick earns; None: 1 for gold only


@dataclass
class Task:
    name: str
    source: str                                 # the file or cache entry, for messages
    kind: str
    size: int
    render: Callable[[int, list[int]], Item]
    pools: list[int]                            # each example's pool (subtask): shots come from the same one
    shots: int = 0                              # shots unless --shots says otherwise
    rule: str = "sum"                           # "sum" or "mean" log-probability per choice
    field: str = "choices"                      # where the continuations are in the task file
    answer: Callable[[str], str] | None = None  # generate: the reply reduced to what is compared
    stop: tuple[str, ...] = ()                  # generate: where a reply ends
    max_new_tokens: int = 0                     # generate: 0 for the longest reference and 8 tokens
    chance: float | None = None                 # a published chance level; None: the items' own
    note: str = ""


@dataclass
class TaskResult:
    name: str
    kind: str
    shots: int
    examples: int
    accuracy: float             # 0..1: mean credit
    chance: float               # 0..1: what picking at random earns
    seconds: float
    cut: int = 0                # examples whose prompt lost tokens on the left to fit the context
    rows: list[dict] = field(default_factory=list, repr=False)

    @property
    def centred(self) -> float | None:
        """(accuracy - chance) / (1 - chance): 0 at chance, 1 when perfect, negative below chance."""
        return None if self.chance >= 1 else (self.accuracy - self.chance) / (1 - self.chance)

    def summary(self) -> dict:
        return {"task": self.name, "kind": self.kind, "shots": self.shots, "examples": self.examples,
                "accuracy": self.accuracy, "chance": self.chance, "centred": self.centred, "cut": self.cut,
                "seconds": round(self.seconds, 2)}


def sample(size: int, limit: int, seed: int) -> list[int]:
    """The examples --limit picks: all of them for 0, else a fixed sample in file order."""
    if limit <= 0 or limit >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), limit))


def shots_for(task: Task, members: dict[int, list[int]], index: int, k: int, seed: int) -> list[int]:
    if k == 0:
        return []
    pool = members[task.pools[index]]
    if len(pool) <= k:
        raise UserError(f"{task.source}: --shots {k} needs {k + 1} examples in a task (or subtask); "
                        f"{task.name} has {len(pool)}")
    picked = [j for j in random.Random(f"{seed}/{index}").sample(pool, k + 1) if j != index]
    return picked[:k]


def item_chance(item: Item) -> float:
    if item.kind == "choice":
        grades = item.grades or [float(i == item.gold) for i in range(len(item.continuations))]
        return sum(grades) / len(grades)
    if item.kind == "schema":
        return 1 / len(item.contexts)
    return 0.0


def run_task(model, tokenizer, task: Task, *, shots: int | None = None, limit: int = 0, seed: int = DEFAULT_SEED,
             batch: int = 16, progress: bool = True) -> TaskResult:
    """Score a sample of the task's examples. The result carries one row per example."""
    from tqdm import tqdm

    k = task.shots if shots is None else shots
    members: dict[int, list[int]] = {}
    for i, p in enumerate(task.pools):
        members.setdefault(p, []).append(i)
    indices = sample(task.size, limit, seed)
    items = [task.render(i, shots_for(task, members, i, k, seed)) for i in indices]
    start = time.perf_counter()
    with tqdm(total=len(items), desc=task.name, unit="ex", disable=not progress, leave=False) as bar:
        if task.kind == "generate":
            rows = _generate(model, tokenizer, task, items, indices, batch, bar)
        else:
            rows = _likelihoods(model, tokenizer, task, items, indices, batch, bar)
    seconds = time.perf_counter() - start
    chances = [item_chance(it) for it in items]
    chance = task.chance if task.chance is not None else sum(chances) / len(chances)
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    for r in rows:
        r["task"] = task.name
    return TaskResult(task.name, task.kind, k, len(rows), accuracy, chance, seconds,
                      sum(1 for r in rows if r["cut"]), rows)


def _pairs(item: Item) -> list[tuple[str, str]]:
    if item.kind == "choice":
        return [(item.contexts[0], c) for c in item.continuations]
    if item.kind == "schema":
        return [(c, item.continuations[0]) for c in item.contexts]
    return [(item.contexts[0], item.continuations[0])]


def _likelihoods(model, tokenizer, task: Task, items: Sequence[Item], indices: Sequence[int], batch: int,
                 bar) -> list[dict]:
    pairs, owner = [], []
    for n, item in enumerate(items):
        for context, continuation in _pairs(item):
            pairs.append(encode_pair(tokenizer, context, continuation))
            owner.append(n)
    left = Counter(owner)

    def done(finished: list[int]) -> None:
        for i in finished:
            left[owner[i]] -= 1
            if left[owner[i]] == 0:
                bar.update(1)

    try:
        scores = loglikelihoods(model, pairs, max_batch=max(1, batch), on_done=done)
    except ContinuationTooLong as e:
        raise UserError(f"{task.source}: example {indices[owner[e.index]]}: field {task.field!r}: a continuation of "
                        f"{e.tokens} tokens is longer than the model's context ({e.window})") from None
    except OutsideVocabulary as e:
        raise unreadable(task, indices[owner[e.index]], tokenizer, e) from None
    rows, at = [], 0
    for item, index in zip(items, indices):
        mine = scores[at:at + len(_pairs(item))]
        at += len(mine)
        cut = max(s.cut for s in mine)
        if item.kind == "lm":
            s = mine[0]
            rows.append({"index": index, "kind": "lm", "prompt": item.contexts[0], "continuation": item.continuations[0],
                         "logprob": s.logprob, "tokens": s.tokens, "greedy": s.greedy, "correct": float(s.greedy),
                         "cut": cut})
            continue
        values = [s.logprob / s.tokens if task.rule == "mean" else s.logprob for s in mine]
        pick = max(range(len(values)), key=values.__getitem__)
        grades = item.grades or [float(i == item.gold) for i in range(len(values))]
        row = {"index": index, "kind": item.kind}
        if item.kind == "choice":
            row.update(prompt=item.contexts[0], choices=item.continuations)
        else:
            row.update(prompts=item.contexts, continuation=item.continuations[0])
        row.update(logprobs=[s.logprob for s in mine], tokens=[s.tokens for s in mine], rule=task.rule,
                   pick=pick, gold=item.gold, correct=grades[pick], cut=cut)
        if item.grades is not None:
            row["grades"] = item.grades
        rows.append(row)
    return rows


def unreadable(task: Task, index: int, tokenizer, e: OutsideVocabulary) -> UserError:
    return UserError(f"{task.source}: example {index}: its text holds "
                     f"{tokenizer.decode_bytes([e.token], errors='replace')!r}, which the model has no token for")


def _generate(model, tokenizer, task: Task, items: Sequence[Item], indices: Sequence[int], batch: int,
              bar) -> list[dict]:
    prompts = [tokenizer.encode(it.contexts[0]) or empty_prompt(tokenizer) for it in items]
    # A reply longer than any reference can still hold one (a regex picks it out), but not much longer.
    longest = task.max_new_tokens or 8 + max(len(tokenizer.encode(r)) for it in items for r in it.continuations)
    try:
        texts, cuts = greedy_completions(model, tokenizer, prompts, task.stop, longest, batch=batch, on_done=bar.update)
    except OutsideVocabulary as e:
        raise unreadable(task, indices[e.index], tokenizer, e) from None
    rows = []
    for item, index, text, cut in zip(items, indices, texts, cuts):
        reply = task.answer(text) if task.answer else text
        rows.append({"index": index, "kind": "generate", "prompt": item.contexts[0], "output": text, "answer": reply,
                     "references": item.continuations, "correct": float(reply in item.continuations), "cut": cut})
    return rows


def core_score(results: Sequence[TaskResult]) -> float | None:
    """The mean centred accuracy over the tasks, CORE's summary of a suite."""
    centred = [r.centred for r in results if r.centred is not None]
    return sum(centred) / len(centred) if centred else None

