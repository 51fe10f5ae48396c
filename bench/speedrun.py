"""The Shakespeare CPU speedrun: validation bits per byte after a fixed wall-clock budget of training.

    python bench/speedrun.py                      # the demo recipe, 5 minutes
    python bench/speedrun.py --set train.lr=4e-3  # any override, as in `scratchlm pretrain`

Tokenizer training and shard encoding happen first and are timed apart: the budget is training steps
only (the schedule is sized to it; see train/budget.py). The final evaluation reads the whole validation
split. For scale: a well-known minimal character-level GPT reaches about 2.5 bits per byte in 5 minutes
on the same 2-core machine (figure from the issue, not measured here).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.config import load_config, recipe_path
from scratchlm.data.prepare import train_tokenizer
from scratchlm.data.sources import get_dataset
from scratchlm.train.pretrain import pretrain

PEER_BPB = 2.5  # minimal char-level GPT, 5 minutes, this machine (quoted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(recipe_path("shakespeare-cpu.toml")))
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", help="run folder (default: a temporary one)")
    p.add_argument("--json", help="append the result as one JSON line to this file")
    a = p.parse_args()

    cfg = load_config(a.config, [f"train.minutes={a.minutes}", "train.eval_every=0", *a.set])
    split = get_dataset(cfg.data.dataset)
    work = Path(tempfile.mkdtemp(prefix="speedrun-"))
    start = time.perf_counter()
    if not cfg.data.tokenizer:
        train_tokenizer([split.train], cfg.data.vocab_size, cfg.data.special_tokens, work / "tokenizer",
                        cfg.data.uncased)
        cfg.data.tokenizer = str(work / "tokenizer")
    tokenizer_seconds = time.perf_counter() - start
    out = Path(a.out) if a.out else work / "run"
    result = pretrain(cfg, out)
    row = {"val_bpb": result["val_bpb"], "val_loss": result["val_loss"], "steps": result["step"],
           "tokens": result["tokens"], "train_seconds": result["train_seconds"],
           "tokenizer_seconds": tokenizer_seconds, "overrides": a.set, "minutes": a.minutes,
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__}
    print(f"\nspeedrun: val bits per byte {row['val_bpb']:.4f} after {row['train_seconds']:.0f} s of training "
          f"({row['steps']} steps, {row['tokens']:,} tokens); tokenizer {tokenizer_seconds:.1f} s (excluded)")
    print(f"peer (minimal char-level GPT, quoted): {PEER_BPB} bits per byte; ratio peer/ours "
          f"{PEER_BPB / row['val_bpb']:.2f}x")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
