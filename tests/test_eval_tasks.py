"""Evaluation: bits per byte and perplexity worked by hand, answer metrics against the packages' documented
values and hand counts, multiple choice by hand on a toy model, and `scratchlm eval` on a tiny run at
longer contexts for every position scheme."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import TINIER

import scratchlm
from scratchlm.cli import main
from scratchlm.config import load_config, recipe_path
from scratchlm.errors import UserError
from scratchlm.eval import tasks
from scratchlm.eval.metrics import evaluate
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.pretrain import pretrain

TINY = [*TINIER, "train.eval_every=0", "train.minutes=0", "train.max_steps=2"]


pytestmark = pytest.mark.usefixtures("single_thread")


class FixedModel(nn.Module):
    """Whatever it reads, it predicts the same distribution for the next token."""

    def __init__(self, probs, context: int = 64):
        super().__init__()
        self.logits = nn.Parameter(torch.log(torch.tensor(probs, dtype=torch.float32)))
        self.config = type("Config", (), {"context": context})()

    def forward(self, x):
        return self.logits.expand(*x.shape, -1)


def test_bits_per_byte_and_perplexity_by_hand():
    # p = 1/2, 1/4, 1/8, 1/8 for tokens of 1, 2, 3 and 1 bytes.
    model = FixedModel([0.5, 0.25, 0.125, 0.125])
    tokens = np.array([0, 1, 2, 3, 0, 1])
    row = evaluate(model, [tokens], torch.tensor([1, 2, 3, 1]), context=3, batch=2)
    # targets 1, 2, 3, 0, 1: -log2 p = 2 + 3 + 3 + 1 + 2 = 11 bits over 2 + 3 + 1 + 1 + 2 = 9 bytes
    assert row["val_tokens"] == 5 and row["val_bytes"] == 9
    assert row["val_bpb"] == pytest.approx(11 / 9)
    assert row["val_loss"] == pytest.approx(11 * math.log(2) / 5)
    assert row["val_ppl"] == pytest.approx(2 ** (11 / 5))
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))


def test_exact_match_and_f1_by_hand():
    # SQuAD normalisation: case, punctuation and articles do not count.
    assert tasks.exact_match("The Cat!", ["cat"]) == 1.0
    assert tasks.exact_match("a cat sat", ["the dog", "cat sat"]) == 1.0
    assert tasks.exact_match("cats", ["cat"]) == 0.0
    # "the cat sat" vs "a cat sat down": 2 common tokens, precision 2/2, recall 2/3 -> F1 0.8
    assert tasks.token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert tasks.token_f1("cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeats count once each
    assert tasks.token_f1("dog", ["cat", "dog house"]) == pytest.approx(2 * 1 * 0.5 / 1.5)  # best reference
    assert tasks.token_f1("", ["the"]) == 1.0  # both empty after normalisation
    assert tasks.token_f1("x", ["y"]) == 0.0


def test_bleu_is_sacrebleus_documented_example():
    # sacrebleu's README: BLEU = 48.53 for this system output and two reference streams.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."], ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert tasks.bleu(hyps, refs) == pytest.approx(48.53, abs=0.005)
    assert tasks.bleu(["a b c d e"], [["a b c d e"]]) == pytest.approx(100.0)


def test_rouge_l_by_hand():
    # rouge-score's README example. Longest common subsequence: the quick brown jumps the (5 tokens);
    # precision 5/8, recall 5/9.
    p, r = 5 / 8, 5 / 9
    got = tasks.rouge_l(["The quick brown dog jumps on the log."], [["The quick brown fox jumps over the lazy dog"]])
    assert got == pytest.approx(100 * 2 * p * r / (p + r))
    assert tasks.rouge_l(["a b", "c"], [["a b"], ["d"]]) == pytest.approx(50.0)


def test_task_files_are_read_and_mistakes_name_the_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "Who?", "answers": ["Romeo", "him"]}) + "\n\n"
                    + json.dumps({"instruction": "Say", "input": "x", "output": "y"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    items = tasks.read_task(path)
    assert [e.line for e in items] == [1, 3, 4]
    assert items[0].references == ["Romeo", "him"] and items[0].text == "Question: Who?\nAnswer:"
    assert items[1].text == "Instruction: Say\nInput: x\nResponse:" and items[2].references == ["yo"]
    for record, expected in [({"question": "q"}, "no reference answer"),
                             ({"question": 3, "answer": "a"}, "'question'"),
                             ({"choices": ["a", "b"], "answer": 2}, "'answer'"), ({"text": "x"}, "no prompt")]:
        path.write_text(json.dumps({"question": "ok", "answer": "a"}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(UserError, match=f"qa.jsonl:2: .*{expected}"):
            tasks.read_task(path)
    mixed = [{"question": "ok", "answer": "a"}, {"choices": ["a", "b"], "answer": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in mixed))
    with pytest.raises(UserError, match="qa.jsonl:2: a multiple-choice example in a file of generation"):
        tasks.read_task(path)
    path.write_text("{not json\n")
    with pytest.raises(UserError, match="qa.jsonl:1: not valid JSON"):
        tasks.read_task(path)


def test_multiple_choice_by_hand_on_a_toy_model():
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])   # one token per byte
    probs = np.full(256, 0.3 / 254)
    probs[ord("a")], probs[ord("b")] = 0.5, 0.2
    model = FixedModel(probs)
    # "aaaa": 4 ln 0.5 = -2.77 < ln 0.2 = -1.61, so plain likelihood picks "b"; per byte, ln 0.5 beats ln 0.2.
    item = tasks.Choice(1, "xy", ["aaaa", "b"], answer=0)
    assert tasks.choice_logprobs(model, tok, item) == pytest.approx([4 * math.log(0.5), math.log(0.2)], rel=1e-5)
    scores, details = tasks.score_choices(model, tok, [item, tasks.Choice(2, "", ["b", "a"], answer=1)])
    assert details[0]["pick"] == 1 and details[0]["pick_norm"] == 0
    assert scores == {"accuracy": 50.0, "accuracy_norm": 100.0, "examples": 2}


def test_choice_logprobs_match_the_model_on_the_joined_text():
    from scratchlm.model.transformer import Transformer

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    model = Transformer(load_config(None, ["model.vocab_size=256", "model.d_model=16", "model.n_layers=1",
                                           "model.n_heads=2", "model.context=12"]).model).eval()
    item = tasks.Choice(1, "Answer: ", ["Paris", "a long one"], answer=0)
    got = tasks.choice_logprobs(model, tok, item)
    for choice, lp in zip(item.choices, got):
        ids = list(("Answer: " + choice).encode())[-13:]       # the last context + 1 tokens
        n = len(" " + choice)                                  # the context's trailing space goes with the choice
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
        want = sum(float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1 - n, len(ids) - 1))
        assert lp == pytest.approx(want, abs=1e-4)
    with pytest.raises(UserError, match="mc.jsonl:3: a choice of 13 tokens is longer than the model's context"):
        tasks.choice_logprobs(model, tok, tasks.Choice(3, "x", ["1234567890123"], 0, "mc.jsonl:3"))


class Runs(dict):
    """Two-step runs, one per position scheme, each trained the first time a test asks for it."""

    def __init__(self, root, corpus):
        super().__init__()
        self.root, self.corpus = root, corpus

    def __missing__(self, position):
        cfg = load_config(recipe_path("shakespeare-cpu.toml"), [f"data.dataset={self.corpus}", *TINY,
                                                                f"model.position={position}"])
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SCRATCHLM_CACHE", str(self.root / "cache"))
            pretrain(cfg, self.root / position, progress=False)
        self[position] = self.root / position
        return self[position]


@pytest.fixture(scope="module")
def tiny_runs(play_text, tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("eval-runs"), play_text)


@pytest.mark.slow
def test_eval_at_longer_contexts_for_every_position(tiny_runs, play_text, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    from scratchlm.eval.lm import eval_contexts

    for position in ("learned", "sinusoidal", "rope", "alibi", "nope"):
        run = tiny_runs[position]
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(run), "--data", str(play_text), "--context", "16,64"]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert out[0].startswith(f"{play_text} val, context 16: loss")
        if position == "learned":
            assert out[1] == "context 64: learned positions stop at 16; skipped"
        else:
            assert out[1].startswith(f"{play_text} val, context 64: loss")

    # The numbers themselves: the model's cross-entropy over 64-token windows of the validation text,
    # and bits per byte over the UTF-8 bytes those targets decode to.
    loaded = scratchlm.load(tiny_runs["alibi"])
    [row] = eval_contexts(loaded, str(play_text), [64], progress=False)
    from scratchlm.data.sources import get_dataset

    ids = loaded.tokenizer.encode(get_dataset(str(play_text)).val.read_text())
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 64):
            chunk = torch.tensor(ids[s:s + 65])
            nats += F.cross_entropy(loaded.model(chunk[None, :-1])[0], chunk[1:], reduction="sum").item()
    n_bytes = len(loaded.tokenizer.decode_bytes(ids[1:]))
    assert row["val_tokens"] == len(ids) - 1 and row["val_bytes"] == n_bytes
    assert row["val_loss"] == pytest.approx(nats / (len(ids) - 1), rel=1e-4)
    assert row["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
    assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))


def test_generation_task_end_to_end(tiny_runs, play_text, tmp_path, capsys):
    from scratchlm.infer.generate import SamplingParams, complete

    task = tmp_path / "qa.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Who loves?", "answer": "Romeo"}, {"prompt": "ROMEO.\n", "completion": "Love night"}]) + "\n")
    out = tmp_path / "preds.jsonl"
    run = tiny_runs["rope"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--task", str(task), "--out", str(out),
                 "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "qa.jsonl: 2 examples, greedy answers: exact match" in printed and "ROUGE-L" in printed
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["line"] for p in preds] == [1, 2]
    # The answer is the greedy continuation's first line of text.
    loaded = scratchlm.load(tiny_runs["rope"])
    text = complete(loaded.model, loaded.tokenizer, loaded.tokenizer.encode("Question: Who loves?\nAnswer:"),
                    SamplingParams(8, temperature=0.0)).text
    assert preds[0]["prediction"] == next(iter(text.strip().splitlines()), "")

    choice = tmp_path / "mc.jsonl"
    choice.write_text(json.dumps({"context": "ROMEO.\n", "choices": ["Love", "Qzx"], "answer": 0}) + "\n")
    assert main(["eval", "--checkpoint", str(run), "--task", str(choice)]) == 0
    assert "1 multiple-choice examples: accuracy" in capsys.readouterr().out


def test_eval_mistakes_are_one_line(capsys, tmp_path):
    assert main(["eval"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["eval", "--baseline", "ngram", "--data", "x"]) == 2
    assert "needs a tokenizer" in capsys.readouterr().err


def test_choices_are_split_from_the_context_as_lm_evaluation_harness_splits_them():
    # Whitespace that ends the context, a line break too, goes with each choice ("\nLove", not "Love" after
    # "ROMEO.\n"), so that the pick matches the harness's; the numbers are the model's on the joined text.
    from scratchlm.model.transformer import Transformer

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    model = Transformer(load_config(None, ["model.vocab_size=256", "model.d_model=16", "model.n_layers=1",
                                           "model.n_heads=2", "model.context=32"]).model).eval()
    item = tasks.Choice(1, "ROMEO. \n", ["Love", "Qzx"], answer=0)
    with torch.no_grad():
        for choice, lp in zip(item.choices, tasks.choice_logprobs(model, tok, item)):
            ids = list(("ROMEO. \n" + choice).encode())
            logp = F.log_softmax(model(torch.tensor([ids[:-1]]))[0], dim=-1)
            start = len("ROMEO.") - 1                     # the last context token predicts " \n" + choice
            assert lp == pytest.approx(sum(float(logp[i, ids[i + 1]]) for i in range(start, len(ids) - 1)), abs=1e-4)


def test_limit_scores_a_seeded_sample_not_the_first_lines(tmp_path):
    import random
    from types import SimpleNamespace

    from scratchlm.model.transformer import Transformer

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [])
    model = Transformer(load_config(None, ["model.vocab_size=256", "model.d_model=16", "model.n_layers=1",
                                           "model.n_heads=2", "model.context=32"]).model).eval()
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"context": f"q{i} ", "choices": ["a", "b"], "answer": i % 2}) + "\n"
                            for i in range(12)))
    out = tmp_path / "picks.jsonl"
    tasks.run_task(SimpleNamespace(model=model, tokenizer=tok), path, out=str(out), limit=4, seed=5)
    lines = [json.loads(row)["line"] for row in out.read_text().splitlines()]
    assert lines == [i + 1 for i in sorted(random.Random(5).sample(range(12), 4))] != [1, 2, 3, 4]
