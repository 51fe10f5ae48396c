"""A chat model made by `scratchlm sft`, exported, chats elsewhere as it does in scratchlm: transformers
formats the conversation with the exported Jinja template into the ids scratchlm's chat gives, its greedy
reply is scratchlm's, and its generation stops at the end of the reply by itself; the GGUF export carries
the same template and end token, and llama.cpp's server chats with it as scratchlm does.

The base model has a small trained BPE vocabulary, not bare bytes: llama.cpp refuses a GGUF tokenizer
without merges."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from test_sft_train import PAIRS, sft_config, write_qa
from tiny_chat import BASE_SPECIALS, one_thread, tiny_model

import scratchlm
from scratchlm.chat.jinja import SCRATCHLM_TEMPLATE
from scratchlm.chat.terminal import ChatSession
from scratchlm.config import RunConfig
from scratchlm.convert import convert
from scratchlm.infer.sampling import SamplingParams
from scratchlm.sft.train import finetune
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.bpe import train_bpe_on_texts
from scratchlm.train.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

END, EOS = "<|end|>", "<eos>"
CONVERSATIONS = [
    [{"role": "user", "content": question}] for question, _ in PAIRS
] + [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made you?"}]]


def bpe_base_run(path: Path) -> Path:
    """A base run folder with a 320-token BPE tokenizer trained on the questions and answers, and a tiny
    untrained model (sft teaches it everything it says)."""
    texts = [f"{q} {a}" for q, a in PAIRS] + ["Be brief."]
    vocab, merges = train_bpe_on_texts([texts * 8], 320, BASE_SPECIALS, progress=False)
    tok = Tokenizer(vocab, merges, BASE_SPECIALS)
    model = tiny_model(tok.vocab_size, scale=8.0, context=48)
    cfg = RunConfig()
    cfg.model = model.config
    tok.save(path / "tokenizer")
    cfg.save(path / "config.toml")
    save_checkpoint(path, 1, model, None, {"tokens": 0})
    return path


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny base model fine-tuned until it answers PAIRS exactly, ending each reply with <|end|>."""
    tmp = tmp_path_factory.mktemp("chat")
    base = bpe_base_run(tmp / "base")
    qa = write_qa(tmp / "qa.json", PAIRS)
    with one_thread():
        finetune(sft_config(base, [qa], max_steps=200), tmp / "chat", progress=False)
    return tmp / "chat"


def scratchlm_reply(loaded, messages) -> tuple[list[int], str]:
    """The prompt ids and greedy reply of `scratchlm chat` (its ChatSession) to the conversation."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    session = ChatSession(loaded.model, loaded.tokenizer, SamplingParams(max_new_tokens=16, temperature=0.0),
                          system=system)
    session.messages = [dict(m) for m in messages[1 if system else 0:]]
    prompt = session.prompt_ids()   # what the chat sends: the conversation kept in the context's budget
    session.messages.pop()
    reply = "".join(session.reply(messages[-1]["content"])).strip()
    return prompt, reply


def test_the_hf_export_chats_in_transformers_as_scratchlm_does(chat_run, tmp_path):
    convert(chat_run, tmp_path / "hf", "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    loaded = scratchlm.load(chat_run, "cpu")
    end = loaded.tokenizer.special_tokens[END]
    assert hf_tok.chat_template == SCRATCHLM_TEMPLATE and hf_tok.eos_token == END
    assert model.generation_config.eos_token_id == [end, loaded.tokenizer.special_tokens[EOS]]
    for messages in CONVERSATIONS:
        prompt, reply = scratchlm_reply(loaded, messages)
        ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert list(ids) == prompt
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert out[-1] == end and end not in out[:-1], "transformers stops at <|end|> by itself"
        assert hf_tok.decode(out, skip_special_tokens=True).strip() == reply
        if len(messages) == 1:   # a question it was taught, asked as it was taught
            assert reply == dict(PAIRS)[messages[0]["content"]]


def test_the_gguf_export_carries_the_template_and_the_end_token(chat_run, tmp_path):
    convert(chat_run, tmp_path / "chat.gguf", "gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "chat.gguf").fields.items()
              if k.startswith("tokenizer.") and k != "tokenizer.ggml.tokens" and "merges" not in k
              and "token_type" not in k}
    specials = scratchlm.load(chat_run, "cpu").tokenizer.special_tokens
    assert fields["tokenizer.chat_template"] == SCRATCHLM_TEMPLATE
    assert fields["tokenizer.ggml.eos_token_id"] == specials[END]
    assert fields["tokenizer.ggml.bos_token_id"] == specials["<bos>"]
    # and back: importing the GGUF gives a chat model that renders the same prompt
    convert(tmp_path / "chat.gguf", tmp_path / "back", "scratchlm")
    back = scratchlm.load(tmp_path / "back", "cpu")
    assert back.tokenizer.chat_template == SCRATCHLM_TEMPLATE and back.tokenizer.eos_id == specials[END]
    json.dumps(fields, default=str)  # every field decodes


def test_the_gguf_export_chats_in_llama_cpp_as_scratchlm_does(chat_run, tmp_path):
    """llama-server (when llama.cpp is installed: the test extras build it) formats the conversation with the
    template the GGUF carries into scratchlm's prompt ids, and its greedy reply, ended at <|end|>, is
    scratchlm chat's."""
    spec = importlib.util.spec_from_file_location("llamacpp_bin", Path(__file__).parents[1] / "bench" / "llamacpp_bin.py")
    lb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lb)
    try:
        folder = lb.bin_dir()
    except lb.LlamaCppMissing as e:
        pytest.skip(str(e))
    convert(chat_run, tmp_path / "chat.gguf", "gguf")
    loaded = scratchlm.load(chat_run, "cpu")
    exact = ["--cache-type-k", "f32", "--cache-type-v", "f32"]
    with lb.LlamaServer(tmp_path / "chat.gguf", threads=1, context=48, extra=exact, folder=folder) as server:
        assert server.get("/props")["chat_template"].strip() == SCRATCHLM_TEMPLATE.strip()  # it trims the end
        for messages in CONVERSATIONS:
            prompt, reply = scratchlm_reply(loaded, messages)
            answer = server.post("/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 16})
            choice = answer["choices"][0]
            assert answer["usage"]["prompt_tokens"] == len(prompt)
            assert choice["finish_reason"] == "stop"
            assert choice["message"]["content"].strip() == reply
