"""Data-stage benchmark: a synthetic web-like corpus, as parquet files, through `scratchlm data prepare`.

    python bench/data.py                 # 300 MB of text, tokenizer on a 100 MB sample: about 10 minutes on 2 cores
    python bench/data.py --size 2000     # the 2 GB run in docs/benchmarks.md: about 25 minutes on 2 cores
    python bench/data.py --size 50 --sample 20 --workers 1 2      # a quick look

The corpus: documents of Zipf-distributed words (exponent 1.05) over a vocabulary of 400,000 made-up word
types (syllables; the frequent words short, as in real text), with capitalised sentence starts, commas,
full stops, paragraphs, and numbers of 1-6 digits, so the number of distinct pre-tokens keeps growing
with the size of the corpus as it does in web text; documents of log-normal length (about 3 KB), written
as parquet files of about 64 MB of text in row groups of 1,000 documents, like a Hub dataset's. It is
made from `--seed` and kept in `--work` for the next run.

What is measured, each in a child process pinned to `--cores` cores:
- tokenizer: `data prepare`'s own training on the first `--sample` MB of train documents, against Hugging
  Face `tokenizers` (`BpeTrainer`, ByteLevel, the same vocabulary size and special tokens) fed the same
  texts with `train_from_iterator`: time and peak memory (`ru_maxrss`; ours: the main process, and its
  largest counting worker);
- ingestion: `scratchlm data prepare` with the qt-1b recipe pointed at the corpus and that tokenizer, for
  each `--workers`: MB of corpus text per second over the whole command (start-up included), peak memory
  of the main process and of the largest worker, and the peak size of the cache folder while it runs
  (polled every 0.1 s) against the size of the finished shards; then whether the shards of every worker
  count are the same bytes;
- resuming: the run with the most workers once more, killed with SIGKILL (workers and all) when half its
  shards are on disk, then started again: are its shards the same bytes as those of the run that never
  stopped;
- encoding against tiktoken: the same documents, read the same way and sent in the same batches to the
  same number of processes, encoded by a `tiktoken.Encoding` built on our tokenizer's ranks
  (`encode_ordinary` per document, the ids thrown away): tiktoken's throughput with none of our work
  around it (routing, numpy arrays, writing), which our whole command is set against.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]   # the qt-1b recipe's
FILE_TEXT = 64_000_000                            # text per parquet file
MB = 1_000_000


def _pin(cores: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def _peak_mb(who) -> float:
    """Peak resident memory in MB: of this process since it started (VmHWM: `ru_maxrss` would also count
    what the parent held when it forked us), or of its largest child process."""
    if who == resource.RUSAGE_SELF and os.path.exists("/proc/self/status"):
        line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- the corpus
SYLLABLES = [o + n + c for o in ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
                                 "w", "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
             for n in ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ou", "io", "y"]
             for c in ["", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck"]]


def word_types(n: int, rng) -> list[str]:
    """`n` distinct made-up words of 1-5 syllables, shortest first (rank 0 is the most frequent)."""
    import numpy as np

    syllables = np.array(SYLLABLES, dtype=object)
    lengths = np.minimum(rng.geometric(0.45, size=3 * n), 5)
    picks = rng.integers(len(syllables), size=(3 * n, 5))
    out, seen = [], set()
    for k, row in zip(lengths, picks):
        word = "".join(syllables[row[:k]])
        if word not in seen:
            seen.add(word)
            out.append(word)
            if len(out) == n:
                break
    out.sort(key=len)
    return out


def documents(seed: int, n_types: int = 400_000, exponent: float = 1.05):
    """An endless, reproducible stream of documents (see the module docstring)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = word_types(n_types, rng)
    p = 1.0 / (np.arange(n_types) + 2.7) ** exponent
    cdf = np.cumsum(p / p.sum())
    # each word in five forms: plain, capitalised (a sentence start), with a full stop, with a comma, and
    # ending a paragraph
    forms = np.array([words, [w.capitalize() for w in words], [w + "." for w in words], [w + "," for w in words],
                      [w + ".\n\n" for w in words]], dtype=object)
    while True:
        n = 1 << 20
        ids = np.minimum(np.searchsorted(cdf, rng.random(n)), n_types - 1)
        u = rng.random(n)
        form = np.where(u < 0.06, 2, np.where(u < 0.14, 3, 0))
        form[u < 0.008] = 4
        starts = np.flatnonzero((form[:-1] == 2) | (form[:-1] == 4)) + 1
        form[starts[form[starts] == 0]] = 1
        tokens = forms[form, ids]
        numbers = np.flatnonzero(rng.random(n) < 0.015)
        tokens[numbers] = [str(x) for x in rng.integers(0, 10 ** rng.integers(1, 7, size=len(numbers)))]
        lengths = np.maximum(rng.lognormal(6.0, 0.9, size=n // 200).astype(int), 5)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        bounds = bounds[bounds <= n]
        for a, b in zip(bounds, bounds[1:]):
            text = " ".join(tokens[a:b]).replace("\n\n ", "\n\n")
            yield text[0].upper() + text[1:]


def make_corpus(root: Path, size_mb: float, seed: int) -> dict:
    """The corpus of `size_mb` MB of text under `root` (made once; its stats in `corpus.json`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = root / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start, total, n_docs, files = time.perf_counter(), 0, 0, 0
    stream = documents(seed)
    while total < size_mb * MB:
        docs, size = [], 0
        while size < FILE_TEXT and total + size < size_mb * MB:
            doc = next(stream)
            docs.append(doc)
            size += len(doc.encode())
        pq.write_table(pa.table({"id": list(range(n_docs, n_docs + len(docs))), "text": docs}),
                       tmp / f"part-{files:05d}.parquet", row_group_size=1000)
        total, n_docs, files = total + size, n_docs + len(docs), files + 1
        print(f"  corpus: {total / MB:,.0f} MB", file=sys.stderr, flush=True)
    stats = {"text_bytes": total, "documents": n_docs, "files": files, "seed": seed,
             "parquet_bytes": sum(p.stat().st_size for p in tmp.iterdir()),
             "seconds": round(time.perf_counter() - start, 1)}
    (tmp / "corpus.json").write_text(json.dumps(stats))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return stats


# ----------------------------------------------------------------------------- children
def _data_config(corpus: str, vocab: int, sample_mb: float, workers: int):
    from scratchlm.config import DataConfig

    return DataConfig(dataset=corpus, vocab_size=vocab, special_tokens=list(SPECIALS), uncased=False,
                      tokenizer_sample_bytes=int(sample_mb * MB), workers=workers)


def child_tok_ours(a) -> dict:
    from scratchlm.data.prepare import open_source, train_on_sample

    cfg = _data_config(a.corpus, a.vocab, a.sample, a.cores)
    start = time.perf_counter()
    train_on_sample(open_source(cfg, progress=False), cfg, Path(a.out), progress=False)
    seconds = time.perf_counter() - start
    record = json.loads((Path(a.out) / "training.json").read_text())
    return {"seconds": seconds, "peak_mb": _peak_mb(resource.RUSAGE_SELF),
            "workers_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN), "sample": record["sample"]}


def child_tok_hf(a) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from scratchlm.data.prepare import open_source, sample_batches

    cfg = _data_config(a.corpus, a.vocab, a.sample, a.cores)
    stats: dict = {}
    texts = (t for batch in sample_batches(open_source(cfg, progress=False), cfg.tokenizer_sample_bytes, stats)
             for t in batch)
    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=a.vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return {"seconds": time.perf_counter() - start, "peak_mb": _peak_mb(resource.RUSAGE_SELF),
            "vocab": tok.get_vocab_size(), "sample_bytes": stats["bytes"]}


_TT: dict = {}


def _tt_init(ranks, specials, pattern):
    import tiktoken

    _TT["enc"] = tiktoken.Encoding("bench", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def _tt_encode(texts: list[str]) -> int:
    enc = _TT["enc"]
    return sum(len(enc.encode_ordinary(t)) for t in texts)


def child_tiktoken(a) -> dict:
    import collections
    import multiprocessing

    from scratchlm.data.ingest import batches
    from scratchlm.data.stream import LocalSource
    from scratchlm.tokenizer import GPT2_SPLIT_PATTERN, Tokenizer

    tok = Tokenizer.load(a.out)
    special_ids = set(tok.special_tokens.values())
    ranks = {b: i for i, b in tok.vocab.items() if i not in special_ids}
    source = LocalSource(Path(a.corpus), "text", SPECIALS, 100)
    pool = multiprocessing.get_context("fork").Pool(a.workers, _tt_init, (ranks, tok.special_tokens, GPT2_SPLIT_PATTERN))
    pool.map(_tt_encode, [["warm up"]] * a.workers)
    start, tokens, text = time.perf_counter(), 0, 0
    pending: collections.deque = collections.deque()
    for batch in batches(source.items()):
        texts = [it.text for it in batch]
        text += sum(len(t.encode()) for t in texts)
        pending.append(pool.apply_async(_tt_encode, (texts,)))
        if len(pending) >= 2 * a.workers:
            tokens += pending.popleft().get()
    while pending:
        tokens += pending.popleft().get()
    seconds = time.perf_counter() - start
    pool.terminate()
    return {"seconds": seconds, "tokens": tokens, "text_bytes": text}


def child_prepare(a) -> dict:
    from scratchlm.cli import main
    from scratchlm.data import ingest, prepare

    # the time spent streaming, apart from the command's start-up (Python, the config, the tokenizer)
    real, spent = ingest.encode_stream, []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    prepare.encode_stream = timed
    start = time.perf_counter()
    code = main(["data", "prepare", "--config", str(REPO / "recipes" / "qt-1b.toml"), "--set", f"data.dataset={a.corpus}",
                 "--set", f"data.tokenizer={a.out}", "--set", f"data.workers={a.workers}"])
    return {"code": code, "seconds": time.perf_counter() - start, "stream_seconds": sum(spent),
            "peak_mb": _peak_mb(resource.RUSAGE_SELF), "workers_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN)}


CHILDREN = {"tok-ours": child_tok_ours, "tok-hf": child_tok_hf, "tiktoken": child_tiktoken, "prepare": child_prepare}


def _child_cmd(kind: str, a, workers: int, cache: Path | None) -> tuple[list[str], dict]:
    env = {**os.environ, "RAYON_RS_NUM_CPUS": str(a.cores), "TOKENIZERS_PARALLELISM": "true",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if cache is not None:
        env["SCRATCHLM_CACHE"] = str(cache)
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(a.corpus), "--out", str(a.tok), "--vocab",
           str(a.vocab), "--sample", str(a.sample), "--cores", str(a.cores), "--workers", str(workers)]
    return cmd, env


def run_child(kind: str, a, workers: int = 1, cache: Path | None = None, watch: Path | None = None) -> dict:
    """Run one measurement in a fresh process; with `watch`, also the peak size of that folder meanwhile."""
    cmd, env = _child_cmd(kind, a, workers, cache)
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            if watch is not None and watch.exists():
                peak[0] = max(peak[0], _du(watch))
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    stop.set()
    watcher.join()
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    result = json.loads(line[len("RESULT "):]) if line else {}
    if res.returncode or not line or result.get("code"):
        raise SystemExit(f"{kind} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return {**result, "peak_disk": peak[0]}


def _du(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass  # renamed or removed while we looked
    return total


# ----------------------------------------------------------------------------- the benchmark
def machine() -> str:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    import tiktoken
    import tokenizers

    return (f"{model or platform.processor()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), "
            f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}, tokenizers {tokenizers.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=300, help="MB of corpus text (default 300; 2000 for the 2 GB run)")
    ap.add_argument("--sample", type=float, default=100, help="MB the tokenizers are trained on (default 100)")
    ap.add_argument("--vocab", type=int, default=10001, help="vocabulary size (default 10001, the qt-1b recipe's)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="data.workers values to measure")
    ap.add_argument("--cores", type=int, default=2, help="cores every child process is pinned to (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "scratchlm-bench-data",
                    help="where the corpus is kept and the runs write (default $TMPDIR/scratchlm-bench-data)")
    ap.add_argument("--skip-hf", action="store_true", help="leave out Hugging Face tokenizers")
    ap.add_argument("--no-kill", dest="kill", action="store_false",
                    help="leave out the SIGKILL-and-resume check (one more run with the most workers)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _pin(a.cores)
        a.workers = a.workers[0]
        print("RESULT " + json.dumps(CHILDREN[a.child](a)), flush=True)
        return

    print(f"machine: {machine()}; children pinned to {a.cores} cores", file=sys.stderr)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    a.corpus = a.work / f"corpus-{a.size:g}MB-seed{a.seed}"
    corpus = make_corpus(a.corpus, a.size, a.seed)
    print(f"corpus: {corpus['text_bytes'] / MB:,.0f} MB of text, {corpus['documents']:,} documents, "
          f"{corpus['files']} parquet files of {corpus['parquet_bytes'] / MB:,.0f} MB", file=sys.stderr)

    a.tok = a.work / f"tok-{a.size:g}MB-{a.sample:g}MB-{a.vocab}"
    shutil.rmtree(a.tok, ignore_errors=True)
    ours = run_child("tok-ours", a)
    print(f"tokenizer, ours: {ours['seconds']:.1f} s, peak {ours['peak_mb']:.0f} MB "
          f"(largest worker {ours['workers_peak_mb']:.0f} MB), sample {ours['sample']['bytes'] / MB:.1f} MB "
          f"of {ours['sample']['documents']:,} documents", file=sys.stderr)
    hf = None if a.skip_hf else run_child("tok-hf", a)
    if hf:
        print(f"tokenizer, HF: {hf['seconds']:.1f} s, peak {hf['peak_mb']:.0f} MB", file=sys.stderr)

    rows, hashes = [], {}
    for workers in a.workers:
        cache = a.work / f"cache-w{workers}"
        shutil.rmtree(cache, ignore_errors=True)
        run = run_child("prepare", a, workers, cache=cache, watch=cache)
        [shard_dir] = (cache / "shards").iterdir()
        final = _du(shard_dir)
        hashes[workers] = {p.name: _sha(p) for p in sorted(shard_dir.iterdir())}
        tt = run_child("tiktoken", a, workers)
        row = {"workers": workers, "seconds": run["seconds"], "mb_s": corpus["text_bytes"] / MB / run["seconds"],
               "stream_mb_s": corpus["text_bytes"] / MB / run["stream_seconds"],
               "peak_mb": run["peak_mb"], "workers_peak_mb": run["workers_peak_mb"], "peak_disk": run["peak_disk"],
               "shards": final, "tt_mb_s": tt["text_bytes"] / MB / tt["seconds"]}
        rows.append(row)
        print(f"workers {workers}: {row['mb_s']:.2f} MB/s, streaming {row['stream_mb_s']:.2f} MB/s "
              f"(tiktoken alone {row['tt_mb_s']:.2f}), peak "
              f"{row['peak_mb']:.0f} MB (largest worker {row['workers_peak_mb']:.0f}), disk peak "
              f"{row['peak_disk'] / MB:,.1f} MB for {final / MB:,.1f} MB of shards  (load {os.getloadavg()[0]:.2f})",
              file=sys.stderr, flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    same = len({json.dumps(h, sort_keys=True) for h in hashes.values()}) == 1
    resumed = kill_and_resume(a, max(a.workers), hashes[max(a.workers)], rows[-1]["shards"]) if a.kill else None
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)

    print(f"corpus {corpus['text_bytes'] / MB:,.0f} MB of text ({corpus['documents']:,} documents, "
          f"{corpus['parquet_bytes'] / MB:,.0f} MB of parquet); tokenizer sample {ours['sample']['bytes'] / MB:,.0f} MB, "
          f"vocabulary {a.vocab:,}\n")
    print("| tokenizer on the sample | seconds | peak MB |\n|---|---|---|")
    print(f"| scratchlm (main; largest worker) | {ours['seconds']:.1f} | {ours['peak_mb']:.0f}; "
          f"{ours['workers_peak_mb']:.0f} |")
    if hf:
        print(f"| Hugging Face tokenizers | {hf['seconds']:.1f} | {hf['peak_mb']:.0f} |")
    print("\n| workers | data prepare MB/s: whole command; streaming | tiktoken alone MB/s | streaming / tiktoken "
          "| peak MB: main; largest worker | peak disk MB | shards MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['mb_s']:.2f}; {r['stream_mb_s']:.2f} | {r['tt_mb_s']:.2f} "
              f"| {r['stream_mb_s'] / r['tt_mb_s']:.2f}x | {r['peak_mb']:.0f}; {r['workers_peak_mb']:.0f} "
              f"| {r['peak_disk'] / MB:,.1f} | {r['shards'] / MB:,.1f} |")
    print(f"\nshards byte-identical across workers {a.workers}: {'yes' if same else 'NO'}")
    if resumed:
        print(f"killed with SIGKILL at {resumed['killed_at'] / MB:,.0f} MB of shards, then resumed "
              f"({resumed['seconds']:.1f} s): byte-identical to the run that never stopped: "
              f"{'yes' if resumed['same'] else 'NO'}")


def kill_and_resume(a, workers: int, want: dict, final: int) -> dict:
    """`data prepare` killed (SIGKILL, workers and all) once half the shards are on disk, then run again."""
    import signal

    cache = a.work / "cache-kill"
    shutil.rmtree(cache, ignore_errors=True)
    cmd, env = _child_cmd("prepare", a, workers, cache)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while (size := _du(cache) if cache.exists() else 0) < final // 2:
        if proc.poll() is not None:
            raise SystemExit("the run to be killed ended first")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run = run_child("prepare", a, workers, cache=cache)
    [shard_dir] = (cache / "shards").iterdir()
    got = {p.name: _sha(p) for p in sorted(shard_dir.iterdir())}
    shutil.rmtree(cache, ignore_errors=True)
    return {"killed_at": size, "seconds": run["seconds"], "same": got == want}


def _sha(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    main()
