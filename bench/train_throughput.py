"""Training-step throughput of scratchlm's model against transformers' of the same shape: forward, backward,
gradient clipping and the AdamW step, as the training engine runs them.

    python bench/train_throughput.py                                  # CPU: d_model 256, 6 layers, batch 16 x 256
    python bench/train_throughput.py --layers 4 --batch 8 --rounds 2  # a quicker look
    python bench/train_throughput.py --device cuda                    # GPT-2 124M (preset gpt2-124m), 16 x 1024, bf16
    python bench/train_throughput.py --device cuda --compile          # both models through torch.compile

Each step is the one `scratchlm.train.loop.fit` takes: the forward pass under the engine's autocast
(`autocast_for`: bf16 on a GPU, none on a CPU) with the loss (scratchlm: its output head fused into the
cross-entropy, `model(x, targets=y)`; transformers: float32 cross-entropy over its logits), backward,
`clip_grad_norm_` at train.grad_clip, the loss and gradient norm read back to the host (the engine logs
both every step), and the step of the optimizer `build_optimizer` makes from the default TrainConfig:
AdamW with weight decay on matrices only, fused on a GPU. The peer is transformers' LlamaForCausalLM
(GPT2LMHeadModel for GPT-2-shaped presets) built from `to_hf_config`, holding the same weights, with SDPA
attention and the same optimizer built by the same function. They take turns, round after round, so a
change in the machine's load hits both; each keeps its best round.

MFU is the step's useful FLOPs (`scratchlm.model.info.flops_per_token`: 6 per matrix weight per token plus
attention) per second, over the device's rate: on a CPU the float32 rate of a large matrix product on the
same threads, measured alongside (`scratchlm.train.mfu.matmul_flops`); on a GPU the dense bf16 peak of
`scratchlm.train.mfu.GPU_PEAK_BF16`. Without CUDA, `--device cuda` says so in one line and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from scratchlm.config import PRESETS, TrainConfig, build_config
from scratchlm.convert.families import to_hf_config
from scratchlm.convert.hf import to_gpt2, to_llama
from scratchlm.model.info import count_params, flops_per_token
from scratchlm.model.transformer import Transformer
from scratchlm.runtime import autocast_for
from scratchlm.train.mfu import matmul_flops, peak_flops
from scratchlm.train.optim import build_optimizer, set_lr


def peer_model(cfg, weights: dict[str, torch.Tensor]):
    """transformers' model of the same family and shape, holding `weights` (scratchlm names)."""
    import transformers

    kwargs = to_hf_config(cfg)
    if kwargs.pop("model_type") == "llama":
        config, cls, names = transformers.LlamaConfig, transformers.LlamaForCausalLM, to_llama
    else:
        config, cls, names = transformers.GPT2Config, transformers.GPT2LMHeadModel, to_gpt2
    model = cls(config(**kwargs, attn_implementation="sdpa"))
    if cfg.tie_embeddings:
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    # Not strict: a tied head is filled by tying, and GPT-2 keeps buffers scratchlm has no name for.
    missing, unexpected = model.load_state_dict(names(weights, cfg), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SystemExit(f"weights do not fit transformers' model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


class Side:
    """One model with its optimizer, stepped exactly as the training engine steps."""

    def __init__(self, model: torch.nn.Module, loss_of, device: torch.device, tc: TrainConfig, compile: bool):
        self.model = model.to(device).train()
        self.loss_of = torch.compile(loss_of) if compile else loss_of
        self.optimizer = build_optimizer(self.model, tc, device)
        self.params = list(self.model.parameters())
        self.device, self.tc = device, tc
        self.autocast = autocast_for(device, tc.precision)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def seconds(self, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
        """Mean seconds of one training step over `steps` steps."""
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            set_lr(self.optimizer, self.tc.lr)
            with self.autocast() if self.autocast else contextlib.nullcontext():
                loss = self.loss_of(x, y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
            loss.item(), float(norm)  # the engine's per-step read-back, a host sync on a GPU
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=list(PRESETS), help="a model preset (default on cuda: gpt2-124m)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--context", type=int, help="sequence length (default: 256, or the preset's context)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--steps", type=int, help="steps per round (default: 3 on cpu, 10 on cuda)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile both models' forward passes")
    a = p.parse_args()

    if a.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible here; nothing measured")
        return
    import transformers

    transformers.logging.set_verbosity_error()
    device = torch.device(a.device)
    preset = a.preset or ("gpt2-124m" if a.device == "cuda" else "")
    shape = {"preset": preset} if preset else {"vocab_size": a.vocab, "d_model": a.d_model, "n_layers": a.layers,
                                               "n_heads": a.heads}
    cfg = build_config({"model": shape}).model
    if a.context or not preset:
        cfg.context = a.context or 256
    steps = a.steps or (10 if a.device == "cuda" else 3)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    tc = TrainConfig()
    torch.manual_seed(0)

    ours = Transformer(cfg)
    theirs = peer_model(cfg, dict(ours.state_dict()))
    x = torch.randint(0, cfg.vocab_size, (a.batch, cfg.context), device=device)
    y = torch.randint(0, cfg.vocab_size, (a.batch, cfg.context), device=device)
    sides = {"scratchlm": Side(ours, lambda t, labels: ours(t, targets=labels), device, tc, a.compile),
             "transformers": Side(theirs, lambda t, labels: F.cross_entropy(
                 theirs(t).logits.float().flatten(0, 1), labels.flatten()), device, tc, a.compile)}
    with torch.no_grad():  # before any step, so both still hold the same weights; float32, two rows
        diff = (ours(x[:2]) - theirs(x[:2]).logits).abs().max().item()
    for side in sides.values():  # warm-up: allocation, kernel choice, compilation, the optimizer's state
        side.seconds(x, y, 2)
    peak = peak_flops(device) if a.device == "cuda" else matmul_flops()
    best = {name: float("inf") for name in sides}
    memory = {name: 0 for name in sides}
    for r in range(a.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            if a.device == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            best[name] = min(best[name], sides[name].seconds(x, y, steps))
            if a.device == "cuda":
                memory[name] = max(memory[name], torch.cuda.max_memory_allocated(device))
        if a.device == "cpu":
            peak = max(peak, matmul_flops())
        print(f"  round {r + 1}: {best['scratchlm'] * 1e3:.1f} vs {best['transformers'] * 1e3:.1f} ms a step "
              f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)

    tokens, flops = a.batch * cfg.context, flops_per_token(cfg, cfg.context)
    n = count_params(cfg)["total"]
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    if a.device == "cuda":
        where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}, bf16 autocast, fused AdamW"
                 f"{', torch.compile' if a.compile else ''}")
        rate_name = f"dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "peak unknown (add it to GPU_PEAK_BF16)"
    else:
        where = f"{platform.processor() or platform.machine()}, {a.threads} threads, float32, AdamW"
        rate_name = f"float32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s"
    print(f"machine: {where}; torch {torch.__version__}, transformers {transformers.__version__}; load average {load}")
    print(f"model: {n / 1e6:.2f}M parameters ({cfg.preset or 'custom'}: d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, ffn {cfg.ffn_hidden}, vocab {cfg.vocab_size}, {cfg.position} positions, "
          f"{'tied' if cfg.tie_embeddings else 'untied'}), batch {a.batch} x {cfg.context}, {steps} steps a round, "
          f"best of {a.rounds}; {flops / 1e6:.1f} MFLOP per token; max logit difference {diff:.1e}")
    print(f"{rate_name}\n")
    unit, scale = ("TFLOP/s", 1e12) if a.device == "cuda" else ("GFLOP/s", 1e9)
    head = f"{'':14}{'step (ms)':>10}{'tokens/s':>12}{unit:>9}{'MFU':>7}"
    print(head + (f"{'peak GiB':>10}" if a.device == "cuda" else ""))
    for name, seconds in best.items():
        rate = tokens / seconds
        mfu = f"{rate * flops / peak:7.1%}" if peak else f"{'-':>7}"
        line = f"{name:14}{seconds * 1e3:10.1f}{rate:12,.0f}{rate * flops / scale:9.1f}{mfu}"
        print(line + (f"{memory[name] / 2**30:10.2f}" if a.device == "cuda" else ""))
    print(f"\nscratchlm / transformers: {best['transformers'] / best['scratchlm']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
