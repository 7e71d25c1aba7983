"""Evaluation throughput: single process vs dask.distributed with 1 and 2 workers (not a test).

A store of random rows (32 shards) and an RQAE with random weights; every path computes
the same float64 sums (checked here too), so only the time differs. Measured in one run:

    python bench/eval.py            # d=640, n_q=256, 32 shards of 16,384 rows
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


def timed(cfg: EvalConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    result = evaluate(cfg, progress=False)
    return time.perf_counter() - t0, result


def timed_on_cluster(base: dict, workers: int) -> tuple[float, dict, float]:
    """Throughput on a started, warmed cluster (reached through its scheduler address, as a
    multi-machine user would), plus the cluster's start-up time on its own."""
    from dask.distributed import Client, LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    with Client(cluster) as client:
        client.run(lambda: __import__("rqae_pipeline.evaluate"))  # workers import torch & co. once
        startup = time.perf_counter() - t0
        # workers on one machine: each gets its share of the cores, as --workers does
        threads = max(1, (os.cpu_count() or 1) // workers)
        t, result = timed(EvalConfig(**base, scheduler=cluster.scheduler_address, threads_per_worker=threads))
    cluster.close()
    return t, result, startup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    d, n_q, shards = (640, 256, 32) if not args.quick else (128, 32, 8)
    rows = shards * 128 * 128
    with tempfile.TemporaryDirectory() as tmp:
        store, model_dir = Path(tmp) / "s.zarr", Path(tmp) / "rqae"
        make_store(store, rows, d)
        torch.manual_seed(0)
        RQAE(RQAEConfig(d_in=d, n_q=n_q)).save(model_dir)
        base = dict(store=store, model=model_dir, rows="all", space="normalised")
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}; store {rows:,} rows x d={d} in "
              f"{shards} shards; RQAE n_q={n_q} (random weights), prefixes 1..{n_q}")
        t_single, r_single = timed(EvalConfig(**base))
        t_one, r_one, up_one = timed_on_cluster(base, 1)
        t_two, r_two, up_two = timed_on_cluster(base, 2)
    same = all(abs(r["metrics"][k]["fvu"] - r_single["metrics"][k]["fvu"]) <= 1e-9 * r_single["metrics"][k]["fvu"]
               for r in (r_one, r_two) for k in r_single["metrics"])
    print("\n| measure | value | target |\n|---|---|---|")
    print(f"| single process | {t_single:.1f} s ({rows / t_single:,.0f} tok/s) | |")
    print(f"| dask LocalCluster, 1 worker | {t_one:.1f} s ({rows / t_one:,.0f} tok/s) | |")
    print(f"| dask LocalCluster, 2 workers | {t_two:.1f} s ({rows / t_two:,.0f} tok/s) | |")
    print(f"| 2 workers / 1 worker throughput | **{t_one / t_two:.2f}x** | >= 1.6x |")
    print(f"| dask 1 worker overhead vs single process | **{(t_one / t_single - 1) * 100:+.1f}%** | < 10% |")
    print(f"| results identical across paths (rel 1e-9) | {same} | |")
    print(f"| cluster start-up (not in the times above): 1 / 2 workers | {up_one:.1f} s / {up_two:.1f} s | |")


if __name__ == "__main__":
    main()
