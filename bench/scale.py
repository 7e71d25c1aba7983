"""Parallel-harvest scaling (not a test): `harvest_parallel` tok/s on a dask LocalCluster of
2 workers x 1 torch thread against 1 worker x 1 thread, same settings and tokens.

Both clusters stay up for the whole run and each is warmed once (the model loads on every
worker), so the timings are of the harvest alone: packing, forward passes, encoding,
writes and commits. The 1- and 2-worker runs alternate for `--rounds` rounds, and each
round's ratio (2-worker tok/s / 1-worker tok/s) is reported as min / median / max, so
drift from other load on a shared machine hits both sides of a ratio alike. The first
round also checks that the two stores are byte-identical (the manifest's creation time
aside).

    python bench/scale.py                                            # offline Gemma-3-270M, 8,192 tokens
    python bench/scale.py --model tiny-random:0 --tokens 2048 --rounds 2   # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rqae_pipeline.harvest import HarvestConfig
from rqae_pipeline.harvest_dask import DaskConfig, harvest_parallel
from rqae_pipeline.lm import OFFLINE_GEMMA


def store_bytes(path: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p == path / "zarr.json":
                meta = json.loads(data)
                meta["attributes"]["rqae"]["created"] = None
                data = json.dumps(meta).encode()
            files[str(p.relative_to(path))] = data
    return files


def timed_run(cfg: HarvestConfig, client, workers: int, out: Path) -> float:
    """tok/s of one harvest into a fresh `out`."""
    t0 = time.perf_counter()
    result = harvest_parallel(dataclasses.replace(cfg, out=out), DaskConfig(workers=workers, threads_per_worker=1),
                              client=client, progress=False)
    return result.new_tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=OFFLINE_GEMMA)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--contexts-per-shard", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from dask.distributed import Client

    from rqae_pipeline.tasks import local_cluster

    root = Path(tempfile.mkdtemp(prefix="rqae-scale-"))
    cfg = HarvestConfig(out=root / "unused", model=args.model, tokens=args.tokens, context_length=args.context_length,
                        batch_contexts=args.batch_size, contexts_per_shard=args.contexts_per_shard,
                        contexts_per_chunk=args.batch_size, device="cpu")
    clusters = {n: local_cluster(n) for n in (1, 2)}
    clients = {n: Client(cluster) for n, cluster in clusters.items()}
    try:
        for n, client in clients.items():  # warm-up: every worker loads the model
            client.wait_for_workers(n)
            harvest_parallel(dataclasses.replace(cfg, out=root / f"warm-{n}", tokens=args.context_length * n *
                                                 args.contexts_per_shard), DaskConfig(workers=n, threads_per_worker=1),
                             client=client, progress=False)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for n in (1, 2):
                rates[n].append(timed_run(cfg, clients[n], n, root / f"r{r}-{n}"))
            if r == 0 and store_bytes(root / "r0-1") != store_bytes(root / "r0-2"):
                raise SystemExit("the 1- and 2-worker stores differ")
            for n in (1, 2):
                shutil.rmtree(root / f"r{r}-{n}")
            print(f"round {r}: 1 worker {rates[1][-1]:,.0f} tok/s, 2 workers {rates[2][-1]:,.0f} tok/s", flush=True)
    finally:
        for n in clients:
            clients[n].close()
            clusters[n].close()
        shutil.rmtree(root, ignore_errors=True)
    ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    print(f"{args.model}, {args.tokens:,} tokens, {args.rounds} rounds: 1 worker median "
          f"{statistics.median(rates[1]):,.0f} tok/s, 2 workers median {statistics.median(rates[2]):,.0f} tok/s; "
          f"2/1 ratio min {min(ratios):.2f} / median {statistics.median(ratios):.2f} / max {max(ratios):.2f}")


if __name__ == "__main__":
    main()
