"""Where loraprune keeps what it computes once: converted models and tokenized corpora.

The root is ``~/.cache/loraprune`` unless the ``LORAPRUNE_CACHE`` environment variable names another.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The folder loraprune caches converted models and token ids in."""
    env = os.environ.get("LORAPRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loraprune"
