"""Hostile values given to the commands that run a model (generate, chat, eval, rate, attention, demo): each is
refused with exit code 2 and one `error:` line, never a traceback and never accepted silently. Prompts are
read one way by every command, and a chat asked for replies longer than the context says what it will do."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from cli_checks import one_line_error
from tiny_chat import byte_tokenizer, make_run, tiny_model

import scratchlm
from scratchlm.chat.terminal import ChatSession
from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.infer.prompt import read_prompt
from scratchlm.infer.sampling import SamplingParams
from scratchlm.runtime import pick_device


pytestmark = pytest.mark.usefixtures("offline_cache", "single_thread")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A base model on byte tokens (one token per byte, <bos> and <eos>), context 64."""
    return str(make_run(tmp_path_factory.mktemp("hostile") / "base", chat=False))


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    return str(make_run(tmp_path_factory.mktemp("hostile") / "chat"))


@pytest.mark.parametrize("flags, named", [
    (["--max-new-tokens", "-1"], "max_new_tokens"),        # was accepted: nothing generated
    (["--temperature", "-1"], "temperature"),              # was accepted: greedy
    (["--top-p", "2"], "top_p"),                           # was accepted: no filter
    (["--top-p", "0"], "top_p"),                           # was a traceback: every token filtered out
    (["--top-k", "-3"], "top_k"),                          # was a traceback in torch.topk
    (["--temperature", "nan"], "temperature"),             # was a traceback in torch.multinomial
    (["--seed", str(2**64)], "seed"),                      # was a traceback: past what torch seeds take
])
def test_generate_refuses_bad_sampling(capsys, base_run, flags, named):
    assert named in one_line_error(capsys, ["generate", "--checkpoint", base_run, "--prompt", "x", *flags])


def test_chat_refuses_the_same_values_the_same_way(capsys, chat_run):
    for flags, named in ((["--top-k", "-3"], "top_k"), (["--temperature", "nan"], "temperature")):
        assert f"sampling parameter {named}" in one_line_error(capsys, ["chat", "--checkpoint", chat_run, *flags])


@pytest.mark.parametrize("command", ["generate", "chat", "eval", "attention"])
def test_an_unknown_device_is_one_line(capsys, base_run, command):
    prompt = ["--prompt", "x"] if command == "attention" else []
    err = one_line_error(capsys, [command, "--checkpoint", base_run, "--device", "potato", *prompt])
    assert "--device 'potato'" in err and "cuda:N" in err


def test_device_names():
    assert pick_device("cpu").type == "cpu" and pick_device("auto").type in ("cpu", "cuda", "mps")
    for bad in ("potato", "CPU", "cuda:", "cuda:x", "cuda:-1", ""):
        with pytest.raises(UserError, match="is not a device"):
            pick_device(bad)
    with pytest.raises(UserError, match="train.device"):
        pick_device("gpu", "train.device")
    # one past the last GPU: "no CUDA device is visible" here, "this machine has N CUDA devices" on a GPU box
    with pytest.raises(UserError, match="--device cuda:.*CUDA device"):
        pick_device(f"cuda:{torch.cuda.device_count()}")


def test_prompts_that_are_not_text(capsys, base_run):
    # A byte that is not UTF-8 reaches Python as a lone surrogate (argv is decoded with surrogateescape).
    err = one_line_error(capsys, ["generate", "--checkpoint", base_run, "--prompt", "caf\udce9"])
    assert "--prompt: character 4 is not text" in err
    assert "--prompt" in one_line_error(capsys, ["generate", "--checkpoint", base_run, "--prompt", "\\ud800"])
    assert "past the last Unicode character" in one_line_error(capsys, ["generate", "--checkpoint", base_run,
                                                                  "--prompt", "\\U00110000"])
    assert "--system" in one_line_error(capsys, ["chat", "--checkpoint", base_run, "--system", "\udcff"])
    assert "--prompt" in one_line_error(capsys, ["attention", "--checkpoint", base_run, "--prompt", "a\udcff"])


