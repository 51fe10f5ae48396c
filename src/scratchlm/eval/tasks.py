"""Task evaluation from JSONL files: answers generated greedily and scored against references (exact
match, token F1, BLEU, ROUGE-L), and multiple choice scored by log-likelihood (accuracy, and accuracy
with each choice's log-likelihood divided by its length in bytes).

One example per line. Generation tasks take any of these shapes (the reference may be a list):

    {"question": "...", "answer": "..."}                 optional "context": a passage shown first
    {"instruction": "...", "input": "...", "output": "..."}
    {"prompt": "...", "completion": "..."}                or "response" / "answer" / "output"
    {"messages": [{"role": "user", ...}, ..., {"role": "assistant", "content": "reference"}]}

Multiple choice: {"context": "...", "choices": ["...", "..."], "answer": 1} (answer: index of the right one).

Exact match and F1 normalise as the SQuAD evaluation does (lower case, no punctuation, no articles);
BLEU is sacrebleu's corpus BLEU and ROUGE-L the `rouge-score` package's F-measure, best reference taken.
All four are reported as percentages.
"""
from __future__ import annotations

import collections
import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from scratchlm.errors import UserError
from scratchlm.files import read_json_lines

REFERENCE_FIELDS = ("answer", "answers", "output", "completion", "response")
_PUNCTUATION = set(string.punctuation)


