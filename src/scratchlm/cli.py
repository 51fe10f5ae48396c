"""The `scratchlm` command. Each subcommand parses its arguments and calls one stage function; the work
lives in the modules it imports."""
from __future__ import annotations

import argparse
import signal
import math
import sys
from dataclasses import replace
from pathlib import Path

from scratchlm.errors import UserError


def _exit_code(result: dict) -> int:
    """A run stopped by a signal exits as the shell reports one killed by it (130 for Ctrl-C, 143 for
    SIGTERM), so that `pretrain && sft` does not go on with a half-trained model."""
    return 128 + result["signal"] if result.get("interrupted") else 0


def cmd_demo(a):
    from scratchlm.demo import run_demo

    if not (math.isfinite(a.minutes) and a.minutes > 0):
        raise UserError(f"--minutes {a.minutes}: give a training budget in minutes > 0, e.g. --minutes 5")
    return _exit_code(run_demo(a.minutes, a.out))


def cmd_data_list(a):
    from scratchlm.data.sources import format_dataset_table

    print(format_dataset_table())
    from scratchlm.eval.bigbench import DESCRIPTION

    print(DESCRIPTION)


def cmd_data_get(a):
    from scratchlm.data.sources import get_dataset

    if a.name == "bigbench":
        from scratchlm.eval.bigbench import fetch_for_cli

        print(fetch_for_cli(a.out))
        return
    split = get_dataset(a.name)
    train, val = split.train, split.val
    if a.out:
        from scratchlm.files import atomic_copy, make_dir

        make_dir(Path(a.out))
        train, val = atomic_copy(split.train, Path(a.out) / "train.txt"), atomic_copy(split.val, Path(a.out) / "val.txt")
    print(f"train {train} ({split.train_bytes:,} bytes)")
    print(f"val   {val} ({split.val_bytes:,} bytes)")


def cmd_data_prepare(a):
    from scratchlm.config import load_config
    from scratchlm.data.prepare import prepare, summary

    print(summary(prepare(load_config(a.config, a.set).data)))


def _input_files(inputs: list[str]) -> list[Path]:
    """Files as given; a dataset name (or hf: source) stands for its train split."""
    from scratchlm.data.sources import get_dataset

    return [Path(p) if Path(p).is_file() else get_dataset(p).train for p in inputs]


def cmd_tokenizer_train(a):
    from scratchlm.data.prepare import train_tokenizer

    tok = train_tokenizer(_input_files(a.input), a.vocab_size, a.special, Path(a.out), a.uncased)
    print(f"tokenizer with {tok.vocab_size} tokens written to {a.out}")


def cmd_tokenizer_encode(a):
    from scratchlm.data.shards import encode_sources

    meta = encode_sources(Path(a.tokenizer), a.input, Path(a.out), a.workers)
    for name, s in meta["splits"].items():
        print(f"{name}: {s['tokens']:,} tokens from {s['bytes']:,} bytes ({s['bytes'] / max(1, s['tokens']):.2f} bytes/token)")
    print(f"shards written to {a.out}")


def cmd_pretrain(a):
    from scratchlm.config import load_config
    from scratchlm.train.pretrain import pretrain

    overrides = list(a.set) + (["train.resume=auto"] if a.resume else [])
    cfg = load_config(a.config, overrides)
    out = Path(a.out) if a.out else Path("runs") / Path(a.config).stem
    result = pretrain(cfg, out)
    if "val_bpb" in result:
        print(f"step {result['step']}: val loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}, "
              f"bits per byte {result['val_bpb']:.4f}; run folder {out}")
    return _exit_code(result)


def cmd_sft(a):
    from scratchlm.config import load_config
    from scratchlm.sft.train import finetune, summary

    overrides = list(a.set) + (["train.resume=auto"] if a.resume else [])
    out = Path(a.out) if a.out else Path("runs") / f"{Path(a.config).stem}-sft"
    result = finetune(load_config(a.config, overrides), out)
    line = summary(result, out)
    if line:
        print(line)
    return _exit_code(result)


