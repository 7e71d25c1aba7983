"""Where the project keeps things it derives once and reuses (converted weights, tokenizers)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """Directory for converted model weights; `RQAE_CACHE` overrides `~/.cache/rqae_pipeline`."""
    env = os.environ.get("RQAE_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rqae_pipeline"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