# ---- answer metrics --------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    def f1(pred: list[str], ref: list[str]) -> float:
        if not pred or not ref:
            return float(pred == ref)  # both empty: a perfect answer; one empty: none at all
        common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(ref)
        return 2 * precision * recall / (precision + recall)

    pred = normalize_answer(prediction).split()
    return max(f1(pred, normalize_answer(r).split()) for r in references)


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this metric needs the {package} package: pip install 'scratchlm[eval]'") from None


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100); examples may have different numbers of references."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    width = max(len(r) for r in references)
    # sacrebleu wants one stream per reference slot; a missing reference is None.
    streams = [[r[i] if i < len(r) else None for r in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean ROUGE-L F-measure (0-100), each prediction against its best reference. rouge-score's
    tokenizer keeps only ASCII letters and digits."""
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]
    return 100 * sum(scores) / max(1, len(scores))


def score_answers(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    n = len(predictions)
    return {"exact_match": 100 * sum(exact_match(p, r) for p, r in zip(predictions, references)) / max(1, n),
            "f1": 100 * sum(token_f1(p, r) for p, r in zip(predictions, references)) / max(1, n),
            "bleu": bleu(predictions, references), "rouge_l": rouge_l(predictions, references), "examples": n}


# ---- reading task files ----------------------------------------------------------------------------

@dataclass
class Example:
    line: int
    messages: list[dict] = field(default_factory=list)   # the prompt as a conversation (chat models)
    text: str = ""                                       # the prompt as plain text (base models)
    references: list[str] = field(default_factory=list)


@dataclass
class Choice:
    line: int
    context: str
    choices: list[str]
    answer: int
    where: str = ""          # file:line, for messages


def _text(value, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def _references(record: dict, where: str) -> list[str]:
    for name in REFERENCE_FIELDS:
        if name in record:
            value = record[name]
            refs = value if isinstance(value, list) else [value]
            if not refs or not all(isinstance(r, str) for r in refs):
                raise UserError(f"{where}: field {name!r} must be text or a non-empty list of texts")
            return refs
    raise UserError(f"{where}: no reference answer; add one of the fields {', '.join(REFERENCE_FIELDS)}")


def _parse(record: dict, where: str) -> Example | Choice:
    if "choices" in record:
        choices, answer = record["choices"], record.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise UserError(f"{where}: field 'choices' must be a list of at least two non-empty texts")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UserError(f"{where}: field 'answer' must be the index (0 to {len(choices) - 1}) of the right choice")
        return Choice(0, _text(record.get("context", ""), where, "context"), choices, answer)
    if "messages" in record:
        from scratchlm.chat.template import check_messages

        messages = check_messages(record["messages"], where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise UserError(f"{where}: the last message must be the assistant's reference reply, after a prompt")
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages[:-1]) + "Assistant:"
        return Example(0, messages[:-1], text, [messages[-1]["content"]])
    if "question" in record:
        q = _text(record["question"], where, "question")
        passage = _text(record.get("context", ""), where, "context")
        user = f"{passage}\n\n{q}" if passage else q
        text = (f"{passage}\n" if passage else "") + f"Question: {q}\nAnswer:"
    elif "instruction" in record:
        ins = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input", ""), where, "input")
        user = f"{ins}\n\n{extra}" if extra else ins
        text = f"Instruction: {ins}\n" + (f"Input: {extra}\n" if extra else "") + "Response:"
    elif "prompt" in record:
        user = text = _text(record["prompt"], where, "prompt")
    else:
        raise UserError(f"{where}: no prompt; expected a field 'question', 'instruction', 'prompt', 'messages' "
                        f"or 'choices'")
    return Example(0, [{"role": "user", "content": user}], text, _references(record, where))


def read_task(path: Path) -> list[Example] | list[Choice]:
    """The examples of a JSONL task file, all of one kind (generation or multiple choice)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    out: list = []
    for n, record in read_json_lines(path):
        where = f"{path}:{n}"
        if not isinstance(record, dict):
            raise UserError(f"{where}: each line must be a JSON object")
        example = _parse(record, where)
        example.line = n
        if isinstance(example, Choice):
            example.where = where
        if out and type(example) is not type(out[0]):
            kinds = {Example: "generation", Choice: "multiple-choice"}
            raise UserError(f"{where}: a {kinds[type(example)]} example in a file of {kinds[type(out[0])]} "
                            f"examples (line {out[0].line}); keep one kind per file")
        out.append(example)
    if not out:
        raise UserError(f"{path} holds no examples")
    return out


# ---- running a model -------------------------------------------------------------------------------

def generate_answers(model, tokenizer, examples: Sequence[Example], max_new_tokens: int = 64,
                     batch: int = 16) -> list[str]:
    """Greedy answers. A model with a chat template (scratchlm's chat tokens, or its own Jinja template)
    gets it and the reply ends at the template's end token; any other model gets the plain prompt and
    answers with its first line."""
    from scratchlm.chat.template import Prompter
    from scratchlm.infer.generate import complete_batch
    from scratchlm.infer.prompt import end_ids, plain_prompt
    from scratchlm.infer.sampling import SamplingParams

    prompter = Prompter(tokenizer)
    chat = prompter.templated
    if chat:
        prompts = [prompter.prompt(e.messages) for e in examples]
        params = SamplingParams(max_new_tokens, temperature=0.0, stop_ids=prompter.stop_ids, stop=prompter.stop_strings)
    else:
        prompts = [plain_prompt(tokenizer, e.text)[0] for e in examples]
        params = SamplingParams(max_new_tokens, temperature=0.0, stop_ids=end_ids(tokenizer))
    answers = []
    for i in range(0, len(prompts), batch):
        answers += [c.text for c in complete_batch(model, tokenizer, prompts[i:i + batch], params)]
    if chat:
        return [a.strip() for a in answers]
    # A base model has no end-of-answer token: its answer is its first line of text (the whole text when
    # a reference itself runs over several lines).
    return [a.strip() if any("\n" in r.strip() for r in e.references) else next(iter(a.strip().splitlines()), "")
            for a, e in zip(answers, examples)]


def _choice_pairs(tokenizer, item: Choice) -> list[tuple[list[int], list[int]]]:
    from scratchlm.eval.loglik import encode_pair

    return [encode_pair(tokenizer, item.context, c) for c in item.choices]


def _too_long(item: Choice, e, tokenizer) -> UserError:
    from scratchlm.eval.loglik import OutsideVocabulary

    where = item.where or f"line {item.line}"
    if isinstance(e, OutsideVocabulary):
        return UserError(f"{where}: the text holds {tokenizer.decode_bytes([e.token], errors='replace')!r}, which the "
                         "model has no token for")
    return UserError(f"{where}: a choice of {e.tokens} tokens is longer than the model's context ({e.window})")


def choice_logprobs(model, tokenizer, item: Choice) -> list[float]:
    """Sum of log P(choice tokens | context) for each choice, split into tokens as lm-evaluation-harness
    splits them (eval/loglik.py): the context's trailing whitespace goes with the choice, so that
    "Answer: " + "Paris" is read as "Answer:" + " Paris", as in running text."""
    from scratchlm.eval.loglik import ContinuationTooLong, OutsideVocabulary, loglikelihoods

    try:
        return [s.logprob for s in loglikelihoods(model, _choice_pairs(tokenizer, item))]
    except (ContinuationTooLong, OutsideVocabulary) as e:
        raise _too_long(item, e, tokenizer) from None


def score_choices(model, tokenizer, items: Sequence[Choice]) -> tuple[dict, list[dict]]:
    """Accuracy by the likeliest choice, and by the likeliest per UTF-8 byte of the choice. Every item is
    scored in one pass of batches, the choices of an item sharing the prefill of its context."""
    from scratchlm.eval.loglik import ContinuationTooLong, OutsideVocabulary, loglikelihoods

    pairs, owner = [], []
    for n, item in enumerate(items):
        mine = _choice_pairs(tokenizer, item)
        pairs += mine
        owner += [n] * len(mine)
    try:
        scores = loglikelihoods(model, pairs)
    except (ContinuationTooLong, OutsideVocabulary) as e:
        raise _too_long(items[owner[e.index]], e, tokenizer) from None
    correct = correct_norm = 0
    details, at = [], 0
    for item in items:
        lps = [s.logprob for s in scores[at:at + len(item.choices)]]
        at += len(item.choices)
        norm = [lp / max(1, len(c.encode("utf-8"))) for lp, c in zip(lps, item.choices)]
        pick, pick_norm = max(range(len(lps)), key=lps.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        correct += pick == item.answer
        correct_norm += pick_norm == item.answer
        details.append({"line": item.line, "context": item.context, "choices": item.choices, "answer": item.answer,
                        "pick": pick, "pick_norm": pick_norm, "logprobs": lps})
    n = len(items)
    return {"accuracy": 100 * correct / n, "accuracy_norm": 100 * correct_norm / n, "examples": n}, details


def run_task(loaded, path: Path, max_new_tokens: int = 64, batch: int = 16, out: str | None = None,
             limit: int = 0, seed: int = 1234) -> dict:
    """Score a checkpoint on a task file (or a fixed sample of `limit` of its examples), print the scores,
    and write each example's result to `out`."""
    from scratchlm.eval.benchmark import sample

    items = read_task(path)
    items = [items[i] for i in sample(len(items), limit, seed)]
    if isinstance(items[0], Choice):
        scores, details = score_choices(loaded.model, loaded.tokenizer, items)
        print(f"{path.name}: {scores['examples']} multiple-choice examples: accuracy {scores['accuracy']:.1f}%, "
              f"length-normalised accuracy {scores['accuracy_norm']:.1f}%")
    else:
        answers = generate_answers(loaded.model, loaded.tokenizer, items, max_new_tokens, batch)
        refs = [e.references for e in items]
        scores = score_answers(answers, refs)
        details = [{"line": e.line, "prediction": a, "references": e.references,
                    "exact_match": exact_match(a, e.references), "f1": token_f1(a, e.references)}
                   for e, a in zip(items, answers)]
        print(f"{path.name}: {scores['examples']} examples, greedy answers: exact match {scores['exact_match']:.1f}, "
              f"F1 {scores['f1']:.1f}, BLEU {scores['bleu']:.1f}, ROUGE-L {scores['rouge_l']:.1f}")
    if out:
        from scratchlm.files import atomic_write_text

        atomic_write_text(Path(out), "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in details))
        print(f"per-example results written to {out}")
    return scores