def cmd_generate(a):
    import dataclasses

    from scratchlm.infer.generate import stream
    from scratchlm.infer.prompt import plain_prompt, read_prompt
    from scratchlm.infer.sampling import sampling_for
    from scratchlm.infer.text import stream_text
    from scratchlm.loading import load
    from scratchlm.runtime import pick_device

    params = sampling_for("generate", max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, seed=a.seed)
    prompt = read_prompt(a.prompt, a.escapes)
    loaded = load(a.checkpoint, pick_device(a.device))
    ids, stops = plain_prompt(loaded.tokenizer, prompt)
    sys.stdout.write(prompt)
    for piece in stream_text(loaded.tokenizer, stream(loaded.model, ids, dataclasses.replace(params, stop_ids=stops))):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(a):
    from scratchlm.chat.terminal import chat
    from scratchlm.infer.prompt import read_prompt
    from scratchlm.infer.sampling import sampling_for

    params = sampling_for("chat", max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                          top_p=a.top_p, min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed)
    chat(a.checkpoint, a.device, read_prompt(a.system, escapes=False, flag="--system"), params)


def cmd_serve(a):
    from scratchlm.serve.server import serve

    serve(a.checkpoint, a.host, a.port, a.device, a.model_name, a.max_batch, a.verbose, a.idle_timeout)


def cmd_eval(a):
    from scratchlm.eval.lm import evaluate_run, format_row, ngram_baseline, run_data
    from scratchlm.eval.runner import is_benchmark

    tasks = a.task or []
    if a.baseline:  # "ngram", the one choice
        if a.tokenizer:
            tokenizer_dir, run_source = Path(a.tokenizer), None
        elif a.checkpoint:
            tokenizer_dir, run_source = run_data(a.checkpoint)
        else:
            raise UserError("--baseline ngram needs a tokenizer: --tokenizer DIR, or --checkpoint RUN for the "
                            "run's own")
        source = a.data or run_source
        if not source:
            raise UserError("--baseline ngram needs --data SOURCE (a dataset name, a path or hf:NAME)")
        row = ngram_baseline(a.order, source, tokenizer_dir, a.discount)
        print(f"{a.order}-gram Kneser-Ney, trained on {row['train_tokens']:,} tokens of {source} train "
              f"(discounts {row['discounts']})")
        print(format_row(source, row))
    elif a.compare:
        from scratchlm.eval.runner import compare

        if a.checkpoint:
            raise UserError("--compare takes the runs to compare itself; leave out --checkpoint")

        compare(a.compare, a.suite, tasks, out=a.out, shots=a.shots, limit=a.limit, seed=a.seed, device=a.device,
                batch=a.batch)
    elif not a.checkpoint:
        raise UserError("name a model to evaluate with --checkpoint RUN (or use --baseline ngram --tokenizer DIR)")
    elif a.suite or any(is_benchmark(t) for t in tasks):
        from scratchlm.eval.runner import evaluate

        plain = [t for t in tasks if not is_benchmark(t)]
        if plain:
            raise UserError(f"--task {plain[0]}: a file of questions and answers is scored on its own; give it "
                            "without --suite and benchmark tasks")
        evaluate(a.checkpoint, a.suite, tasks, shots=a.shots, limit=a.limit, seed=a.seed, out=a.out, device=a.device,
                 batch=a.batch)
    elif tasks:
        from scratchlm.eval.tasks import run_task
        from scratchlm.loading import load
        from scratchlm.runtime import pick_device

        limit = a.limit or 0
        if a.shots is not None:
            raise UserError(f"--shots {a.shots}: a file of questions and answers is scored without shots")
        if a.batch < 1 or limit < 0:
            raise UserError(f"--batch {a.batch} --limit {limit}: give a batch >= 1 and a limit >= 0 (0: all)")
        if len(tasks) > 1 and a.out:
            raise UserError("--out names one file of results; give one question-and-answer --task at a time")
        loaded = load(a.checkpoint, pick_device(a.device))
        for task in tasks:
            run_task(loaded, Path(task), a.max_new_tokens, a.batch, a.out, limit, a.seed)
    else:
        source, rows = evaluate_run(a.checkpoint, a.data, a.context, a.batch, a.max_tokens, a.device)
        for row in rows:
            print(format_row(source, row))


