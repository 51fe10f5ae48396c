"""Tiny models, tokenizers and run folders for the chat, generation and serving tests: byte-level
tokens (so expected ids can be written by hand) and a model of a few thousand parameters."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from scratchlm.chat.template import add_chat_tokens
from scratchlm.config import RunConfig, build_config
from scratchlm.model.transformer import Transformer
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.checkpoint import save_checkpoint

BASE_SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


@contextlib.contextmanager
def one_thread():
    """Tiny matrices gain nothing from two threads, and on a busy machine the threads' waiting for each
    other makes every step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def byte_tokenizer(chat: bool = True) -> Tokenizer:
    """Ids 0-255 are the bytes, then <pad> <unk> <bos> <eos> (256-259), then the chat tokens (260-263)."""
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], BASE_SPECIALS)
    return add_chat_tokens(tok)[0] if chat else tok


def tiny_model(vocab_size: int, seed: int = 0, scale: float = 1.0, **model) -> Transformer:
    settings = {"vocab_size": vocab_size, "context": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, **model}
    cfg = build_config({"model": settings}).model
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    if scale != 1.0:  # larger weights spread the logits, so greedy choices are far from ties
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() >= 2:
                    p.mul_(scale)
    return m


def make_run(path: Path, chat: bool = True, **model) -> Path:
    """A run folder as training leaves one: config.toml, tokenizer/, checkpoints/step_00000001/."""
    tok = byte_tokenizer(chat)
    m = tiny_model(tok.vocab_size, scale=8.0, **model)
    cfg = RunConfig()
    cfg.model = m.config
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path / "tokenizer")
    cfg.save(path / "config.toml")
    save_checkpoint(path, 1, m, None, {"tokens": 0})
    return path
