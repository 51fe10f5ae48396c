"""Agreement with an independent reference: EleutherAI's lm-evaluation-harness running its own `hf` backend
(transformers) on a random-weight Hugging Face Llama, against `scratchlm eval` on the same model imported
with `scratchlm convert`, example by example, on task YAMLs over local JSONL (nothing is downloaded). Then
the harness driving scratchlm itself: the `scratchlm` model, and `local-completions` against
`scratchlm serve`. Skipped where lm-eval (pip install 'scratchlm[eval]') or transformers is missing."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import scratchlm  # noqa: E402
from scratchlm.cli import main  # noqa: E402
from scratchlm.eval import harness  # noqa: E402,F401  (registers the scratchlm model)

TEXT = ("The capital of France is Paris. The capital of Italy is Rome. Question: what is two plus two? Answer: four.\n"
        "Input: ( [ ] ) Output: valid. 12 plus 1 = 13. A cat sat on the mat; the dog barked at the cat.\n") * 5


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    transformers.logging.set_verbosity_error()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(Hugging Face folder, the scratchlm run converted from it): a random Llama with GQA, untied."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("agree")
    hf_dir = root / "hf"
    hf_dir.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Only the characters of TEXT, and a model exactly as wide as the vocabulary: whatever a random model
    # writes is then ASCII, which both sides decode the same way.
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        show_progress=False))
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|endoftext|>", "model_max_length": 96}))
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=96,
                                   rope_theta=2000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15) if p.dim() > 1 else p.normal_(0.5, 0.3)
    hf.eval().save_pretrained(hf_dir)
    assert main(["convert", str(hf_dir), str(root / "run"), "--to", "scratchlm"]) == 0
    return hf_dir, root / "run"


def task_yaml(folder: Path, name: str, data: Path, **fields) -> None:
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {data}",
             "test_split: test", *(f"{k}: {json.dumps(v)}" for k, v in fields.items())]
    (folder / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def harness_run(model: str, model_args, folder: Path, tasks: list[str]) -> dict:
    """Per task, the harness's filtered responses in document order."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True, device="cpu",
                                  batch_size=4, task_manager=TaskManager(include_path=str(folder)))
    return {t: [s["filtered_resps"] for s in sorted(out["samples"][t], key=lambda s: s["doc_id"])] for t in tasks}


def hf_args(hf_dir: Path) -> str:
    return f"pretrained={hf_dir},dtype=float32"


MC_ROWS = [
    {"context": "The capital of France is", "choices": ["Paris", "Rome", "four"], "answer": 0},
    {"context": "Question: what is two plus two?\nAnswer:", "choices": ["four", "Paris", "Rome"], "answer": 0},
    {"context": "The capital of Italy is ", "choices": ["Rome", "Paris"], "answer": 0},
    {"context": "A cat sat on the\n", "choices": ["mat", "dog", "capital of France"], "answer": 0},
    {"context": "12 plus 1 =", "choices": [" 13", " 12", " 11."], "answer": 0},
    {"context": "Input: ( [ ] ) Output:", "choices": ["valid", "invalid"], "answer": 0},
]


def test_multiple_choice_picks_equal_the_harness_hf_backend(models, tmp_path):
    hf_dir, run = models
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS * 2))
    task_yaml(tmp_path, "agree_mc", data, output_type="multiple_choice", doc_to_text="{{context}}",
              doc_to_choice="{{choices}}", doc_to_target="{{answer}}", target_delimiter="",
              metric_list=[{"metric": "acc"}])
    theirs = harness_run("hf", hf_args(hf_dir), tmp_path, ["agree_mc"])["agree_mc"]
    assert main(["eval", "--checkpoint", str(run), "--task", str(data), "--out", str(tmp_path / "ours.jsonl")]) == 0
    ours = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()]
    assert len(ours) == len(theirs) == 12
    for mine, resps in zip(ours, theirs):
        lls = [float(ll) for ll, _ in resps]
        assert mine["logprobs"] == pytest.approx(lls, abs=1e-4)
        assert mine["pick"] == max(range(len(lls)), key=lls.__getitem__)
    # The harness driving scratchlm gives the same numbers.
    again = harness_run("scratchlm", {"checkpoint": str(run)}, tmp_path, ["agree_mc"])["agree_mc"]
    for resps, mine in zip(again, ours):
        assert [float(ll) for ll, _ in resps] == pytest.approx(mine["logprobs"], abs=1e-5)


