"""Attention maps: for a prompt, the softmax weights of every head of every layer, drawn as a grid of
heat maps (a row per layer, a column per head) with the prompt's tokens on both axes.

The weights come from the model's explicit attention path, which each attention module takes while its
`keep_weights` flag is set; the flag is cleared afterwards, so the model is left as it was.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scratchlm.errors import UserError
from scratchlm.runtime import eval_mode
from scratchlm.viz.plots import save_figure, plt

LABELLED_TOKENS = 48     # past this many tokens the axes get no labels: they would overlap


@torch.no_grad()
def attention_maps(model, ids: list[int]) -> list[torch.Tensor]:
    """One (heads, T, T) tensor per layer: row i is how query position i spreads over positions 0..i."""
    modules = [block.attn for block in model.blocks]
    try:
        for m in modules:
            m.keep_weights, m.last_weights = True, None
        device = next(model.parameters()).device
        with eval_mode(model):
            model(torch.tensor([ids], device=device))
        maps = [m.last_weights[0].float().cpu() for m in modules]
    finally:
        for m in modules:
            m.keep_weights, m.last_weights = False, None
    return maps


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text with line breaks and spaces made visible."""
    out = []
    for t in ids:
        text = tokenizer.decode_bytes([t], errors="replace").decode("utf-8", errors="replace")
        out.append(text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or "∅")
    return out


def plot_attention(maps: list[torch.Tensor], labels: list[str], out: Path, layers: list[int] | None = None,
                   title: str = "") -> Path:
    """A grid of heat maps, one row per chosen layer and one column per head, written to `out`."""
    layers = list(range(len(maps))) if layers is None else layers
    heads, T = maps[0].shape[0], maps[0].shape[-1]
    cell = 2.6 if T <= 16 else 3.4 if T <= LABELLED_TOKENS else 2.6
    fig, axes = plt.subplots(len(layers), heads, figsize=(cell * heads + 0.6, cell * len(layers) + 0.8),
                             squeeze=False)
    for row, layer in enumerate(layers):
        for h in range(heads):
            ax = axes[row][h]
            weights = maps[layer][h].numpy()
            # The future is blank rather than dark, so a 0 the model chose is not mistaken for the mask.
            shown = np.ma.masked_where(np.triu(np.ones_like(weights, dtype=bool), k=1), weights)
            ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {h}", fontsize=8)
            if T <= LABELLED_TOKENS:
                size = 7 if T <= 16 else 5
                ax.set_xticks(range(T), labels, rotation=90, fontsize=size)
                ax.set_yticks(range(T), labels, fontsize=size)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if h == 0:
                ax.set_ylabel("query (attending)", fontsize=7)
            if row == len(layers) - 1:
                ax.set_xlabel("key (attended to)", fontsize=7)
    fig.suptitle((title + "\n" if title else "") + "attention weight: 0 dark to 1 yellow; each row sums to 1",
                 fontsize=9)
    return save_figure(fig, out)


def plot_checkpoint_attention(checkpoint: str, prompt: str, out: Path, layer: int | None = None,
                              device: str = "cpu") -> tuple[Path, int]:
    """Load a checkpoint, run the prompt through it and draw its attention. Returns (file, tokens shown)."""
    from scratchlm.loading import load

    loaded = load(checkpoint, device)
    ids = loaded.tokenizer.encode(prompt)
    if not ids:
        raise UserError("--prompt is empty; give some text to look at")
    n_layers, context = loaded.config.model.n_layers, loaded.config.model.context
    if layer is not None and not 0 <= layer < n_layers:
        raise UserError(f"--layer {layer}: this model has layers 0 to {n_layers - 1}")
    if len(ids) > context:
        ids = ids[-context:]  # what the model would see of a prompt this long
    maps = attention_maps(loaded.model, ids)
    title = f"{Path(checkpoint).name}: {len(ids)} tokens, {loaded.config.model.position} positions"
    path = plot_attention(maps, token_labels(loaded.tokenizer, ids), Path(out),
                          None if layer is None else [layer], title)
    return path, len(ids)
