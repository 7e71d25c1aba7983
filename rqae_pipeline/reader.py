"""Shuffled, bounded-memory batch reading from an activation store, seekable in O(one buffer).

Reading whole chunks is what zarr does cheaply (one byte range of a shard file), so the
shuffle has two levels: a seeded permutation of the chunks, cut into buffers of many
chunks, then a token-level permutation of each buffer's kept rows seeded by (seed, buffer).
The batches are consecutive `batch_size` rows of the concatenated permuted buffers (a batch
may take the tail of one buffer and the head of the next). Every buffer's rows are thus a
pure function of (seed, buffer index), and a position (buffer, row) names the next row
exactly: reading from it touches that buffer only, however far into the pass it lies.
With the default 128 MB buffer every batch mixes rows of dozens of contexts from all over
the store, and memory stays at a few buffers whatever the store's size.

Data-parallel ranks each take their own equal, contiguous part of every global batch: a rank
reads the buffer's chunks (zarr decompresses whole chunks) but gathers, permutes and keeps
only its rows, and all ranks step through the same global batches and positions.

(Until 2026-12 the tail of each buffer was re-shuffled into the next one, which made a
buffer's order depend on every earlier one, so a resume had to replay the whole pass.)
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from rqae_pipeline import RQAEError

BUFFER_BYTES = 128 * 2**20


@dataclass(frozen=True)
class ReadPosition:
    """Where a pass stands: the next row is row `row` of buffer `buffer`'s permuted kept rows."""

    buffer: int = 0
    row: int = 0


@dataclass(frozen=True)
class DataPosition:
    """Where training stands in its data: pass `epoch` over the rows, at `read` in that pass."""

    epoch: int = 0
    read: ReadPosition = ReadPosition()

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "buffer": self.read.buffer, "row": self.read.row}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> DataPosition:
        return cls(d["epoch"], ReadPosition(d["buffer"], d["row"]))


