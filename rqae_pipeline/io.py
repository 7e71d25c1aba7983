"""File-system seams: atomic writes, directory swaps, output checks, checked JSON reads and the
default device.

Every file or directory the package replaces whole goes through here, so a kill at any
instant leaves readers the old version or the new one, never a torn one: files are written
to a sibling temp file, fsynced and renamed (`os.replace` is atomic on POSIX); directories
are built in a sibling staging directory and swapped in.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rqae_pipeline import RQAEError

LOCK_NAME = ".lock"  # a writer's lock file (store.StoreLock); the only file a fresh output may hold


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old file or the new one, never a torn one."""
    _atomic_write(path, lambda f: f.write(data))


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """`write(f)` into a sibling temp file, fsynced and renamed over `path`. A failure (the
    path a directory, a full disk) removes the temp file; only a kill can leave one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(out: Path, option: str = "--out") -> None:
    """Refuse an output file that could not be written, before the work that fills it rather
    than after: a directory, or a path under an existing file."""
    out = Path(out)
    try:
        if out.is_dir():
            raise RQAEError(f"{option} {out} is a directory; name the file to write")
        parent = next((p for p in out.parents if p.exists()), None)
    except OSError as e:  # a folder on the way that this user may not read
        raise RQAEError(f"cannot write {out}: {e.strerror or e}") from None
    if parent is not None and not parent.is_dir():
        raise RQAEError(f"{option} {out}: {parent} is a file, not a directory")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 1, default=None) -> None:
    atomic_write_bytes(path, json_text(obj, indent=indent, default=default).encode())


def json_text(obj: Any, *, indent: int | None = 1, default=None) -> str:
    """Strict JSON of a result: NaN and infinities (a standard error of one context, an
    undefined ratio) are written as null, which every JSON reader takes, not as the bare
    NaN Python writes and strict parsers refuse."""
    return json.dumps(finite_or_null(obj), indent=indent, default=default, allow_nan=False)


def finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a temp file: a kill mid-save leaves the previous file."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f))


def read_json(path: Path, fields: Mapping[str, type | tuple[type, ...]] | None = None, *, fix: str = "") -> dict:
    """The JSON object in `path`, its `fields` ("key", "key.sub" or "key.0.sub" -> the type(s) it
    must hold; a missing field reads as None) checked. A file cut short, hand-edited or from
    another tool is the user's to repair: one error line naming the file and what is wrong (then
    `fix`, a hint such as "; delete it to ..."), never a traceback from deep inside its reader."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise RQAEError(f"{path} cannot be read as JSON ({getattr(e, 'strerror', None) or e}){fix}") from None
    if not isinstance(data, dict):
        raise RQAEError(f"{path} holds no JSON object{fix}")
    return checked_fields(data, path, fields or {}, fix=fix)


def checked_fields(data: dict, path: Path, fields: Mapping[str, type | tuple[type, ...]], *, fix: str = "") -> dict:
    """`data` (read from `path`) when its `fields` hold the types `read_json` says; else one error line."""
    for key, kind in fields.items():
        if not is_a(_field(data, key), kind):
            raise RQAEError(f"{path}: {key} {_not_a(kind)}{fix}")
    return data


def is_a(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a JSON true/false is no number (bool subclasses int in Python)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


def _field(data: Any, key: str) -> Any:
    """data["a"]["b"][0] for key "a.b.0"; None where the path leads nowhere."""
    for part in key.split("."):
        if isinstance(data, list):
            data = data[int(part)] if part.isdigit() and int(part) < len(data) else None
        else:
            data = data.get(part) if isinstance(data, dict) else None
    return data


def _not_a(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = " or ".join(t.__name__ for t in kinds if t is not type(None))
    return f"is not of type {names}" if type(None) in kinds else f"is missing or not of type {names}"


def staging_dir(out: Path) -> Path:
    """A fresh, empty sibling of `out` to build its new contents in (then `swap_in`).
    Raises OSError when the parent is not writable."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}.{socket.gethostname()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _remove_orphans(out)
    return tmp


def _remove_orphans(out: Path) -> None:
    """Staging folders of `out` that a killed builder left: this host's (the host is in the
    name, as in lock.py) whose process is gone. Another host's, or a live one's, are left alone.
    A swapped-out `.NAME.oldPID` is never removed here: after a kill between `swap_in`'s
    two renames it holds the only copy of the previous output."""
    import psutil

    prefix, host = f".{out.name}.tmp", socket.gethostname()
    for path in out.parent.glob(f".{out.name}.tmp*"):
        pid, _, its_host = path.name.removeprefix(prefix).partition(".")
        if its_host == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp: Path, out: Path) -> None:
    """Replace directory `out` (if any) by `tmp`: two renames, so `out` is the old or the new
    directory at every instant but the one between them."""
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def ensure_built(out: Path, marker: str, build: Callable[[Path], None]) -> None:
    """Build the derived directory `out` (a cache) with `build(out)` unless `out/marker`
    exists. Processes that want it at the same moment (a first run of parallel tests or
    commands) wait on a file lock beside it, and all but the first then find it built:
    two builds would double a minutes-long conversion and race on the swap."""
    out = Path(out)
    if (out / marker).exists():
        return
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(f".{out.name}.lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except OSError:  # a file system without locks (some NFS and FUSE mounts): build unguarded
            pass
        if not (out / marker).exists():
            build(out)


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


@contextlib.contextmanager
def sigint_handler(handler):
    """SIGINT handled by `handler` (a function, or signal.SIG_IGN) inside the block, the
    previous handler back after it; outside the main thread, which alone receives signals,
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
