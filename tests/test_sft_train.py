"""`scratchlm sft`: a base run fine-tuned into a chat model. Checked against things computed here: replies
compared with the answers taught, the first logged loss against F.cross_entropy over hand-picked answer
positions of a row built by hand, step counts from epochs worked out by hand, an interrupted and resumed
run against one never interrupted, and the command line end to end."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from tiny_chat import make_run, one_thread

import scratchlm
from scratchlm.chat.template import Prompter, has_chat_tokens
from scratchlm.cli import main
from scratchlm.config import build_config, load_config, recipe_path
from scratchlm.errors import UserError
from scratchlm.infer.generate import complete
from scratchlm.infer.sampling import SamplingParams
from scratchlm.sft.persona import Persona
from scratchlm.sft.settings import load_persona, mixture
from scratchlm.sft.train import finetune
from scratchlm import rundir

PAIRS = [("Who are you?", "I am Pip."), ("Who made you?", "Ada did."), ("What is 2+2?", "4"), ("Say hi.", "Hi!")]
# The byte tokenizer of tiny_chat: bytes are their own ids, <pad> 256, <bos> 258, then the chat tokens.
PAD, BOS, USER, ASSISTANT, END = 256, 258, 261, 262, 263


@pytest.fixture(autouse=True)
def _quiet_and_small(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with one_thread():
        yield


def write_qa(path, pairs):
    path.write_text(json.dumps([{"question": q, "answer": a} for q, a in pairs]))
    return path


def sft_config(init, sources, *overrides, **train):
    settings = {"lr": 3e-3, "micro_batch": 4, "warmup_steps": 10, "log_every": 10, "eval_every": 0,
                "checkpoint_every": 0, "threads": 1, **train}
    return build_config({"sft": {"init": str(init), "sources": [str(s) for s in sources], "train": settings}},
                        list(overrides))


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def greedy_reply(loaded, question):
    prompter = Prompter(loaded.tokenizer)
    params = SamplingParams(max_new_tokens=24, temperature=0, stop_ids=prompter.stop_ids)
    reply = complete(loaded.model, loaded.tokenizer, prompter.prompt([{"role": "user", "content": question}]), params)
    return reply.text, reply.finish_reason


def test_a_base_model_fine_tuned_on_a_few_pairs_answers_them_exactly(tmp_path):
    base = make_run(tmp_path / "base", chat=False, context=48)   # no chat tokens yet: sft adds them
    qa = write_qa(tmp_path / "qa.json", PAIRS)
    result = finetune(sft_config(base, [qa], max_steps=200), tmp_path / "chat", progress=False)
    assert result["step"] == 200
    chat = scratchlm.load(tmp_path / "chat")
    assert has_chat_tokens(chat.tokenizer) and chat.tokenizer.vocab_size == 264
    assert chat.model.tok_emb.weight.shape == (264, 32) and chat.config.model.vocab_size == 264
    assert chat.config.train.lr == 3e-3          # the run folder records the stage's [sft.train] values
    for question, answer in PAIRS:
        assert greedy_reply(chat, question) == (answer, "stop")


def test_the_loss_is_cross_entropy_over_the_answer_tokens_only(tmp_path):
    # One conversation of 11 tokens; a row of 24 + 1 holds two copies of it, then 3 pads.
    conv = [BOS, USER, *b"Hi?", END, ASSISTANT, *b"Yo.", END]
    base = make_run(tmp_path / "base", chat=True, context=24)
    qa = write_qa(tmp_path / "qa.json", [("Hi?", "Yo.")])
    finetune(sft_config(base, [qa], max_steps=1, micro_batch=1, log_every=1), tmp_path / "chat", progress=False)
    logged = rows(tmp_path / "chat")[0]["loss"]

    row = conv + conv + [PAD] * 3
    x = torch.tensor([row[:-1]])
    answer_at = [7, 8, 9, 10, 18, 19, 20, 21]     # "Yo." and <|end|> of each copy, by position in the row
    before = [i - 1 for i in answer_at]             # the positions whose outputs predict them
    model = scratchlm.load(base).model
    with torch.no_grad():
        logits = model(x)[0]
    expected = F.cross_entropy(logits[before], torch.tensor([row[i] for i in answer_at])).item()
    everywhere = F.cross_entropy(logits, torch.tensor(row[1:])).item()
    assert logged == pytest.approx(expected, rel=1e-5)
    assert abs(expected - everywhere) > 0.1        # the check can tell the two apart


def test_epochs_set_the_step_count(tmp_path):
    # Six conversations of 4 + 5 + 6 = 15 tokens: three fit a packed row of 47 + 1, so an epoch is two
    # rows when packing and six without; 1.5 epochs at one row per step is 3 or 9 steps.
    base = make_run(tmp_path / "base", chat=True, context=47)
    qa = write_qa(tmp_path / "qa.json", [(f"Que{i}?", f"Ans{i}.") for i in range(6)])
    packed = finetune(sft_config(base, [qa], "sft.epochs=1.5", micro_batch=1), tmp_path / "packed", progress=False)
    single = finetune(sft_config(base, [qa], "sft.epochs=1.5", "sft.pack=false", micro_batch=1), tmp_path / "single",
                      progress=False)
    assert (packed["step"], single["step"]) == (3, 9)
    with pytest.raises(UserError, match="sft.epochs or sft.train.max_steps"):
        finetune(sft_config(base, [qa], "sft.epochs=1", max_steps=5), tmp_path / "both", progress=False)


def test_epochs_count_the_rows_an_accumulated_step_learns_from(tmp_path):
    # As above, 1.5 packed epochs are 3 rows; batch_tokens of two rows of 47 makes each step accumulate
    # two micro-batches of one row, so 2 steps (the second one partly into the next epoch), and the loop
    # counts the tokens of the same two rows per step.
    base = make_run(tmp_path / "base", chat=True, context=47)
    qa = write_qa(tmp_path / "qa.json", [(f"Que{i}?", f"Ans{i}.") for i in range(6)])
    result = finetune(sft_config(base, [qa], "sft.epochs=1.5", micro_batch=1, batch_tokens=2 * 47, log_every=1),
                      tmp_path / "accumulated", progress=False)
    assert result["step"] == 2 and result["tokens"] == 2 * 2 * 47


def test_an_interrupted_run_resumes_to_the_same_losses_without_its_base(tmp_path):
    base = make_run(tmp_path / "base", chat=False, context=48)
    qa = write_qa(tmp_path / "qa.json", PAIRS)
    settings = dict(max_steps=12, checkpoint_every=4, keep_checkpoints=5, log_every=1)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finetune(sft_config(base, [qa], **settings), straight, progress=False)
    # The same run, as if killed after its step-4 checkpoint, with rows logged past it.
    shutil.copytree(straight, killed)
    for later in rundir.list_checkpoints(killed)[1:]:
        shutil.rmtree(later)
    (killed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(killed) if r["step"] <= 6
                                                  and not r.get("final")))
    shutil.rmtree(base)     # a resumed run needs only its own folder
    finetune(sft_config(base, [qa], "train.resume=auto", **settings), killed, progress=False)

    def untimed(run):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "seconds", "mfu")} for r in rows(run)]

    assert untimed(killed) == untimed(straight) and len(untimed(killed)) == 13
    a, b = (scratchlm.load(run).model.state_dict() for run in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and err.count("error: ") == 1, err
    return err.splitlines()[-1]


def write_recipe(path, init, sources, **sft):
    path.write_text("\n".join([
        "[sft]", f"init = {json.dumps(str(init))}", f"sources = {json.dumps([str(s) for s in sources])}",
        *(f"{k} = {json.dumps(v)}" for k, v in sft.items()),
        "[sft.train]", "lr = 3e-3", "micro_batch = 4", "max_steps = 250", "warmup_steps = 10", "eval_every = 0",
        "checkpoint_every = 0", "threads = 1", ""]))
    return path


def test_bad_sft_data_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    base = make_run(tmp_path / "base", chat=False, context=48)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "answer": \n')
    err = one_line_error(capsys, ["sft", "--config", str(write_recipe(tmp_path / "r.toml", base, [bad]))])
    assert "broken.jsonl, line 2: not valid JSON" in err
    no_base = write_recipe(tmp_path / "r.toml", tmp_path / "nobase", [bad])
    err = one_line_error(capsys, ["sft", "--config", str(no_base)])
    assert "sft.init" in err and "nobase" in err
    err = one_line_error(capsys, ["sft", "--config", str(tmp_path / "r.toml"), "--set", "sft.train.lrr=1"])
    assert "sft.train.lrr" in err and "did you mean lr" in err
    err = one_line_error(capsys, ["sft", "--config", str(tmp_path / "r.toml"), "--set", 'sft.sources=["x*fast"]'])
    assert "sft.sources" in err and "x*fast" in err


def test_the_command_trains_scores_the_held_out_answers_and_leaves_a_usable_run(tmp_path, capsys):
    base = make_run(tmp_path / "base", chat=False, context=48)
    # Twelve records: the last one is held out, and it repeats a pair taught (kept, with drop_repeats off),
    # so a model that learned the training pairs answers it exactly (exact match and ROUGE-L both 100).
    qa = write_qa(tmp_path / "qa.json", [PAIRS[i % 3] for i in range(12)])
    recipe = write_recipe(tmp_path / "chat.toml", base, [qa], eval_max_new_tokens=16, drop_repeats=False)
    assert main(["sft", "--config", str(recipe), "--set", "sft.train.lr=4e-3"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "chat-sft"
    assert "exact match 100.0%" in out and "ROUGE-L 100.0%" in out and "runs/chat-sft" in out
    final = rows(run)[-1]
    assert final["final"] and final["exact_match"] == 100.0 and final["rouge_l"] == pytest.approx(100.0)
    assert final["heldout_examples"] == 1 and final["val_loss"] < 0.1
    answers = [json.loads(line) for line in (run / "heldout_answers.jsonl").read_text().splitlines()]
    assert answers == [{"prompt": PAIRS[2][0], "prediction": PAIRS[2][1], "reference": PAIRS[2][1], "exact_match": 1.0}]
    assert load_config(run / "config.toml").train.lr == 4e-3
    assert (run / "loss.png").is_file()
    assert main(["generate", "--checkpoint", str(run), "--prompt", "Hi", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    capsys.readouterr()
    # Asked again, the command refuses to overwrite the run; --resume continues it (already complete).
    assert "--resume" in one_line_error(capsys, ["sft", "--config", str(recipe)])
    assert main(["sft", "--config", str(recipe), "--resume", "--set", "sft.train.lr=4e-3"]) == 0


def test_persona_settings(tmp_path):
    on = build_config({"sft": {"persona": "on", "persona_name": "Zed"}}).sft
    persona = load_persona(on)
    assert (persona.name, persona.about) == ("Zed", Persona().about)
    assert [(s.source, s.weight) for s in mixture(on, persona)] == [("chatterbot", 1.0), ("persona", 3.0)]
    listed = build_config({"sft": {"persona": "on", "sources": ["persona*5"]}}).sft
    assert [(s.source, s.weight) for s in mixture(listed, load_persona(listed))] == [("persona", 5.0)]
    assert load_persona(build_config({}).sft) is None
    with pytest.raises(UserError, match="sft.persona is off"):
        mixture(build_config({"sft": {"sources": ["persona"]}}).sft, None)
    path = tmp_path / "me.toml"
    path.write_text('name = "Ori"\nabout = "a toy"\ncreator = "Lee"\nextra = [["Favourite colour?", "Blue."]]\n')
    persona = load_persona(build_config({"sft": {"persona": str(path)}}).sft)
    assert (persona.name, persona.about, persona.creator) == ("Ori", "a toy", "Lee")
    assert ("What is your name?", "My name is Ori.") in persona.pairs()
    assert ("Favourite colour?", "Blue.") in persona.pairs()
    path.write_text('nmae = "Ori"\n')
    with pytest.raises(UserError, match=r"me\.toml: unknown persona key 'nmae'"):
        load_persona(build_config({"sft": {"persona": str(path)}}).sft)


def test_sft_settings_in_configs():
    cfg = build_config({"sft": {"train": {"lr": 1, "minutes": 2}}}, ["sft.train.lr=3e-4", "sft.val_fraction=0.2"])
    assert cfg.sft.train == {"lr": 3e-4, "minutes": 2.0} and cfg.sft.val_fraction == 0.2
    assert isinstance(cfg.sft.train["minutes"], float)
    with pytest.raises(UserError, match="sft.train.max_steps must be int"):
        build_config({"sft": {"train": {"max_steps": "many"}}})
    with pytest.raises(UserError, match="unknown key sft.inti"):
        build_config({}, ["sft.inti=x"])
    recipe = load_config(recipe_path("chat-cpu.toml"))
    assert recipe.data.dataset == "chitchat" and recipe.sft.init and "chatterbot" in recipe.sft.sources[0]
    assert recipe.sft.persona == "on" and recipe.sft.train["lr"] < recipe.train.lr
