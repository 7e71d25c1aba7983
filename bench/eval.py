"""Evaluation throughput: single process vs dask.distributed with 1 and 2 workers (not a test).

A store of random rows (32 shards) and an RQAE with random weights; every path computes
the same float64 sums (checked here too), so only the time differs. A dask worker is
given one torch thread, as dask gives it one task thread, and the overhead target compares
it with the single-process path at one thread; the single-process path at its default
(all cores) and `--workers 1`'s default (all cores to its one worker) are printed too.
Measured in one run:

    python bench/eval.py            # d=640, n_q=256, 16 shards of 16,384 rows (~8 min on 2 cores)
    python bench/eval.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train import make_store  # noqa: E402  (bench/train.py: a store of random rows via the store API)

from rqae_pipeline.evaluate import EvalConfig, evaluate  # noqa: E402
from rqae_pipeline.models.rqae import RQAE, RQAEConfig  # noqa: E402
from rqae_pipeline.tasks import local_cluster  # noqa: E402


def timed(cfg: EvalConfig, client=None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = evaluate(cfg, progress=False, client=client)
    return time.perf_counter() - t0, result


def single_process(base: dict, threads: int) -> tuple[float, dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return timed(EvalConfig(**base))
    finally:
        torch.set_num_threads(before)


def on_cluster(base: dict, workers: int, threads: int) -> tuple[float, dict, float]:
    """Time on a started, warmed LocalCluster (the run's own start-up reported apart): the
    client is handed to `evaluate` as `rqae compare-gemmascope` does."""
    from dask.distributed import Client

    t0 = time.perf_counter()
    cluster = local_cluster(workers)
    with Client(cluster) as client:
        client.run(lambda: __import__("rqae_pipeline.evaluate"))  # workers import torch & co. once
        startup = time.perf_counter() - t0
        t, result = timed(EvalConfig(**base, workers=workers, threads_per_worker=threads), client)
    cluster.close()
    return t, result, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d=128, n_q=32, 8 shards")
    ap.add_argument("--d", type=int, help="activation width (default 640, Gemma-3-270M's)")
    ap.add_argument("--n-q", type=int, help="RQAE layers (default 256)")
    ap.add_argument("--shards", type=int, help="store shards = evaluation tasks (default 16)")
    args = ap.parse_args()
    d, n_q, shards = (640, 256, 16) if not args.quick else (128, 32, 8)
    d, n_q, shards = args.d or d, args.n_q or n_q, args.shards or shards
    rows = shards * 128 * 128
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        store, model_dir = Path(tmp) / "s.zarr", Path(tmp) / "rqae"
        make_store(store, rows, d)
        torch.manual_seed(0)
        RQAE(RQAEConfig(d_in=d, n_q=n_q)).save(model_dir)
        base = dict(store=store, model=model_dir, rows="all", space="normalised")
        print(f"machine: {cores} CPU cores, torch {torch.__version__}; store {rows:,} rows x d={d} in "
              f"{shards} shards; RQAE n_q={n_q} (random weights), prefixes 1..{n_q}")
        single_process(base, 1)  # warm-up: imports, page cache, allocator
        runs = {
            "single process, 1 torch thread": single_process(base, 1),
            f"single process, {cores} torch threads (default)": single_process(base, cores),
        }
        t1, r1, up1 = on_cluster(base, 1, 1)
        t2, r2, up2 = on_cluster(base, 2, 1)
        runs["dask LocalCluster, 1 worker x 1 thread"] = (t1, r1)
        runs["dask LocalCluster, 2 workers x 1 thread"] = (t2, r2)
        td, rd, _ = on_cluster(base, 1, cores)
        runs[f"dask LocalCluster, 1 worker x {cores} threads (`--workers 1` default)"] = (td, rd)
    ref = runs["single process, 1 torch thread"]
    same = all(abs(r["metrics"][k]["fvu"] - ref[1]["metrics"][k]["fvu"]) <= 1e-9 * ref[1]["metrics"][k]["fvu"]
               for _, r in runs.values() for k in ref[1]["metrics"])
    print("\n| measure | value | target |\n|---|---|---|")
    for name, (t, _) in runs.items():
        print(f"| {name} | {t:.1f} s ({rows / t:,.0f} tok/s) | |")
    print(f"| 2 workers / 1 worker throughput (1 thread each) | **{t1 / t2:.2f}x** | >= 1.6x |")
    print(f"| dask 1 worker vs single process, same thread count: overhead | **{(t1 / ref[0] - 1) * 100:+.1f}%** "
          f"| < 10% |")
    print(f"| dask 2 workers x 1 thread / single process x {cores} threads | {runs[list(runs)[1]][0] / t2:.2f}x | |")
    print(f"| results identical across all paths (rel 1e-9) | {same} | |")
    print(f"| cluster start-up (not in the times above): 1 / 2 workers | {up1:.1f} s / {up2:.1f} s | |")


if __name__ == "__main__":
    main()
