"""The dask client's store work per shard (not a test). With `--workers N` / `--scheduler` the
client does, for every shard, in series: size the row arrays for it before the task is
submitted (workers never resize), and commit it once it and every shard before it are written.
Its shard rate is the harvest's ceiling, whatever the number of GPUs. Three ways, on a local
folder and on an S3-protocol server (moto's ThreadedMotoServer in this process, through s3fs,
as tests/test_object_store.py and bench/scale.py do):

grown each shard, one array after another   the client before RESERVE_SHARDS (as it was)
grown each shard, all arrays at once        RESERVE_SHARDS = 0 with `reserve_rows`
grown RESERVE_SHARDS shards ahead           the client as it is (`shard_writer.reserve_to`)

Each way sizes and commits `--shards` shards of a fresh tiny store, exactly the calls the
client makes; rounds interleave the ways (every other round reversed), and each ratio is
the median of per-round ratios, with min / max. The figure is the store work alone: the
client's packing (bench/pack.py) and dask's own scheduling come on top.

    python bench/client.py                # 200 shards, 5 rounds, local and s3 (~8 min)
    python bench/client.py --shards 40 --rounds 2        # smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rqae_pipeline import shard_writer
from rqae_pipeline.corpus import CorpusState
from rqae_pipeline.harvest import harvest
from rqae_pipeline.shard_writer import Committed, StorageError, commit, reserve_to
from rqae_pipeline.store import ActivationStore, row_arrays

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scale import moto_bucket, spread  # noqa: E402

from helpers import tiny_config  # noqa: E402  (the tests' tiny harvest: 128-row shards)

WAYS = ("grown each shard, one array after another", "grown each shard, all arrays at once",
        f"grown {shard_writer.RESERVE_SHARDS} shards ahead")
BUCKET = "rqae-bench-client"


def grow_one_after_another(store: ActivationStore, rows: int) -> None:
    """How the client sized the arrays before: each array opened and resized in turn."""
    for name in row_arrays(store.spec):
        arr = store.group[name]
        if arr.shape[0] < rows:
            arr.resize((rows,) + arr.shape[1:])


def client_ms_per_shard(url: str, way: str, shards: int) -> float:
    """Milliseconds per shard of the client's sizing and committing, on a fresh store at `url`."""
    store = ActivationStore.open(url).reopen_for_append()
    rows, at, error = store.spec.shard_rows, Committed.of(store), StorageError.from_manifest(store.manifest)
    target, reserved = at.tokens + shards * rows, 0
    t0 = time.perf_counter()
    for i in range(1, shards + 1):
        after = Committed(at.tokens + i * rows, at.contexts + i * store.spec.contexts_per_shard, CorpusState())
        if way == WAYS[0]:
            grow_one_after_another(store, after.tokens)
        elif way == WAYS[1]:
            store.reserve_rows(after.tokens)
        elif after.tokens > reserved:
            reserved = reserve_to(store.spec, after.tokens, target)
            store.reserve_rows(reserved)
        commit(store, after, error, complete=False, exhausted=None)
    seconds = time.perf_counter() - t0
    store.shrink_to_committed()
    return 1000 * seconds / shards


def rounds(make_store, args: argparse.Namespace, where: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for r in range(args.rounds + 1):  # round 0 warms: connections, zarr's codecs, the page cache
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            url = make_store(f"r{r}-{WAYS.index(way)}")
            ms = client_ms_per_shard(url, way, args.shards)
            if r:
                times[way].append(ms)
        if r:
            print(f"{where} round {r}: " + ", ".join(f"{w} {v[-1]:.1f} ms" for w, v in times.items()), flush=True)
    return times


def report(where: str, times: dict[str, list[float]]) -> None:
    for way, values in times.items():
        print(f"| {where}: {way}, ms per shard | {spread(values, '{:.1f}')} |")
    for way in WAYS[:2]:
        ratios = [a / b for a, b in zip(times[way], times[WAYS[2]], strict=True)]
        print(f"| {where}: {way} / {WAYS[2]} | **{spread(ratios)}** |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        template = Path(tmp) / "template.zarr"
        harvest(tiny_config(template, tokens=128), progress=False)  # one committed 128-row shard

        def local_copy(name: str) -> str:
            shutil.copytree(template, Path(tmp) / name)
            return str(Path(tmp) / name)

        results = {"local": rounds(local_copy, args, "local")}
        with moto_bucket(BUCKET) as fs:
            def bucket_copy(name: str) -> str:
                fs.put(str(template), f"{BUCKET}/{name}", recursive=True)
                return f"s3://{BUCKET}/{name}"

            results["s3"] = rounds(bucket_copy, args, "s3")
    print(f"\n{args.shards} shards a way, {args.rounds} rounds (min / median / max)\n\n| measure | value |\n|---|---|")
    for where, times in results.items():
        report(where, times)


if __name__ == "__main__":
    main()
