"""Supervised fine-tuning data: formats, persona, mixtures and batches (see `data.py`)."""
from scratchlm.sft.data import (
    IGNORE, Example, SFTBatches, SFTData, SFTSource, SFTSplit, TokenizeStats, load_mixture, load_source,
    parse_source, prepare_sft, sft_evaluator, tokenize_chat, tokenize_chats,
)
from scratchlm.sft.persona import Persona

__all__ = ["IGNORE", "Example", "Persona", "SFTBatches", "SFTData", "SFTSource", "SFTSplit", "TokenizeStats",
           "load_mixture", "load_source", "parse_source", "prepare_sft", "sft_evaluator", "tokenize_chat",
           "tokenize_chats"]
