"""Byte-level BPE tokenization: train a vocabulary (`train_bpe`) and encode/decode with it (`Tokenizer`)."""
from scratchlm.tokenizer.bpe import train_bpe
from scratchlm.tokenizer.pretokenize import GPT2_SPLIT_PATTERN
from scratchlm.tokenizer.simple import train_char_vocab, train_word_vocab
from scratchlm.tokenizer.normalize import normalize_uncased
from scratchlm.tokenizer.tokenizer import Tokenizer

__all__ = ["GPT2_SPLIT_PATTERN", "Tokenizer", "normalize_uncased", "train_bpe", "train_char_vocab",
           "train_word_vocab"]
