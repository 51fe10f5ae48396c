"""Benchmark evaluation: BIG-bench task files from a synthetic sdist (no download), their prompts written out
by hand, log-likelihoods and greedy checks against a plain forward pass of the whole text, centred accuracy
by hand, CORE's kinds, the suites, resumable downloads from a local HTTP server, and the command line."""
from __future__ import annotations

import gzip
import http.server
import io
import json
import math
import random
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scratchlm import fetch
from scratchlm.cli import main
from scratchlm.config import build_config
from scratchlm.convert.bundle import Bundle, write_run
from scratchlm.errors import UserError
from scratchlm.eval import benchmark, bigbench, core, loglik, report, runner
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer

BYTES = Tokenizer({i: bytes([i]) for i in range(256)}, [])   # one token per byte: counts are easy by hand


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_model(context: int = 96, position: str = "rope", seed: int = 0) -> Transformer:
    cfg = build_config({"model": {"vocab_size": 256, "context": context, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                  "position": position, "init_std": 0.2}}).model
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log P(cont | ctx) and whether cont is the argmax at each step, from one forward pass of the joined
    text (the oldest tokens dropped so that it fits), with no cache and no batching."""
    full = (ctx + cont)[-(model.config.context + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0].float(), dim=-1)
    at = range(len(full) - 1 - len(cont), len(full) - 1)
    return sum(float(logp[i, full[i + 1]]) for i in at), all(int(logp[i].argmax()) == full[i + 1] for i in at)


# ---- the engine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", ["rope", "learned", "alibi", "sinusoidal"])
def test_loglikelihoods_match_a_plain_forward_pass(position):
    model = tiny_model(context=24, position=position)
    rng = random.Random(0)
    pairs = []
    for _ in range(10):  # contexts shared by up to four continuations, some too long for the context
        ctx = [rng.randrange(256) for _ in range(rng.randint(1, 30))]
        pairs += [(ctx, [rng.randrange(256) for _ in range(rng.randint(1, 9))]) for _ in range(rng.randint(1, 4))]
    done = []
    got = loglik.loglikelihoods(model, pairs, batch_tokens=90, on_done=done.extend)
    assert sorted(done) == list(range(len(pairs)))
    for (ctx, cont), score in zip(pairs, got):
        logprob, greedy = reference(model, ctx, cont)
        assert score.logprob == pytest.approx(logprob, abs=1e-4) and score.greedy == greedy
        assert (score.tokens, score.cut) == (len(cont), max(0, len(ctx) + len(cont) - 25))
    with pytest.raises(loglik.ContinuationTooLong, match="25 tokens is longer than the model's context"):
        loglik.loglikelihoods(model, [([1], [2] * 25)])


def test_greedy_tokens_are_found_and_counted():
    model = tiny_model()
    ctx = list(b"Question: ")
    with torch.no_grad():  # write the model's own greedy continuation, so one pair is greedy by construction
        ids = list(ctx)
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    own, other = ids[len(ctx):], ids[len(ctx):-1] + [(ids[-1] + 1) % 256]
    a, b = loglik.loglikelihoods(model, [(ctx, own), (ctx, other)])
    assert a.greedy and not b.greedy and a.tokens == b.tokens == 5


def test_pairs_split_as_lm_evaluation_harness_splits_them():
    # whitespace ending the context goes with the continuation; an empty context reads the empty prompt
    assert loglik.encode_pair(BYTES, "Answer: \n", "Paris") == (list(b"Answer:"), list(b" \nParis"))
    assert loglik.encode_pair(BYTES, "", "ab") == (list(b"\n"), list(b"ab"))
    assert loglik.rolling_pairs([5, 6, 7, 8, 9], [1], window=2) == [([1], [5, 6]), ([1, 5, 6], [7, 8]),
                                                                     ([1, 5, 6, 7, 8], [9])]


# ---- BIG-bench task files ----------------------------------------------------------------------------

MC_TASK = {
    "name": "toy_mc", "description": "d", "keywords": [], "metrics": ["multiple_choice_grade"],
    "preferred_score": "multiple_choice_grade", "task_prefix": "Pick one.\n", "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ", "append_choices_to_input": False,
    "examples": [{"input": f"q{i}", "target_scores": {"yes": 1, "no": 0, "maybe": 0.5}} for i in range(6)],
}
GEN_TASK = {
    "name": "toy_gen", "description": "d", "keywords": [], "metrics": ["bleu", "exact_str_match"],
    "preferred_score": "bleu", "example_input_prefix": "\n", "example_output_prefix": " = ",
    "output_regex": r"([-+]?\d+)[.]{0,1}$", "stop_string": "\n",
    "examples": [{"input": f"{i} plus 1", "target": str(i + 1)} for i in range(5)],
}


def task_file(tmp_path, doc, name="task.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_prompts_in_bigbench_layout_by_hand(tmp_path):
    task = bigbench.read(json.dumps(MC_TASK), "toy_mc", "toy.json")
    assert task.metric == "multiple_choice_grade" and task.separator == "\n"
    assert bigbench.prompt(task, 3, [0, 5], seed=1) == "Pick one.\n\nQ: q0\nA: yes\n\nQ: q5\nA: yes\n\nQ: q3\nA: "
    listed = dict(MC_TASK, append_choices_to_input=True, choice_prefix="\n- ")
    task = bigbench.read(json.dumps(listed), "toy_mc", "toy.json")
    text = bigbench.prompt(task, 2, [], seed=1)
    assert text.startswith("Pick one.\n\nQ: q2\n- ") and text.endswith("\nA: ")
    assert sorted(text.split("\n")[3:6]) == ["- maybe", "- no", "- yes"]          # every choice, once
    assert text == bigbench.prompt(task, 2, [], seed=1)                           # the order is fixed by the seed
    gen = bigbench.read(json.dumps(GEN_TASK), "toy_gen", "gen.json")
    assert gen.metric == "exact_str_match"  # the preferred bleu is not computed here
    assert bigbench.prompt(gen, 1, [4], seed=0) == "\n4 plus 1 = 5\n\n1 plus 1 = "
    assert bigbench.answer(gen, "17") == "17" and bigbench.answer(gen, "x 3.") == "3" and bigbench.answer(gen, "x") == ""


@pytest.mark.parametrize("change, named", [
    ({"metrics": ["multiple_choice_grade", "accuracy"]}, "field 'metrics' names an unknown metric 'accuracy'"),
    ({"metrics": ["bleu"]}, "field 'metrics' is ['bleu']; scratchlm scores"),
    ({"examples": []}, "field 'examples' must be a non-empty list"),
    ({"examples": [{"target_scores": {"a": 1, "b": 0}}]}, "example 0: field 'input' is missing"),
    ({"examples": [{"input": "x", "target_scores": {"a": 1, "b": 0}}, {"input": "y", "target_scores": {}}]},
     "example 1: field 'target_scores' is an empty choice list"),
    ({"examples": [{"input": "x", "target": "a"}]}, "example 0: field 'target_scores' is missing"),
    ({"examples": [{"input": "x", "target_scores": {"a": 0, "b": 0}}]}, "example 0: field 'target_scores' gives no"),
    ({"append_choices_to_input": 3}, "field 'append_choices_to_input' must be true or false"),
])
def test_bad_task_files_name_file_example_and_field(tmp_path, change, named):
    path = task_file(tmp_path, {**MC_TASK, **change}, "bad.json")
    with pytest.raises(UserError) as err:
        bigbench.load(str(path), seed=0)
    assert str(err.value).startswith(f"{path}: ") and named in str(err.value) and "\n" not in str(err.value)


def test_generative_targets_and_regexes_are_checked(tmp_path):
    for change, named in (({"examples": [{"input": "x", "target": 3}]}, "example 0: field 'target' must be text"),
                          ({"output_regex": "(a)(b)"}, "field 'output_regex' has 2 groups"),
                          ({"output_regex": "("}, "field 'output_regex' is not a regular expression")):
        with pytest.raises(UserError, match=named):
            bigbench.read(json.dumps({**GEN_TASK, **change}), "g", "g.json")


# ---- the cache, from a synthetic sdist ---------------------------------------------------------------

CORE6_DOCS = {
    "qa_wikidata": {**GEN_TASK, "examples": [{"input": f"The colour of thing {i} is", "target": ["red", "rouge"]}
                                             for i in range(14)]},
    "dyck_languages": {**MC_TASK, "examples": [{"input": "( [", "target_scores": {"] )": 1, ")": 0}}] * 12},
    "operators": GEN_TASK | {"examples": [{"input": f"{i} plus 1", "target": str(i + 1)} for i in range(12)]},
    "cs_algorithms/lcs": {**MC_TASK, "examples": [{"input": f"AB{i} A{i}", "target_scores": {"2": 1, "1": 0}} for i in range(6)]},
    "cs_algorithms/valid_parentheses": {**MC_TASK,
                                        "examples": [{"input": "( )", "target_scores": {"Valid": 1, "Invalid": 0}}] * 6},
    "repeat_copy_logic": {**GEN_TASK, "examples": [{"input": f"say hi {i} times", "target": "hi " * i} for i in range(1, 13)]},
    "language_identification": {**MC_TASK, "append_choices_to_input": True,
                                "examples": [{"input": f"sentence {i}", "target_scores": {"English": int(i % 3 == 0),
                                              "French": int(i % 3 == 1), "Welsh": int(i % 3 == 2)}} for i in range(12)]},
}


def make_sdist(path: Path, docs: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, data: bytes, kind=tarfile.REGTYPE) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))

        root = "bigbench-1.0.0/bigbench/benchmark_tasks"
        for name, doc in docs.items():
            add(f"{root}/{name}/task.json", json.dumps(doc).encode())
        add(f"{root}/cs_algorithms/task.json", json.dumps({"name": "cs_algorithms", "description": "parent"}).encode())
        add(f"{root}/operators/README.md", b"not a task")
        add(f"{root}/../../../evil/task.json", b"{}")
        add(f"{root}/linked/task.json", b"", tarfile.SYMTYPE)
        add("bigbench-1.0.0/setup.py", b"")
    return path


@pytest.fixture
def fake_sdist(tmp_path, monkeypatch):
    calls = []

    def download(progress):
        calls.append(1)
        target = fetch.cache_dir() / "downloads" / bigbench.SDIST
        target.parent.mkdir(parents=True, exist_ok=True)
        return make_sdist(target, CORE6_DOCS)

    monkeypatch.setattr(bigbench, "download", download)
    return calls


def test_data_get_bigbench_keeps_only_task_files(fake_sdist, capsys):
    assert main(["data", "get", "bigbench"]) == 0
    root = bigbench.tasks_dir()
    assert f"8 BIG-bench task files in {root}" in capsys.readouterr().out
    assert bigbench.task_names(root) == sorted(["cs_algorithms"] + list(CORE6_DOCS))
    stored = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert stored == sorted(["tasks.txt"] + [f"{n}/task.json.gz" for n in ["cs_algorithms", *CORE6_DOCS]])
    assert json.loads(gzip.decompress((root / "operators/task.json.gz").read_bytes())) == CORE6_DOCS["operators"]
    assert not (fetch.cache_dir() / "downloads" / bigbench.SDIST).exists()   # the 358 MB archive goes
    assert main(["data", "get", "bigbench"]) == 0 and len(fake_sdist) == 1    # fetched once
    # a task made of subtasks is all of them; one subtask by its path
    assert [n for n, _ in bigbench.find("cs_algorithms")] == ["cs_algorithms/lcs", "cs_algorithms/valid_parentheses"]
    assert [n for n, _ in bigbench.find("cs_algorithms/lcs")] == ["cs_algorithms/lcs"]
    with pytest.raises(UserError, match=r"no BIG-bench task 'bigbench:operatorz'; close: bigbench:operators"):
        bigbench.find("operatorz")


def test_an_interrupted_extraction_leaves_nothing_behind(tmp_path, monkeypatch):
    archive = fetch.cache_dir() / "downloads" / bigbench.SDIST
    archive.parent.mkdir(parents=True)
    make_sdist(archive, CORE6_DOCS)
    monkeypatch.setattr(bigbench, "download", lambda progress: archive)
    real = gzip.compress
    seen = []

    def failing(data, **kw):
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt
        return real(data, **kw)

    monkeypatch.setattr(bigbench.gzip, "compress", failing)
    with pytest.raises(KeyboardInterrupt):
        bigbench.fetch(progress=False)
    assert not bigbench.tasks_dir().exists() and archive.is_file()   # no half folder; the archive is kept
    monkeypatch.setattr(bigbench.gzip, "compress", real)
    assert len(bigbench.task_names(bigbench.fetch(progress=False))) == 8


class RangeServer(http.server.BaseHTTPRequestHandler):
    """Serves `data`, honouring a Range header; with `cut` set, the first answer stops after that many bytes."""
    data, cut = b"", None

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        start = int(self.headers.get("Range", "bytes=0-")[6:].split("-")[0])
        body = self.data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if RangeServer.cut is not None:
            self.wfile.write(body[:RangeServer.cut])
            RangeServer.cut = None
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


def test_downloads_resume_and_are_checked(tmp_path):
    import hashlib

    RangeServer.data = bytes(random.Random(0).randbytes(300_000))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/f.tar.gz"
    digest = hashlib.sha256(RangeServer.data).hexdigest()
    try:
        RangeServer.cut = 100_000
        with pytest.raises(UserError, match="run the command again to resume"):
            fetch.fetch_url(url, tmp_path / "f.tar.gz", sha256=digest, progress=False)
        assert (tmp_path / "f.tar.gz.partial").stat().st_size == 100_000 and not (tmp_path / "f.tar.gz").exists()
        got = fetch.fetch_url(url, tmp_path / "f.tar.gz", sha256=digest, progress=False)
        assert got.read_bytes() == RangeServer.data and not (tmp_path / "f.tar.gz.partial").exists()
        with pytest.raises(UserError, match="arrived with SHA-256"):
            fetch.fetch_url(url, tmp_path / "g.tar.gz", sha256="0" * 64, progress=False)
        assert not (tmp_path / "g.tar.gz").exists() and not (tmp_path / "g.tar.gz.partial").exists()
    finally:
        server.shutdown()
    with pytest.raises(UserError, match=r"cannot download http://127.0.0.1:9/x \(no internet\?\)"):
        fetch.fetch_url("http://127.0.0.1:9/x", tmp_path / "x", progress=False)


# ---- scoring ---------------------------------------------------------------------------------------


def test_multiple_choice_grade_and_chance_by_hand(tmp_path):
    model = tiny_model()
    path = task_file(tmp_path, MC_TASK)
    [task] = bigbench.load(str(path), seed=3)
    result = benchmark.run_task(model, BYTES, task, shots=1, seed=3, progress=False)
    assert result.examples == 6 and result.chance == pytest.approx(1.5 / 3)   # credit 1 + 0 + 0.5 over 3 choices
    grades = {"yes": 1.0, "no": 0.0, "maybe": 0.5}
    for row in result.rows:
        ctx = row["prompt"]
        assert ctx.count("\nQ: ") == 2 and f"Q: q{row['index']}\nA: " not in ctx[:-len(f"q{row['index']}\nA: ")]
        want = [reference(model, *loglik.encode_pair(BYTES, ctx, c))[0] for c in row["choices"]]
        assert row["logprobs"] == pytest.approx(want, abs=1e-4)
        pick = max(range(3), key=want.__getitem__)
        assert row["pick"] == pick and row["correct"] == grades[row["choices"][pick]]
    acc = sum(r["correct"] for r in result.rows) / 6
    assert result.accuracy == pytest.approx(acc)
    assert result.centred == pytest.approx((acc - 0.5) / 0.5)


def test_shots_come_from_the_same_subtask_never_the_example(fake_sdist):
    [lcs, valid] = bigbench.load("bigbench:cs_algorithms", seed=0)   # one task per subtask
    assert (lcs.name, valid.name) == ("cs_algorithms/lcs", "cs_algorithms/valid_parentheses")
    [task] = core.suite("core6", seed=0)[3:4]                        # CORE's cs_algorithms: both, merged
    members = {0: list(range(6)), 1: list(range(6, 12))}
    for i in range(12):
        shots = benchmark.shots_for(task, members, i, 4, seed=7)
        assert i not in shots and len(set(shots)) == 4 and all(task.pools[s] == task.pools[i] for s in shots)
        assert shots == benchmark.shots_for(task, members, i, 4, seed=7)
    assert any(benchmark.shots_for(task, members, i, 4, 7) != benchmark.shots_for(task, members, i, 4, 8) for i in range(12))
    with pytest.raises(UserError, match="--shots 6 needs 7 examples"):
        benchmark.shots_for(task, members, 0, 6, seed=0)
    assert benchmark.sample(100, 5, seed=1) == benchmark.sample(100, 5, seed=1) != benchmark.sample(100, 5, seed=2)
    assert benchmark.sample(5, 0, 1) == benchmark.sample(5, 9, 1) == [0, 1, 2, 3, 4]


def test_generation_is_greedy_and_reduced_by_the_task(tmp_path):
    model = tiny_model()
    [task] = bigbench.load(str(task_file(tmp_path, GEN_TASK)), seed=0)
    result = benchmark.run_task(model, BYTES, task, shots=2, progress=False)
    for row in result.rows:
        ids = list(row["prompt"].encode())
        with torch.no_grad():                       # greedy decoding by hand, token by token, no cache
            for _ in range(9):                      # the longest target (1 token) and 8
                ids.append(int(model(torch.tensor([ids[-96:]]))[0, -1].argmax()))
        text = bytes(ids[len(row["prompt"].encode()):]).decode("utf-8", "replace").split("\n")[0]
        assert row["output"] == text
        assert row["answer"] == bigbench.answer(bigbench.read(json.dumps(GEN_TASK), "g", "g"), text)
        assert row["correct"] == float(row["answer"] == str(row["index"] + 1))


def test_core_kinds_by_hand(tmp_path):
    model = tiny_model()
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"query": f"Q{i}?", "choices": ["aa", "b"], "gold": i % 2}) + "\n" for i in range(4)))
    task = core.jsonl_task(mc)
    assert task.kind == "choice" and task.rule == "mean"
    item = task.render(2, [0, 3])
    assert item.contexts == ["Q0? aa\n\nQ3? b\n\nQ2? "] and item.continuations == ["aa", "b"] and item.gold == 0
    rows = benchmark.run_task(model, BYTES, task, shots=1, progress=False).rows
    for row in rows:  # the pick is by mean log-probability per token, not the sum
        means = [reference(model, *loglik.encode_pair(BYTES, row["prompt"], c))[0] / len(" " + c) for c in row["choices"]]
        assert row["pick"] == max(range(2), key=means.__getitem__) and row["tokens"] == [3, 2]
    schema = tmp_path / "schema.jsonl"
    schema.write_text("".join(json.dumps({"context_options": ["The cat", "A dog"], "continuation": "barks.", "gold": 1})
                              + "\n" for _ in range(3)))
    task = core.jsonl_task(schema)
    assert task.render(0, [1]).contexts == ["A dog barks.\n\nThe cat ", "A dog barks.\n\nA dog "]
    assert benchmark.run_task(model, BYTES, task, progress=False).chance == 0.5
    lm = tmp_path / "lm.jsonl"
    lm.write_text("".join(json.dumps({"context": f" 1 2 {i} ", "continuation": str(i + 1)}) + "\n" for i in range(3)))
    task = core.jsonl_task(lm)
    assert task.render(0, [2]).contexts == ["1 2 2 3\n\n1 2 0 "]
    for row in benchmark.run_task(model, BYTES, task, shots=2, progress=False).rows:
        greedy = reference(model, *loglik.encode_pair(BYTES, row["prompt"], row["continuation"]))[1]
        assert row["greedy"] == greedy and row["correct"] == float(greedy)


@pytest.mark.parametrize("record, named", [
    ({"query": "q", "choices": [], "gold": 0}, "example 1 (line 2): field 'choices' is an empty choice list"),
    ({"query": "q", "choices": ["a", "b"], "gold": 2}, "example 1 (line 2): field 'gold' must be the index"),
    ({"query": 3, "choices": ["a", "b"], "gold": 0}, "example 1 (line 2): field 'query' is int"),
    ({"context": "c", "continuation": "x"}, "example 1 (line 2): not a multiple choice record"),
])
def test_bad_core_records_name_file_example_and_field(tmp_path, record, named):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"^{path}: {named}".replace("(", r"\(").replace(")", r"\)")):
        core.jsonl_task(path)


def test_long_prompts_are_cut_from_the_left_and_counted(tmp_path):
    model = tiny_model(context=40)
    path = tmp_path / "lm.jsonl"
    path.write_text("".join(json.dumps({"context": "x" * n, "continuation": "yz"}) + "\n" for n in (10, 50, 60)))
    result = benchmark.run_task(model, BYTES, core.jsonl_task(path), progress=False)
    # the delimiter's space goes with the continuation: " yz" is 3 tokens, so 38 of the context's fit
    assert [r["cut"] for r in result.rows] == [0, 50 - 38, 60 - 38] and result.cut == 2
    assert "2 examples had prompts longer than the model's context" in report.table(report.summary([result]))
    path.write_text(json.dumps({"context": "x", "continuation": "y" * 41}) + "\n")
    with pytest.raises(UserError, match=f"{path}: example 0: field 'continuation': a continuation of 42 tokens is "
                                        r"longer than the model's context \(40\)"):
        benchmark.run_task(model, BYTES, core.jsonl_task(path), progress=False)


def test_core6_from_bigbench_and_the_centred_average(fake_sdist):
    tasks = core.suite("core6", seed=0)
    assert [(t.name, t.kind, t.shots, t.size) for t in tasks] == [
        ("qa_wikidata", "lm", 10, 14), ("dyck_languages", "lm", 10, 12), ("operators", "lm", 10, 12),
        ("cs_algorithms", "lm", 10, 12), ("repeat_copy_logic", "lm", 10, 12), ("language_identification", "choice", 10, 12)]
    assert tasks[0].render(0, [1]).contexts == ["The colour of thing 1 is = red\n\nThe colour of thing 0 is = "]
    assert tasks[1].render(0, []).continuations == ["] )"]
    li = tasks[5].render(4, [])
    assert li.contexts == ["Q: sentence 4\nA: "] and li.continuations == ["English", "French", "Welsh"] and li.gold == 1
    model = tiny_model(context=256)
    results = [benchmark.run_task(model, BYTES, t, shots=2, limit=3, progress=False) for t in tasks]
    assert [r.examples for r in results] == [3] * 6 and results[5].chance == pytest.approx(1 / 3)
    centred = [r.accuracy for r in results[:5]] + [(results[5].accuracy - 1 / 3) / (2 / 3)]
    assert benchmark.core_score(results) == pytest.approx(sum(centred) / 6)


def test_suite_core_offline_names_core6(monkeypatch):
    def offline(url, dest, **kw):
        raise UserError(f"cannot download {url} (no internet?): [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch, "fetch_url", offline)
    with pytest.raises(UserError) as err:
        core.suite("core", seed=0)
    msg = str(err.value)
    assert "\n" not in msg and "--suite core needs the DCLM eval bundle" in msg and "--suite core6 runs offline" in msg


def test_suite_core_reads_the_dclm_bundle(tmp_path, monkeypatch):
    bundle = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(bundle, "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks:\n"
                   "- {label: tiny_mc, dataset_uri: a/mc.jsonl, num_fewshot: [1], icl_task_type: multiple_choice,"
                   " continuation_delimiter: \"\\nAnswer: \"}\n"
                   "- {label: tiny_lm, dataset_uri: b/lm.jsonl, num_fewshot: [0], icl_task_type: language_modeling}\n")
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Task Category,Random baseline\ntiny_mc,x,25.0\n")
        z.writestr("eval_bundle/eval_data/a/mc.jsonl", "".join(json.dumps({"query": f"q{i}", "choices": list("abcd"),
                                                                         "gold": 0}) + "\n" for i in range(3)))
        z.writestr("eval_bundle/eval_data/b/lm.jsonl", json.dumps({"context": "c", "continuation": "d"}) + "\n")
        z.writestr("eval_bundle/../../escape.jsonl", "{}")
    fetched = []
    monkeypatch.setattr(fetch, "fetch_url", lambda url, dest, **kw: fetched.append(url) or bundle)
    mc, lm = core.suite("core", seed=0)
    assert fetched == [core.BUNDLE_URL] and not bundle.exists()       # extracted, then the archive goes
    assert [t.name for t in core.suite("core", seed=0)] == ["tiny_mc", "tiny_lm"] and len(fetched) == 1
    assert (mc.name, mc.shots, mc.chance, lm.name, lm.shots, lm.chance) == ("tiny_mc", 1, 0.25, "tiny_lm", 0, None)
    assert mc.render(0, [2]).contexts == ["q2\nAnswer: a\n\nq0\nAnswer: "]
    assert not (fetch.cache_dir().parent / "escape.jsonl").exists()


# ---- the command line --------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    model = tiny_model(context=128)
    weights = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied to the embedding
    return write_run(Bundle(model.config, weights, BYTES, name="tiny"), tmp_path / "run")


def test_eval_suite_core6_end_to_end(fake_sdist, run_dir, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), "--suite", "core6", "--limit", "2", "--shots", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "language_identification  choice" in out and "CORE-style score (mean centred accuracy over 6 tasks)" in out
    where = run_dir / "eval" / "core6"
    doc = json.loads((where / "summary.json").read_text())
    assert [t["examples"] for t in doc["tasks"]] == [2] * 6 and doc["limit"] == 2 and doc["seed"] == 1234
    rows = [json.loads(line) for line in (where / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {"prompt", "pick", "gold", "logprobs", "choices"} <= set(rows[-1])
    assert (where / "scores.png").stat().st_size > 1000
    for t in doc["tasks"]:  # every score can be recomputed from the rows
        mine = [r["correct"] for r in rows if r["task"] == t["task"]]
        assert t["accuracy"] == pytest.approx(sum(mine) / len(mine))

    # the same again is the same, to the row
    assert main(["eval", "--checkpoint", str(run_dir), "--suite", "core6", "--limit", "2", "--shots", "1",
                 "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "examples.jsonl").read_text() == (where / "examples.jsonl").read_text()
    capsys.readouterr()
    assert main(["eval", "--compare", str(where / "summary.json"), str(tmp_path / "again" / "summary.json"),
                 "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    # both summaries are of one run folder: told apart by their order
    assert out.splitlines()[0].split() == ["task", "run", "(1)", "run", "(2)"] and (tmp_path / "cmp" / "compare.png").is_file()


def test_eval_tasks_by_name_and_file(fake_sdist, run_dir, tmp_path, capsys):
    path = task_file(tmp_path, GEN_TASK, "my_task.json")
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "bigbench:operators", "--task", str(path),
                 "--shots", "2", "--out", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    assert "scored by exact_str_match (the task prefers bleu)" in out and "toy_gen" in out
    assert [t["task"] for t in json.loads((tmp_path / "res" / "summary.json").read_text())["tasks"]] == ["operators",
                                                                                                           "toy_gen"]
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "bigbench:operatorz"]) == 2
    assert "close: bigbench:operators" in capsys.readouterr().err
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert main(["eval", "--checkpoint", str(run_dir), "--task", "bigbench:operators", "--task", str(qa)]) == 2
    assert "a file of questions and answers is scored on its own" in capsys.readouterr().err
    for flags, named in ((["--shots", "-1"], "--shots -1"), (["--limit", "-2"], "--limit -2"), (["--batch", "0"], "--batch 0")):
        assert main(["eval", "--checkpoint", str(run_dir), "--suite", "core6", *flags]) == 2
        assert named in capsys.readouterr().err
    assert main(["eval", "--compare", str(run_dir)]) == 2
    assert "two or more runs" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--compare", str(run_dir), str(run_dir)]) == 2
    assert "leave out --checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--task", str(qa), "--shots", "2"]) == 2
    assert "scored without shots" in capsys.readouterr().err


def test_numbers_in_the_table(tmp_path):
    result = benchmark.TaskResult("t", "choice", 3, 10, 0.55, 0.25, 12.0, 1)
    doc = report.summary([result], suite=None)
    assert doc["core"] == pytest.approx(0.4) and math.isclose(result.centred, 0.4)
    line = report.table(doc).splitlines()[2].split()
    assert line == ["t", "choice", "3", "10", "55.0%", "25.0%", "+0.400", "1", "12.0s"]
    assert runner.label_of("core6", ["bigbench:cs_algorithms/lcs", "x/my.json"]) == "core6_cs_algorithms_lcs_my"


def test_text_the_model_cannot_read_is_one_line(tmp_path):
    # A token past the model's embeddings (here a special token; after `scratchlm convert`, a byte the source
    # vocabulary lacked) used to end in an IndexError from the embedding.
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<eos>"])
    model = tiny_model()
    path = tmp_path / "lm.jsonl"
    path.write_text(json.dumps({"context": "a", "continuation": "b"}) + "\n" +
                    json.dumps({"context": "x <eos> y", "continuation": "z"}) + "\n")
    with pytest.raises(UserError, match=f"^{path}: example 1: its text holds b'<eos>', which the model has no token for$"):
        benchmark.run_task(model, tok, core.jsonl_task(path), progress=False)
    gen = task_file(tmp_path, {**GEN_TASK, "examples": [{"input": "1 <eos>", "target": "2"}]})
    with pytest.raises(UserError, match="example 0: its text holds b'<eos>'"):
        benchmark.run_task(model, tok, bigbench.load(str(gen), seed=0)[0], progress=False)
