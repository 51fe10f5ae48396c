"""Crafted, truncated and corrupted model files, and exports that must not destroy what they replace.

Every hostile file is built here, byte by byte where the format is simple enough (GGUF with struct,
safetensors by editing the header of a real file), and must end in exactly one 'error:' line and exit
code 2 through every command that reads weights. The checks that refuse them are themselves checked
against independent readers: gguf's own reader on a file built here, and safetensors' own writer."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from tiny_chat import make_run, one_thread
from cli_checks import one_line_error

import scratchlm
from scratchlm.cli import main
from scratchlm.config import load_config
from scratchlm.convert import convert
from scratchlm.convert.bundle import read_run, write_run
from scratchlm.errors import UserError
from scratchlm.loading import load_weights, safetensors_shapes
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer

VOCAB = 260  # tiny_chat's byte tokenizer without the chat tokens


pytestmark = pytest.mark.usefixtures("offline_cache")


@pytest.fixture(autouse=True)
def _one_thread_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pristine") / "run", chat=False, context=32)


@pytest.fixture
def run(pristine, tmp_path):
    """A fresh copy of a valid tiny run, to corrupt."""
    return shutil.copytree(pristine, tmp_path / "run")


def weights_file(run):
    return next(run.glob("checkpoints/step_*/model.safetensors"))




def names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "cache")


def listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*"))


# ----------------------------------------------------------------------------- safetensors


def _edit_header(data: bytes, edit) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header, len(data) - 8 - n)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _first_matrix(header):
    return next(v for k, v in sorted(header.items()) if k != "__metadata__" and len(v["shape"]) == 2)


def _offsets_past_end(header, data_size):
    t = _first_matrix(header)
    length = t["data_offsets"][1] - t["data_offsets"][0]
    t["data_offsets"] = [data_size, data_size + length]


def _set(key, value):
    def edit(header, data_size):
        _first_matrix(header)[key] = value(_first_matrix(header))
    return edit


CORRUPTIONS = {
    # name: (bytes of a valid file -> hostile bytes, what the error line must say)
    "empty": (lambda d: b"", "0 bytes, too short"),
    "five bytes": (lambda d: d[:5], "5 bytes, too short"),
    "truncated": (lambda d: d[:len(d) // 2], "(truncated file)"),
    "header length past the end": (lambda d: struct.pack("<Q", 2 ** 40) + d[8:],
                                   f"the header claims {2 ** 40} bytes"),
    "garbage header": (lambda d: struct.pack("<Q", 20) + b"\xff\xfe{not json at all" + d[28:], "not valid JSON"),
    "header not an object": (lambda d: struct.pack("<Q", 6) + b"[1, 2]" + d[14:], "not a JSON object"),
    "offsets past the end": (lambda d: _edit_header(d, _offsets_past_end), "(truncated file)"),
    "dtype disagrees with bytes": (lambda d: _edit_header(d, _set("dtype", lambda t: "F16")), "spans"),
    "shape disagrees with bytes": (lambda d: _edit_header(d, _set("shape", lambda t: [t["shape"][0], t["shape"][1] + 1])),
                                   "spans"),
    "unknown dtype": (lambda d: _edit_header(d, _set("dtype", lambda t: "Q4")), "dtype 'Q4'"),
    "offsets not a pair": (lambda d: _edit_header(d, _set("data_offsets", lambda t: [5])), "data_offsets [5]"),
    # found by safetensors' own reader, after the header check: bytes no tensor accounts for
    "trailing bytes": (lambda d: d + b"junk", "cannot be read as safetensors"),
}

COMMANDS = {
    "generate": lambda run: ["generate", "--checkpoint", run, "--device", "cpu", "--max-new-tokens", "2"],
    "eval": lambda run: ["eval", "--checkpoint", run, "--device", "cpu"],
    "chat": lambda run: ["chat", "--checkpoint", run, "--device", "cpu"],
    "serve": lambda run: ["serve", "--checkpoint", run, "--device", "cpu", "--port", "0"],
    "attention": lambda run: ["attention", "--checkpoint", run, "--prompt", "hi", "--out", run.parent / "a.png"],
    "convert": lambda run: ["convert", run, run.parent / "hf", "--to", "hf"],
    "sft.init": lambda run: ["sft", "--config", _sft_recipe(run), "--out", run.parent / "sft"],
}


def _sft_recipe(init):
    qa = init.parent / "qa.json"
    qa.write_text(json.dumps([{"question": "Who are you?", "answer": "Pip."}]))
    recipe = init.parent / "sft.toml"
    recipe.write_text(f"[sft]\ninit = {json.dumps(str(init))}\nsources = {json.dumps([str(qa)])}\n"
                      "[sft.train]\nmax_steps = 1\nthreads = 1\n")
    return recipe


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_corrupt_weights_file_is_one_line_through_every_command(command, corruption, run, capsys):
    path = weights_file(run)
    hostile, says = CORRUPTIONS[corruption]
    path.write_bytes(hostile(path.read_bytes()))
    err = one_line_error(capsys, COMMANDS[command](run))
    assert str(path) in err and says in err


def test_the_header_check_accepts_what_safetensors_writes(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.float16), "c": torch.zeros((), dtype=torch.int64),
               "d": torch.zeros(0, 4, dtype=torch.bfloat16), "e": torch.zeros(2, 2, 2, dtype=torch.uint8)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert safetensors_shapes(tmp_path / "x.safetensors") == theirs == {k: tuple(v.shape) for k, v in tensors.items()}


def test_resuming_from_a_corrupt_checkpoint_is_one_line(run):
    path = weights_file(run)
    path.write_bytes(path.read_bytes()[:100])
    model = Transformer(load_config(run / "config.toml").model)
    with pytest.raises(UserError, match=r"model\.safetensors") as e:
        load_weights(model, path.parent)
    assert "\n" not in str(e.value)


def test_a_checkpoint_without_weights_is_one_line(run, capsys):
    weights_file(run).unlink()
    err = one_line_error(capsys, COMMANDS["generate"](run))
    assert "model.safetensors not found" in err


# ----------------------------------------------------------------------------- config.toml against the weights


@pytest.mark.parametrize("command", ["generate", "convert", "sft.init"])
def test_a_config_whose_shapes_disagree_with_the_weights_names_the_tensor_and_both_shapes(command, run, capsys):
    config = run / "config.toml"
    config.write_text(config.read_text().replace("d_model = 32", "d_model = 64"))
    err = one_line_error(capsys, COMMANDS[command](run))
    assert f"tok_emb.weight has shape ({VOCAB}, 32) but {config} makes it ({VOCAB}, 64)" in err


def test_a_config_with_more_layers_than_the_weights_names_what_is_missing(run, capsys):
    config = run / "config.toml"
    config.write_text(config.read_text().replace("n_layers = 2", "n_layers = 3"))
    err = one_line_error(capsys, COMMANDS["generate"](run))
    assert "missing ['blocks.2." in err and str(config) in err


def test_loading_still_gives_the_saved_weights(pristine):
    from safetensors.torch import load_file

    loaded = scratchlm.load(pristine)
    saved = load_file(str(weights_file(pristine)))
    assert loaded.model.lm_head.weight is loaded.model.tok_emb.weight  # tied, stored once
    for name, tensor in saved.items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    assert set(read_run(pristine).weights) == set(saved)


# ----------------------------------------------------------------------------- Hugging Face folders


def test_a_hugging_face_folder_without_weights_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    err = one_line_error(capsys, ["convert", tmp_path / "hf", tmp_path / "out", "--to", "scratchlm"])
    assert "holds no weights" in err and str(tmp_path / "hf") in err


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "\xff"])
def test_a_hugging_face_config_that_is_not_an_object_is_one_line(text, tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_bytes(text.encode("latin-1"))
    assert "config.json" in one_line_error(capsys, ["convert", tmp_path / "hf", tmp_path / "out", "--to", "scratchlm"])


def test_a_corrupt_hugging_face_weights_file_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    err = one_line_error(capsys, ["convert", tmp_path / "hf", tmp_path / "out", "--to", "scratchlm"])
    assert "model.safetensors: the header claims 1000000000 bytes" in err


@pytest.fixture
def hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("change, says", [
    ({"hidden_size": 64, "head_dim": 16}, "lm_head.weight has shape (64, 32) but config.json makes it (64, 64)"),
    ({"num_hidden_layers": 3}, "config.json needs weights the folder lacks: model.layers.2."),
    ({"num_hidden_layers": 1}, "the weights hold tensors config.json has no place for: model.layers.1."),
])
def test_a_hugging_face_config_that_disagrees_with_its_weights_is_one_line(change, says, hf_folder, capsys):
    config = hf_folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    err = one_line_error(capsys, ["convert", hf_folder, hf_folder.parent / "out", "--to", "scratchlm"])
    assert says in err


# ----------------------------------------------------------------------------- GGUF built by hand


def _str(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _gguf(entries=(), tensors=(), data=b"", *, n_entries=None, n_tensors=None, version=3, magic=b"GGUF") -> bytes:
    """A GGUF file: `entries` are encoded metadata entries, `tensors` encoded tensor descriptions; the
    counts default to their lengths. Tensor data starts at the next multiple of 32."""
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(entries) if n_entries is None else n_entries)
    head += b"".join(entries) + b"".join(tensors)
    return head + b"\0" * (-len(head) % 32) + data if data else head


ARCH = _str(b"general.architecture") + struct.pack("<I", 8) + _str(b"llama")
EMBEDDING = _str(b"token_embd.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 4, 2) + struct.pack("<IQ", 0, 0)
MATRIX = torch.arange(8, dtype=torch.float32).reshape(2, 4)  # GGUF lists (4, 2): the fastest dimension first


def _array(count: int, element_type: int) -> bytes:
    return _str(b"a") + struct.pack("<IIQ", 9, element_type, count)


GGUF_CASES = {
    # name: (file, what the error line must say)
    "header only, claiming entries": (_gguf(n_entries=3), "it claims 3 metadata entries"),
    "header cut short": (_gguf()[:12], "the tensor count needs 8 bytes at offset 8"),
    "array of 2^62 bytes": (_gguf([_array(2 ** 62, 0)]), f"array a of {2 ** 62} elements needs {2 ** 62} bytes"),
    "array of 2^61 strings": (_gguf([_array(2 ** 61, 8)]), f"it claims {2 ** 61} elements in a"),
    "array of 2^62 arrays": (_gguf([_array(2 ** 62, 9)]), f"it claims {2 ** 62} elements in a"),
    "10^12 tensors": (_gguf([ARCH], n_tensors=10 ** 12), f"it claims {10 ** 12} tensors"),
    "key of 2^60 bytes": (_gguf([struct.pack("<Q", 2 ** 60) + b"x" * 16]),
                          f"the key of metadata entry 0 needs {2 ** 60} bytes"),
    "string value of 2^60 bytes": (_gguf([_str(b"k") + struct.pack("<IQ", 8, 2 ** 60)]),
                                   f"the text of k needs {2 ** 60} bytes"),
    "unknown value type": (_gguf([_str(b"k") + struct.pack("<I", 13) + b"\0" * 8]), "value type 13"),
    "tensor name past the end": (_gguf([ARCH], [struct.pack("<Q", 2 ** 40) + b"\0" * 24]),
                                 f"the name of tensor 0 needs {2 ** 40} bytes"),
    "tensor of 7 dimensions": (_gguf([ARCH], [_str(b"t") + struct.pack("<I", 7) + b"\0" * 64]), "7 dimensions"),
    "tensor data truncated": (_gguf([ARCH], [EMBEDDING], MATRIX.numpy().tobytes()[:16]),
                              "token_embd.weight' needs bytes 0 to 32 of the tensor data, but the file holds 16"),
    "tensor data offset past the end": (_gguf([ARCH], [EMBEDDING[:-8] + struct.pack("<Q", 2 ** 63)],
                                              MATRIX.numpy().tobytes()), f"needs bytes {2 ** 63} to"),
    "huge tensor dimensions": (_gguf([ARCH], [EMBEDDING[:-28] + struct.pack("<QQ", 2 ** 63, 2 ** 63) +
                                              EMBEDDING[-12:]], MATRIX.numpy().tobytes()), "needs bytes 0 to"),
    "unknown tensor type": (_gguf([ARCH], [EMBEDDING[:-12] + struct.pack("<IQ", 9999, 0)], MATRIX.numpy().tobytes()),
                            "type 9999"),
    "duplicate key": (_gguf([ARCH, ARCH]), "'general.architecture' appears twice"),
    "wrong magic": (_gguf(magic=b"GGUX"), "not a GGUF file"),
    "version 1": (_gguf(version=1), "GGUF version 1 is not supported"),
    "version 4": (_gguf(version=4), "GGUF version 4 is not supported"),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_a_hostile_gguf_is_one_line_naming_the_file(case, tmp_path, capsys):
    pytest.importorskip("gguf")
    from scratchlm.convert.gguf import read_gguf

    path = tmp_path / "m.gguf"
    data, says = GGUF_CASES[case]
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        read_gguf(path)
    assert str(e.value).startswith(f"{path}") and says in str(e.value) and "\n" not in str(e.value)
    err = one_line_error(capsys, ["convert", path, tmp_path / "out", "--to", "scratchlm"])
    assert str(path) in err
    assert not (tmp_path / "out").exists()


def test_the_hand_built_gguf_reads_the_same_in_gguf_itself(tmp_path):
    """The builder above is right (gguf's reader finds the tensor in it) and the layout check passes a
    sound file; so the cases above fail for the fault each plants, not for a fault of the builder."""
    gguf = pytest.importorskip("gguf")
    from scratchlm.convert.gguf_layout import check_layout

    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf([ARCH], [EMBEDDING], MATRIX.numpy().tobytes()))
    check_layout(path, gguf.GGML_QUANT_SIZES)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == "llama"
    (tensor,) = reader.tensors
    assert tensor.name == "token_embd.weight" and torch.equal(torch.tensor(tensor.data), MATRIX)


def test_a_header_only_gguf_is_refused_for_what_it_lacks(tmp_path, capsys):
    pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf())
    assert "architecture None" in one_line_error(capsys, ["convert", path, tmp_path / "out", "--to", "scratchlm"])


def test_an_exported_gguf_passes_and_truncated_by_one_byte_fails(run, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    from scratchlm.convert.gguf_layout import check_layout

    path = tmp_path / "m.gguf"
    assert main(["convert", str(run), str(path), "--to", "gguf"]) == 0
    check_layout(path, gguf.GGML_QUANT_SIZES)
    path.write_bytes(path.read_bytes()[:-1])
    err = one_line_error(capsys, ["convert", path, tmp_path / "back", "--to", "scratchlm"])
    assert "truncated" in err


@pytest.mark.parametrize("key, value, says", [
    ("llama.block_count", 10 ** 12, f"llama.block_count = {10 ** 12} but the file holds tensors for 2 blocks"),
    ("llama.embedding_length", 0, "llama.embedding_length = 0 is not a positive whole number"),
    ("llama.context_length", "long", "llama.context_length = 'long' is not a positive whole number"),
])
def test_crafted_gguf_metadata_is_one_line(key, value, says, run, tmp_path, capsys):
    """Metadata rewritten by gguf's own writer: a model of 10^12 blocks is refused before it is built."""
    gguf = pytest.importorskip("gguf")
    good = tmp_path / "good.gguf"
    convert(run, good, "gguf")
    reader = gguf.GGUFReader(str(good))
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for name, field in reader.fields.items():
        if name == key:
            kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT64
            writer.add_key_value(name, value, kind)
        elif not name.startswith("GGUF.") and name != "general.architecture":  # the writer adds those
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = one_line_error(capsys, ["convert", tmp_path / "bad.gguf", tmp_path / "back", "--to", "scratchlm"])
    assert says in err


# ----------------------------------------------------------------------------- atomic exports


def test_converting_a_run_onto_itself_is_refused_and_leaves_it_loadable(run, capsys):
    before = listing(run)
    assert "where the source" in one_line_error(capsys, ["convert", run, run, "--to", "hf"])
    ckpt = weights_file(run).parent
    assert "where the source" in one_line_error(capsys, ["convert", ckpt, run, "--to", "hf", "--force"])
    assert "where the source" in one_line_error(capsys, ["convert", run, run, "--to", "gguf", "--force"])
    assert listing(run) == before
    scratchlm.load(run)


@pytest.mark.parametrize("target, dst", [("hf", "out"), ("gguf", "out.gguf")])
def test_an_existing_destination_is_refused_without_force(target, dst, run, tmp_path, capsys):
    dst = tmp_path / dst
    if target == "hf":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    else:
        dst.write_text("mine")
    before = listing(tmp_path)
    err = one_line_error(capsys, ["convert", run, dst, "--to", target])
    assert f"{dst} already exists" in err and "--force" in err
    assert listing(tmp_path) == before


def test_force_replaces_the_destination_whole(run, tmp_path):
    pytest.importorskip("gguf")
    dst = tmp_path / "m.gguf"
    dst.write_text("old")
    assert main(["convert", str(run), str(dst), "--to", "gguf", "--force"]) == 0
    assert dst.read_bytes()[:4] == b"GGUF"
    back = tmp_path / "back"
    back.mkdir()
    (back / "stale.txt").write_text("old")
    assert main(["convert", str(dst), str(back), "--to", "scratchlm", "--force"]) == 0
    assert not (back / "stale.txt").exists()
    assert torch.equal(scratchlm.load(back).model.tok_emb.weight, scratchlm.load(run).model.tok_emb.weight)
    assert names(tmp_path) == ["back", "m.gguf", "run"]  # no temporaries left beside them


def test_an_export_that_fails_midway_leaves_the_destination_as_it_was(run, tmp_path, monkeypatch):
    bundle = read_run(run)

    def broken_save(self, path):
        (path / "tokenizer.json").parent.mkdir(parents=True, exist_ok=True)
        (path / "tokenizer.json").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "save", broken_save)
    with pytest.raises(OSError):
        write_run(bundle, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(OSError):
        write_run(bundle, old, replace=True)
    assert listing(old) == [("keep.txt", 4)]
    assert names(tmp_path) == ["old", "run"]  # no temporaries left beside them


def test_a_gguf_export_that_fails_midway_leaves_no_file(run, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import scratchlm.convert.gguf as gguf_module

    def broken_write(gguf, bundle, path, dtype):
        path.write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_module, "_write", broken_write)
    with pytest.raises(OSError):
        convert(run, tmp_path / "m.gguf", "gguf")
    assert names(tmp_path) == ["run"]
