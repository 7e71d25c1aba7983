"""The activation store: a self-describing Zarr v3 group of normalised residual activations.

```
STORE/            attrs["rqae"] = manifest (identity, provenance, commit state)
  acts    (N, d)  float16 | float32 | uint8 (compact: e4m3 bit patterns of (x - mean) / row_scale)
  scale   (N,)    float32  per-token RMS of the raw activation
  tokens  (N,)    int32    token id
  seq     (N,)    int64    context index
  pos     (N,)    int16    position inside the context
  flags   (N,)    uint8    Flags bits: special tokens and norm outliers
  gain    (d,)    float32  final-norm gain used ("final-norm" mode; ones in "rms" mode)
  mean, row_scale          compact mode only: (d,) float32 and (N,) float32
```
Rows are appended a shard at a time (a shard = `contexts_per_shard` whole contexts) and
only count once the manifest's `committed` block names them; the manifest lives in the
group's `zarr.json`, which zarr's LocalStore writes by temp file + rename, so a kill at
any instant leaves the previous commit intact. Arrays may hold more rows than committed
(an interrupted shard); readers never look past `committed.tokens`.

A store may also live at an fsspec URL (`s3://bucket/x.zarr`, `gs://...`, `memory://...`;
see urls.py), opened through zarr's own `FsspecStore`. There is no rename on an object
store; the commit stays atomic because the manifest is one object (`zarr.json`), written
by a single PUT after every shard it names has been written (zarr returns from a write
only once all its chunk PUTs have completed), and a PUT is all-or-nothing: readers see
the previous manifest or the new one. A shard object cut short by a kill never exists.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError, codec
from rqae_pipeline.codec import decode_acts
from rqae_pipeline.corpus_files import describe_change, without_files
from rqae_pipeline.integrity import (
    dask_rows,
    read_checked,
    read_checked_ranges,
    require_rows,
    require_shards,
    shards_of,
)
from rqae_pipeline.io import checked_fields
from rqae_pipeline.lock import StoreLock
from rqae_pipeline.store_format import (  # noqa: F401  (re-exported: the store's public names)
    ROW_ARRAYS,
    SCHEMA_VERSION,
    Flags,
    Rows,
    StoreSpec,
    array_layout,
    layout_problem,
    row_arrays,
    tokenizer_name,
)
from rqae_pipeline.store_writes import UNFINISHED_WRITE, StoreWrites  # noqa: F401  (re-exported)
from rqae_pipeline.urls import Location, check_writable, exists, is_remote, location, open_group, total_bytes

# --------------------------------------------------------------------------- the store


class ActivationStore(StoreWrites):
    """Open stores with `ActivationStore.open` (read) or `.create` / `.open_for_append` (write)."""

    def __init__(self, path: Location, group, manifest: dict):
        self.path = path
        self.group = group
        self.manifest = manifest
        self.spec = StoreSpec(**manifest["spec"])
        self._arrays: dict = {}  # zarr arrays opened for reading (`_array`)
        self._writable: dict = {}  # zarr AsyncArrays opened for writing, kept between writes (`_for_writing`)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path) -> ActivationStore:
        path = location(path)
        if not exists(path, "zarr.json"):
            raise RQAEError(f"no activation store at {path}")
        group = open_group(path, "r")
        manifest = group.attrs.get("rqae")
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA_VERSION:
            raise RQAEError(f"{path} is a Zarr group but not an rqae activation store (schema {SCHEMA_VERSION})")
        checked_fields(manifest, path, {"committed.tokens": int, "committed.contexts": int, "committed.complete": bool},
                       fix="; its commit record is damaged: run `rqae verify`, or harvest it again")
        try:
            store = cls(path, group, manifest)
        except (KeyError, TypeError, ValueError) as e:  # fields missing, unknown or of a wrong value
            raise RQAEError(f"{path}: the manifest's spec is not a store spec ({type(e).__name__}: {e})") from None
        store.check_commit_record()
        return store

    def check_commit_record(self) -> None:
        """The commit counts whole contexts: rows = contexts x rows per context, none negative.
        Counts that disagree would put a held-out split mid-context, or read rows never committed."""
        n, ctx, R = self.n_tokens, self.n_contexts, self.spec.rows_per_context
        if n < 0 or ctx < 0 or n != ctx * R:
            raise RQAEError(f"{self.path}: the manifest commits {n:,} rows as {ctx:,} contexts of {R} rows; its commit "
                            f"record is damaged: run `rqae verify`, or harvest it again")

    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec, gain: torch.Tensor | None, provenance: dict) -> ActivationStore:
        """Create an empty store. Refuses a path that already holds anything but our own lock.
        `gain`: the LM's final-norm gain (d,) in "final-norm" mode; "rms" stores ones."""
        from rqae_pipeline.io import empty_except_lock

        path = location(path)
        if spec.normalisation == "rms":
            gain = torch.ones(spec.d_model)
        elif gain is None:
            raise ValueError("a final-norm store needs the LM's final-norm gain")
        if not empty_except_lock(path):
            raise RQAEError(f"{path} already exists and is not an empty directory; use --resume or another --out")
        check_writable(path)
        group = open_group(path, "a")  # "w" would wipe the directory, our lock included
        for name, (shape, dtype, chunks, shards) in array_layout(spec).items():
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                               compressors=codec.compressors(dtype), fill_value=0)
        group.create_array("gain", data=gain.float().numpy(), compressors=codec.compressors("float32"))
        manifest = {
            "schema": SCHEMA_VERSION,
            "spec": asdict(spec),
            "provenance": provenance,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "committed": {"tokens": 0, "contexts": 0, "corpus_state": [0, 0], "complete": False},
        }
        group.attrs["rqae"] = manifest
        return cls(path, group, manifest)

    def reopen_for_append(self) -> ActivationStore:
        group = open_group(self.path, "r+")
        return type(self)(self.path, group, group.attrs["rqae"])

    def check_matches(self, spec: StoreSpec) -> None:
        """Raise naming the first identity field that differs from `spec`; for local corpus
        files, the first file that is missing, new or changed since the store began."""
        mine = asdict(self.spec)
        for key, value in asdict(spec).items():
            was = mine.get(key)
            if key == "corpus":  # its files are compared below, one by one
                was, value = without_files(was), without_files(value)
            if key == "tokenizer":  # a store from before `tokenizer_name` recorded the whole path
                was, value = tokenizer_name(was or ""), tokenizer_name(value)
            if was != value:
                raise RQAEError(
                    f"store {self.path} was harvested with {key}={was!r}, not {value!r}; "
                    f"use a new --out for different settings"
                )
        change = describe_change(mine["corpus"], spec.corpus)
        if change:
            raise RQAEError(f"store {self.path} cannot resume: {change}; restore the corpus or use a new --out")

    # ------------------------------------------------------------------ properties

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["committed"]["tokens"])

    @property
    def n_contexts(self) -> int:
        return int(self.manifest["committed"]["contexts"])

    @property
    def d(self) -> int:
        return self.spec.d_model

    @property
    def gain(self) -> torch.Tensor:
        """(d,) float32 gain the rows were multiplied by: the LM's final-norm gain in
        "final-norm" mode, ones in "rms" mode (the one place that decides it)."""
        if self.spec.normalisation == "rms":
            return torch.ones(self.d)
        if not hasattr(self, "_gain_cache"):
            self._gain_cache = torch.from_numpy(np.asarray(self._rows("gain", slice(None)), dtype=np.float32))
        return self._gain_cache.clone()

    def writer(self) -> dict | None:
        """The lock's record of the process writing this store (pid, host, started) with
        "live": whether that process still runs; None when no writer holds the lock."""
        info = StoreLock(self.path).read()
        return None if not info else {**info, "live": StoreLock._alive(info)}

    def is_being_written(self) -> bool:
        w = self.writer()
        return bool(w) and w["live"]

    # ------------------------------------------------------------------ normalisation

    def to_normalised(self, raw: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalise raw residuals (..., d) as this store's rows were: `(acts, scale)` with
        `raw = acts / gain * scale` (`eps`: the LM's norm epsilon)."""
        from rqae_pipeline.lm import normalise

        return normalise(raw, self.gain, eps, self.spec.normalisation)

    def to_raw(self, acts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Rebuild raw residuals from normalised rows (n, d) and their scales (n,):
        acts / gain * scale ("rms": the gain is ones, so acts * scale, bit for bit)."""
        return acts / self.gain.to(acts.device) * scale.to(acts.device)[:, None]

    def to_raw_factor(self, scale: torch.Tensor, device=None) -> torch.Tensor:
        """(n, d) factor with raw = acts * factor: scale / gain per row."""
        device = scale.device if device is None else device
        return scale[:, None].to(device) / self.gain.to(device)

    def codec_mean(self) -> np.ndarray | None:
        """(d,) float32 mean the fp8 codec centres rows on; None for other dtypes or before
        the first batch of an fp8 harvest set it."""
        if self.spec.dtype != "fp8":
            return None
        if getattr(self, "_mean_cache", None) is None and "mean" in self.group:
            self._mean_cache = np.asarray(self._rows("mean", slice(None)), dtype=np.float32)
        if getattr(self, "_mean_cache", None) is None and self.n_tokens:  # a new mean would misdecode them
            raise RQAEError(f"store {self.path}: array mean is missing, and its {self.n_tokens:,} committed fp8 rows "
                            f"cannot be decoded without it; see `rqae verify {self.path}`")
        return getattr(self, "_mean_cache", None)

    # ------------------------------------------------------------------ columns

    def column(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        """A row-aligned column other than acts (scale, tokens, seq, pos, flags, row_scale),
        as stored, for a slice of rows or an array of sorted row indices."""
        if name not in ROW_ARRAYS + ("row_scale",) or name == "acts":
            raise ValueError(f"unknown column {name!r}; acts are read decoded with read / read_rows")
        return np.asarray(self._rows(name, rows))

    def columns(self, rows: slice | np.ndarray, *names: str) -> dict[str, np.ndarray]:
        return {name: self.column(name, rows) for name in names}

    # ------------------------------------------------------------------ reading

    def check_shards(self) -> None:
        """Raise RQAEError naming a missing shard file of the committed rows: one stat per
        shard and array, for commands to fail before they create any output."""
        for name in row_arrays(self.spec):
            arr = self._array(name)
            require_rows(self.path, arr, name, slice(0, self.n_tokens))
            require_shards(self.path, arr, name, shards_of(arr, slice(0, self.n_tokens)))

    def _rows(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        """Rows of one array as stored. Every read goes through here: a missing shard (zarr
        would return zeros) or a damaged one is an RQAEError naming the store, array and file."""
        return read_checked(self.path, self._array(name), name, rows)

    def _array(self, name: str):
        """Array `name`, opened once for reading: opening parses its metadata (~0.6 ms, twice
        per chunk span a reader reads: ~1/5 of its time at d = 640, docs/benchmarks.md). The writes above
        drop the cache, since they change shapes; rows below the committed count read the
        same through an array opened earlier, whatever another process appended since."""
        arr = self._arrays.get(name)
        if arr is None:
            try:
                arr = self.group[name]
            except KeyError:  # deleted by hand: zarr would say only the name
                raise RQAEError(f"{self.path}: array {name!r} is missing; `rqae verify` lists the damage") from None
            except Exception as e:  # noqa: BLE001  its zarr.json cut short or edited: zarr raises several types
                raise RQAEError(f"{self.path}: array {name!r} metadata cannot be read ({type(e).__name__}); "
                                f"`rqae verify` lists the damage") from None
            if problem := layout_problem(self.spec, name, arr):  # rows of another kind, read as numbers
                raise RQAEError(f"{self.path}: {problem}; `rqae verify` lists the damage")
            self._arrays[name] = arr
        return arr

    def read_encoded(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Columns of rows [start, stop) exactly as stored (no decoding)."""
        names = row_arrays(self.spec)
        return {n: self._rows(n, slice(start, stop)) for n in names}

    def read(self, start: int = 0, stop: int | None = None) -> Rows:
        stop = self.n_tokens if stop is None else min(stop, self.n_tokens)
        if not 0 <= start <= stop:
            raise RQAEError(f"row range [{start}, {stop}) is outside the store's {self.n_tokens} rows")
        cols = self.read_encoded(start, stop)
        return self._decode(cols)

    def read_acts(self, start: int, stop: int) -> tuple[torch.Tensor, np.ndarray]:
        """Decoded activations and flags of rows [start, stop): all a training batch needs."""
        acts, row_scale, flags = self.read_acts_encoded(start, stop)
        return self.decode_acts(acts, row_scale), flags

    def read_acts_encoded(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Activations of rows [start, stop) as stored, their row scales (fp8; else None) and
        flags: a reader gathers the rows it keeps in the storage dtype, then decodes them."""
        rows = slice(start, stop)
        row_scale = self._rows("row_scale", rows) if self.spec.dtype == "fp8" else None
        return self._rows("acts", rows), row_scale, self._rows("flags", rows)

    def read_spans_encoded(self, spans: list[tuple[int, int]]) -> list[tuple]:
        """`read_acts_encoded` of each (start, stop) span: a reader's shuffle buffer. From an
        object store an array's spans are requested concurrently, hiding each request's
        latency (`integrity.read_checked_ranges`); from a local disk that only spread the
        decoding over threads, 0.75-1.20x (docs/benchmarks.md), so local spans go in turn."""
        if not is_remote(self.path):
            return [self.read_acts_encoded(a, b) for a, b in spans]
        ranges = [slice(a, b) for a, b in spans]

        def read(name: str) -> list[np.ndarray]:
            return read_checked_ranges(self.path, self._array(name), name, ranges)

        scales = read("row_scale") if self.spec.dtype == "fp8" else [None] * len(ranges)
        return list(zip(read("acts"), scales, read("flags")))

    def decode_acts(self, acts: np.ndarray, row_scale: np.ndarray | None) -> torch.Tensor:
        """Float32 activations from stored ones (`read_acts_encoded`)."""
        return decode_acts(acts, self.spec.dtype, row_scale, self._mean())

    def read_rows(self, index: np.ndarray) -> Rows:
        """Rows at arbitrary sorted indices (a zarr orthogonal selection)."""
        names = row_arrays(self.spec)
        cols = {n: self._rows(n, np.asarray(index)) for n in names}
        return self._decode(cols)

    def _decode(self, cols: dict[str, np.ndarray]) -> Rows:
        acts = decode_acts(cols["acts"], self.spec.dtype, cols.get("row_scale"), self._mean())
        return Rows(acts=acts, scale=torch.from_numpy(np.asarray(cols["scale"], dtype=np.float32)),
                    tokens=cols["tokens"], seq=cols["seq"], pos=cols["pos"], flags=cols["flags"])

    def _mean(self) -> np.ndarray | None:
        return self.codec_mean()

    def raw(self, rows: Rows) -> torch.Tensor:
        """Rebuild raw residuals: raw = acts / gain * scale (final-norm) or acts * scale (rms)."""
        return self.to_raw(rows.acts, rows.scale)

    def batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, start: int = 0,
                stop: int | None = None, exclude: int = Flags.BOS, buffer_rows: int | None = None,
                drop_last: bool = False, return_rows: bool = False, first=None,
                with_position: bool = False) -> Iterator:
        """Stream (batch_size, d) float32 batches of rows in [start, stop) with bounded memory.

        Shuffling is token-level across the whole range: chunks are visited in a seeded
        random order, `buffer_rows` worth of them (default: 128 MB of fp32 rows) are read
        together and their rows permuted with a seed of (seed, buffer), and batches are cut
        from the buffers in turn (`reader.py`). Rows whose flags meet `exclude` are dropped.
        With `return_rows`, yields `(acts, row indices)`. `first` (a `reader.ReadPosition`)
        starts the pass there, reading only from that buffer on; with `with_position` every
        item comes as `(item, position of the next row)`, the value to resume from.
        """
        from rqae_pipeline.reader import ReadPosition, shuffled_batches

        yield from shuffled_batches(self, batch_size, shuffle=shuffle, seed=seed, start=start, stop=stop,
                                    exclude=exclude, buffer_rows=buffer_rows, drop_last=drop_last,
                                    return_rows=return_rows, first=first or ReadPosition(),
                                    with_position=with_position)

    def dask(self) -> dict:
        """Committed rows as dask arrays chunked by shard (acts stay in their storage dtype);
        every chunk is read checked, as `read` is."""
        n, shard = self.n_tokens, self.spec.shard_rows
        return {name: dask_rows(self.path, self._array(name), name, n, shard) for name in row_arrays(self.spec)}

    def nbytes_on_disk(self) -> int:
        return total_bytes(self.path)
