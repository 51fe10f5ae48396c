"""The `scratchlm` command. Each subcommand parses its arguments and calls one stage function; the work
lives in the modules it imports."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scratchlm.errors import UserError


def cmd_demo(a):
    from scratchlm.demo import run_demo

    run_demo(a.minutes, a.out)


def cmd_data_list(a):
    from scratchlm.data.sources import format_dataset_table

    print(format_dataset_table())


def cmd_data_get(a):
    import shutil

    from scratchlm.data.sources import get_dataset

    split = get_dataset(a.name)
    train, val = split.train, split.val
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        train, val = Path(shutil.copy(split.train, out / "train.txt")), Path(shutil.copy(split.val, out / "val.txt"))
    print(f"train {train} ({split.train_bytes:,} bytes)")
    print(f"val   {val} ({split.val_bytes:,} bytes)")


def _input_files(inputs: list[str]) -> list[Path]:
    """Files as given; a dataset name (or hf: source) stands for its train split."""
    from scratchlm.data.sources import get_dataset

    return [Path(p) if Path(p).is_file() else get_dataset(p).train for p in inputs]


def cmd_tokenizer_train(a):
    from scratchlm.data.prepare import train_tokenizer

    tok = train_tokenizer(_input_files(a.input), a.vocab_size, a.special, Path(a.out), a.uncased)
    print(f"tokenizer with {tok.vocab_size} tokens written to {a.out}")


def cmd_tokenizer_encode(a):
    from scratchlm.data.shards import encode_corpus
    from scratchlm.data.sources import get_dataset
    from scratchlm.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(a.tokenizer))
    splits: dict[str, list[Path]] = {"train": [], "val": []}
    for source in a.input:
        split = get_dataset(source)
        splits["train"].append(split.train)
        splits["val"].append(split.val)
    meta = encode_corpus(tok, Path(a.tokenizer), splits, Path(a.out))
    for name, s in meta["splits"].items():
        print(f"{name}: {s['tokens']:,} tokens from {s['bytes']:,} bytes ({s['bytes'] / max(1, s['tokens']):.2f} bytes/token)")
    print(f"shards written to {a.out}")


def cmd_pretrain(a):
    from scratchlm.config import load_config
    from scratchlm.train.loop import pretrain

    overrides = list(a.set) + (["train.resume=auto"] if a.resume else [])
    cfg = load_config(a.config, overrides)
    out = Path(a.out) if a.out else Path("runs") / Path(a.config).stem
    result = pretrain(cfg, out)
    if "val_bpb" in result:
        print(f"step {result['step']}: val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}, "
              f"bits per byte {result['val_bpb']:.4f}; run folder {out}")


def cmd_generate(a):
    from scratchlm.infer.generate import SamplingParams, stream, stream_text
    from scratchlm.loading import load
    from scratchlm.train.loop import pick_device

    loaded = load(a.checkpoint, pick_device(a.device))
    tok = loaded.tokenizer
    stops = (tok.eos_id,) if tok.eos_id is not None else ()
    params = SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed, stops)
    prompt = a.prompt.encode().decode("unicode_escape") if a.escapes else a.prompt
    ids = tok.encode(prompt) or ([tok.bos_id] if tok.bos_id is not None else tok.encode("\n"))
    sys.stdout.write(prompt)
    for piece in stream_text(tok, stream(loaded.model, ids, params)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_eval(a):
    import torch

    from scratchlm.data.shards import encode_corpus, open_split
    from scratchlm.data.sources import cache_dir, get_dataset
    from scratchlm.eval.metrics import evaluate
    from scratchlm.loading import load
    from scratchlm.train.loop import pick_device

    device = pick_device(a.device)
    loaded = load(a.checkpoint, device)
    source = a.data or loaded.config.data.dataset
    split = get_dataset(source)
    shard_dir = cache_dir() / "eval" / loaded.checkpoint.parent.parent.name / Path(str(split.val)).parent.name
    encode_corpus(loaded.tokenizer, loaded.checkpoint.parent.parent / "tokenizer", {"val": [split.val]}, shard_dir)
    for context in a.context or [loaded.config.model.context]:
        if context > loaded.config.model.context and loaded.config.model.position == "learned":
            print(f"context {context}: learned positions stop at {loaded.config.model.context}; skipped")
            continue
        row = evaluate(loaded.model, open_split(shard_dir, "val"), torch.tensor(loaded.tokenizer.token_byte_lengths()),
                       context=context, batch=a.batch, device=device)
        print(f"{source} val, context {context}: loss {row['val_loss']:.4f}, perplexity {row['val_ppl']:.2f}, "
              f"bits per byte {row['val_bpb']:.4f} ({row['val_tokens']:,} tokens)")


def cmd_plot(a):
    from scratchlm.viz.plots import plot_runs, plot_schedule

    if a.schedule:
        from scratchlm.config import load_config

        train = load_config(a.schedule, a.set).train
        steps = a.steps or train.max_steps
        if not steps:
            raise UserError(f"{a.schedule} sets no train.max_steps (it runs for a time budget); give --steps N")
        print(f"wrote {plot_schedule(train, steps, Path(a.out))}")
    elif a.runs:
        print(f"wrote {plot_runs([Path(r) for r in a.runs], Path(a.out))}")
    else:
        raise UserError("name run folders to plot, or --schedule RECIPE.toml to draw a learning-rate schedule")


def cmd_model_info(a):
    from scratchlm.config import load_config, preset_config
    from scratchlm.model.info import describe

    cfg = load_config(a.config).model if a.config else preset_config(a.preset)
    print(describe(cfg))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchlm", description="Build your own language model from scratch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="raw text to samples in one command (CPU: about 5 minutes)")
    s.add_argument("--minutes", type=float, default=5.0, help="training budget in minutes (default 5)")
    s.add_argument("--out", help="run folder (default runs/demo-<time>)")
    s.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="named datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("list", help="the named datasets: size, licence, source")
    s.set_defaults(func=cmd_data_list)
    s = data.add_parser("get", help="fetch a dataset into the cache and print where its splits are")
    s.add_argument("name", help="a dataset name, a local path, or hf:NAME")
    s.add_argument("--out", help="also copy train.txt and val.txt into this folder")
    s.set_defaults(func=cmd_data_get)

    tok = sub.add_parser("tokenizer", help="train and apply a byte-level BPE tokenizer").add_subparsers(
        dest="tokenizer_command", required=True)
    s = tok.add_parser("train", help="train a tokenizer on text files or a dataset's train split")
    s.add_argument("--input", nargs="+", required=True, help="text files or dataset names")
    s.add_argument("--vocab-size", type=int, required=True)
    s.add_argument("--special", nargs="*", default=["<pad>", "<unk>", "<bos>", "<eos>"], help="special tokens")
    s.add_argument("--uncased", action="store_true", help="lowercase, straighten quotes, drop symbols")
    s.add_argument("--out", required=True, help="tokenizer folder to write")
    s.set_defaults(func=cmd_tokenizer_train)
    s = tok.add_parser("encode", help="encode datasets or text files into train/val token shards")
    s.add_argument("--tokenizer", required=True, help="tokenizer folder")
    s.add_argument("--input", nargs="+", required=True, help="dataset names or paths (split 90/10)")
    s.add_argument("--out", required=True, help="shard folder to write")
    s.set_defaults(func=cmd_tokenizer_encode)

    s = sub.add_parser("pretrain", help="pretrain a model from a TOML recipe")
    s.add_argument("--config", required=True, help="recipe, e.g. recipes/shakespeare-cpu.toml")
    s.add_argument("--out", help="run folder (default runs/<recipe name>)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    s.add_argument("--prompt", default="", help="text to continue")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default="auto")
    s.add_argument("--no-escapes", dest="escapes", action="store_false", help="take \\n in the prompt literally")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--data", help="dataset name or path (default: the run's own)")
    s.add_argument("--context", type=lambda v: [int(x) for x in v.split(",")], help="e.g. 256,512,1024")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("plot", help="loss, bits-per-byte, lr and grad-norm curves of one or more runs")
    s.add_argument("runs", nargs="*", help="run folders")
    s.add_argument("--out", default="runs.png", help="PNG or SVG file")
    s.add_argument("--schedule", metavar="RECIPE", help="draw the learning rate a recipe will follow instead")
    s.add_argument("--steps", type=int, help="with --schedule: the run length (default train.max_steps)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="with --schedule")
    s.set_defaults(func=cmd_plot)

    model = sub.add_parser("model", help="model presets").add_subparsers(dest="model_command", required=True)
    s = model.add_parser("info", help="parameters, FLOPs and memory of a preset or config")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--config")
    s.set_defaults(func=cmd_model_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0
