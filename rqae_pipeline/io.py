"""File-system seams: atomic writes, directory swaps, output checks and the default device.

Every file or directory the package replaces whole goes through here, so a kill at any
instant leaves readers the old version or the new one, never a torn one: files are written
to a sibling temp file, fsynced and renamed (`os.replace` is atomic on POSIX); directories
are built in a sibling staging directory and swapped in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"  # a writer's lock file (store.StoreLock); the only file a fresh output may hold


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 1, default=None) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent, default=default).encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a temp file: a kill mid-save leaves the previous file."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def staging_dir(out: Path) -> Path:
    """A fresh, empty sibling of `out` to build its new contents in (then `swap_in`).
    Raises OSError when the parent is not writable."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, out: Path) -> None:
    """Replace directory `out` (if any) by `tmp`: two renames, so `out` is the old or the new
    directory at every instant but the one between them."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def empty_except_lock(path) -> bool:
    """True when `path` (a local directory or a store URL, see urls.py) does not exist or
    holds nothing but a writer's lock: the only places a new store, codes store or run may
    be created in."""
    from rqae_pipeline.urls import location, names_in

    names = names_in(location(path))
    # `.lock.<host>.<pid>.tmp`: another process's lock record on its way to `.lock` (lock.py)
    return names is None or all(n == LOCK_NAME or (n.startswith(f"{LOCK_NAME}.") and n.endswith(".tmp"))
                                for n in names)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
