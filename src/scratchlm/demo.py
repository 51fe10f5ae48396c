"""`scratchlm demo`: the whole path from raw text to samples, in one command, on whatever machine it runs.

Every step is the real stage the other commands run; the demo only strings them together and explains.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from scratchlm.config import load_config, recipe_path
from scratchlm.data.prepare import prepare
from scratchlm.data.sources import get_dataset
from scratchlm.infer.generate import generate
from scratchlm.infer.sampling import SAMPLING
from scratchlm.loading import load
from scratchlm.runtime import pick_device
from scratchlm.train.pretrain import pretrain

PROMPTS = ["ROMEO.\n", "LADY MACBETH.\n", "KING HENRY.\nNow"]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run_demo(minutes: float = 5.0, out: str | Path | None = None, progress: bool = True,
             overrides: list[str] = ()) -> dict:
    device = pick_device("auto")
    recipe = recipe_path("shakespeare-gpu.toml" if device.type == "cuda" else "shakespeare-cpu.toml")
    cfg = load_config(recipe, [f"train.minutes={minutes}", *overrides])
    out = Path(out) if out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"scratchlm demo on {device.type} ({torch.get_num_threads()} threads), recipe {recipe.name}, "
          f"{minutes:g} minutes of training, run folder {out}")

    _say("1. corpus: Shakespeare's plays, modern spelling")
    split = get_dataset(cfg.data.dataset, progress=progress)
    print(f"train {split.train} ({split.train_bytes:,} bytes)\nval   {split.val} ({split.val_bytes:,} bytes)")

    _say(f"2-3. byte-level BPE tokenizer ({cfg.data.vocab_size} tokens) and token shards")
    data = prepare(cfg.data, progress)
    print(f"tokenizer {data.tokenizer_dir}\nshards    {data.shard_dir}")

    _say(f"4. pretraining the {cfg.model.preset or 'custom'} model for {minutes:g} minutes")
    result = pretrain(cfg, out, progress)
    if result.get("interrupted"):
        return result   # the run said where it stopped and how to go on

    _say("5. validation over the whole held-out split")
    print(f"loss {result['val_loss']:.4f} nats/token, perplexity {result['val_ppl']:.2f}, "
          f"bits per byte {result['val_bpb']:.4f} ({result['val_tokens']:,} tokens, {result['val_bytes']:,} bytes)")

    _say(f"6. run folder {out}: config.toml, metrics.jsonl, loss.png, checkpoints/")
    sampling = SAMPLING["demo"]
    _say(f"7. samples (temperature {sampling.temperature:g}, top-k {sampling.top_k})")
    loaded = load(out, device)
    for seed, prompt in enumerate(PROMPTS):
        # a seed of its own for each prompt: with one seed for all, a small model's samples share whole lines
        ids = generate(loaded.model, loaded.tokenizer.encode(prompt), dataclasses.replace(sampling, seed=seed))
        print("-" * 60)
        print(prompt + loaded.tokenizer.decode(ids))
    print("-" * 60)
    print("\nGo on with:")
    print(f"  scratchlm generate --checkpoint {out} --prompt 'JULIET.\\n' --max-new-tokens 300")
    print(f"  scratchlm eval --checkpoint {out}")
    print(f"  scratchlm plot {out} --out {out}/curves.png")
    return result
