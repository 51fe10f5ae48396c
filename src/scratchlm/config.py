"""Run configuration: dataclasses, TOML recipes, `--set section.key=value` overrides and model presets.

A recipe has three tables, `[data]`, `[model]` and `[train]`, and a fourth, `[sft]`, for fine-tuning into a
chat model (`scratchlm sft`). `model.preset` names a preset whose values the other `[model]` keys then
override. The resolved config (every field, no preset left to look up) is
written into each run folder, so a run can always be repeated.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import tomli_w

from scratchlm.errors import UserError


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
    mlp: str = "swiglu"          # gelu | relu | silu | swiglu
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False
    bias: bool = False
    attention: str = "sdpa"      # sdpa | explicit | triton (scratchlm's FlashAttention-2 kernel; CUDA only)
    init_std: float = 0.02

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

    def validate(self) -> None:
        choices = {"position": ("learned", "sinusoidal", "rope", "alibi", "nope"), "norm": ("rmsnorm", "layernorm"),
                   "mlp": ("gelu", "relu", "silu", "swiglu"), "attention": ("sdpa", "explicit", "triton")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise UserError(f"model.{key} = {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.d_model % self.n_heads:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise UserError(f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            raise UserError(f"RoPE needs an even head size; d_model / n_heads = {self.head_dim}")
        if self.attention == "triton":
            from scratchlm.model.flash_triton import check_usable  # imports Triton, so only when asked for
            check_usable(self.head_dim, self.dropout)


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
    tokenizer: str = ""              # an existing tokenizer folder; empty: train one on the train split
    vocab_size: int = 4096
    special_tokens: list[str] = field(default_factory=lambda: ["<pad>", "<unk>", "<bos>", "<eos>"])
    uncased: bool = False
    shards: str = ""                 # an existing shard folder; empty: encode into the cache


@dataclass
class TrainConfig:
    seed: int = 1337
    device: str = "auto"             # auto | cpu | cuda | mps
    precision: str = "auto"          # auto (bf16 autocast on GPU, float32 on CPU) | bf16-native (bf16 where the hardware multiplies it) | fp32 | bf16 | fp16
    micro_batch: int = 16            # sequences per forward pass
    batch_tokens: int = 0            # tokens per optimizer step; 0: one micro-batch. Sets gradient accumulation.
    max_steps: int = 0               # 0: until the time budget runs out
    minutes: float = 0.0             # wall-clock budget for training steps; 0: none
    optimizer: str = "adamw"         # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    implementation: str = "torch"    # torch (fused, fast) | reference (scratchlm's readable AdamW, cross-entropy, clipping)
    lr: float = 3e-3
    muon_lr_scale: float = 10.0      # Muon's lr as a multiple of train.lr
    muon_momentum: float = 0.95
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

    def validate(self) -> None:
        from scratchlm.sft.data import parse_source  # the SFT package imports torch: only when a config is built

        for spec in self.sources:
            try:
                parse_source(spec)
            except UserError as e:
                raise UserError(f"sft.sources: {e}") from None
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"sft.val_fraction = {self.val_fraction} must be at least 0 and below 1")
        for key in ("persona_weight", "epochs"):
            if getattr(self, key) < 0:
                raise UserError(f"sft.{key} = {getattr(self, key)} must not be negative")
        if self.eval_examples < 0 or self.eval_max_new_tokens < 1:
            raise UserError("sft.eval_examples must be >= 0 and sft.eval_max_new_tokens >= 1")


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
    if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool) \
            or not isinstance(value, kind):
        raise UserError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
    return value


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


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
    cfg.model.validate()
    # [sft.train] is checked as [train] is, so a misspelt key fails here and not after pretraining.
    checked = TrainConfig()
    _apply(checked, "sft.train", cfg.sft.train, where)
    cfg.sft.train = {key: getattr(checked, key) for key in cfg.sft.train}
    cfg.sft.validate()
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    if path is None:
        return build_config({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
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
