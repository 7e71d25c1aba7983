"""Where a store lives: a local directory or an fsspec URL (`s3://`, `gs://`, `memory://`, ...).

A location is a `Path` for plain paths and `file://` URLs (handled exactly as local
directories always were) or the URL string for any other scheme; `location()` is the one
place that decides which, so a URL is never mistaken for a relative path (`Path("s3://b/x")`
is the local folder `s3:/b/x`). Remote locations are reached through fsspec, the same
filesystems zarr's `FsspecStore` uses; credentials and endpoints come from the filesystem's
own configuration (for s3fs: the AWS environment variables and config files).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from rqae_pipeline import RQAEError

Location = Path | str  # a local directory, or a URL with a non-file scheme
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # scheme -> `pip install -e ".[extra]"`
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_COLLAPSED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/[^/]")


def scheme_of(value: str | Path) -> str | None:
    match = _SCHEME.match(str(value)) if isinstance(value, str) else None
    return match.group(1).lower() if match else None


def location(value: str | Path) -> Location:
    """`value` as a location: a Path for plain paths and file:// URLs, else the URL with its
    filesystem checked to be installed (RQAEError naming the extra that installs it)."""
    scheme = scheme_of(value)
    if scheme is None:
        path = Path(value).expanduser()  # `--out=~/x` reaches us unexpanded (the shell expands only `~/x`)
        if _COLLAPSED_URL.match(str(path)):  # Path("s3://b/x") is "s3:/b/x": a URL that lost its "//"
            raise RQAEError(f"{value} looks like a URL that lost its '//'; write it as {path.parts[0]}//...")
        return path
    rest = str(value).split("://", 1)[1]
    if scheme in ("file", "local"):
        return _file_url_path(str(value), rest)
    _require_filesystem(scheme)
    if not rest.strip("/"):  # "memory://" would otherwise become the local folder "memory:"
        raise RQAEError(f"{value} names no bucket or path")
    return f"{scheme}://{rest.rstrip('/')}"  # fsspec knows schemes in lower case only


def _file_url_path(value: str, rest: str) -> Path:
    """The local path of a file:// URL: file:///abs, file://localhost/abs, a relative
    file://dir/x as the plain path dir/x; ~ expanded, %-escapes decoded."""
    from urllib.parse import unquote

    if rest.startswith("localhost/"):
        rest = rest[len("localhost"):]
    if not rest:
        raise RQAEError(f"{value} names no path")
    return Path(unquote(rest)).expanduser()


def _require_filesystem(scheme: str) -> None:
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        extra = EXTRAS.get(scheme)
        hint = f'pip install -e ".[{extra}]"' if extra else f"install the fsspec filesystem for {scheme}://"
        raise RQAEError(f"no filesystem for {scheme}:// is installed; {hint}") from None
    except ValueError:
        raise RQAEError(f"unknown URL scheme {scheme}://; use a local path or s3://, gs://, memory://, file://"
                        ) from None


def is_remote(loc: Location) -> bool:
    return isinstance(loc, str) and scheme_of(loc) is not None


