"""Training-step speed of scratchlm's model against transformers' LlamaForCausalLM of the same shape, on CPU.

    python bench/model.py                                # d_model 256, 6 layers, vocab 4096, batch 16 x 256
    python bench/model.py --layers 4 --threads 2 --rounds 5
    python bench/model.py --precision fp32 --compile     # float32 only, eager and compiled, both models

Both models get the same weights and the same batch, and run forward + backward with the same attention
backend (SDPA); no optimizer step, which costs both the same. Each computes the training loss its own
way: scratchlm as its training loop does, with the output head fused into the cross-entropy
(`model(x, targets=y)`, model/loss.py), transformers as float32 cross-entropy over its logits, which is
what its `labels=` loss does. A third row runs scratchlm the same way as transformers, to show what the
fused loss is worth. They take turns, round after round, so a change in the machine's load hits both;
each reports its best round. Where the CPU multiplies bfloat16 itself (AMX or AVX-512 BF16), both
precisions are timed: float32, and both models under the same bf16 autocast. The machine's own float32
matmul rate (a large square product on the same threads) is measured alongside, and the training step's
useful FLOPs (`scratchlm.model.info.flops_per_token`) are given as a fraction of it.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from scratchlm.config import build_config
from scratchlm.convert.hf import to_llama
from scratchlm.model.info import count_params, flops_per_token
from scratchlm.model.transformer import Transformer
from scratchlm.runtime import multiplies_bf16_natively
from scratchlm.train.mfu import matmul_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def step_seconds(loss_of, x: torch.Tensor, y: torch.Tensor, params: list[torch.Tensor], steps: int,
                 dtype: torch.dtype = torch.float32) -> float:
    """Mean seconds of one forward + backward over `steps` steps, under autocast to `dtype` unless float32."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(x, y)
        loss.backward()
        for p in params:
            p.grad = None
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tied", action="store_true", help="tie the output head to the embedding")
    p.add_argument("--precision", nargs="+", choices=list(DTYPES), default=None,
                   help="fp32, and bf16 (both models under the same CPU bf16 autocast); default: both where the "
                        "CPU multiplies bfloat16 itself (AMX or AVX-512 BF16), else fp32")
    p.add_argument("--compile", action="store_true", help="also time both models under torch.compile")
    a = p.parse_args()

    import transformers

    torch.set_num_threads(a.threads)
    if a.precision is None:
        a.precision = ["fp32", "bf16"] if multiplies_bf16_natively(torch.device("cpu")) else ["fp32"]
    torch.manual_seed(0)
    cfg = build_config({"model": {"vocab_size": a.vocab, "context": a.context, "d_model": a.d_model,
                                  "n_layers": a.layers, "n_heads": a.heads, "tie_embeddings": a.tied}}).model
    ours = Transformer(cfg).train()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.context, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_base,
        tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(hf_cfg).train()
    weights = dict(ours.state_dict())
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    theirs.load_state_dict(to_llama(weights, cfg), strict=False)

    x = torch.randint(0, cfg.vocab_size, (a.batch, a.context))
    y = torch.randint(0, cfg.vocab_size, (a.batch, a.context))
    with torch.no_grad():
        diff = (ours(x) - theirs(x).logits).abs().max().item()
        fused = ours(x, targets=y).item() - F.cross_entropy(theirs(x).logits.flatten(0, 1).float(), y.flatten()).item()

    def over_logits(forward):
        return lambda t, labels: F.cross_entropy(forward(t).flatten(0, 1).float(), labels.flatten())

    runners = {"scratchlm": (lambda t, labels: ours(t, targets=labels), list(ours.parameters())),
               "scratchlm, plain loss": (over_logits(ours), list(ours.parameters())),
               "transformers": (over_logits(lambda t: theirs(t).logits), list(theirs.parameters()))}
    if a.compile:  # both sides, so that the comparison stays like for like
        ours_c, theirs_c = torch.compile(ours), torch.compile(theirs)
        runners["scratchlm, compiled"] = (lambda t, labels: ours_c(t, targets=labels), list(ours.parameters()))
        runners["transformers, compiled"] = (over_logits(lambda t: theirs_c(t).logits), list(theirs.parameters()))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    n, flops = count_params(cfg), flops_per_token(cfg, a.context)
    print(f"machine: {platform.processor() or platform.machine()}, {a.threads} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, load average {load:.2f}")
    print(f"model: {n['total'] / 1e6:.2f}M parameters (d_model {cfg.d_model}, {cfg.n_layers} layers, "
          f"{cfg.n_heads} heads, ffn {cfg.ffn_hidden}, vocab {cfg.vocab_size}, "
          f"{'tied' if cfg.tie_embeddings else 'untied'}), batch {a.batch} x {a.context}, "
          f"{flops / 1e6:.1f} MFLOP per token; max logit difference {diff:.1e}, "
          f"loss difference {fused:.1e}")
    peak = matmul_flops()
    for precision in a.precision:
        dtype = DTYPES[precision]
        for name, (fwd, params) in runners.items():  # warm-up: first calls allocate, pick kernels, compile
            start = time.perf_counter()
            step_seconds(fwd, x, y, params, 2, dtype)
            if "compiled" in name:
                print(f"  {name}, {precision}: compiled in {time.perf_counter() - start:.0f} s")
        best = {name: float("inf") for name in runners}
        for _ in range(a.rounds):
            for name, (fwd, params) in runners.items():
                best[name] = min(best[name], step_seconds(fwd, x, y, params, a.steps, dtype))
            peak = max(peak, matmul_flops())
        report(precision, best, peak, a.batch * a.context, flops)


def report(precision: str, best: dict[str, float], peak: float, tokens: int, flops: float) -> None:
    bf16 = f"; bfloat16 {matmul_flops(dtype=torch.bfloat16) / 1e9:.1f} GFLOP/s" if precision == "bf16" else ""
    print(f"\n{precision}: float32 matmul, 2048^3: {peak / 1e9:.1f} GFLOP/s{bf16}")
    print(f"{'':24}{'step (ms)':>10}{'tokens/s':>11}{'GFLOP/s':>9}{'of fp32 matmul':>16}")
    for name, seconds in best.items():
        rate = tokens / seconds
        print(f"{name:24}{seconds * 1e3:10.1f}{rate:11,.0f}{rate * flops / 1e9:9.1f}{rate * flops / peak:16.0%}")
    ratio = best["transformers"] / best["scratchlm"]
    print(f"{precision}: scratchlm / transformers: {ratio:.2f}x tokens/s (target 1.2x); scratchlm reaches "
          f"{tokens / best['scratchlm'] * flops / peak:.0%} of the float32 matmul rate (target 60%)")

if __name__ == "__main__":
    main()