def pass_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of pass `epoch` of a run seeded `seed`."""
    return seed * 100_003 + epoch


def _chunk_ranges(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    first = start - start % chunk_rows
    return [(max(a, start), min(a + chunk_rows, stop)) for a in range(first, stop, chunk_rows)]


def buffer_groups(store, *, shuffle: bool, seed: int, start: int, stop: int | None,
                  buffer_rows: int | None) -> list[list[tuple[int, int]]]:
    """The pass's buffers, each a list of (first, stop) chunk row ranges: a pure function of
    the seed (the chunk permutation) and the store's layout."""
    stop = store.n_tokens if stop is None else min(stop, store.n_tokens)
    ranges = _chunk_ranges(start, stop, store.spec.chunk_rows)
    if shuffle:
        ranges = [ranges[i] for i in np.random.default_rng(seed).permutation(len(ranges))]
    if buffer_rows is None:
        buffer_rows = BUFFER_BYTES // (4 * store.d)
    per_buffer = max(1, buffer_rows // store.spec.chunk_rows)
    return [ranges[i : i + per_buffer] for i in range(0, len(ranges), per_buffer)]


def _merged_spans(group: list[tuple[int, int]]) -> list[list[int]]:
    # The buffer is permuted as a whole, so its chunks can be read in store order, and
    # neighbouring ones in one call (zarr's per-call overhead dominates for small chunks).
    spans: list[list[int]] = []
    for a, b in sorted(group):
        if spans and spans[-1][1] == a:
            spans[-1][1] = b
        else:
            spans.append([a, b])
    return spans


def _rank_positions(n: int, skip: int, phase: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """The positions in [skip, n) of a buffer's pass order that fall in rank `rank`'s part of
    their global batch, when position `skip` is `phase` rows into a global batch."""
    q = np.arange(skip, n)
    if world_size == 1:
        return q
    part = batch_size // world_size
    return q[(q - skip + phase) % batch_size // part == rank]


def load_buffer(store, group, index: int, *, shuffle: bool, seed: int, exclude: int, positions=None,
                check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Buffer `index`'s kept rows and their store row indices in the pass's order, or only those
    at `positions(n)` of that order (n: the buffer's kept rows); also n. With `check_finite`, a
    kept row holding NaN/inf, wanted or not, is an RQAEError naming it.

    The chunks are read and decoded whole (that is what zarr reads), but only the wanted rows
    are gathered, permuted and kept: a rank reads its own part of the buffer's rows."""
    spans = _merged_spans(group)
    parts = [store.read_acts(a, b) for a, b in spans]
    acts = [p[0] for p in parts]
    store_rows = np.concatenate([np.arange(a, b) for a, b in spans])
    starts = np.cumsum([0] + [b - a for a, b in spans])
    kept = np.flatnonzero((np.concatenate([p[1] for p in parts]) & exclude) == 0)  # offsets into the spans
    if check_finite:
        _require_finite(store, acts, starts, kept, store_rows)
    n = len(kept)
    if shuffle:  # seeded by (seed, buffer) alone, so any buffer can be produced first
        kept = kept[np.random.default_rng([seed, index]).permutation(n)]
    if positions is not None:
        kept = kept[positions(n)]
    return _gather(acts, starts, kept, store.d), torch.from_numpy(store_rows[kept]), n


def _require_finite(store, acts: list[torch.Tensor], starts: np.ndarray, kept: np.ndarray,
                    store_rows: np.ndarray, limit: int = 5) -> None:
    """Raise naming the kept rows that hold NaN/inf: the store's fault, not the learning rate's.
    The whole buffer is checked, whatever part of it is wanted, so that data-parallel ranks
    stop together; a row sum per row (~1/20 of an elementwise check) finds the suspects, and
    an elementwise check of those alone tells NaN/inf from a sum that overflowed."""
    sums = torch.cat([a.sum(1) for a in acts])
    suspects = kept[~torch.isfinite(sums[torch.from_numpy(kept)]).numpy()]
    if not len(suspects):
        return
    bad = suspects[~torch.isfinite(_gather(acts, starts, suspects, store.d)).all(1).numpy()]
    if len(bad):
        where = ", ".join(str(r) for r in sorted(store_rows[bad])[:limit]) + (" ..." if len(bad) > limit else "")
        raise RQAEError(f"store {store.path} has non-finite (NaN/inf) activations in row(s) {where}; nothing was "
                        f"trained on them (`rqae verify {store.path}` lists the damage)")


def _gather(acts: list[torch.Tensor], starts: np.ndarray, offsets: np.ndarray, d: int) -> torch.Tensor:
    """Rows at `offsets` (in that order) of the concatenation of `acts`, without building it:
    each span's wanted rows are copied in store order into their places."""
    out = torch.empty(len(offsets), d)
    order = np.argsort(offsets, kind="stable")
    ordered = offsets[order]
    bounds = np.searchsorted(ordered, starts)
    for part, first, lo, hi in zip(acts, starts, bounds[:-1], bounds[1:]):
        if hi > lo:
            out[torch.from_numpy(order[lo:hi])] = part[torch.from_numpy(ordered[lo:hi] - first)]
    return out


def kept_rows(store, group, exclude: int) -> int:
    """How many rows of a buffer survive `exclude` (reads the flags column only)."""
    return sum(int(((store.column("flags", slice(a, b)) & exclude) == 0).sum()) for a, b in _merged_spans(group))


def position_after(store, groups, batch_size: int, batches: int, *, first: ReadPosition = ReadPosition(),
                   exclude: int) -> ReadPosition | None:
    """The position `batches` batches after `first`, from the flags alone (no activations
    decoded); None when the pass has fewer. For runs that did not record their position."""
    need = first.row + batches * batch_size
    for index in range(first.buffer, len(groups)):
        n = kept_rows(store, groups[index], exclude)
        if need < n:
            return ReadPosition(index, need)
        need -= n
    return ReadPosition(len(groups), 0) if need == 0 else None


class _RowQueue:
    """Rows read but not yet handed out, as the pieces they were read in: a batch inside one
    piece is a view of it, only one that straddles two pieces is copied."""

    def __init__(self):
        self.pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.head = 0  # rows of the first piece already handed out

    def __len__(self) -> int:
        return sum(len(rows) for _, rows in self.pieces) - self.head

    def put(self, acts: torch.Tensor, rows: torch.Tensor) -> None:
        if len(rows):
            self.pieces.append((acts, rows))

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        acts, rows = [], []
        while n:
            a, r = self.pieces[0]
            k = min(n, len(r) - self.head)
            acts.append(a[self.head : self.head + k])
            rows.append(r[self.head : self.head + k])
            n, self.head = n - k, self.head + k
            if self.head == len(r):
                self.pieces.pop(0)
                self.head = 0
        return (acts[0], rows[0]) if len(acts) == 1 else (torch.cat(acts), torch.cat(rows))


def _batch_ends(n: int, skip: int, phase: int, batch_size: int) -> range:
    """The positions in (skip, n] of a buffer where a global batch ends, when position `skip`
    is `phase` rows into a global batch."""
    return range(skip + batch_size - phase, n + 1, batch_size)


def shuffled_batches(store, batch_size: int, *, shuffle: bool, seed: int, start: int, stop: int | None,
                     exclude: int, buffer_rows: int | None, drop_last: bool, return_rows: bool = False,
                     first: ReadPosition = ReadPosition(), with_position: bool = False, rank: int = 0,
                     world_size: int = 1, check_finite: bool = False) -> Iterator:
    """Batches from position `first` on. Yields acts, or (acts, rows) with `return_rows`; with
    `with_position` each item is followed by the ReadPosition of the next row, `(item, position)`.

    With `world_size` > 1 each item is rank `rank`'s equal, contiguous part of the global batch
    (the batches of world size 1, whatever the world size), and a rank gathers only its rows.
    With `check_finite`, a buffer with a kept NaN/inf row raises before its first batch."""
    if batch_size % world_size or (world_size > 1 and not drop_last):
        raise ValueError("ranks need drop_last and a batch size that splits evenly over them")
    groups = buffer_groups(store, shuffle=shuffle, seed=seed, start=start, stop=stop, buffer_rows=buffer_rows)
    part = batch_size // world_size

    def load(index, skip, phase):
        def positions(n):
            return _rank_positions(n, skip, phase, batch_size, rank, world_size)

        return load_buffer(store, groups[index], index, shuffle=shuffle, seed=seed, exclude=exclude,
                           positions=positions, check_finite=check_finite)

    def item(acts, rows, position):
        out = (acts, rows) if return_rows else acts
        return (out, position) if with_position else out

    queue, phase, skip = _RowQueue(), 0, first.row  # phase: rows of the current global batch before `skip`
    # Read the next buffer on a thread while the caller consumes this one (zarr decoding
    # releases the GIL), so training does not wait on decompression.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, first.buffer, skip, 0) if first.buffer < len(groups) else None
        for i in range(first.buffer, len(groups)):
            acts, rows, n = pending.result()
            next_phase = (phase + n - skip) % batch_size
            read_next = partial(pool.submit, load, i + 1, 0, next_phase) if i + 1 < len(groups) else lambda: None
            pending = None
            queue.put(acts, rows)
            for end in _batch_ends(n, skip, phase, batch_size):
                yield item(*queue.take(part), ReadPosition(i, end) if end < n else ReadPosition(i + 1, 0))
                # asked for another batch: read the next buffer meanwhile (not before, so that a
                # caller taking one batch does not wait, on closing, for a buffer it never uses)
                pending = pending or read_next()
            pending = pending or read_next()
            phase, skip = next_phase, 0
    if len(queue) and not drop_last:
        yield item(*queue.take(len(queue)), ReadPosition(len(groups), 0))


def endless_batches(store, batch_size: int, *, seed: int, stop: int, exclude: int, start: DataPosition,
                    rank: int = 0, world_size: int = 1) -> Iterator:
    """Full shuffled batches of rows [0, stop) from `start` on, pass after pass (pass e seeded
    `pass_seed(seed, e)`), each as (batch, DataPosition after it); with `world_size` > 1, rank
    `rank`'s part of each global batch (`shuffled_batches`). A NaN/inf row is an RQAEError
    before any batch of its buffer is handed out, on every rank."""
    epoch, first = start.epoch, start.read
    while True:
        seen = False
        for batch, at in shuffled_batches(store, batch_size, shuffle=True, seed=pass_seed(seed, epoch), start=0,
                                          stop=stop, exclude=exclude, buffer_rows=None, drop_last=True, first=first,
                                          with_position=True, rank=rank, world_size=world_size, check_finite=True):
            seen = True
            yield batch, DataPosition(epoch, at)
        if not seen and first == ReadPosition():
            raise RQAEError(f"fewer than {batch_size} training rows in the store; lower --batch-size")
        epoch, first = epoch + 1, ReadPosition()


def position_of_batch(store, batch_size: int, *, seed: int, stop: int, exclude: int, batches: int) -> DataPosition:
    """Where `endless_batches` stands after `batches` batches, counted from the flags alone
    (no activations decoded): for runs that did not record their position, and for tests."""
    def groups(epoch):
        return buffer_groups(store, shuffle=True, seed=pass_seed(seed, epoch), start=0, stop=stop, buffer_rows=None)

    per_pass = sum(kept_rows(store, g, exclude) for g in groups(0)) // batch_size
    if per_pass == 0:
        raise RQAEError(f"fewer than {batch_size} training rows in the store; lower --batch-size")
    epoch, k = divmod(batches, per_pass)
    if epoch and not k:  # the stream reports the end of a pass as a position in that pass
        epoch, k = epoch - 1, per_pass
    return DataPosition(epoch, position_after(store, groups(epoch), batch_size, k, exclude=exclude))
