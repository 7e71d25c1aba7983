"""What the training reader delivers per process, for sizing GPU training (not a test).

Times `reader.endless_batches` (shuffled 4,096-row batches, NaN check on, what `rqae train`
reads) alone, with nothing consuming the batches, on synthetic fp16 stores written through
the store API at d = 640 (the offline model) and d = 2304 (Gemma-2-2B), with 1 and 2
streams (each stream reads on its own thread); and at d = 2304 from an S3-protocol server
(moto's, started by the script as its own process). Reports rows/s of wall time and CPU
microseconds per row of this process, min / median / max over `--rounds`, next to what the
chunk codec alone costs per row (Blosc zstd-5 decode of whole chunks, one thread).

Each round also reads, interleaved with the current reader (in alternating order), as the
reader was before (every zarr array reopened on every read, a buffer's chunk spans read one
after another) and, from S3, with the spans read one after another instead of concurrently
(local stores read them in turn anyway): the ratios are measured in the same run.

    python bench/reader.py               # ~5 min on a 2-core machine
    python bench/reader.py --rounds 1 --buffers 2 --s3-buffers 1   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
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


def span_by_span():
    """A buffer's chunk spans read one after another, each array's read waited for in turn."""
    return mock.patch.object(ActivationStore, "read_spans_encoded",
                             lambda self, spans: [self.read_acts_encoded(a, b) for a, b in spans])


@contextlib.contextmanager
def as_before():
    """The reader before both changes: span by span, every read opening its zarr array anew."""
    with span_by_span(), mock.patch.object(ActivationStore, "_array", lambda self, name: self.group[name]):
        yield


MODES = {"now": contextlib.nullcontext, "span by span": span_by_span, "before": as_before}


def spread(values: list[float], fmt: str) -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def measure(path: str, d: int, buffers: int, rounds: int, streams: tuple[int, ...], modes: list[str]) -> dict:
    """Each round reads `buffers` shuffle buffers' rows of a store holding two more (no pass ends)."""
    rows = buffers * buffer_rows(d)
    make_store(path, rows + 2 * buffer_rows(d), d)
    store = ActivationStore.open(path)
    out = {"codec": codec_us_per_row(store)}
    read_rows(store, 1, buffer_rows(d))  # warm-up: first calls, thread pools, the allocator
    for r in range(rounds):
        for n_streams in streams:
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                with MODES[mode]():
                    store = ActivationStore.open(path)
                    out.setdefault((n_streams, mode), []).append(read_rows(store, n_streams, rows))
    return out


def print_rows(where: str, d: int, m: dict, streams: tuple[int, ...]) -> None:
    def ratio(n_streams, mode):
        if (n_streams, mode) not in m:
            return "= now (local spans are read in turn)"
        return spread([a[0] / b[0] for a, b in zip(m[(n_streams, "now")], m[(n_streams, mode)])], "{:.2f}") + "x"

    for n_streams in streams:
        now = m[(n_streams, "now")]
        print(f"| {where} | {d} | {n_streams} | {spread([r for r, _ in now], '{:,.0f}')} | "
              f"{spread([u for _, u in now], '{:.1f}')} | {m['codec']:.1f} | {ratio(n_streams, 'span by span')} | "
              f"{ratio(n_streams, 'before')} |")


@contextlib.contextmanager
def s3_server(bucket: str):
    """moto's S3 server as its own process on a free port, one bucket, and the environment
    pointing botocore (s3fs, so zarr's FsspecStore) at it with dummy credentials."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(100):  # the server takes a moment to listen
            try:
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
                break
            except Exception:  # noqa: BLE001  connection refused until it is up
                time.sleep(0.1)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.terminate()
        server.wait()


def shard_checks(bucket: str, rounds: int, shards: int = 14) -> tuple[list[float], list[float]]:
    """Seconds to check that `shards` shard objects exist (what a shuffle buffer of a 1B-row
    store asks per array), all requests at once (`urls.file_sizes`) and one after another."""
    import zarr

    from rqae_pipeline import integrity, urls

    url = f"{bucket}/checks.zarr"
    arr = zarr.create_array(store=url, shape=(64 * 256, 8), chunks=(256, 8), shards=(256, 8), dtype="float16",
                            overwrite=True)
    arr[:] = 1
    keys = [integrity.shard_key(arr, "", i).lstrip("/") for i in range(0, 64, 64 // shards)][:shards]
    assert all(urls.file_sizes(url, keys))  # every key present, none empty
    at_once, in_turn = [], []
    pairs = [(urls.file_sizes, at_once), (lambda u, k: [urls.is_file(u, key) for key in k], in_turn)]
    for r in range(rounds):
        for check, out in (pairs if r % 2 == 0 else pairs[::-1]):
            t = time.perf_counter()
            check(url, keys)
            out.append(time.perf_counter() - t)
    return at_once, in_turn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--buffers", type=int, default=8, help="shuffle buffers read per measurement")
    ap.add_argument("--s3-buffers", type=int, default=4, help="the same from the S3 server (0: no S3 rows)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} rounds of {args.buffers} shuffle buffers ({args.s3_buffers} from S3; "
          f"{BUFFER_BYTES >> 20} MB of float32 rows each), batch {BATCH}, fp16 stores")
    print("| store | d | streams | rows/s (min / median / max) | CPU µs/row | codec alone, µs/row | "
          "now / span by span | now / before (also reopening arrays) |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for d in (640, 2304):
            m = measure(str(Path(tmp) / f"store-{d}.zarr"), d, args.buffers, args.rounds, (1, 2), ["now", "before"])
            print_rows("local", d, m, (1, 2))
    if args.s3_buffers:
        with s3_server("bench") as bucket:
            m = measure(f"{bucket}/store.zarr", 2304, args.s3_buffers, args.rounds, (1,), list(MODES))
            print_rows("S3 (moto)", 2304, m, (1,))
            at_once, in_turn = shard_checks(bucket, max(9, args.rounds))
        ratio = spread([b / a for a, b in zip(at_once, in_turn)], "{:.2f}")
        at_once, in_turn = (spread([1e3 * t for t in ts], "{:.1f}") for ts in (at_once, in_turn))
        print(f"\nshard checks of one buffer (14 objects) from S3: at once {at_once} ms, one by one {in_turn} ms; "
              f"one by one / at once {ratio}x")


if __name__ == "__main__":
    main()
