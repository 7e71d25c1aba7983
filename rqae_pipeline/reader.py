"""Shuffled, bounded-memory batch reading from an activation store.

Reading whole chunks is what zarr does cheaply (one byte range of a shard file), so the
shuffle has two levels: a seeded random order of chunks, then a token-level permutation
of a buffer of many chunks. With the default 64k-row buffer every batch mixes rows of
dozens of contexts from all over the store, and memory stays at a few buffers (the one
being consumed and the one being read ahead), whatever the store's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch


BUFFER_BYTES = 128 * 2**20


def _chunk_ranges(start: int, stop: int, chunk_rows: int) -> list[tuple[int, int]]:
    first = start - start % chunk_rows
    return [(max(a, start), min(a + chunk_rows, stop)) for a in range(first, stop, chunk_rows)]


def shuffled_batches(store, batch_size: int, *, shuffle: bool, seed: int, start: int, stop: int | None,
                     exclude: int, buffer_rows: int | None, drop_last: bool,
                     return_rows: bool = False) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    stop = store.n_tokens if stop is None else min(stop, store.n_tokens)
    ranges = _chunk_ranges(start, stop, store.spec.chunk_rows)
    rng = np.random.default_rng(seed)
    if shuffle:
        ranges = [ranges[i] for i in rng.permutation(len(ranges))]
    if buffer_rows is None:
        buffer_rows = BUFFER_BYTES // (4 * store.d)
    per_buffer = max(1, buffer_rows // store.spec.chunk_rows)
    groups = [ranges[i : i + per_buffer] for i in range(0, len(ranges), per_buffer)]

    def load(group):
        # The buffer is permuted as a whole, so its chunks can be read in store order, and
        # neighbouring ones in one call (zarr's per-call overhead dominates for small chunks).
        spans: list[list[int]] = []
        for a, b in sorted(group):
            if spans and spans[-1][1] == a:
                spans[-1][1] = b
            else:
                spans.append([a, b])
        parts = [store.read_acts(a, b) for a, b in spans]
        acts = torch.cat([p[0] for p in parts])
        rows = torch.cat([torch.arange(a, b) for a, b in spans])
        keep = torch.from_numpy((np.concatenate([p[1] for p in parts]) & exclude) == 0)
        return acts[keep], rows[keep]

    carry, carry_rows = torch.empty(0, store.d), torch.empty(0, dtype=torch.long)
    # Read the next buffer on a thread while the caller consumes this one (zarr decoding
    # releases the GIL), so training does not wait on decompression.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, groups[0]) if groups else None
        for i in range(len(groups)):
            buf, rows = pending.result()
            pending = pool.submit(load, groups[i + 1]) if i + 1 < len(groups) else None
            buf, rows = torch.cat([carry, buf]), torch.cat([carry_rows, rows])
            if shuffle:
                perm = torch.from_numpy(rng.permutation(len(buf)))
                buf, rows = buf[perm], rows[perm]
            n_full = len(buf) // batch_size
            for j in range(n_full):
                sl = slice(j * batch_size, (j + 1) * batch_size)
                yield (buf[sl], rows[sl]) if return_rows else buf[sl]
            carry, carry_rows = buf[n_full * batch_size :], rows[n_full * batch_size :]
    if len(carry) and not drop_last:
        yield (carry, carry_rows) if return_rows else carry
