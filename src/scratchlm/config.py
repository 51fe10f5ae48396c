"""Run configuration: dataclasses, TOML recipes, `--set section.key=value` overrides and model presets.

A recipe has three tables, `[data]`, `[model]` and `[train]`, and a fourth, `[sft]`, for fine-tuning into a
chat model (`scratchlm sft`). `model.preset` names a preset whose values the other `[model]` keys then
override. The resolved config (every field, no preset left to look up) is
written into each run folder, so a run can always be repeated.

Every value is checked when the config is built (`build_config`): names against the choices the code that
reads them accepts, numbers against their ranges, so a mistake fails in one line before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import tomli_w

from scratchlm.errors import UserError


@dataclass(frozen=True)
class Range:
    """Where a number may lie: from `low` to `high` (None: no bound), each end included unless marked open.
    Infinities and NaN are never in range: TOML can spell them, no setting means them."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, low_open=True)
FRACTION = Range(0, 1, high_open=True)   # momentum, betas, dropout: 1 would never forget (or drop everything)


@dataclass(frozen=True)
class RangeOrUnset(Range):
    """From `start` up, or -1: "unset, take the value of the field `fallback`". `low` is -1, the least
    value taken, so that what lies below it is what the range refuses first."""
    start: float = 0.0
    fallback: str = ""

    def holds(self, value: float) -> bool:
        return value == -1 or Range(self.start).holds(value)

    def __str__(self) -> str:
        return f"{Range(self.start)}, or -1 for the value of {self.fallback}"


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{name} = {value!r} is not one of {', '.join(allowed)}{_nearest(str(value), allowed)}")


DEVICES = ("auto", "cpu", "cuda", "mps")


def check_device(name: str, value: str) -> None:
    """What the trainer's device picker takes: one of DEVICES, or cuda:N for one GPU of several."""
    if value not in DEVICES and not re.fullmatch(r"cuda:\d+", value):
        raise UserError(f"{name} = {value!r} is not one of auto, cpu, cuda, cuda:N, mps{_nearest(value, DEVICES)}")


def check_range(name: str, value: float, allowed: Range) -> None:
    if not allowed.holds(value):
        finite = "" if math.isfinite(value) else "a finite number "
        raise UserError(f"{name} = {value!r} is out of range: it must be {finite}{allowed}")