def cmd_rate(a):
    from scratchlm.eval.rate import format_summary, rate, summarize

    if a.summary:
        print(format_summary(summarize(Path(a.summary))))
    elif not a.prompts:
        raise UserError("give --prompts FILE (and --checkpoint A --checkpoint B ...), or --summary ratings.csv")
    else:
        from scratchlm.infer.sampling import sampling_for

        params = sampling_for("rate", max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k)
        rate(a.checkpoint or [], Path(a.prompts), Path(a.out), seed=a.seed, params=params, device=a.device)


def cmd_attention(a):
    from scratchlm.infer.prompt import read_prompt
    from scratchlm.runtime import pick_device
    from scratchlm.viz.attention import plot_checkpoint_attention

    prompt = read_prompt(a.prompt, a.escapes)
    path, n = plot_checkpoint_attention(a.checkpoint, prompt, Path(a.out), a.layer, pick_device(a.device))
    print(f"wrote {path} ({n} tokens)")


def cmd_sweep(a):
    from scratchlm.sweep import run_sweep

    run_sweep(a.config, a.grid, a.out, minutes=a.minutes, steps=a.steps, sets=a.set, contexts=a.context or (),
              eval_tokens=a.eval_tokens, jobs=a.jobs, command="scratchlm " + " ".join(sys.argv[1:]))
    print(f"wrote {Path(a.out) / 'sweep.md'} and {Path(a.out) / 'sweep.png'}")


def cmd_plot(a):
    from scratchlm.viz.plots import plot_runs, plot_schedule

    if a.schedule:
        from scratchlm.config import load_config

        train = load_config(a.schedule, a.set).train
        steps = a.steps or train.max_steps
        if not steps:
            raise UserError(f"{a.schedule} sets no train.max_steps (it runs for a time budget); give --steps N")
        from scratchlm.train.optim import lr_at

        lrs = [lr_at(s, steps, train) for s in range(steps)]
        title = f"{train.schedule} schedule, {train.warmup_steps} warmup steps, peak {train.lr:g}"
        print(f"wrote {plot_schedule(lrs, title, Path(a.out))}")
    elif a.runs:
        print(f"wrote {plot_runs([Path(r) for r in a.runs], Path(a.out))}")
    else:
        raise UserError("name run folders to plot, or --schedule RECIPE.toml to draw a learning-rate schedule")


def cmd_model_info(a):
    from scratchlm.config import load_config, preset_config
    from scratchlm.model.info import describe

    if a.config:
        run = load_config(a.config)
        # a recipe that trains its own tokenizer gets a model as wide as that tokenizer, as pretrain builds it
        own_tokenizer = not (run.data.tokenizer or run.data.shards)
        cfg = replace(run.model, vocab_size=run.data.vocab_size) if own_tokenizer else run.model
    else:
        cfg = preset_config(a.preset)
    print(describe(cfg))


def cmd_convert(a):
    from scratchlm.convert import convert

    for note in convert(a.src, a.dst, a.to, a.dtype, a.tokenizer, a.force, chat_template=not a.no_chat_template):
        print(f"note: {note}")
    print(f"wrote {a.dst} ({a.to})")


