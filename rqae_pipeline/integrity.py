"""Checked reads of a store's arrays: a missing or damaged shard is an error, never data.

Zarr reads a missing shard as the fill value (zeros) without complaint, so before a read
every shard file the read covers is stat'ed (a few stats per read: negligible next to the
decompression; on an object store, one HEAD request per shard through its fsspec filesystem,
all of a read's requests at once).
Chunks written since checksums were added carry a crc32c (see
`codec.compressors`) and the shard index always has one, so corrupted bytes raise inside
zarr; the error is turned into one line naming the store, the array and the shard file.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.urls import Location, file_sizes, is_remote, join, sizes_under


def shard_rows(arr) -> int:
    """Rows per shard (per chunk, for an unsharded array): the outer chunk grid."""
    return int(arr.metadata.chunk_grid.chunk_shape[0])


def shard_key(arr, name: str, i: int) -> str:
    """The shard's object key inside the store, e.g. `acts/c/3/0` or `flags/c/3`."""
    return f"{name}/" + arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))


def shards_of(arr, rows: slice | np.ndarray) -> list[int]:
    per = shard_rows(arr)
    if isinstance(rows, slice):
        start, stop, _ = rows.indices(arr.shape[0])
        return list(range(start // per, -(-stop // per))) if stop > start else []
    return np.unique(np.asarray(rows, dtype=np.int64) // per).tolist()


def has_chunk_checksums(arr) -> bool:
    from zarr.codecs import Crc32cCodec, ShardingCodec

    codecs = arr.metadata.codecs
    if codecs and isinstance(codecs[0], ShardingCodec):
        codecs = codecs[0].codecs  # the inner chunks' pipeline (the shard index always has a crc32c)
    return any(isinstance(c, Crc32cCodec) for c in codecs)


def may_omit_shards(arr, name: str) -> bool:
    """Stores written before checksums also let zarr skip writing all-zero shards
    (write_empty_chunks=False). Of the row arrays only `flags` is realistically zero over a
    whole shard, so such a store's missing flags shard still reads as zeros, as it did."""
    return name == "flags" and not has_chunk_checksums(arr)


def unusable_shards(root: Location, arr, name: str, shards: Iterable[int]) -> dict[str, str]:
    """{key: "missing" | "empty"} of the shard files of `shards` that are absent or hold no
    bytes: zarr reads both as the fill value (an empty file is a write that never reached
    the disk, e.g. a crash before it was synced; every written shard holds at least its
    index)."""
    if may_omit_shards(arr, name):
        return {}
    return unusable_of(arr, name, shard_sizes(root, arr, name, shards))


def unusable_of(arr, name: str, sizes: dict[str, int | None]) -> dict[str, str]:
    """`unusable_shards` of shard files whose sizes are known (`shard_sizes`)."""
    if may_omit_shards(arr, name):
        return {}
    return {key: "missing" if size is None else "empty" for key, size in sizes.items() if not size}


def shard_sizes(root: Location, arr, name: str, shards: Iterable[int]) -> dict[str, int | None]:
    """{key: bytes, None where absent} of the shard files of `shards`, in their order."""
    keys = [shard_key(arr, name, i) for i in shards]
    if is_remote(root) and len(keys) > max(4, listing_pages(arr)):  # fewer requests than one per shard
        listed = sizes_under(root, f"{name}/")
        sizes = [listed.get(key) for key in keys]
    else:
        sizes = file_sizes(root, keys)
    return dict(zip(keys, sizes, strict=True))


def missing_shards(root: Location, arr, name: str, shards: Iterable[int]) -> list[str]:
    """Keys of the shard files of `shards` that are absent or empty (`unusable_shards`)."""
    return list(unusable_shards(root, arr, name, shards))


def listing_pages(arr) -> int:
    """Requests a listing of all of an array's shards takes (object stores list 1,000 keys a
    page): a read that checks more shards than this lists them, a smaller one asks for each
    (a shuffle buffer's ~14 shards of a 1B-row store: 14 requests, not a 61-page listing)."""
    return -(-arr.shape[0] // shard_rows(arr)) // 1000


def require_shards(root: Location, arr, name: str, shards: Iterable[int]) -> None:
    unusable = unusable_shards(root, arr, name, shards)
    if unusable:
        key, what = next(iter(unusable.items()))
        raise RQAEError(f"store {root}: array {name}: shard file {join(root, key)} is {what}"
                        f"{f' (and {len(unusable) - 1} more)' if len(unusable) > 1 else ''}; "
                        f"see `rqae verify {root}` and docs on repairing a store")


def require_rows(root: Location, arr, name: str, rows: slice | np.ndarray | int) -> None:
    """Refuse rows past the array's end: zarr would return fewer rows than asked, silently
    (a manifest that commits more rows than an array holds: a copy taken mid-write)."""
    if isinstance(rows, slice):
        end = rows.stop
    else:
        rows = np.asarray(rows)
        end = int(rows.max()) + 1 if rows.size else None
    if end is not None and end > arr.shape[0]:
        raise RQAEError(f"store {root}: array {name} holds {arr.shape[0]:,} rows, not the {end:,} asked for (its "
                        f"manifest commits rows that were never written); see `rqae verify {root}`")


def read_checked(root: Location, arr, name: str, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of one array as stored (a slice or sorted row indices), or RQAEError naming the
    missing or damaged shard."""
    require_rows(root, arr, name, rows)
    shards = shards_of(arr, rows)
    require_shards(root, arr, name, shards)
    try:
        return _read(arr, rows)
    except Exception as e:  # noqa: BLE001  zarr and its codecs raise many types for damaged bytes
        drain_zarr_tasks()
        raise damage_error(root, arr, name, shards, e) from None


def read_checked_ranges(root: Location, arr, name: str, ranges: list[slice]) -> list[np.ndarray]:
    """`read_checked` of several row ranges of one array, read concurrently: zarr fetches and
    decodes their chunks on its event loop and thread pool at once, where one range after
    another would leave all cores but one idle and, on an object store, wait out each
    request in turn."""
    from zarr.core.sync import sync

    for rows in ranges:
        require_rows(root, arr, name, rows)
    shards = sorted({i for rows in ranges for i in shards_of(arr, rows)})
    require_shards(root, arr, name, shards)

    async def read_all():
        return await asyncio.gather(*(arr.async_array.getitem(rows) for rows in ranges))

    try:
        return list(sync(read_all()))
    except Exception as e:  # noqa: BLE001  as in read_checked
        drain_zarr_tasks()
        raise damage_error(root, arr, name, shards, e) from None


class CheckedRows:
    """An array-like over one store array whose every read is `read_checked`: what a dask
    array built on it reads (`dask_rows`) is checked when its chunks are computed, not only
    when the graph is built (a shard deleted in between would read as zeros)."""

    def __init__(self, root: Location, arr, name: str, n_rows: int):
        self.root, self.arr, self.name = root, arr, name
        self.shape, self.dtype, self.ndim = (n_rows,) + tuple(arr.shape[1:]), arr.dtype, arr.ndim

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows = slice(*key[0].indices(self.shape[0]))
        if rows.step != 1:
            raise IndexError("checked store views read contiguous rows")
        return read_checked(self.root, self.arr, self.name, rows)[(slice(None),) + key[1:]]

    def __dask_tokenize__(self):  # dask names the array by this, not by hashing the zarr object
        return ("checked-rows", str(self.root), self.name, self.shape)


def dask_rows(root: Location, arr, name: str, n_rows: int, block_rows: int):
    """The first `n_rows` rows of `arr` as a dask array of `block_rows`-row chunks, each read
    checked (`CheckedRows`); the shards are also checked once now, so a gap is an error at
    once rather than on the first compute."""
    import dask.array as da

    require_shards(root, arr, name, shards_of(arr, slice(0, n_rows)))
    view = CheckedRows(root, arr, name, n_rows)
    return da.from_array(view, chunks=(block_rows,) + view.shape[1:], asarray=False, fancy=False)


def _read(arr, rows: slice | np.ndarray) -> np.ndarray:
    if isinstance(rows, slice):
        return arr[rows]
    return arr.get_orthogonal_selection((np.asarray(rows),) + (slice(None),) * (arr.ndim - 1))


def shard_error(arr, i: int) -> Exception | None:
    """The error reading shard `i` whole raises, or None when it reads."""
    per = shard_rows(arr)
    try:
        arr[i * per : min((i + 1) * per, arr.shape[0])]
    except Exception as e:  # noqa: BLE001  as above
        drain_zarr_tasks()
        return e
    return None


def describe(e: Exception) -> str:
    text = str(e)
    if "checksum" in text.lower():
        return "checksum mismatch: the bytes on disk are not the bytes written"
    return f"unreadable: {type(e).__name__}: {text[:200]}"


def damage_error(root: Location, arr, name: str, shards: list[int], first: Exception) -> RQAEError:
    """Find which of `shards` fails on its own (the read that failed may span several)."""
    for i in shards:
        e = shard_error(arr, i)
        if e is not None:
            return RQAEError(f"store {root}: array {name}: shard file {join(root, shard_key(arr, name, i))} is damaged "
                             f"({describe(e)}); see `rqae verify {root}` and docs on repairing a store")
    return RQAEError(f"store {root}: reading array {name} failed ({describe(first)})")


_DRAINING = threading.Lock()


def drain_zarr_tasks() -> None:
    """Wait for the sibling tasks of a zarr read that raised. zarr gathers a read's chunk
    tasks without cancelling the rest when one fails; left pending, they are reported as
    "Task was destroyed but it is pending!" at exit. One thread drains at a time: two drains
    on zarr's loop at once would each wait for the other."""
    from zarr.core.sync import sync

    async def wait_for_others():
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        await asyncio.gather(*others, return_exceptions=True)

    try:
        with _DRAINING:
            sync(wait_for_others())
    except Exception:  # noqa: BLE001, S110  best effort: the read's own error is the one to report
        pass