def _check_fields(obj, section: str) -> None:
    """The choices and ranges a config class declares, checked in field order."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in obj.CHOICES:
            for item in value if isinstance(value, list) else [value]:
                check_choice(f"{section}.{f.name}", item, obj.CHOICES[f.name])
        if f.name in obj.RANGES:
            check_range(f"{section}.{f.name}", value, obj.RANGES[f.name])


@dataclass
class ModelConfig:
    preset: str = ""
    vocab_size: int = 4096
    context: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0          # 0: as many as n_heads (MHA); 1: MQA; in between: GQA
    d_ff: int = 0                # 0: derived from d_model and the MLP kind
    position: str = "rope"       # learned | sinusoidal | rope | alibi | nope
    rope_base: float = 10000.0
    norm: str = "rmsnorm"        # rmsnorm | layernorm
    norm_eps: float = 1e-5
    pre_norm: bool = True
    mlp: str = "swiglu"          # gelu | relu | relu2 (relu(x)^2) | silu | swiglu
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False
    bias: bool = False
    attention: str = "sdpa"      # sdpa | explicit | triton (scratchlm's FlashAttention-2 kernel; CUDA only)
    init_std: float = 0.02
    logit_softcap: float = 0.0   # > 0: logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt); 0: off
    zero_init_proj: bool = False  # attention o_proj and MLP down start at zero: residual branches start adding nothing
    value_embeds: int = 0        # extra token tables mixed into the values of layer k and n_layers-1-k (modded-nanogpt)
    unet_skips: bool = False     # the first n_layers//2 block outputs feed the mirrored later blocks, with learned weights

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """4 * d_model for a plain MLP; for SwiGLU two thirds of that (so the three matrices cost what two
        would), rounded up to a multiple of 64 for fast kernels."""
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-int(8 * self.d_model / 3) // 64) * 64
        return 4 * self.d_model

    CHOICES: ClassVar[dict] = {"position": ("learned", "sinusoidal", "rope", "alibi", "nope"),
                               "norm": ("rmsnorm", "layernorm"), "mlp": ("gelu", "relu", "relu2", "silu", "swiglu"),
                               "attention": ("sdpa", "explicit", "triton")}
    RANGES: ClassVar[dict] = {"vocab_size": AT_LEAST_1, "context": AT_LEAST_1, "d_model": AT_LEAST_1,
                              "n_layers": AT_LEAST_1, "n_heads": AT_LEAST_1, "n_kv_heads": AT_LEAST_0,
                              "d_ff": AT_LEAST_0, "rope_base": Range(1, low_open=True), "norm_eps": POSITIVE,
                              "dropout": FRACTION, "init_std": POSITIVE, "logit_softcap": AT_LEAST_0,
                              "value_embeds": AT_LEAST_0}

    def validate(self) -> None:
        """Whether the settings make a model at all. Not whether this machine can run it: a model trained
        with the Triton kernel on a GPU still loads on a CPU (see model.flash_triton.require_usable)."""
        _check_fields(self, "model")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head size; d_model / n_heads = {self.head_dim}")
        if self.value_embeds > self.n_layers // 2:
            raise UserError(f"model.value_embeds = {self.value_embeds} is more than n_layers // 2 = "
                            f"{self.n_layers // 2}: each table feeds one early and one mirrored late layer")
        if self.unet_skips and self.n_layers < 2:
            raise UserError("model.unet_skips = true needs n_layers >= 2: a skip joins block k to block n_layers-1-k")
        if self.attention == "triton":
            from scratchlm.model.flash_triton import check_config  # imports Triton, so only when asked for
            check_config(self.head_dim, self.dropout)


PRESETS: dict[str, dict] = {
    # The CPU demo: about 3.4M parameters with a 4096 vocabulary, trains at tens of thousands of tokens/s on 2 cores.
    "tiny": dict(context=256, d_model=256, n_layers=4, n_heads=4, n_kv_heads=0, mlp="swiglu", position="rope", norm="rmsnorm"),
    "small": dict(context=512, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, mlp="swiglu", position="rope", norm="rmsnorm"),
    "llama-style": dict(context=1024, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, mlp="swiglu", position="rope",
                        norm="rmsnorm", rope_base=10000.0),
    "gpt2-124m": dict(vocab_size=50257, context=1024, d_model=768, n_layers=12, n_heads=12, n_kv_heads=0, d_ff=3072,
                      mlp="gelu", position="learned", norm="layernorm", bias=True, tie_embeddings=True),
    # The seeds' 1.01B model.
    "qt-1b": dict(vocab_size=10001, context=512, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=8, d_ff=8196,
                  mlp="gelu", position="alibi", norm="rmsnorm", tie_embeddings=False),
}


@dataclass
class DataConfig:
    dataset: str = "shakespeare"     # a named dataset, a local path, or hf:NAME
    text_field: str = "text"         # the field holding the text in .jsonl, .parquet and hf: records
    tokenizer: str = ""              # an existing tokenizer folder; empty: train one on a sample of the train split
    vocab_size: int = 4096
    special_tokens: list[str] = field(default_factory=lambda: ["<pad>", "<unk>", "<bos>", "<eos>"])
    uncased: bool = False
    tokenizer_sample_bytes: int = 1_000_000_000  # text the tokenizer is trained on: the first this many bytes of train documents
    shards: str = ""                 # an existing shard folder; empty: encode into the cache
    max_tokens: int = 0              # train tokens to encode, then stop (the token budget); 0: the whole source
    val_tokens: int = 10_000_000     # validation tokens at most; 0: no cap
    val_every: int = 100             # every Nth document of a streamed source is held out for validation
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB at 2 bytes a token)
    workers: int = 0                 # encoding processes; 0: one per usable CPU

    CHOICES: ClassVar[dict] = {}
    RANGES: ClassVar[dict] = {"tokenizer_sample_bytes": AT_LEAST_1, "max_tokens": AT_LEAST_0,
                              "val_tokens": AT_LEAST_0, "val_every": Range(2), "shard_tokens": AT_LEAST_1,
                              "workers": AT_LEAST_0}
    # Token counts and byte sizes may be written as 2e9 (TOML reads that as a float): whole numbers are taken.
    WHOLE: ClassVar[tuple] = ("tokenizer_sample_bytes", "max_tokens", "val_tokens", "shard_tokens")

    def validate(self) -> None:
        from scratchlm.tokenizer.pretokenize import check_special_tokens

        if not self.dataset:
            raise UserError("data.dataset is empty: name a dataset (scratchlm data list), a local path or hf:NAME")
        if not self.text_field:
            raise UserError("data.text_field is empty: name the field that holds the text, e.g. text")
        try:
            check_special_tokens(self.special_tokens)
        except ValueError as e:
            raise UserError(f"data.special_tokens: {e}") from None
        _check_fields(self, "data")
        # Byte-level BPE starts from the 256 single bytes and the specials; fewer tokens cannot be had.
        least = 256 + len(self.special_tokens)
        if self.vocab_size < least:
            raise UserError(f"data.vocab_size = {self.vocab_size} is out of range: it must be >= {least} "
                            f"(256 byte tokens + {len(self.special_tokens)} special tokens)")
        # A budget under one shard is most likely a slip (2e6 for 2e9); a small run lowers shard_tokens too.
        if 0 < self.max_tokens < self.shard_tokens:
            raise UserError(f"data.max_tokens = {self.max_tokens:,} is below one shard (data.shard_tokens = "
                            f"{self.shard_tokens:,}): raise the budget, or lower data.shard_tokens with it")


@dataclass
class TrainConfig:
    seed: int = 1337
    device: str = "auto"             # auto | cpu | cuda | mps
    # auto (bf16 autocast on GPU, float32 on CPU) | bf16-native (bf16 where the hardware multiplies it) | fp32 | bf16 | fp16
    precision: str = "auto"
    micro_batch: int = 16            # sequences per forward pass
    batch_tokens: int = 0            # tokens per optimizer step; 0: one micro-batch. Sets gradient accumulation.
    max_steps: int = 0               # 0: until the time budget runs out
    minutes: float = 0.0             # wall-clock budget for training steps; 0: none
    optimizer: str = "adamw"         # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    implementation: str = "torch"    # torch (fused, fast) | reference (scratchlm's readable AdamW, cross-entropy, clipping)
    lr: float = 3e-3
    muon_lr_scale: float = 10.0      # Muon's lr as a multiple of train.lr
    muon_momentum: float = 0.95
    muon_polynomial: str = "quintic"  # quintic (Jordan's, every step) | polar-express (Amsel et al. 2025, one per step)
    muon_normalize: str = "none"     # none | neuron (NorMuon: even out the update's rows, keeping its size)
    muon_weight_decay: float = -1.0  # decoupled decay of Muon's matrices, p *= 1 - lr * wd at Muon's lr; -1: weight_decay
    embed_lr_scale: float = 1.0      # lr of embedding tables (token, value, learned positions) as a multiple of train.lr
    head_lr_scale: float = 1.0       # lr of an untied output head (a tied one is the token table)
    scalar_lr_scale: float = 1.0     # lr of parameters with fewer than 2 dimensions (gains, biases, mixing scalars)
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"         # cosine | wsd | linear | constant
    warmup_steps: int = 50
    cooldown_steps: int = 0          # wsd: steps of linear decay at the end; 0: 20% of the run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_tokens: int = 65536         # tokens of validation per periodic eval; the final eval reads all of it
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    log_to: list[str] = field(default_factory=list)  # also log to: tensorboard, wandb (both work offline)
    compile: bool = False
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% more time
    parallel: str = "ddp"            # under torchrun: ddp (replicated weights) | fsdp (FSDP2, sharded weights)
    keep_best: bool = True           # also keep the checkpoint with the best validation loss
    resume: str = "no"               # no | auto (continue the run in the output folder when there is one)
    threads: int = 0                 # CPU threads for PyTorch; 0: all cores
    # Schedules of the batch (train/accumulation.py): each off at 0; the fractions are of the run's progress.
    seq_len_start: int = 0           # tokens per row at the start, growing to model.context; 0: full rows throughout
    seq_len_warmup: float = 0.25     # fraction of the run over which the rows grow to model.context
    batch_start_tokens: int = 0      # tokens per optimizer step at the start, growing to the full batch; 0: full
    batch_warmup: float = 0.25       # fraction of the run over which the step grows to the full batch

    # Each list is what the code that reads the field accepts (train.loop, train.optim, train.distributed,
    # train.loggers): a misspelling fails here, not after minutes of training.
    CHOICES: ClassVar[dict] = {"precision": ("auto", "bf16-native", "fp32", "bf16", "fp16"),
                               "optimizer": ("adamw", "muon"), "implementation": ("torch", "reference"),
                               "schedule": ("cosine", "wsd", "linear", "constant"),
                               "log_to": ("tensorboard", "wandb"), "parallel": ("ddp", "fsdp"),
                               "resume": ("no", "auto"), "muon_polynomial": ("quintic", "polar-express"),
                               "muon_normalize": ("none", "neuron")}
    RANGES: ClassVar[dict] = {"seed": AT_LEAST_0, "micro_batch": AT_LEAST_1, "batch_tokens": AT_LEAST_0,
                              "max_steps": AT_LEAST_0, "minutes": AT_LEAST_0, "lr": POSITIVE,
                              "muon_lr_scale": POSITIVE, "muon_momentum": FRACTION, "embed_lr_scale": POSITIVE,
                              "head_lr_scale": POSITIVE, "scalar_lr_scale": POSITIVE, "min_lr_ratio": Range(0, 1),
                              "warmup_steps": AT_LEAST_0, "cooldown_steps": AT_LEAST_0, "weight_decay": AT_LEAST_0,
                              "beta1": FRACTION, "beta2": FRACTION, "grad_clip": AT_LEAST_0,
                              "eval_every": AT_LEAST_0, "eval_tokens": AT_LEAST_0, "checkpoint_every": AT_LEAST_0,
                              "keep_checkpoints": AT_LEAST_0, "log_every": AT_LEAST_1, "threads": AT_LEAST_0,
                              "muon_weight_decay": RangeOrUnset(-1, start=0, fallback="weight_decay"),
                              "seq_len_start": AT_LEAST_0, "seq_len_warmup": Range(0, 1, low_open=True),
                              "batch_start_tokens": AT_LEAST_0, "batch_warmup": Range(0, 1, low_open=True)}

    def validate(self, section: str = "train") -> None:
        """`section` names the table in messages: [sft.train] is checked with this too."""
        check_device(f"{section}.device", self.device)
        _check_fields(self, section)

    @property
    def muon_decay(self) -> float:
        """The weight decay of Muon's matrices: muon_weight_decay, or weight_decay where that is -1."""
        return self.weight_decay if self.muon_weight_decay == -1 else self.muon_weight_decay

    def accumulation_steps(self, context: int, world: int = 1) -> int:
        """Micro-batches per optimizer step: as many as fit in `batch_tokens` (at least one)."""
        if not self.batch_tokens:
            return 1
        return max(1, self.batch_tokens // (self.micro_batch * world * context))

    def rows_per_step(self, context: int, world: int = 1) -> int:
        """Rows (sequences) one optimizer step learns from, all processes together."""
        return self.micro_batch * world * self.accumulation_steps(context, world)

    def full_batch_tokens(self, context: int, world: int = 1) -> int:
        """Tokens per optimizer step once the batch schedules are done, all processes together."""
        return self.rows_per_step(context, world) * context

    def check_batch_schedules(self, context: int, world: int = 1, section: str = "train") -> None:
        """The schedules' starts against what they grow to: the model's context and the full batch on
        `world` processes (build_config checks one; the training loop again, knowing how many there are)."""
        if self.seq_len_start > context:
            raise UserError(f"{section}.seq_len_start = {self.seq_len_start} is longer than model.context = "
                            f"{context}; lower it (0 turns the sequence-length warmup off)")
        full = self.full_batch_tokens(context, world)
        if self.batch_start_tokens > full:
            raise UserError(f"{section}.batch_start_tokens = {self.batch_start_tokens:,} is more than the full batch "
                            f"of {full:,} tokens per step; lower it (0 turns the batch-size warmup off)")


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`scratchlm sft`). The model and tokenizer come from `init`, so `[model]` and
    `[data]` describe the base model only; `[train]` applies, with the keys of `[sft.train]` over it, so
    one recipe can pretrain and fine-tune with different learning rates and budgets."""
    init: str = ""                   # run or checkpoint folder to start from (scratchlm's, or `convert --to scratchlm`)
    sources: list[str | dict] = field(default_factory=lambda: ["chatterbot"])  # SOURCE[*WEIGHT] or {source=..., ...}
    persona: str = "off"             # off | on | a .toml/.json file with name, about, creator, extra
    persona_name: str = ""           # with persona = "on"; "": the Persona defaults (Pip, ...)
    persona_about: str = ""
    persona_creator: str = ""
    persona_weight: float = 3.0      # times each persona pair is seen per epoch, unless sources lists persona*W
    val_fraction: float = 0.1        # of each local or hf: source held out (named datasets keep their own split)
    pack: bool = True                # several examples per row (faster); false: one per row
    drop_repeats: bool = True        # leave out of the held-out set what training also asks (it would score recall)
    epochs: float = 0.0              # > 0: sets train.max_steps to this many passes over the mixture
    eval_examples: int = 200         # held-out conversations answered greedily at the end (0: none)
    eval_max_new_tokens: int = 64
    train: dict[str, object] = field(default_factory=dict)   # [train] values for this stage (lr, minutes, ...)

    CHOICES: ClassVar[dict] = {}
    RANGES: ClassVar[dict] = {"persona_weight": AT_LEAST_0, "val_fraction": FRACTION, "epochs": AT_LEAST_0,
                              "eval_examples": AT_LEAST_0, "eval_max_new_tokens": AT_LEAST_1}

    def validate(self) -> None:
        from scratchlm.sft.data import parse_source  # the SFT package imports torch: only when a config is built

        for spec in self.sources:
            try:
                parse_source(spec)
            except UserError as e:
                raise UserError(f"sft.sources: {e}") from None
        _check_fields(self, "sft")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from scratchlm.files import atomic_write_text

        atomic_write_text(path, tomli_w.dumps(self.to_dict()))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "sft": SFTConfig}


def _coerce(section: str, key: str, value, kind, source: str):
    """Check a TOML value against the field's type; ints are accepted for floats."""
    name = f"{section}.{key}"
    origin = typing.get_origin(kind)
    if origin is list:
        item = typing.get_args(kind)[0]
        allowed = typing.get_args(item) or (item,)    # list[str | dict] allows either
        if not isinstance(value, list) or not all(isinstance(v, allowed) for v in value):
            what = " or ".join({str: "strings", dict: "tables"}[t] for t in allowed)
            raise UserError(f"{source}: {name} must be a list of {what}, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {name} must be a table, got {value!r}")
        return dict(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and key in getattr(SECTIONS.get(section), "WHOLE", ()) and isinstance(value, float) \
            and value.is_integer():
        return int(value)
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool) \
            or not isinstance(value, kind):
        raise UserError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


