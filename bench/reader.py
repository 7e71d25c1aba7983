"""What the training reader delivers per process, for sizing GPU training (not a test).

Times `reader.endless_batches` (shuffled 4,096-row batches, NaN check on, what `rqae train`
reads) alone, with nothing consuming the batches, on synthetic fp16 stores written through
the store API at d = 640 (the offline model) and d = 2304 (Gemma-2-2B), with 1 and 2
streams (each stream reads on its own thread). Reports rows/s of wall time and CPU
microseconds per row of this process, min / median / max over `--rounds`, next to what the
chunk codec alone costs per row (Blosc zstd-5 decode of whole chunks, one thread): the
difference is zarr's per-read work and the first touch of each freshly allocated buffer.

Each round also reads with every zarr array reopened on every read (how the store read
before it kept its arrays open), interleaved with the current reader: the ratio of the two
is measured in the same run.

    python bench/reader.py               # ~3 min on a 2-core machine
    python bench/reader.py --rounds 1 --buffers 2   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from rqae_pipeline.reader import BUFFER_BYTES, DataPosition, endless_batches, start_of_pass
from rqae_pipeline.store import ActivationStore

sys.path.insert(0, str(Path(__file__).parent))
from train import make_store  # noqa: E402  (bench/train.py: a synthetic store through the store API)

BATCH = 4096
CHUNK_ROWS = 1024  # make_store's chunks (8 contexts of 128)


def buffer_rows(d: int) -> int:
    """Rows of one shuffle buffer at width d (whole 1,024-row chunks)."""
    return BUFFER_BYTES // (4 * d) // CHUNK_ROWS * CHUNK_ROWS


def read_rows(store: ActivationStore, streams: int, rows: int) -> tuple[float, float]:
    """(rows/s wall, CPU µs/row) of reading the first `rows` rows of a pass, buffer reads included."""
    start = DataPosition(0, start_of_pass(streams))
    wall, cpu, n = time.perf_counter(), time.process_time(), 0
    batches = endless_batches(store, BATCH, seed=0, stop=store.n_tokens, exclude=0, start=start, streams=streams)
    while n < rows:
        batch, _ = next(batches)
        n += len(batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    batches.close()
    return n / wall, 1e6 * cpu / n


def codec_us_per_row(store: ActivationStore, rounds: int = 5) -> float:
    """CPU µs per row of Blosc-decoding one chunk, one thread (the floor under a reader)."""
    import numcodecs

    rows = store.spec.chunk_rows
    chunk = store.read_acts_encoded(0, rows)[0]
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    encoded = blosc.encode(chunk)
    times = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(10):
            blosc.decode(encoded)
        times.append((time.process_time() - t) / (10 * rows) * 1e6)
    return statistics.median(times)


def reopening_arrays():
    """The store as it read before: each read opened its zarr array anew."""
    return mock.patch.object(ActivationStore, "_array", lambda self, name: self.group[name])


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def measure(d: int, buffers: int, rounds: int, tmp: Path) -> dict:
    """Each round reads `buffers` shuffle buffers' rows from a store of a few more (no pass ends)."""
    path, rows = tmp / f"store-{d}.zarr", buffers * buffer_rows(d)
    make_store(path, rows + 2 * buffer_rows(d), d)
    store = ActivationStore.open(path)
    out = {"codec": codec_us_per_row(store)}
    read_rows(store, 1, buffer_rows(d))  # warm-up: first calls, thread pools, the allocator
    for r in range(rounds):
        for streams in (1, 2):
            for reopen in ((False, True) if r % 2 == 0 else (True, False)):
                with reopening_arrays() if reopen else contextlib.nullcontext():
                    store = ActivationStore.open(path)
                    rate, us = read_rows(store, streams, rows)
                key = (streams, "reopen" if reopen else "now")
                out.setdefault(key, []).append((rate, us))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--buffers", type=int, default=8, help="shuffle buffers read per measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} rounds of {args.buffers} shuffle buffers ({BUFFER_BYTES >> 20} MB of float32 "
          f"rows each), batch {BATCH}, fp16 stores")
    print("| d | streams | rows/s (min / median / max) | CPU µs/row | codec alone, µs/row | "
          "rows/s now / reopening arrays |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for d in (640, 2304):
            m = measure(d, args.buffers, args.rounds, Path(tmp))
            for streams in (1, 2):
                now, before = m[(streams, "now")], m[(streams, "reopen")]
                ratio = [a[0] / b[0] for a, b in zip(now, before)]
                print(f"| {d} | {streams} | {spread([r for r, _ in now], '{:,.0f}')} | "
                      f"{spread([u for _, u in now], '{:.1f}')} | {m['codec']:.1f} | {spread(ratio, '{:.2f}')}x |")


if __name__ == "__main__":
    main()