ESCAPES = r"\n, \t, \\, \xHH, \uXXXX read as in Python"
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def _lengths(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected whole numbers separated by commas, "
                                         "e.g. 256,512") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scratchlm", description="Build your own language model from scratch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="raw text to samples in one command (CPU: about 5 minutes)")
    s.add_argument("--minutes", type=float, default=5.0, help="training budget in minutes (default 5)")
    s.add_argument("--out", help="run folder (default runs/demo-<time>)")
    s.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="named datasets and the data stage").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("list", help="the named datasets: size, licence, source")
    s.set_defaults(func=cmd_data_list)
    s = data.add_parser("get", help="fetch a dataset into the cache and print where its splits are")
    s.add_argument("name", help="a dataset name, a local path, or hf:NAME")
    s.add_argument("--out", help="also copy train.txt and val.txt into this folder")
    s.set_defaults(func=cmd_data_get)
    s = data.add_parser("prepare", help="a recipe's data stage: stream its dataset into a tokenizer and token "
                                        "shards in the cache (rerun to resume)")
    s.add_argument("--config", required=True, help="recipe, e.g. recipes/qt-1b.toml")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. data.max_tokens=2e9 or data.workers=16")
    s.set_defaults(func=cmd_data_prepare)

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
    s.add_argument("--out", required=True, help="shard folder to write (rerun the same command to resume)")
    s.add_argument("--workers", type=int, help="encoding processes (default: all CPUs)")
    s.set_defaults(func=cmd_tokenizer_encode)

    s = sub.add_parser("pretrain", help="pretrain a model from a TOML recipe")
    s.add_argument("--config", required=True, help="recipe, e.g. recipes/shakespeare-cpu.toml")
    s.add_argument("--out", help="run folder (default runs/<recipe name>)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("sft", help="fine-tune a base model into a chat model ([sft] section of a recipe)")
    s.add_argument("--config", required=True, help="recipe with an [sft] section, e.g. recipes/chat-cpu.toml")
    s.add_argument("--out", help="run folder (default runs/<recipe name>-sft)")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. sft.init=runs/base or sft.train.lr=3e-4")
    s.add_argument("--resume", action="store_true", help="continue the run in --out")
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("generate", help="sample text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    s.add_argument("--prompt", default="", help=f"text to continue ({ESCAPES}); empty: start from <bos>")
    # Sampling flags default to None: the command's row of infer.sampling.SAMPLING fills them in.
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float, help="0 for greedy")
    s.add_argument("--top-k", type=int, help="0: off")
    s.add_argument("--top-p", type=float, help="1: off")
    s.add_argument("--seed", type=int)
    s.add_argument("--device", default="auto", help=DEVICES)
    s.add_argument("--no-escapes", dest="escapes", action="store_false", help="take backslashes in --prompt literally")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streaming, multi-turn)")
    s.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    s.add_argument("--system", default="", help="system message")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", default="auto", help=DEVICES)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page for a checkpoint")
    s.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="model id in the API (default: the run folder's name)")
    s.add_argument("--max-batch", type=int, default=8, help="requests generated together at most")
    s.add_argument("--device", default="auto")
    s.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds a connection may stay silent before it is closed (default 30)")
    s.add_argument("--verbose", action="store_true", help="log every request")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("eval", help="loss, perplexity and bits per byte; task scores; an n-gram baseline")
    s.add_argument("--checkpoint", help="run folder or checkpoint folder")
    s.add_argument("--data", help="dataset name or path (default: the run's own)")
    s.add_argument("--context", type=_lengths, help="e.g. 256,512,1024")
    s.add_argument("--max-tokens", type=int, default=0, help="score only the first N validation tokens (0: all)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--device", default="auto", help=DEVICES)
    s.add_argument("--task", action="append", metavar="TASK",
                   help="repeatable: bigbench:NAME, a BIG-bench task.json, a JSONL file in one of CORE's kinds, or a "
                        "JSONL file of questions and answers (generated, scored) or multiple choice")
    s.add_argument("--suite", choices=["core6", "core"],
                   help="core6: CORE's six BIG-bench tasks, offline; core: all 22 from the DCLM bundle (internet)")
    s.add_argument("--shots", type=int, help="examples shown before each question (default: each task's own)")
    s.add_argument("--limit", type=int, help="score a fixed sample of N examples per task (default: 50 with "
                   "--suite, else all; 0: all)")
    s.add_argument("--seed", type=int, default=1234, help="fixes the --limit sample and the shots (default 1234)")
    s.add_argument("--compare", nargs="+", metavar="RUN", help="several runs (or their summary.json) side by side")
    s.add_argument("--max-new-tokens", type=int, default=64, help="with a question-and-answer --task: the longest answer")
    s.add_argument("--out", help="benchmarks: the results folder (default RUN/eval/NAME); a question-and-answer "
                   "--task: a JSONL file of each example's result")
    s.add_argument("--baseline", choices=["ngram"], help="score an n-gram model instead of a checkpoint")
    s.add_argument("--order", type=int, default=3, help="with --baseline ngram: n (default 3)")
    s.add_argument("--discount", type=float, help="with --baseline ngram: a fixed Kneser-Ney discount in (0, 1]")
    s.add_argument("--tokenizer", help="with --baseline ngram: tokenizer folder (default: the --checkpoint run's)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("rate", help="blind human ratings of samples from several checkpoints; their summary")
    s.add_argument("--checkpoint", action="append", help="a run to compare (repeat for each)")
    s.add_argument("--prompts", help="text file, one prompt per line (or .jsonl with a 'prompt' field)")
    s.add_argument("--out", default="ratings.csv", help="CSV the ratings are appended to (default ratings.csv)")
    s.add_argument("--summary", metavar="CSV", help="print each checkpoint's mean and spread instead")
    s.add_argument("--seed", type=int, default=0, help="fixes the shuffled order and the samples")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_rate)

    s = sub.add_parser("attention", help="attention maps of every layer and head for a prompt, as a PNG grid")
    s.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    s.add_argument("--prompt", required=True, help=f"text to look at ({ESCAPES})")
    s.add_argument("--no-escapes", dest="escapes", action="store_false", help="take backslashes in --prompt literally")
    s.add_argument("--out", default="attention.png", help="PNG, SVG or PDF file")
    s.add_argument("--layer", type=int, help="only this layer (0 is the first)")
    s.add_argument("--device", default="cpu", help=DEVICES)
    s.set_defaults(func=cmd_attention)

    s = sub.add_parser("sweep", help="train every combination of a grid of config values; table and plot")
    s.add_argument("--config", required=True, help="base recipe")
    s.add_argument("--grid", action="append", default=[], metavar="SECTION.KEY=V1,V2,...", help="repeat for more keys")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--minutes", type=float, help="training budget of each run")
    g.add_argument("--steps", type=int, help="training steps of each run")
    s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override for every run")
    s.add_argument("--out", required=True, help="sweep folder: one run folder per combination, sweep.md, sweep.png")
    s.add_argument("--context", type=lambda v: [int(x) for x in v.split(",")],
                   help="also evaluate each run at these context lengths (extrapolation table)")
    s.add_argument("--eval-tokens", type=int, default=0, help="with --context: validation tokens to score (0: all)")
    s.add_argument("--jobs", type=int, help="runs at a time, as subprocesses (default: one per GPU, else 1)")
    s.set_defaults(func=cmd_sweep)

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

    s = sub.add_parser("convert", help="convert between run folders, Hugging Face folders and GGUF files")
    s.add_argument("src", help="a run or checkpoint folder, a Hugging Face folder (Llama, GPT-2) or a .gguf file")
    s.add_argument("dst", help="folder (hf, scratchlm) or .gguf file to write")
    s.add_argument("--to", required=True, choices=["hf", "scratchlm", "gguf"])
    s.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"], help="weights (q8_0: GGUF only)")
    s.add_argument("--tokenizer", help="a scratchlm tokenizer folder to use instead of the source's")
    s.add_argument("--force", action="store_true", help="replace an existing destination")
    s.add_argument("--no-chat-template", action="store_true",
                   help="leave the source's chat template out (one that does not parse as Jinja is refused)")
    s.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # as a shell reports a command a signal stopped
    except BrokenPipeError:
        return 0
    return code or 0
