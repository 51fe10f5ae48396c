"""scratchlm: build your own language model from scratch."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """A trained model with `.model`, `.tokenizer` and `.config`, from a run or checkpoint folder."""
    from scratchlm.loading import load as _load

    return _load(path, device)
