"""SFT data: every format read from files of the shapes people have, the errors they get (file, line,
field), mixtures, the persona, examples, and batches checked against targets built by hand; last, a tiny
model fine-tuned on a few Q&A pairs answers them exactly."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_chat import byte_tokenizer, tiny_model

from scratchlm.chat.template import Prompter, render
from scratchlm.errors import UserError
from scratchlm.infer.generate import complete
from scratchlm.infer.sampling import SamplingParams
from scratchlm.sft import (
    IGNORE, Example, Persona, SFTBatches, TokenizeStats, load_mixture, load_source, parse_source, prepare_sft,
    sft_evaluator, tokenize_chat, tokenize_chats,
)
from scratchlm.sft.formats import chats, read_file

pytestmark = pytest.mark.usefixtures("single_thread")


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- formats


def test_every_format_becomes_the_expected_chat(tmp_path):
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"id": 1, "category": "Identity", "question": "Who are you?", "answer": "Me."},
                              {"question": "2+2?", "answer": "4"}], indent=2))
    assert chats(read_file(qa)) == [[user("Who are you?"), bot("Me.")], [user("2+2?"), bot("4")]]
    msgs = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "system", "content": "S"}, user("a"), bot("b")]}])
    assert chats(read_file(msgs)) == [[{"role": "system", "content": "S"}, user("a"), bot("b")]]
    inst = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Translate.", "input": "chat", "output": "cat"},
                                                 {"instruction": "Say hi.", "input": "", "output": "hi"}])
    assert chats(read_file(inst)) == [[user("Translate.\n\nchat"), bot("cat")], [user("Say hi."), bot("hi")]]
    flan = write_jsonl(tmp_path / "flan.jsonl", [{"inputs": "Q: sky?", "targets": "blue", "task": "x"}])
    assert chats(read_file(flan)) == [[user("Q: sky?"), bot("blue")]]
    summ = write_jsonl(tmp_path / "samsum.jsonl", [{"id": "1", "dialogue": "A: hi\nB: yo", "summary": "They greet."}])
    assert chats(read_file(summ)) == [[user("Summarize this dialogue:\n\nA: hi\nB: yo"), bot("They greet.")]]
    # Field names of another dataset, renamed to ours.
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "response": "r"}])
    assert chats(read_file(other), rename={"prompt": "question", "response": "answer"}) == [[user("p"), bot("r")]]
    # One JSON object is one record.
    single = tmp_path / "one.json"
    single.write_text('{"question": "q", "answer": "a"}')
    assert chats(read_file(single)) == [[user("q"), bot("a")]]


@pytest.mark.parametrize("rows, message", [
    (['{"question": "q", "answer": "a"}', '{"question": "q2", "answer": 5}'], r"b\.jsonl, line 2: field 'answer' must be text"),
    (['{"question": "q", "answer": "a"}', '', '{"question": "q2"}'], r"b\.jsonl, line 3: field 'answer' is missing"),
    (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": "a"'], r"b\.jsonl, line 2: not valid JSON"),
    (['{"question": "q", "answer": "  "}'], r"line 1: field 'answer' is empty"),
    (['{"text": "hello"}'], r"line 1: cannot tell the format from the fields \(text\)"),
    (['[1, 2]'], r"line 1: expected a JSON object"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}'],
     r"line 1: messages\[1\]: field 'role' is 'robot'"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], r"line 1: field 'messages' has no assistant message"),
    (['{"instruction": "i", "output": "o"}', '{"instruction": "i", "input": 3, "output": "o"}'],
     r"line 2: field 'input' must be text"),
])
def test_bad_records_name_file_line_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(UserError, match=message):
        chats(read_file(path))


def test_errors_in_json_lists_name_the_line_of_the_record(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text('[\n  {"question": "q", "answer": "a"},\n\n  {"question": "q",\n   "anwser": "a"}\n]\n')
    with pytest.raises(UserError, match=r"qa\.json, line 4: field 'answer' is missing"):
        chats(read_file(path))
    path.write_text('[\n  {"question": "q", "answer": "a"}\n  {"question": "q", "answer": "a"}\n]')
    with pytest.raises(UserError, match=r"qa\.json, line 3: expected ',' or ']'"):
        read_file(path)
    path.write_text('[{"question": "q",\n "answer": }]')
    with pytest.raises(UserError, match=r"qa\.json, line 2: not valid JSON"):
        read_file(path)
    for name, text, message in (("e.json", "  ", "is empty"), ("e.jsonl", "\n", "holds no records"),
                                ("e.csv", "a,b", "must be .json or .jsonl")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            read_file(tmp_path / name)
    with pytest.raises(UserError, match="unknown SFT format 'qna'"):
        chats(read_file(write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "answer": "a"}])), "qna")
    with pytest.raises(UserError, match="not found"):
        read_file(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- sources and mixtures


def test_parse_source():
    assert parse_source("chatterbot").weight == 1.0
    src = parse_source("data/qa.jsonl*2.5")
    assert (src.source, src.weight) == ("data/qa.jsonl", 2.5)
    assert parse_source({"source": "persona", "weight": 3}).weight == 3
    with pytest.raises(UserError, match="must be a number"):
        parse_source("chatterbot*lots")
    with pytest.raises(UserError, match=">= 0"):
        parse_source("chatterbot*-1")
    with pytest.raises(UserError, match="allowed keys"):
        parse_source({"source": "x", "wieght": 2})
    with pytest.raises(UserError, match="unknown SFT source 'nothing-here'"):
        load_source(parse_source("nothing-here"))


def test_persona_is_configurable_and_never_held_out():
    persona = Persona(name="Quill", about="a tiny model", creator="Ada", extra=[("Favourite colour?", "Green.")])
    split = load_source(parse_source("persona"), persona)
    assert split.val == [] and len(split.train) == len(persona.pairs()) >= 20
    answers = {c[0]["content"]: c[1]["content"] for c in split.train}
    assert answers["What is your name?"] == "My name is Quill."
    assert answers["Who made you?"] == "I was made by Ada."
    assert "a tiny model" in answers["What are you?"] and answers["Favourite colour?"] == "Green."


def test_local_files_hold_out_their_last_records(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(30)])
    split = load_source(parse_source(str(path)), val_fraction=0.1)
    assert [c[0]["content"] for c in split.val] == ["q27", "q28", "q29"] and len(split.train) == 27
    small = write_jsonl(tmp_path / "small.jsonl", [{"question": "q", "answer": "a"}] * 5)
    assert load_source(parse_source(str(small))).val == []
    sys_split = load_source(parse_source({"source": str(small), "system": "Be brief."}))
    assert sys_split.train[0][0] == {"role": "system", "content": "Be brief."}


def test_named_datasets_come_through_load_records_with_their_splits(monkeypatch):
    calls = []

    def fake(name, *, split=None, cache=None, progress=True):
        calls.append((name, split))
        if name == "chatterbot":
            return [{"question": f"{split} q{i}", "answer": "a", "category": "ai"} for i in range(3)]
        return [{"messages": [user(f"{split} hi"), bot("hey")]}]

    monkeypatch.setattr("scratchlm.data.dialogues.load_records", fake)
    cb = load_source(parse_source("chatterbot"))
    assert calls == [("chatterbot", "train"), ("chatterbot", "val")]
    assert cb.train[0] == [user("train q0"), bot("a")] and cb.val[2] == [user("val q2"), bot("a")]
    cc = load_source(parse_source("chitchat"))
    assert cc.train == [[user("train hi"), bot("hey")]]


def test_hf_sources_read_through_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"id": str(i), "dialogue": f"A: hi {i}\nB: bye", "summary": f"Greeting {i}."} for i in range(20)]
    seen = {}

    def fake_load(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    split = load_source(parse_source("hf:knkarthick/dialogsum@train"))
    assert seen == {"name": "knkarthick/dialogsum", "config": None, "split": "train"}
    assert len(split.train) == 18 and split.val[-1][1] == bot("Greeting 19.")
    rows[3] = {"id": "3", "dialogue": "x", "summary": None}
    with pytest.raises(UserError, match=r"hf:knkarthick/dialogsum@train, record 3: field 'summary' is missing"):
        load_source(parse_source("hf:knkarthick/dialogsum@train"))


def test_mixture_needs_something_to_train_on(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match="no training examples"):
        load_mixture([f"{path}*0"])
    splits = load_mixture([str(path), "persona*2"], Persona(name="Z"))
    assert [s.weight for s in splits] == [1.0, 2.0]


# ---------------------------------------------------------------- examples and batches


def test_long_conversations_are_cut_before_user_turns():
    tok = byte_tokenizer()
    system = {"role": "system", "content": "S"}
    conv = [system]
    for i in range(4):
        conv += [user(f"question {i}"), bot(f"answer {i}")]
    head = render(tok, [system])[0]
    turn_len = len(render(tok, [user("question 0"), bot("answer 0")], bos=False)[0])
    stats = TokenizeStats()
    examples = tokenize_chat(tok, conv, len(head) + 2 * turn_len, stats)
    assert len(examples) == 2 and stats.split == 1 and stats.truncated == 0
    assert examples[0].ids == render(tok, conv[:5])[0]
    assert examples[1].ids == render(tok, [system] + conv[5:])[0]
    assert examples[1].mask == render(tok, [system] + conv[5:])[1]
    # Too long for even one exchange: truncated, or dropped when no answer token survives.
    stats = TokenizeStats()
    assert tokenize_chat(tok, [user("x" * 50), bot("y")], 20, stats) == [] and stats.dropped == 1
    stats = TokenizeStats()
    [ex] = tokenize_chat(tok, [user("x"), bot("y" * 50)], 20, stats)
    assert len(ex) == 20 and stats.truncated == 1


def examples_of(tok, n, offset=0):
    return tokenize_chats(tok, [[user(f"q{i}"), bot("a" * (1 + i % 4))] for i in range(offset, offset + n)], 65)


def test_batches_are_examples_laid_end_to_end_with_targets_only_on_answers():
    tok = byte_tokenizer()
    examples = examples_of(tok, 7)
    batches = SFTBatches([(examples, 1.0)], context=32, batch=3, seed=0, pad_id=256)
    seen = 0
    for _ in range(4):
        x, y = batches.next_batch()
        assert x.shape == y.shape == (3, 32) and x.dtype == y.dtype == torch.long
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            # Find the whole examples the row is made of: each starts with <bos>, and none is cut.
            ids, mask, at = [], [], 0
            while at < 32 and row_x[at] == 258:
                ex = next(e for e in examples if e.ids[:32 - at] == row_x[at:at + len(e.ids)][:32 - at])
                ids, mask, at = ids + ex.ids, mask + ex.mask, at + len(ex.ids)
                seen += 1
            assert len(ids) <= 33
            ids += [256] * (33 - len(ids))
            mask += [False] * (33 - len(mask))
            assert row_x == ids[:32]
            assert row_y == [ids[t + 1] if mask[t + 1] else IGNORE for t in range(32)]
    assert seen > 12  # rows held several examples each
    # Without packing: one example per row.
    x, y = SFTBatches([(examples, 1.0)], context=32, batch=3, seed=0, pack=False, pad_id=256).next_batch()
    assert [(row == 258).sum().item() for row in x] == [1, 1, 1]


def test_loss_over_a_batch_counts_only_the_answers():
    tok = byte_tokenizer()
    examples = examples_of(tok, 5)
    x, y = SFTBatches([(examples, 1.0)], context=40, batch=2, seed=1).next_batch()
    model = tiny_model(tok.vocab_size)
    with torch.no_grad():
        logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    logp = logits.log_softmax(-1)
    picked = [-logp[b, t, y[b, t]] for b in range(2) for t in range(40) if y[b, t] != IGNORE]
    assert len(picked) == (y != IGNORE).sum() > 0
    torch.testing.assert_close(loss, torch.stack(picked).mean())


def test_weights_set_how_often_each_source_is_seen():
    tok = byte_tokenizer()
    a, b_, c = examples_of(tok, 10), examples_of(tok, 10, 10), examples_of(tok, 10, 20)
    batches = SFTBatches([(a, 2.0), (b_, 0.5), (c, 0.0)], context=16, batch=1, seed=0)
    order = batches.order
    assert len(order) == 25
    assert sorted(i for i in order if i < 10) == sorted(list(range(10)) * 2)
    assert len([i for i in order if 10 <= i < 20]) == 5 and not [i for i in order if i >= 20]
    halves = {tuple(sorted(i for i in batches._order(e) if 10 <= i < 20)) for e in range(5)}
    assert len(halves) > 1  # a different half each epoch


def test_batches_are_seeded_and_resume_exactly():
    tok = byte_tokenizer()
    groups = [(examples_of(tok, 9), 1.0), (examples_of(tok, 4, 9), 1.5)]
    straight = SFTBatches(groups, context=24, batch=2, seed=7)
    seq = [straight.next_batch() for _ in range(12)]
    again = SFTBatches(groups, context=24, batch=2, seed=7)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(seq, (again.next_batch() for _ in range(12))))
    first = SFTBatches(groups, context=24, batch=2, seed=7)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint's state.json holds
    resumed = SFTBatches(groups, context=24, batch=2, seed=7)
    resumed.load_state_dict(state)
    for want in seq[5:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert resumed.epoch >= 1  # the run went through an epoch boundary
    other = SFTBatches(groups, context=24, batch=2, seed=8).next_batch()
    assert not torch.equal(other[0], seq[0][0])
    with pytest.raises(UserError, match="seeded with 7"):
        SFTBatches(groups, context=24, batch=2, seed=8).load_state_dict(state)


def test_each_process_gets_its_slice_of_the_global_batch():
    tok = byte_tokenizer()
    groups = [(examples_of(tok, 11), 1.0)]
    whole = SFTBatches(groups, context=24, batch=4, seed=3).next_batch()
    parts = [SFTBatches(groups, context=24, batch=2, seed=3, rank=r, world=2).next_batch() for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0]) and torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_evaluator_scores_the_answers_of_held_out_examples():
    tok = byte_tokenizer()
    examples = examples_of(tok, 3)
    model = tiny_model(tok.vocab_size)
    row = sft_evaluator(examples, torch.tensor(tok.token_byte_lengths()), context=32, batch=2)(model, 0)
    nats, n, nbytes = 0.0, 0, 0
    with torch.no_grad():
        for ex in examples:
            logp = model(torch.tensor([ex.ids[:-1]]))[0].log_softmax(-1)
            for t in range(len(ex.ids) - 1):
                if ex.mask[t + 1]:
                    nats -= logp[t, ex.ids[t + 1]].item()
                    n += 1
                    nbytes += 0 if ex.ids[t + 1] >= 256 else 1
    assert row["val_tokens"] == n and row["val_bytes"] == nbytes
    assert row["val_loss"] == pytest.approx(nats / n, rel=1e-5)


def test_batcher_rejects_what_it_cannot_use():
    tok = byte_tokenizer()
    with pytest.raises(UserError, match="no SFT examples"):
        SFTBatches([([], 1.0)], context=16, batch=1, seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        SFTBatches([([Example([1] * 40, [True] * 40)], 1.0)], context=16, batch=1, seed=0)
    with pytest.raises(UserError, match=">= 0"):
        SFTBatches([(examples_of(tok, 2), -1.0)], context=16, batch=1, seed=0)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_fine_tuning_on_a_tiny_qa_set_learns_to_answer_it_exactly():
    tok = byte_tokenizer()
    pairs = [("Who are you?", "I am Pip."), ("Who made you?", "Ada did."), ("What is 2+2?", "4"),
             ("Say hi.", "Hi!")]
    examples = tokenize_chats(tok, [[user(q), bot(a)] for q, a in pairs], 33)
    torch.manual_seed(0)
    model = tiny_model(tok.vocab_size, d_model=64, n_heads=4, context=32).train()
    batches = SFTBatches([(examples, 1.0)], context=32, batch=4, seed=0, pad_id=tok.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(250):
        x, y = batches.next_batch()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompter = Prompter(tok)
    greedy = SamplingParams(max_new_tokens=20, temperature=0, stop_ids=prompter.stop_ids)
    for q, a in pairs:
        reply = complete(model, tok, prompter.prompt([user(q)]), greedy)
        assert (reply.text, reply.finish_reason) == (a, "stop")


def test_prepare_sft_puts_it_together(tmp_path):
    tok = byte_tokenizer()
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)])
    data = prepare_sft(tok, [str(path), "persona*2"], context=48, batch=2, seed=0, persona=Persona(name="Z"))
    n_persona = len(Persona(name="Z").pairs())
    assert data.sources == [(str(path), 1.0, 18, 2, 0), ("persona", 2.0, n_persona, 0, 0)]
    assert len(data.val) == 2 and data.val_chats[0] == [user("q18"), bot("a18")]
    assert len(data.batches.order) == 18 + 2 * n_persona
    x, y = data.batches.next_batch()
    assert x.shape == (2, 48) and (y != IGNORE).any()
    assert data.stats.conversations == 20 + n_persona


def test_held_out_prompts_that_training_also_asks_are_left_out(tmp_path):
    from scratchlm.sft.data import drop_repeated_prompts, load_mixture

    pairs = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(9)] + [{"question": " Q3 ", "answer": "other"}]
    path = write_jsonl(tmp_path / "qa.jsonl", [json.dumps(p) for p in pairs])
    (kept,) = load_mixture([str(path)], val_fraction=0.2)
    assert [c[0]["content"] for c in kept.val] == ["q8"] and kept.repeats == 1  # " Q3 " is q3 again
    (both,) = load_mixture([str(path)], val_fraction=0.2, drop_repeats=False)
    assert [c[0]["content"] for c in both.val] == ["q8", " Q3 "] and both.repeats == 0
    # across sources too: a prompt taught by one source is no test for another
    other = write_jsonl(tmp_path / "other.jsonl", [json.dumps({"question": "q8", "answer": "x"})] * 3)
    first, _ = load_mixture([str(path), str(other)], val_fraction=0.2)
    assert first.val == [] and first.repeats == 2
    assert drop_repeated_prompts([]) is None