def _apply(target, section: str, values: dict, source: str) -> None:
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{source}: unknown key {section}.{key}{_nearest(key, known)}")
        setattr(target, key, _coerce(section, key, value, hints[key], source))


def parse_override(text: str) -> tuple[str, str, object]:
    """`section.key=value`, the value read as TOML (so 3e-4, true, "x", [..] work) or else as a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.lr=3e-4")
    path, raw = text.split("=", 1)
    section, key = path.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def build_config(table: dict, overrides: list[str] = (), source: str = "config") -> RunConfig:
    cfg = RunConfig()
    sets: dict[str, dict] = {s: {} for s in SECTIONS}
    for name, values in table.items():
        if name not in SECTIONS:
            raise UserError(f"{source}: unknown section [{name}]{_nearest(name, SECTIONS)}")
        if not isinstance(values, dict):
            raise UserError(f"{source}: [{name}] must be a table")
        sets[name].update(values)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise UserError(f"--set {text}: unknown section {section}{_nearest(section, SECTIONS)}")
        head, dot, rest = key.partition(".")
        if dot and typing.get_origin(typing.get_type_hints(SECTIONS[section]).get(head)) is dict:
            # `--set sft.train.lr=1e-4`: one key of a table, the others kept
            sets[section][head] = {**sets[section].get(head, {}), rest: value}
        else:
            sets[section][key] = value
    preset = sets["model"].get("preset", "")
    if preset:
        if preset not in PRESETS:
            raise UserError(f"{source}: unknown model.preset {preset!r}{_nearest(preset, PRESETS)}; "
                            f"known: {', '.join(PRESETS)}")
        _apply(cfg.model, "model", PRESETS[preset], source)
    where = source if not overrides else f"{source} / --set"
    for name, values in sets.items():
        _apply(getattr(cfg, name), name, values, where)
    # [sft.train] is checked as [train] is, so a misspelt key fails here and not after pretraining.
    checked = TrainConfig()
    _apply(checked, "sft.train", cfg.sft.train, where)
    cfg.sft.train = {key: getattr(checked, key) for key in cfg.sft.train}
    try:
        cfg.data.validate()
        cfg.model.validate()
        cfg.train.validate()
        cfg.train.check_batch_schedules(cfg.model.context)
        # [train] passed, so a value out of range here is one that [sft.train] set.
        dataclasses.replace(cfg.train, **cfg.sft.train).validate("sft.train")
        cfg.sft.validate()
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    if path is None:
        return build_config({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: invalid TOML: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                        f"save it as UTF-8") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    return build_config(table, overrides, str(path))


def recipe_path(name: str) -> Path:
    """A recipe shipped in the repository's `recipes/` folder."""
    path = Path(__file__).resolve().parents[2] / "recipes" / name
    if not path.is_file():
        raise UserError(f"recipe {name} not found in {path.parent}; run scratchlm from a clone of the repository")
    return path


def preset_config(name: str) -> ModelConfig:
    return build_config({"model": {"preset": name}}).model
