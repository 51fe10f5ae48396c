"""`scratchlm rate`: blind, shuffled, resumable human ratings fed through stdin, and their summary
against numpy's mean and standard deviation."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.eval.rate import parse_rating, rate, read_prompts, summarize


class FakeSampler:
    """Stands in for generation: each checkpoint writes with a mark of its own, so a test can tell whose
    sample a row holds without the screen naming the checkpoint."""

    def __init__(self):
        self.calls = []

    def __call__(self, checkpoint, prompt, index):
        self.calls.append((checkpoint, index))
        return f"text {index} {'alpha' if checkpoint.endswith('run-a') else 'beta'}"


@pytest.fixture
def setup(tmp_path):
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    a.mkdir(), b.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO.\\n\n\nJULIET.\nOnce upon\n")
    return [str(a), str(b)], prompts, tmp_path / "ratings.csv"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_parse_rating():
    assert parse_rating("4 3 5\n") == (4, 3, 5)
    assert parse_rating("4,3,5") == (4, 3, 5) and parse_rating("435") == (4, 3, 5)
    for bad in ("4 3", "4 3 6", "0 1 2", "a b c", "", "4 3 5 1", "45"):
        assert parse_rating(bad) is None


def test_prompts_file(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("A\\nB\n\nC\n")
    assert read_prompts(p) == ["A\nB", "C"]
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "x"}\n{"text": "y"}\n')
    with pytest.raises(UserError, match="p.jsonl:2: expected an object with a text field 'prompt'"):
        read_prompts(p)


def test_blind_shuffled_and_resumable(setup):
    checkpoints, prompts, out = setup
    sampler = FakeSampler()
    shown = io.StringIO()
    # Two ratings (one after a typo), a skip, then quit.
    n = rate(checkpoints, prompts, out, seed=3, sampler=sampler, stdin=io.StringIO("5 4 3\nfive\n2,2,1\ns\nq\n"),
             stdout=shown)
    assert n == 2
    text = shown.getvalue()
    rows = read_csv(out)
    assert [(r["fluency"], r["coherence"], r["relevance"]) for r in rows] == [("5", "4", "3"), ("2", "2", "1")]
    assert "three whole numbers from 1 to 5" in text
    # Blind: the screen shows "sample k of n", the prompt and the text, never which run wrote it.
    assert "--- sample 1 of 6 ---" in text and "prompt: ROMEO.\n" in text
    assert "run-a" not in text and "run-b" not in text
    first_order = sampler.calls[:]
    assert len(first_order) == 4 and len(set(first_order)) == 4      # rated, rated, skipped, quit at

    # The same command again: the two rated items are not asked again, the skipped one is.
    sampler2 = FakeSampler()
    n = rate(checkpoints, prompts, out, seed=3, sampler=sampler2, stdin=io.StringIO("1 1 1\n3 3 3\n4 4 4\n5 5 5\n"),
             stdout=io.StringIO())
    assert n == 4
    rows = read_csv(out)
    assert len(rows) == 6
    assert {(r["checkpoint"], r["prompt"]) for r in rows} == {(c, p) for c in checkpoints
                                                              for p in ("ROMEO.\n", "JULIET.", "Once upon")}
    # The order is the first session's, less what was rated in it.
    assert sampler2.calls[:2] == [first_order[2], first_order[3]]
    # Rows hold what was shown.
    for r in rows:
        assert r["sample"].endswith("alpha" if r["checkpoint"].endswith("run-a") else "beta")
    # Nothing left: no question asked.
    assert rate(checkpoints, prompts, out, seed=3, sampler=FakeSampler(), stdin=io.StringIO(""), stdout=io.StringIO()) == 0


def test_the_seed_fixes_the_order(setup):
    checkpoints, prompts, out = setup
    orders = []
    for seed in (0, 0, 1):
        sampler = FakeSampler()
        rate(checkpoints, prompts, out.with_name(f"r{len(orders)}.csv"), seed=seed, sampler=sampler,
             stdin=io.StringIO("3 3 3\n" * 6), stdout=io.StringIO())
        orders.append(sampler.calls)
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(orders[2]) == sorted((c, i) for c in checkpoints for i in range(3))


def test_summary_matches_numpy(setup, capsys):
    checkpoints, prompts, out = setup
    answers = ["5 4 3", "2 2 1", "4 4 4", "1 5 2", "3 3 3", "5 5 4"]
    rate(checkpoints, prompts, out, seed=0, sampler=FakeSampler(), stdin=io.StringIO("\n".join(answers) + "\n"),
         stdout=io.StringIO())
    rows = read_csv(out)
    summary = {s["checkpoint"]: s for s in summarize(out)}
    for c in checkpoints:
        mine = np.array([[int(r[k]) for k in ("fluency", "coherence", "relevance")] for r in rows if r["checkpoint"] == c])
        s = summary[c]
        assert s["n"] == len(mine) == 3
        for j, k in enumerate(("fluency", "coherence", "relevance")):
            assert s[k] == pytest.approx(mine[:, j].mean())
            assert s[f"{k}_std"] == pytest.approx(mine[:, j].std(ddof=1))
        assert s["overall"] == pytest.approx(mine.mean())
    assert main(["rate", "--summary", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fluency" in printed and checkpoints[0] in printed and "±" in printed


def test_rate_mistakes(setup, capsys, tmp_path):
    _, prompts, out = setup
    assert main(["rate", "--checkpoint", str(tmp_path / "nope"), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    out.write_text("checkpoint,prompt,sample,fluency,coherence,relevance,rated_at\nx,p,s,4,9,1,t\n")
    assert main(["rate", "--summary", str(out)]) == 2
    assert "ratings.csv:2: coherence is '9'" in capsys.readouterr().err
    assert main(["rate"]) == 2


@pytest.mark.slow
def test_real_samples_are_seeded(play_text, tmp_path, monkeypatch):
    """With a real (two-step) run: the sample shown is the seeded continuation of the prompt."""
    import torch

    from scratchlm.config import load_config, recipe_path
    from scratchlm.eval.rate import Samples
    from scratchlm.infer.sampling import SamplingParams
    from scratchlm.train.pretrain import pretrain

    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(load_config(recipe_path("shakespeare-cpu.toml"), [
            f"data.dataset={play_text}", "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.context=16",
            "data.vocab_size=280", "train.micro_batch=2", "train.eval_every=0", "train.max_steps=2", "train.minutes=0",
            "train.warmup_steps=1"]), tmp_path / "run", progress=False)
        draw = Samples(SamplingParams(max_new_tokens=12, temperature=1.0), seed=7, device="cpu")
        first = draw(str(tmp_path / "run"), "ROMEO.", 2)
        again = Samples(SamplingParams(max_new_tokens=12, temperature=1.0), seed=7, device="cpu")
        assert first == again(str(tmp_path / "run"), "ROMEO.", 2)   # same seed, same sample
        assert len(first) > 0
    finally:
        torch.set_num_threads(before)
