"""`rqae verify` on a local folder and on an S3-protocol server (not a test). Verify reads
every committed shard of every row array once. Two ways:

one shard and array at a time   as verify read before: for each shard, each array in turn
                                opened, its shard file stat'ed, read, stat'ed again
as it is                        `verify.verify_store`: arrays opened once, every shard's size
                                from one listing, a shard's arrays and the next shard's read
                                together (verify.READ_AHEAD)

Both run the same content checks on the same rows and must report the same bytes and no
problem. The store is the tests' tiny harvest (128-row shards, six row arrays), so the
figure is the per-request cost that dominates on an object store, not decompression. The
bucket is moto's ThreadedMotoServer in this process, through s3fs (bench/scale.py): a real
bucket's round trips are longer, which favours reading together more. Rounds interleave the
ways (every other round reversed); each ratio is the median of per-round ratios, min / max.

    python bench/verify.py                      # 48 shards, 7 rounds (~5 min)
    python bench/verify.py --shards 8 --rounds 1    # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from rqae_pipeline.harvest import harvest
from rqae_pipeline.integrity import shard_key, unusable_shards
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.urls import size_of
from rqae_pipeline.verify import VerifyReport, _check_rows, _row_arrays, verify_store

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from scale import moto_bucket, spread  # noqa: E402

from helpers import tiny_config  # noqa: E402  (the tests' tiny harvest: 128-row shards)

BUCKET = "rqae-bench-verify"
WAYS = ("one shard and array at a time", "as it is")


def verify_one_at_a_time(store: ActivationStore) -> VerifyReport:
    """How verify read before: every array of every shard in turn, each read between two stats."""
    n, per, names = store.n_tokens, store.spec.shard_rows, _row_arrays(store)
    report = VerifyReport(path=str(store.path), tokens=n, contexts=store.n_contexts, shards=-(-n // per),
                          arrays=len(names))
    special_bits: set[tuple[int, int]] = set()
    for i in range(report.shards):
        cols = {}
        for name in names:
            arr = store.group[name]
            unusable = unusable_shards(store.path, arr, name, [i])
            report.problems += [f"{key}: {what}" for key, what in unusable.items()]
            cols[name] = arr[i * per: min((i + 1) * per, n)]
            report.bytes_read += size_of(store.path, shard_key(arr, name, i))
        _check_rows(store, i * per, cols, report, special_bits)
    return report


def timed(way: str, where: str) -> tuple[float, VerifyReport]:
    store = ActivationStore.open(where)  # opened anew each time: no array kept from an earlier run
    t0 = time.perf_counter()
    report = verify_one_at_a_time(store) if way == WAYS[0] else verify_store(store)
    return time.perf_counter() - t0, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, moto_bucket(BUCKET) as fs:
        local = Path(tmp) / "verify.zarr"
        harvest(tiny_config(local, tokens=args.shards * 128), progress=False)
        fs.put(str(local), f"{BUCKET}/verify.zarr", recursive=True)
        places = {"local": str(local), "s3": f"s3://{BUCKET}/verify.zarr"}
        n_arrays = len(_row_arrays(ActivationStore.open(local)))
        seconds = {(w, p): [] for w in WAYS for p in places}
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                for place, where in places.items():
                    s, report = timed(way, where)
                    assert report.ok and report.bytes_read > 0, report.problems[:3]
                    seconds[way, place].append(s)
            print(f"round {r + 1}: " + ", ".join(f"{w} {p} {seconds[w, p][-1]:.2f} s" for w, p in seconds),
                  file=sys.stderr)
        _, before = timed(WAYS[0], places["s3"])
        _, now = timed(WAYS[1], places["s3"])
        assert (before.bytes_read, before.problems) == (now.bytes_read, now.problems)  # the same reads and checks
    print(f"\n{args.shards} shards x {n_arrays} row arrays, {args.rounds} rounds; min / median / max\n")
    print("| where | way | s per verify | ms per shard | before / now |")
    print("|---|---|---|---|---|")
    for place in places:
        ratio = [b / n for b, n in zip(seconds[WAYS[0], place], seconds[WAYS[1], place])]
        for way in WAYS:
            per_shard = [1000 * s / args.shards for s in seconds[way, place]]
            last = spread(ratio) if way == WAYS[1] else ""
            print(f"| {place} | {way} | {spread(seconds[way, place])} | {statistics.median(per_shard):.1f} | {last} |")


if __name__ == "__main__":
    main()