def test_benchmark_rows_equal_the_harness_on_the_same_prompts(models, tmp_path):
    """scratchlm eval's own prompts (CORE's layout, with shots) scored again by the harness: the same
    log-likelihoods, the same greedy verdicts, the same picks."""
    hf_dir, run = models
    lm = tmp_path / "lm.jsonl"
    lm.write_text("".join(json.dumps({"context": c, "continuation": w}) + "\n" for c, w in [
        ("The capital of France is", "Paris."), ("The capital of Italy is", "Rome."), ("12 plus 1 =", "13."),
        ("Input: ( [ ] ) Output:", "valid."), ("A cat sat on the", "mat;"),
        ("Question: what is two plus two? Answer:", "four.")]))
    mc = tmp_path / "core_mc.jsonl"
    mc.write_text("".join(json.dumps({"query": r["context"].strip(), "choices": [c.strip() for c in r["choices"]],
                                      "gold": 0}) + "\n" for r in MC_ROWS))
    assert main(["eval", "--checkpoint", str(run), "--task", str(lm), "--task", str(mc), "--shots", "2",
                 "--out", str(tmp_path / "res")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "res" / "examples.jsonl").read_text().splitlines()]
    lm_rows, mc_rows = [r for r in rows if r["kind"] == "lm"], [r for r in rows if r["kind"] == "choice"]
    for name, subset in (("lm_rows", lm_rows), ("mc_rows", mc_rows)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in subset))
    task_yaml(tmp_path, "agree_lm", tmp_path / "lm_rows.jsonl", output_type="loglikelihood", doc_to_text="{{prompt}}",
              doc_to_target="{{continuation}}", target_delimiter="", metric_list=[{"metric": "acc"}])
    task_yaml(tmp_path, "agree_core_mc", tmp_path / "mc_rows.jsonl", output_type="multiple_choice",
              doc_to_text="{{prompt}}", doc_to_choice="{{choices}}", doc_to_target="{{gold}}", target_delimiter="",
              metric_list=[{"metric": "acc"}])
    theirs = harness_run("hf", hf_args(hf_dir), tmp_path, ["agree_lm", "agree_core_mc"])
    for row, [(ll, greedy)] in zip(lm_rows, theirs["agree_lm"]):
        assert row["logprob"] == pytest.approx(float(ll), abs=1e-4) and row["greedy"] == (str(greedy) == "True")
    for row, resps in zip(mc_rows, theirs["agree_core_mc"]):
        lls = [float(ll) for ll, _ in resps]
        assert row["logprobs"] == pytest.approx(lls, abs=1e-4)
        means = [ll / n for ll, n in zip(lls, row["tokens"])]   # CORE's rule, on the harness's numbers
        assert row["pick"] == max(range(len(means)), key=means.__getitem__)


def test_generation_equals_the_harness_hf_backend(models, tmp_path):
    hf_dir, run = models
    task = {"name": "agree_gen", "description": "d", "keywords": [], "metrics": ["exact_str_match"],
            "preferred_score": "exact_str_match", "example_input_prefix": "\n", "example_output_prefix": " is",
            "stop_string": "\n", "output_regex": "[a-zA-Z]+",
            "examples": [{"input": f"The capital of {c}", "target": t} for c, t in
                         [("France", "Paris"), ("Italy", "Rome"), ("the cat", "mat"), ("two plus two", "four")]]}
    path = tmp_path / "task.json"
    path.write_text(json.dumps(task))
    assert main(["eval", "--checkpoint", str(run), "--task", str(path), "--shots", "1", "--out", str(tmp_path / "g")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "g" / "examples.jsonl").read_text().splitlines()]
    (tmp_path / "gen_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new_tokens = 8 + max(len(scratchlm.load(run).tokenizer.encode(t["target"])) for t in task["examples"])
    task_yaml(tmp_path, "agree_gen", tmp_path / "gen_rows.jsonl", output_type="generate_until", doc_to_text="{{prompt}}",
              doc_to_target="{{references[0]}}", target_delimiter="",
              generation_kwargs={"until": ["\n"], "max_gen_toks": new_tokens, "do_sample": False},
              metric_list=[{"metric": "exact_match"}])
    theirs = harness_run("hf", hf_args(hf_dir), tmp_path, ["agree_gen"])["agree_gen"]
    assert [r["output"] for r in rows] == [t[0] for t in theirs]


def test_local_completions_against_scratchlm_serve(models, tmp_path):
    pytest.importorskip("tenacity")  # lm-eval's API models need it: pip install 'lm-eval[api]'
    from scratchlm.serve.server import make_server

    hf_dir, run = models
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    task_yaml(tmp_path, "served_mc", data, output_type="multiple_choice", doc_to_text="{{context}}",
              doc_to_choice="{{choices}}", doc_to_target="{{answer}}", target_delimiter="",
              metric_list=[{"metric": "acc"}])
    loaded = scratchlm.load(run)
    server = make_server(loaded.model, loaded.tokenizer, "tiny", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
        served = harness_run("local-completions", f"model=tiny,base_url={url},max_length=96", tmp_path, ["served_mc"])
    finally:
        server.shutdown()
        server.server_close()
        server.app.engine.stop()
    direct = harness_run("hf", hf_args(hf_dir), tmp_path, ["served_mc"])
    for a, b in zip(served["served_mc"], direct["served_mc"]):
        assert [float(ll) for ll, _ in a] == pytest.approx([float(ll) for ll, _ in b], abs=1e-4)


def test_rolling_loglikelihood_is_the_whole_text_once(models):
    """Each token of a text longer than the context is scored once, with as much text before it as fits."""
    from lm_eval.api.instance import Instance

    _, run = models
    model = harness.ScratchLM(checkpoint=str(run), device="cpu")
    text = TEXT
    [total] = model.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [model.tokenizer.encode("\n")[-1]] + model.tokenizer.encode(text)
    window, want = model.max_length, 0.0
    with torch.no_grad():
        for start in range(1, len(ids), window):       # targets start..start+window-1, from the window before
            end = min(start + window, len(ids))
            inp = ids[max(0, end - 1 - window):end - 1]
            logp = torch.log_softmax(model.model(torch.tensor([inp]))[0], dim=-1)
            for t in range(start, end):
                want += float(logp[t - 1 - max(0, end - 1 - window), ids[t]])
    assert len(ids) > 2 * window and total == pytest.approx(want, abs=1e-3)
    with pytest.raises(scratchlm.errors.UserError, match="decodes greedily"):
        model.generate_until([Instance("generate_until", {}, ("x", {"do_sample": True}), 0)])