def test_non_utf8_argv_from_a_real_process(base_run, tmp_path):
    env = {**os.environ, "SCRATCHLM_CACHE": str(tmp_path / "cache"), "LC_ALL": "C.UTF-8"}
    out = subprocess.run([sys.executable, "-m", "scratchlm", "generate", "--checkpoint", base_run,
                          "--prompt", b"caf\xe9"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: --prompt") and out.stderr.count("\n") == 1, out.stderr


def test_prompts_are_read_one_way(capsys, base_run, tmp_path):
    # Escapes are read, and the text around them stays as typed (it used to be decoded as Latin-1).
    generate = ["generate", "--checkpoint", base_run, "--max-new-tokens", "0", "--prompt"]
    assert main([*generate, "café\\tRO\\\\MEO.\\n"]) == 0
    assert capsys.readouterr().out == "café\tRO\\MEO.\n\n"
    assert main([*generate, "a\\nb", "--no-escapes"]) == 0
    assert capsys.readouterr().out == "a\\nb\n"
    assert read_prompt("C:\\data\\x4", flag="--prompt") == "C:\\data\\x4"   # not an escape: left as typed
    # attention reads the same text: with one token a byte, "ab\ncd" is 5 tokens (a backslash and an n made 6)
    out = tmp_path / "att.png"
    assert main(["attention", "--checkpoint", base_run, "--prompt", "ab\\ncd", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (5 tokens)"


def test_rate_prompt_files_that_are_not_text(capsys, base_run, tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"ROMEO.\\n\ncaf\xe9\n")
    assert "prompts.txt: not UTF-8 text" in one_line_error(capsys, ["rate", "--checkpoint", base_run, "--prompts", str(bad)])
    lone = tmp_path / "prompts.jsonl"
    lone.write_text('{"prompt": "ok"}\n{"prompt": "\\ud800"}\n')
    assert "prompts.jsonl:2" in one_line_error(capsys, ["rate", "--checkpoint", base_run, "--prompts", str(lone)])
    good = tmp_path / "good.txt"
    good.write_text("ROMEO.\n")
    assert "--seed -1" in one_line_error(capsys, ["rate", "--checkpoint", base_run, "--prompts", str(good), "--seed", "-1"])


def test_eval_refuses_counts_that_score_nothing(capsys, base_run, play_text, tmp_path):
    # --max-tokens -1 used to print "bits per byte 0.0000 (0 tokens)" and exit 0.
    err = one_line_error(capsys, ["eval", "--checkpoint", base_run, "--data", str(play_text), "--max-tokens", "-1"])
    assert "--max-tokens -1" in err
    assert "--batch 0" in one_line_error(capsys, ["eval", "--checkpoint", base_run, "--data", str(play_text), "--batch", "0"])
    task = tmp_path / "qa.jsonl"
    task.write_text('{"question": "Who?", "answer": "Romeo"}\n{"question": "Where?", "answer": "Verona"}\n')
    for flags in (["--batch", "0"], ["--limit", "-1"]):      # a traceback, and one example silently dropped
        assert flags[0] in one_line_error(capsys, ["eval", "--checkpoint", base_run, "--task", str(task), *flags])
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", base_run, "--context", "256,abc"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert next(line for line in err.splitlines() if "error:" in line).endswith(
        "argument --context: '256,abc': expected whole numbers separated by commas, e.g. 256,512")


@pytest.mark.parametrize("minutes", ["-1", "0", "nan", "inf"])
def test_demo_refuses_a_budget_that_is_not_a_time(capsys, minutes):
    assert f"--minutes {float(minutes)}" in one_line_error(capsys, ["demo", "--minutes", minutes])


def test_chat_caps_replies_at_the_context_and_says_so(capsys, chat_run, monkeypatch):
    loaded = scratchlm.load(chat_run)
    session = ChatSession(loaded.model, loaded.tokenizer, SamplingParams(max_new_tokens=1_000_000_000, temperature=0))
    assert session.params.max_new_tokens == 64
    assert session.notice == "(max_new_tokens 1000000000 is more than the context: replies stop after 64 tokens)"
    reply = "".join(session.reply("Hello"))
    assert len(reply) <= 64                      # a character takes at least one byte token
    assert session.command("/params max_new_tokens=500").endswith("replies stop after 64 tokens)")
    assert "max_new_tokens=64" in session.command("/params max_new_tokens=500")
    assert "\n" not in session.command("/params max_new_tokens=20")      # under the context: no notice
    # The command prints the notice once, before the first prompt.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nHow are you?\n"))
    assert main(["chat", "--checkpoint", chat_run, "--max-new-tokens", "1000000000", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    # (two messages answered, then the end of input: three prompts, one notice)
    assert out.count("is more than the context: replies stop after 64 tokens") == 1 and out.count("you> ") == 3


def test_chat_lines_that_are_not_text_are_refused_and_the_chat_goes_on(chat_run):
    from scratchlm.chat.terminal import run

    loaded = scratchlm.load(chat_run)
    session = ChatSession(loaded.model, loaded.tokenizer, SamplingParams(max_new_tokens=4, temperature=0))

    def undecodable():
        raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")

    lines = iter([undecodable, "caf\udce9", "/params"])
    out = []

    def read(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError
        return line() if callable(line) else line

    run(session, read, out.append, lambda: None)
    text = "".join(out)
    assert "error: that line is not UTF-8 text\n" in text and "error: that line: character 4 is not text" in text
    assert "max_new_tokens=4" in text and session.messages == []     # nothing sent to the model


def test_a_prompt_token_the_model_has_no_embedding_for_is_one_line(tmp_path, capsys):
    """A converted model's tokenizer may spell bytes its source vocabulary lacked with ids past the
    model's embedding table: here a byte tokenizer (260 ids) over a model of 150."""
    from scratchlm.config import RunConfig
    from scratchlm.train.checkpoint import save_checkpoint

    run = tmp_path / "run"
    model, cfg = tiny_model(150), RunConfig()
    cfg.model = model.config
    byte_tokenizer(chat=False).save(run / "tokenizer")
    cfg.save(run / "config.toml")
    save_checkpoint(run, 1, model, None, {"tokens": 0})
    assert main(["generate", "--checkpoint", str(run), "--prompt", "abc", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["generate", "--checkpoint", run, "--prompt", "caf\u00e9", "--max-new-tokens", "2"])
    assert "token 195" in err and "no embedding" in err  # é is the bytes 195 169


def test_a_task_file_that_is_not_utf8_is_one_line(capsys, base_run, tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "caf\xe9", "answer": "b"}\n')
    err = one_line_error(capsys, ["eval", "--checkpoint", base_run, "--task", task])
    assert "task.jsonl:2" in err and "UTF-8" in err
