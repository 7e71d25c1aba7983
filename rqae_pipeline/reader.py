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

(Until 2026-12 the tail of each buffer was re-shuffled into the next one, which made a
buffer's order depend on every earlier one, so a resume had to replay the whole pass.)
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


def load_buffer(store, group, index: int, *, shuffle: bool, seed: int,
                exclude: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffer `index`'s kept rows and their store row indices, in the pass's order."""
    spans = _merged_spans(group)
    parts = [store.read_acts(a, b) for a, b in spans]
    acts = torch.cat([p[0] for p in parts])
    rows = torch.cat([torch.arange(a, b) for a, b in spans])
    keep = torch.from_numpy((np.concatenate([p[1] for p in parts]) & exclude) == 0)
    acts, rows = acts[keep], rows[keep]
    if shuffle:  # seeded by (seed, buffer) alone, so any buffer can be produced first
        perm = torch.from_numpy(np.random.default_rng([seed, index]).permutation(len(acts)))
        acts, rows = acts[perm], rows[perm]
    return acts, rows


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


def shuffled_batches(store, batch_size: int, *, shuffle: bool, seed: int, start: int, stop: int | None,
                     exclude: int, buffer_rows: int | None, drop_last: bool, return_rows: bool = False,
                     first: ReadPosition = ReadPosition(), with_position: bool = False) -> Iterator:
    """Batches from position `first` on. Yields acts, or (acts, rows) with `return_rows`; with
    `with_position` each item is followed by the ReadPosition of the next row, `(item, position)`."""
    groups = buffer_groups(store, shuffle=shuffle, seed=seed, start=start, stop=stop, buffer_rows=buffer_rows)
    carry, carry_rows = torch.empty(0, store.d), torch.empty(0, dtype=torch.long)

    def load(index):
        return load_buffer(store, groups[index], index, shuffle=shuffle, seed=seed, exclude=exclude)

    def item(acts, rows, position):
        out = (acts, rows) if return_rows else acts
        return (out, position) if with_position else out

    # Read the next buffer on a thread while the caller consumes this one (zarr decoding
    # releases the GIL), so training does not wait on decompression.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, first.buffer) if first.buffer < len(groups) else None
        for i in range(first.buffer, len(groups)):
            buf, rows = pending.result()
            pending = pool.submit(load, i + 1) if i + 1 < len(groups) else None
            skip = first.row if i == first.buffer else 0
            buf, rows = torch.cat([carry, buf[skip:]]), torch.cat([carry_rows, rows[skip:]])
            n_full = len(buf) // batch_size
            for j in range(n_full):
                sl = slice(j * batch_size, (j + 1) * batch_size)
                used = len(buf) - (j + 1) * batch_size  # rows of this buffer still to come
                at = ReadPosition(i, len(rows) + skip - len(carry) - used) if used else ReadPosition(i + 1, 0)
                yield item(buf[sl], rows[sl], at)
            carry, carry_rows = buf[n_full * batch_size :], rows[n_full * batch_size :]
    if len(carry) and not drop_last:
        yield item(carry, carry_rows, ReadPosition(len(groups), 0))


def endless_batches(store, batch_size: int, *, seed: int, stop: int, exclude: int, start: DataPosition) -> Iterator:
    """Full shuffled batches of rows [0, stop) from `start` on, pass after pass (pass e seeded
    `pass_seed(seed, e)`), each as (batch, DataPosition after it)."""
    epoch, first = start.epoch, start.read
    while True:
        seen = False
        for batch, at in store.batches(batch_size, seed=pass_seed(seed, epoch), stop=stop, exclude=exclude,
                                       drop_last=True, first=first, with_position=True):
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
