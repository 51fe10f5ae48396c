"""Tokenizer benchmark: our BPE trainer against Hugging Face `tokenizers`, our encoder against `tiktoken`.

    python bench/tokenizer.py                      # Shakespeare at 4096, 8192, 32768 + a 50 MB corpus
    python bench/tokenizer.py --sizes 4096 --big-mb 0 --repeats 1     # a quick look

Training: `train_bpe` and Hugging Face's `BpeTrainer` (ByteLevel pre-tokenizer, all 256 bytes, the same
special tokens and vocabulary size) on the same file, each in a child process pinned to the same cores
(`--cores`, default 2: our worker processes, Hugging Face's Rayon threads), alternating, best of
`--repeats`. Peak memory is the child's `ru_maxrss`; for ours, the main process and the largest worker.
Encoding: `Tokenizer.encode` against a `tiktoken.Encoding` built on the same ranks, pattern and special
tokens (`encode_ordinary`, its fastest call, when the text holds no special token), one thread, the whole
training file, best of at least 6 calls each, alternating; the ids are checked equal.
The load average is printed, since other work on the machine disturbs every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
MB = 1 << 20


def _pin(cores: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[:cores])


def _peak_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- child processes
def child_train_ours(path: str, vocab: int, cores: int, out: str) -> dict:
    from scratchlm.tokenizer import Tokenizer, train_bpe

    t = time.perf_counter()
    vocab_map, merges = train_bpe(path, vocab, SPECIALS, workers=cores, progress=False)
    seconds = time.perf_counter() - t
    if out:
        Tokenizer(vocab_map, merges, SPECIALS).save(out)
    return {"seconds": seconds, "peak_mb": _peak_mb(resource.RUSAGE_SELF),
            "workers_peak_mb": _peak_mb(resource.RUSAGE_CHILDREN)}


def child_train_hf(path: str, vocab: int, cores: int, out: str) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([path], trainer)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_mb": _peak_mb(resource.RUSAGE_SELF), "vocab": tok.get_vocab_size()}


def child_encode(path: str, tok_dir: str, repeats: int) -> dict:
    import tiktoken

    from scratchlm.tokenizer import GPT2_SPLIT_PATTERN, Tokenizer

    tok = Tokenizer.load(tok_dir)
    ref = tiktoken.Encoding("ref", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=dict(tok._encoder),
                            special_tokens=tok.special_tokens)
    text = Path(path).read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / MB
    tok.encode(text[:100000]), ref.encode(text[:100000], allowed_special="all")  # warm up
    # tiktoken's fastest call for the text: `encode_ordinary` where it holds no special token.
    if any(s in text for s in tok.special_tokens):
        peer = lambda: ref.encode(text, allowed_special="all")
    else:
        peer = lambda: ref.encode_ordinary(text)
    calls = {"ours": lambda: tok.encode(text), "tiktoken": peer}
    best = {"ours": float("inf"), "tiktoken": float("inf")}
    ids = {}
    for r in range(repeats):
        for name in (("ours", "tiktoken") if r % 2 == 0 else ("tiktoken", "ours")):  # alternate who goes first
            t = time.perf_counter()
            ids[name] = calls[name]()
            best[name] = min(best[name], time.perf_counter() - t)
    ours_ids, ref_ids = ids["ours"], ids["tiktoken"]
    return {"ours_mb_s": mb / best["ours"], "tiktoken_mb_s": mb / best["tiktoken"], "equal": ours_ids == ref_ids,
            "tokens": len(ours_ids), "peak_mb": _peak_mb(resource.RUSAGE_SELF)}


def _child(args) -> None:
    _pin(args.cores)
    if args.child == "train-ours":
        result = child_train_ours(args.input, args.vocab, args.cores, args.out)
    elif args.child == "train-hf":
        result = child_train_hf(args.input, args.vocab, args.cores, args.out)
    else:
        result = child_encode(args.input, args.out, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(kind: str, path: Path, vocab: int, cores: int, out: str = "", repeats: int = 1,
              one_core: bool = False) -> dict:
    # Rayon reads its thread count at start-up, so it is set in the child's environment.
    env = {**os.environ, "RAYON_RS_NUM_CPUS": str(cores), "TOKENIZERS_PARALLELISM": "true"}
    cmd = [sys.executable, __file__, "--child", kind, "--input", str(path), "--vocab", str(vocab),
           "--cores", str(1 if one_core else cores), "--out", out, "--repeats", str(repeats)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if res.returncode or line is None:
        raise SystemExit(f"{kind} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(line[len("RESULT "):])


# ----------------------------------------------------------------------------- the benchmark
def big_corpus(text: str, mb: int, path: Path) -> Path:
    """About `mb` MB: copies of the text, each with two letters swapped (copy k swaps a different pair),
    so the copies add new words, as a larger corpus would, instead of repeating the same counts."""
    pairs = ["ae", "io", "st", "nr", "dl", "mp", "bv", "cg", "fh", "wy", "kx", "uo", "et", "ar", "in", "sh"]
    with open(path, "w", encoding="utf-8") as f:
        size, k = 0, 0
        while size < mb * MB:
            if k == 0:
                copy = text
            else:
                x, y = pairs[(k - 1) % len(pairs)]
                copy = text.translate(str.maketrans(x + y + x.upper() + y.upper(), y + x + y.upper() + x.upper()))
            f.write(copy)
            size += len(copy.encode("utf-8"))
            k += 1
    return path


def measure(name: str, path: Path, vocab: int, cores: int, repeats: int, tmp: Path) -> dict:
    tok_dir = tmp / f"tok-{name}-{vocab}"
    ours, hf = [], []
    for r in range(repeats):
        ours.append(run_child("train-ours", path, vocab, cores, str(tok_dir) if r == 0 else ""))
        hf.append(run_child("train-hf", path, vocab, cores))
    enc = run_child("encode", path, vocab, cores, str(tok_dir), repeats=max(6, repeats), one_core=True)
    if not enc["equal"]:
        raise SystemExit(f"{name} {vocab}: our ids differ from tiktoken's")
    row = {
        "corpus": name, "mb": path.stat().st_size / MB, "vocab": vocab,
        "ours_s": min(o["seconds"] for o in ours), "hf_s": min(h["seconds"] for h in hf),
        "ours_mb": max(o["peak_mb"] for o in ours), "ours_workers_mb": max(o["workers_peak_mb"] for o in ours),
        "hf_mb": max(h["peak_mb"] for h in hf),
        "enc_ours": enc["ours_mb_s"], "enc_tt": enc["tiktoken_mb_s"], "enc_mb": enc["peak_mb"],
    }
    print(f"  {name} {vocab}: train {row['ours_s']:.2f} s vs {row['hf_s']:.2f} s, "
          f"encode {row['enc_ours']:.2f} vs {row['enc_tt']:.2f} MB/s  (load {os.getloadavg()[0]:.2f})",
          file=sys.stderr, flush=True)
    return row


def table(rows: list[dict]) -> str:
    head = ("| corpus | MB | vocab | train: ours s | HF s | ours/HF | peak MB: ours (workers) | HF "
            "| encode: ours MB/s | tiktoken MB/s | ours/tiktoken |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['mb']:.1f} | {r['vocab']} | {r['ours_s']:.2f} | {r['hf_s']:.2f} "
            f"| {r['ours_s'] / r['hf_s']:.2f}x | {r['ours_mb']:.0f} ({r['ours_workers_mb']:.0f}) | {r['hf_mb']:.0f} "
            f"| {r['enc_ours']:.2f} | {r['enc_tt']:.2f} | {r['enc_ours'] / r['enc_tt']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 32768])
    ap.add_argument("--big-mb", type=int, default=50, help="size of the grown corpus (0: skip)")
    ap.add_argument("--big-vocab", type=int, default=32768)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["train-ours", "train-hf", "encode"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)

    from scratchlm.data.sources import get_dataset

    corpus = get_dataset("shakespeare").train
    print(f"machine: {os.cpu_count()} CPUs, using {args.cores}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tokenizer-") as tmp:
        tmp = Path(tmp)
        for vocab in args.sizes:
            rows.append(measure("shakespeare", corpus, vocab, args.cores, args.repeats, tmp))
        if args.big_mb:
            big = big_corpus(corpus.read_text(encoding="utf-8"), args.big_mb, tmp / "big.txt")
            rows.append(measure(f"shakespeare x{round(big.stat().st_size / corpus.stat().st_size)}",
                                big, args.big_vocab, args.cores, max(1, args.repeats - 2), tmp))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", file=sys.stderr)
    print(table(rows))


if __name__ == "__main__":
    main()