def join(loc: Location, *parts: str) -> Location:
    """A child of a location: `Path / part` locally, `url/part` remotely."""
    if is_remote(loc):
        return "/".join([loc.rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(loc).joinpath(*parts)


def sibling(loc: Location, name: str) -> Location:
    """`name` in the same directory (or under the same prefix) as `loc`."""
    if is_remote(loc):
        return f"{loc.rstrip('/').rsplit('/', 1)[0]}/{name}"
    return Path(loc).with_name(name)


def name_of(loc: Location) -> str:
    return loc.rstrip("/").rsplit("/", 1)[-1] if is_remote(loc) else Path(loc).name


def filesystem(loc: str):
    """(fsspec filesystem, path inside it) of a remote location."""
    from fsspec.core import url_to_fs

    return url_to_fs(loc)


def is_file(loc: Location, key: str = "") -> bool:
    """Does the file (object) `key` under `loc` (or `loc` itself) exist?"""
    return _size_or_none(loc, key) is not None


def file_sizes(loc: Location, keys: list[str]) -> list[int | None]:
    """Bytes of each file (object) `key` under `loc`, None where there is none. On an
    asynchronous object-store filesystem (s3fs, gcsfs) the requests are made at once, so
    checking a shuffle buffer's shards waits about one round trip instead of one per shard."""
    fs = filesystem(loc)[0] if is_remote(loc) and len(keys) > 1 else None
    if not getattr(fs, "async_impl", False):
        return [_size_or_none(loc, key) for key in keys]
    from fsspec.asyn import sync

    root = filesystem(loc)[1].rstrip("/")

    async def size(key: str) -> int | None:
        fs.invalidate_cache(f"{root}/{key}")  # as in _size_or_none
        try:
            info = await fs._info(f"{root}/{key}")
        except FileNotFoundError:
            return None
        return int(info["size"]) if info["type"] == "file" else None

    async def sizes() -> list[int | None]:
        return list(await asyncio.gather(*(size(key) for key in keys)))

    try:
        return sync(fs.loop, sizes)
    except OSError:
        raise
    except Exception as e:  # as in _size_or_none
        raise ConnectionError(f"{type(e).__name__}: {e}") from e


def _size_or_none(loc: Location, key: str) -> int | None:
    """Bytes of file `key` under `loc` (or of `loc` itself), None where there is none."""
    if not is_remote(loc):
        path = Path(loc) / key if key else Path(loc)
        return path.stat().st_size if path.is_file() else None
    fs, path = filesystem(join(loc, key) if key else loc)
    fs.invalidate_cache(path)  # a listing cached earlier would answer for objects written or deleted since
    try:  # not fs.isfile: it answers False for every error, so an unreachable endpoint read as "no store"
        info = fs.info(path)
    except FileNotFoundError:
        return None
    except OSError:
        raise
    except Exception as e:  # botocore/aiohttp connection errors are not OSErrors
        raise ConnectionError(f"{type(e).__name__}: {e}") from e
    return int(info["size"]) if info["type"] == "file" else None


def size_of(loc: Location, key: str) -> int:
    """Bytes of file `key` under `loc`; 0 when it is missing."""
    if not is_remote(loc):
        p = Path(loc) / key
        return p.stat().st_size if p.is_file() else 0
    fs, path = filesystem(join(loc, key))
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return 0


def names_in(loc: Location) -> list[str] | None:
    """Names directly under `loc`; None when nothing is there (no directory, no prefix)."""
    if not is_remote(loc):
        p = Path(loc)
        return None if not p.exists() else [c.name for c in p.iterdir()] if p.is_dir() else [p.name]
    fs, path = filesystem(loc)
    try:
        entries = fs.ls(path, detail=False, refresh=True)
    except FileNotFoundError:
        return None
    return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries] or None


def sizes_under(loc: str, prefix: str) -> dict[str, int]:
    """Bytes of each object under `loc`/`prefix`, by key relative to `loc` (a remote location)."""
    fs, root = filesystem(loc)
    root = root.rstrip("/")
    path = f"{root}/{prefix}".rstrip("/")
    found = fs.find(path, refresh=True, detail=True) if fs.exists(path) else {}
    return {f[len(root) + 1:]: int(info["size"]) for f, info in found.items()}


def sizes_of_all(loc: Location) -> dict[str, int]:
    """Bytes of every file (object) under `loc`, by key relative to it."""
    if not is_remote(loc):
        root = Path(loc)
        return {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()}
    return sizes_under(loc, "")


def total_bytes(loc: Location) -> int:
    if not is_remote(loc):
        return sum(f.stat().st_size for f in Path(loc).rglob("*") if f.is_file())
    fs, path = filesystem(loc)
    return int(fs.du(path))


def zarr_location(loc: Location) -> Path | str:
    """What to hand zarr: a local directory as a Path (as a string, a name containing "::"
    or looking like a URL would be read as an fsspec URL), a URL as its string."""
    return loc if isinstance(loc, Path) else str(loc)


def open_group(path: Location, mode: str):
    """The store's zarr group: zarr opens a URL through its FsspecStore, a path as a LocalStore."""
    import zarr

    try:
        return zarr.open_group(zarr_location(path), mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise RQAEError(f"no activation store at {path}") from None
    except Exception as e:  # zarr raises several types for "not a group"
        raise RQAEError(f"{path} is not an activation store ({type(e).__name__})") from e


def store_exists(path: str | Path) -> bool:
    """Is there a store (its group's zarr.json) at `path`, a local directory or a URL?"""
    return exists(location(path), "zarr.json")


def exists(path: Location, key: str) -> bool:
    """Like `is_file`, but an unreachable or forbidden remote location is one error line."""
    try:
        return is_file(path, key)
    except OSError as e:
        raise RQAEError(f"cannot read {path}: {e.strerror or e}") from None


def check_writable(path: Location) -> None:
    try:
        if is_remote(path):
            fs, probe = filesystem(join(path, ".write-probe"))
            fs.pipe_file(probe, b"x")
            fs.rm_file(probe)
            return
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise RQAEError(f"cannot write to {path}: {e.strerror or e}") from None
