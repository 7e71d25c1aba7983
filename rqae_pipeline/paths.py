"""Where the project keeps things it derives once and reuses (converted weights, tokenizers)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Directory for converted model weights; `RQAE_CACHE` overrides `~/.cache/rqae_pipeline`
    (`$XDG_CACHE_HOME/rqae_pipeline` where that is set). `~` is expanded; an empty or relative
    XDG_CACHE_HOME is ignored, as the XDG spec says (a relative one would put the cache in
    whatever directory a command runs from)."""
    env = os.environ.get("RQAE_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
    return base / "rqae_pipeline"
