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

A read may be split into `streams` independent streams: the permuted chunks are dealt to
the streams in turn, each stream cuts its own buffers and permutes their rows (seeded by
(seed, buffer, stream)), and a global batch is the concatenation of equal parts, one from
each stream, in stream order. One stream is the reading described above. Data-parallel
ranks each own a contiguous block of streams, so a rank decompresses only its own chunks
and its part of every global batch is an equal, contiguous slice; the global batches are
those of one process reading the same number of streams, whatever the number of ranks
that divides it. A pass ends when its shortest stream does (the other streams' tails, at
most a few chunks, wait for the next pass's permutation).

(In earlier versions the tail of each buffer was re-shuffled into the next one, which made a
buffer's order depend on every earlier one, so a resume had to replay the whole pass.)
"""

from __future__ import annotations

import operator
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


Reads = ReadPosition | tuple[ReadPosition, ...]  # one stream's position, or each stream's


@dataclass(frozen=True)
class DataPosition:
    """Where training stands in its data: pass `epoch` over the rows, at `read` in that pass
    (a ReadPosition, or a tuple of one per stream)."""

    epoch: int = 0
    read: Reads = ReadPosition()

    def as_dict(self) -> dict:
        if isinstance(self.read, tuple):
            return {"epoch": self.epoch, "streams": [[r.buffer, r.row] for r in self.read]}
        return {"epoch": self.epoch, "buffer": self.read.buffer, "row": self.read.row}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        """The position `as_dict` wrote; KeyError, TypeError or ValueError for a record lacking a
        field or holding a non-integer (read further, it would fail or start at another row)."""
        if "streams" in d:
            return cls(_int(d["epoch"]), tuple(ReadPosition(_int(b), _int(r)) for b, r in d["streams"]))
        return cls(_int(d["epoch"]), ReadPosition(_int(d["buffer"]), _int(d["row"])))


def _int(value) -> int:
    n = operator.index(value)  # an int: a float or a string in a record is no position
    if n < 0:
        raise ValueError(f"negative position {n}")
    return n


def start_of_pass(streams: int) -> Reads:
    return ReadPosition() if streams == 1 else (ReadPosition(),) * streams


def pass_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of pass `epoch` of a run seeded `seed`."""
    return seed * 100_003 + epoch


def _chunk_ranges(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    first = start - start % chunk_rows
    return [(max(a, start), min(a + chunk_rows, stop)) for a in range(first, stop, chunk_rows)]


def stream_groups(store, *, shuffle: bool, seed: int, start: int, stop: int | None, buffer_rows: int | None,
                  streams: int = 1) -> list[list[list[tuple[int, int]]]]:
    """Each stream's buffers, each a list of (first, stop) chunk row ranges: a pure function
    of the seed (the chunk permutation), the stream count and the store's layout. The permuted
    chunks are dealt to the streams in turn; each stream's buffers hold `buffer_rows`."""
    stop = store.n_tokens if stop is None else min(stop, store.n_tokens)
    ranges = _chunk_ranges(start, stop, store.spec.chunk_rows)
    if shuffle:
        ranges = [ranges[i] for i in np.random.default_rng(seed).permutation(len(ranges))]
    if buffer_rows is None:
        buffer_rows = BUFFER_BYTES // (4 * store.d)
    per_buffer = max(1, buffer_rows // store.spec.chunk_rows)
    dealt = [ranges[s::streams] for s in range(streams)]
    return [[mine[i : i + per_buffer] for i in range(0, len(mine), per_buffer)] for mine in dealt]


def buffer_groups(store, *, shuffle: bool, seed: int, start: int, stop: int | None,
                  buffer_rows: int | None) -> list[list[tuple[int, int]]]:
    """The buffers of a one-stream pass (`stream_groups`)."""
    return stream_groups(store, shuffle=shuffle, seed=seed, start=start, stop=stop, buffer_rows=buffer_rows)[0]


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


def load_buffer(store, group, index: int, *, shuffle: bool, seed: int, exclude: int, stream: int = 0,
                check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer `index` of stream `stream`: its kept rows and their store row indices, in the
    pass's order. With `check_finite`, a kept row holding NaN/inf is an RQAEError naming it.

    The kept rows are gathered in the storage dtype (a half or a quarter of float32's bytes)
    and decoded once, in their final order: one copy of each row instead of two."""
    spans = _merged_spans(group)
    parts = store.read_spans_encoded(spans)
    stored = _joined([p[0] for p in parts])
    row_scale = None if parts[0][1] is None else _joined([p[1] for p in parts])
    store_rows = np.concatenate([np.arange(a, b) for a, b in spans])
    kept = np.flatnonzero((_joined([p[2] for p in parts]) & exclude) == 0)  # offsets into the spans
    if shuffle:  # seeded by (seed, buffer, stream) alone, so any buffer can be produced first
        # (stream 0 keeps the one-stream seed: one stream is the reading of before streams)
        kept = kept[np.random.default_rng([seed, index] + ([stream] if stream else [])).permutation(len(kept))]
    acts = store.decode_acts(stored[kept], None if row_scale is None else row_scale[kept])
    if check_finite:
        _require_finite(store, acts, store_rows[kept])
    return acts, torch.from_numpy(store_rows[kept])


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _require_finite(store, acts: torch.Tensor, store_rows: np.ndarray, limit: int = 5) -> None:
    """Raise naming the rows of `acts` (store rows `store_rows`) that hold NaN/inf: the
    store's fault, not the learning rate's. A row sum per row (~1/20 of an elementwise check)
    finds the suspects, and an elementwise check of those alone tells NaN/inf from a sum
    that overflowed."""
    suspects = np.flatnonzero(~torch.isfinite(acts.sum(1)).numpy())
    if not len(suspects):
        return
    bad = suspects[~torch.isfinite(acts[torch.from_numpy(suspects)]).all(1).numpy()]
    if len(bad):
        where = ", ".join(str(r) for r in sorted(store_rows[bad])[:limit]) + (" ..." if len(bad) > limit else "")
        raise RQAEError(f"store {store.path} has non-finite (NaN/inf) activations in row(s) {where}; nothing was "
                        f"trained on them (`rqae verify {store.path}` lists the damage)")


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


def _piece_ends(index: int, n: int, skip: int, phase: int, piece: int) -> list[ReadPosition]:
    """The positions after each piece that ends in buffer `index` (n kept rows), when its
    position `skip` is `phase` rows into a piece."""
    return [ReadPosition(index, end) if end < n else ReadPosition(index + 1, 0)
            for end in range(skip + piece - phase, n + 1, piece)]


def _stream_pieces(store, groups, piece: int, *, stream: int, shuffle: bool, seed: int, exclude: int,
                   first: ReadPosition, drop_last: bool, check_finite: bool) -> Iterator:
    """One stream's consecutive `piece` rows from `first` on, as (acts, rows, position after),
    and with `drop_last` off the shorter tail last."""
    def load(index):
        return load_buffer(store, groups[index], index, shuffle=shuffle, seed=seed, exclude=exclude,
                           stream=stream, check_finite=check_finite)

    queue, phase, skip = _RowQueue(), 0, first.row  # phase: rows of the current piece before `skip`
    # Read the next buffer on a thread while the caller consumes this one (zarr decoding
    # releases the GIL), so training does not wait on decompression.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, first.buffer) if first.buffer < len(groups) else None
        for i in range(first.buffer, len(groups)):
            acts, rows = pending.result()
            acts, rows, n = acts[skip:], rows[skip:], len(rows)
            read_next = partial(pool.submit, load, i + 1) if i + 1 < len(groups) else lambda: None
            pending = None
            queue.put(acts, rows)
            for position in _piece_ends(i, n, skip, phase, piece):
                yield (*queue.take(piece), position)
                # asked for another piece: read the next buffer meanwhile (not before, so that a
                # caller taking one piece does not wait, on closing, for a buffer it never uses)
                pending = pending or read_next()
            pending = pending or read_next()
            phase, skip = (phase + n - skip) % piece, 0
    if len(queue) and not drop_last:
        yield (*queue.take(len(queue)), ReadPosition(len(groups), 0))


def _stream_positions(store, groups, piece: int, *, exclude: int, first: ReadPosition) -> Iterator[ReadPosition]:
    """The positions `_stream_pieces` reports, from the flags alone: another rank's stream."""
    phase, skip = 0, first.row
    for i in range(first.buffer, len(groups)):
        n = kept_rows(store, groups[i], exclude)
        yield from _piece_ends(i, n, skip, phase, piece)
        phase, skip = (phase + n - skip) % piece, 0


def check_streams(batch_size: int, streams: int, world_size: int) -> None:
    if streams < 1 or streams % world_size:
        raise RQAEError(f"--streams {streams} does not split over {world_size} processes; "
                        f"use a multiple of {world_size}")
    if batch_size % streams:
        raise RQAEError(f"--batch-size {batch_size} does not split evenly over {streams} streams; "
                        f"use a multiple of {streams}")


def shuffled_batches(store, batch_size: int, *, shuffle: bool, seed: int, start: int, stop: int | None,
                     exclude: int, buffer_rows: int | None, drop_last: bool, return_rows: bool = False,
                     first: Reads | None = None, with_position: bool = False, streams: int = 1, rank: int = 0,
                     world_size: int = 1, check_finite: bool = False) -> Iterator:
    """Batches from position `first` on (default: the pass's start). Yields acts, or (acts,
    rows) with `return_rows`; with `with_position` each item is followed by the position of the
    next row (a ReadPosition, or one per stream), `(item, position)`.

    With `streams` > 1 each batch is the concatenation of `batch_size / streams` rows of each
    stream; with `world_size` > 1 each item is rank `rank`'s part, the rows of its own block of
    streams, and the rank decompresses only their chunks (the other streams' positions come
    from their flags). With `check_finite`, a buffer with a kept NaN/inf row raises before its
    first batch (only this rank's streams are checked)."""
    check_streams(batch_size, streams, world_size)
    if streams > 1 and not drop_last:
        raise ValueError("several streams need drop_last (a pass ends with its shortest stream)")
    groups = stream_groups(store, shuffle=shuffle, seed=seed, start=start, stop=stop, buffer_rows=buffer_rows,
                           streams=streams)
    first = start_of_pass(streams) if first is None else first
    firsts = first if isinstance(first, tuple) else (first,)
    if len(firsts) != streams:
        raise ValueError(f"a position of {len(firsts)} stream(s) for a read of {streams}")
    piece, own = batch_size // streams, range(rank * streams // world_size, (rank + 1) * streams // world_size)
    readers = [_stream_pieces(store, groups[s], piece, stream=s, shuffle=shuffle, seed=seed, exclude=exclude,
                              first=firsts[s], drop_last=drop_last, check_finite=check_finite) if s in own
               else _stream_positions(store, groups[s], piece, exclude=exclude, first=firsts[s])
               for s in range(streams)]
    for items in zip(*readers):
        mine = [items[s] for s in own]
        acts, rows = (mine[0][0], mine[0][1]) if len(mine) == 1 else (torch.cat([m[0] for m in mine]),
                                                                      torch.cat([m[1] for m in mine]))
        at = tuple(item[2] if s in own else item for s, item in enumerate(items))
        out = (acts, rows) if return_rows else acts
        yield (out, at[0] if streams == 1 else at) if with_position else out


def endless_batches(store, batch_size: int, *, seed: int, stop: int, exclude: int, start: DataPosition,
                    streams: int = 1, rank: int = 0, world_size: int = 1) -> Iterator:
    """Full shuffled batches of rows [0, stop) from `start` on, pass after pass (pass e seeded
    `pass_seed(seed, e)`), each as (batch, DataPosition after it); with `world_size` > 1, rank
    `rank`'s part of each global batch (`shuffled_batches`). A NaN/inf row is an RQAEError
    before any batch of its buffer is handed out, on the rank that reads it."""
    epoch, first = start.epoch, start.read
    while True:
        seen = False
        for batch, at in shuffled_batches(store, batch_size, shuffle=True, seed=pass_seed(seed, epoch), start=0,
                                          stop=stop, exclude=exclude, buffer_rows=None, drop_last=True, first=first,
                                          with_position=True, streams=streams, rank=rank, world_size=world_size,
                                          check_finite=True):
            seen = True
            yield batch, DataPosition(epoch, at)
        if not seen and first == start_of_pass(streams):
            raise RQAEError(f"fewer than {batch_size} training rows in the store; lower --batch-size")
        epoch, first = epoch + 1, start_of_pass(streams)


def check_start(store, start: DataPosition, *, seed: int, stop: int, exclude: int, streams: int = 1) -> None:
    """`start` (a checkpoint's position for `endless_batches`) is one its pass has: each
    stream at a row of one of its buffers, or at its end. A position past either would read
    as the end of the pass, silently: a damaged record, an RQAEError instead."""
    groups = stream_groups(store, shuffle=True, seed=pass_seed(seed, start.epoch), start=0, stop=stop,
                           buffer_rows=None, streams=streams)
    for s, first in enumerate(start.read if isinstance(start.read, tuple) else (start.read,)):
        if first.row == 0 and 0 <= first.buffer <= len(groups[s]):  # a buffer's start, or the pass's end
            continue
        if not (0 <= first.buffer < len(groups[s]) and 0 < first.row < kept_rows(store, groups[s][first.buffer],
                                                                                    exclude)):
            raise RQAEError(f"read position (buffer {first.buffer}, row {first.row}) of stream {s} is not in its "
                            f"pass over {store.path} ({len(groups[s])} buffers)")


def position_of_batch(store, batch_size: int, *, seed: int, stop: int, exclude: int, batches: int,
                      streams: int = 1) -> DataPosition:
    """Where `endless_batches` stands after `batches` batches, counted from the flags alone
    (no activations decoded): for runs that did not record their position, and for tests."""
    def groups(epoch):
        return stream_groups(store, shuffle=True, seed=pass_seed(seed, epoch), start=0, stop=stop, buffer_rows=None,
                             streams=streams)

    piece = batch_size // streams
    per_pass = min(sum(kept_rows(store, g, exclude) for g in mine) for mine in groups(0)) // piece
    if per_pass == 0:
        raise RQAEError(f"fewer than {batch_size} training rows in the store; lower --batch-size")
    epoch, k = divmod(batches, per_pass)
    if epoch and not k:  # the stream reports the end of a pass as a position in that pass
        epoch, k = epoch - 1, per_pass
    at = tuple(position_after(store, mine, piece, k, exclude=exclude) for mine in groups(epoch))
    return DataPosition(epoch, at[0] if streams == 1 else at)
