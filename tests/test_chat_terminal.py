"""The terminal chat, driven with scripted input: commands, multi-turn replies that match the library's
generation for the same conversation, Ctrl-C in the middle of a reply, and the CLI's one-line errors."""
from __future__ import annotations

import pytest
from tiny_chat import make_run

import scratchlm
from scratchlm.chat.template import Prompter
from scratchlm.chat.terminal import ChatSession, parse_params, run
from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.infer.generate import complete
from scratchlm.infer.sampling import SAMPLING

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return scratchlm.load(make_run(tmp_path_factory.mktemp("chat") / "run"))


def script(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_params_parse_and_check():
    p = parse_params(SAMPLING["chat"], ["temperature=0.2", "top_k=5", "seed=3", "max-new-tokens=9"])
    assert (p.temperature, p.top_k, p.seed, p.max_new_tokens) == (0.2, 5, 3, 9)
    assert parse_params(p, ["seed=none"]).seed is None
    with pytest.raises(UserError, match="top_p"):
        parse_params(SAMPLING["chat"], ["top_p=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_params(SAMPLING["chat"], ["colour=blue"])
    with pytest.raises(UserError, match="not a number"):
        parse_params(SAMPLING["chat"], ["temperature=hot"])


def test_a_scripted_conversation(loaded):
    session = ChatSession(loaded.model, loaded.tokenizer)
    out = []
    run(session, script(["/params temperature=0 max_new_tokens=8 repetition_penalty=1", "/system Be short.",
                         "Hello", "How are you?", "/params top_p=9", "/nonsense"]), out.append, lambda: None)
    text = "".join(out)
    assert "temperature=0.0" in text and "(system message: Be short.)" in text
    assert "error: sampling parameter top_p = 9.0" in text and "error: unknown command /nonsense" in text
    # The replies are the library's greedy replies to the same growing conversation.
    prompter = Prompter(loaded.tokenizer)
    params = parse_params(SAMPLING["chat"], ["temperature=0", "max_new_tokens=8", "repetition_penalty=1"])
    params.stop_ids = prompter.stop_ids
    history = [{"role": "system", "content": "Be short."}]
    for said in ("Hello", "How are you?"):
        history.append({"role": "user", "content": said})
        # (cut to leave room for the reply, as the chat does: the context is only 64 tokens)
        want = complete(loaded.model, loaded.tokenizer, prompter.prompt(prompter.fit(history, 64 - 8)), params).text
        assert f"bot> {want}\n" in text
        history.append({"role": "assistant", "content": want.strip()})
    assert session.messages == history[1:]
    assert session.command("/reset") == "(conversation cleared)" and session.messages == []


def test_history_is_trimmed_to_the_context(loaded):
    session = ChatSession(loaded.model, loaded.tokenizer, parse_params(SAMPLING["chat"], ["max_new_tokens=10"]))
    for i in range(20):
        session.messages += [{"role": "user", "content": f"message {i}"}, {"role": "assistant", "content": "ok"}]
    session.messages.append({"role": "user", "content": "the last one"})
    prompt = session.prompt_ids()
    assert len(prompt) <= 64 - 10
    assert loaded.tokenizer.decode(prompt).endswith("the last one<|end|><|assistant|>")


def test_ctrl_c_stops_a_reply_but_not_the_chat(loaded):
    session = ChatSession(loaded.model, loaded.tokenizer,
                          parse_params(SAMPLING["chat"], ["temperature=0", "max_new_tokens=20"]))
    out, pieces = [], []

    def write(text):
        out.append(text)
        if out[-2:-1] == ["bot> "] and not pieces:  # the first piece of the first reply: press Ctrl-C
            pieces.append(text)
            raise KeyboardInterrupt

    run(session, script(["first", "second"]), write, lambda: None)
    text = "".join(out)
    assert " [stopped]\n" in text and text.count("bot> ") == 2
    assert session.messages[1] == {"role": "assistant", "content": pieces[0].strip()}
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_cli_errors_are_one_line(capsys, tmp_path):
    for argv in (["chat", "--checkpoint", str(tmp_path / "none")], ["serve", "--checkpoint", str(tmp_path / "none")],
                 ["chat", "--checkpoint", str(tmp_path), "--top-p", "5"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
