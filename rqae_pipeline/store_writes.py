"""The writing half of `ActivationStore` (store.py): shard writes, growing the row arrays ahead
of them, commits, and cutting back what lies past the last commit. Only the writer that holds
the store's lock calls these (the single-process harvest, or the dask client and its workers).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from zarr.core.array import AsyncArray
from zarr.core.sync import sync

from rqae_pipeline import RQAEError, codec
from rqae_pipeline.integrity import drain_zarr_tasks
from rqae_pipeline.store_format import row_arrays
from rqae_pipeline.urls import is_remote

UNFINISHED_WRITE = re.compile(r"[0-9a-f]{32}\.partial")  # zarr LocalStore's temporary name suffix


class StoreWrites:
    """Mixed into `ActivationStore`, which provides `path`, `group`, `spec`, `manifest`,
    `n_tokens`, and the caches `_arrays` (read) and `_writable` (write)."""

    def write_rows(self, start: int, cols: dict[str, np.ndarray], *, grow_to: int | None = 0) -> None:
        """Write encoded columns at rows [start, start + n). An array too short for them is first
        grown to max(start + n, grow_to) rows; `grow_to=None` (a dask worker, whose client sized
        the arrays) refuses instead, so a worker never rewrites metadata under other writers.
        Not a commit."""
        stop = start + len(cols["scale"])
        self._arrays.clear()  # the arrays grow: reopen them for the next read

        async def write(name: str, data: np.ndarray) -> None:
            arr = await self._for_writing(name, stop, None if grow_to is None else max(stop, grow_to))
            await arr.setitem(slice(start, stop), data)

        # The columns go out together (on an object store their requests overlap rather than
        # wait on each other's round trips).
        self._all_at_once(write(k, v) for k, v in cols.items())

    def reserve_rows(self, rows: int) -> None:
        """Make every row array at least `rows` long, all at once (metadata only: no shard is
        written). Rows past the commit are invisible to readers and cut by the next resume."""
        self._all_at_once(self._for_writing(name, rows, rows) for name in row_arrays(self.spec))

    async def _for_writing(self, name: str, rows: int, grow_to: int | None) -> AsyncArray:
        """Array `name` opened for writing, at least `rows` long: grown to `grow_to` rows when
        shorter (None: an RQAEError). Kept open between writes (opening parses its metadata, a
        round trip on an object store): only the process holding this object resizes them (a
        dask worker opens the store afresh for each shard, its client sized it before)."""
        arr = self._writable.get(name)
        if arr is None:
            arr = await AsyncArray.open(self.group.store_path / name)
            # Write every shard, all-zero ones too (zarr skips those by default), so that a
            # missing shard file always means damage (see integrity.py).
            arr = arr.with_config({"write_empty_chunks": True})
        if arr.shape[0] < rows:
            if grow_to is None:
                raise RQAEError(f"store {self.path}: array {name} ends before row {rows}; its client did not "
                                f"size it for this shard")
            await arr.resize((grow_to,) + arr.shape[1:])
        self._writable[name] = arr
        return arr

    @staticmethod
    def _all_at_once(coroutines) -> None:
        """Run zarr coroutines together; every one ends, failed or not, before the first
        failure is raised (none runs on behind the caller)."""

        async def gather() -> list:
            return await asyncio.gather(*coroutines, return_exceptions=True)

        failed = [e for e in sync(gather()) if isinstance(e, BaseException)]
        if failed:
            drain_zarr_tasks()  # a failed column's sibling chunk writes
            raise failed[0]

    def set_array(self, name: str, data: np.ndarray) -> None:
        self._arrays.clear()
        if name in self.group:
            self.group[name][:] = data
        else:
            self.group.create_array(name, data=data, compressors=codec.compressors(str(data.dtype)))

    def commit(self, *, tokens: int, contexts: int, corpus_state: Sequence, complete: bool = False,
               extra: dict | None = None) -> None:
        """Make rows [0, tokens) visible: one atomic rewrite of the group's zarr.json."""
        manifest = dict(self.manifest)
        manifest["committed"] = {"tokens": int(tokens), "contexts": int(contexts),
                                 # [doc_index, token_offset(, stream state)]: CorpusState.to_manifest()
                                 "corpus_state": [int(corpus_state[0]), int(corpus_state[1]), *corpus_state[2:]],
                                 "complete": bool(complete)}
        if extra:
            manifest.update(extra)
        self.group.attrs["rqae"] = manifest
        self.manifest = manifest

    def truncate_to_committed(self) -> None:
        """Drop rows past the last commit, and unfinished shard writes (left by an interrupted
        writer or a killed worker)."""
        self.shrink_to_committed()
        self.drop_unfinished_writes()

    def shrink_to_committed(self) -> None:
        """Cut the row arrays back to the committed rows: rows reserved or written past the
        last commit, and their shard files, are dropped."""
        n = self.n_tokens
        self._arrays.clear()
        self._writable.clear()
        arrays = {name: self.group[name] for name in row_arrays(self.spec)}
        short = [f"{name} ({arr.shape[0]:,})" for name, arr in arrays.items() if arr.shape[0] < n]
        if short:  # growing them would commit fill values, zeros, as rows
            raise RQAEError(f"store {self.path}: the manifest commits {n:,} rows but {', '.join(short)} hold fewer; "
                            f"the store is damaged (`rqae verify` lists it) and was left as it is")
        for arr in arrays.values():
            if arr.shape[0] != n:
                arr.resize((n,) + arr.shape[1:])

    def drop_unfinished_writes(self) -> None:
        """Delete zarr's `<key>.<uuid>.partial` files: a local write goes to one and is renamed
        over its key when whole, so one left behind is a write whose process was killed. Only
        for the lock holder with no write running; object stores put whole objects."""
        if not is_remote(self.path):
            for p in Path(self.path).rglob("*.partial"):
                if UNFINISHED_WRITE.fullmatch(p.name.split(".", 1)[-1]):
                    p.unlink(missing_ok=True)
