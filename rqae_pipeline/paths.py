"""Where the project keeps things it derives once and reuses (converted weights, tokenizers)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Directory for converted model weights; `RQAE_CACHE` overrides `~/.cache/rqae_pipeline`."""
    env = os.environ.get("RQAE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rqae_pipeline"
