"""The optional packages that conversion needs, imported only when a conversion asks for them, so the rest
of scratchlm works without them."""
from __future__ import annotations

import importlib

from scratchlm.errors import UserError

INSTALL = "pip install 'scratchlm[hf]'"


def require(module: str, purpose: str):
    """Import `module` or fail with one line that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{purpose} needs the '{module.split('.')[0]}' package: {INSTALL}") from None
