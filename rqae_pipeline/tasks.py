"""Running evaluation tasks: in this process, on a dask `LocalCluster` of worker processes,
or on an existing dask scheduler (`evaluate`'s shard and CE tasks go through `run_tasks`).

Config-agnostic: the functions read `workers`, `scheduler` and `threads_per_worker` from
the config they are given (an `evaluate.EvalConfig`)."""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager

import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.io import sigint_handler


def _in_worker(fn, torch_threads: int | None, *args):
    # dask's nanny starts workers with OMP_NUM_THREADS=1; give each local worker its
    # share of the cores instead, so 1 worker matches the single-process path.
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return fn(*args)


@contextmanager
def dask_client(cfg):
    """A client of `cfg.scheduler`, or of a LocalCluster of `cfg.workers` processes; None
    when the work runs in this process."""
    if not cfg.workers and not cfg.scheduler:
        yield None
        return
    from dask.distributed import Client

    cluster = None
    try:
        if cfg.scheduler:
            client = Client(cfg.scheduler, timeout="10s")
        else:
            cluster = local_cluster(cfg.workers)
            client = Client(cluster)
    except (OSError, TimeoutError, ValueError) as e:
        if cluster is not None:
            cluster.close()
        where = f"the dask scheduler {cfg.scheduler!r}" if cfg.scheduler else "a local dask cluster"
        raise RQAEError(f"cannot reach {where}: {e}") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def local_cluster(workers: int):
    """A LocalCluster of `workers` single-threaded worker processes.

    dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, so glibc hands every
    freed block above 64 kB back to the OS; torch's per-batch temporaries are then mapped
    and page-faulted anew each batch, which measured 2.3x the CPU time of the same task in
    this process (bench/eval.py). The workers here keep glibc's default instead. Nor do they
    run dask's statistical profiler (a stack sample of the task thread every 10 ms, ~1% of a
    core): its only reader is the dashboard, which this cluster does not serve.

    Every process of the cluster also wakes less often: the event-loop health tick (every
    20 ms by default) and the system monitor (500 ms) only feed diagnostics, and the memory
    monitor still enforces the memory limit once a second. On a harvest whose workers fill
    every core, these wake-ups take their CPU from the forwards: with one worker they spent
    6 CPU-seconds per 16,384 tokens outside the forward thread (the worker's event loop,
    and the scheduler and nanny in this process), 2.3 with these settings."""
    import dask.config
    from dask.distributed import LocalCluster

    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ,
                          "distributed.worker.profile.enabled": False,
                          "distributed.admin.tick.interval": "1s",
                          "distributed.admin.system-monitor.interval": "2s",
                          "distributed.worker.memory.monitor-interval": "1s"}):
        # A failing task is re-raised in this process, which prints it as one `error:` line;
        # the workers' own ERROR logs would print its traceback to the same terminal again.
        with workers_ignore_sigint():
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                silence_logs=logging.CRITICAL)


def workers_ignore_sigint():
    """SIGINT ignored while a cluster's worker processes start, so they inherit it ignored:
    a Ctrl-C reaches the terminal's whole process group, and the workers would each print a
    traceback before this process, which owns them, closes the cluster and prints one line."""
    return sigint_handler(signal.SIG_IGN)


def run_tasks(fn, args_list: list[tuple], cfg, desc: str, progress: bool, client=None) -> list:
    """Run fn(*args) for each args, in this process or on dask.distributed (on `client`, or
    on a cluster made for this call from `cfg`)."""
    from tqdm import tqdm

    if client is None and (cfg.workers or cfg.scheduler):
        with dask_client(cfg) as own:
            return run_tasks(fn, args_list, cfg, desc, progress, client=own)
    # the bar is closed (its line ended) before an error propagates, so the error line starts with `error:`
    with tqdm(total=len(args_list), desc=desc, unit="shard", disable=not progress) as bar:
        if client is None:
            results = []
            for args in args_list:
                results.append(fn(*args))
                bar.update()
            return results
        from dask.distributed import as_completed

        share = max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
        threads = cfg.threads_per_worker or (None if cfg.scheduler else share)
        futures = [client.submit(_in_worker, fn, threads, *args, pure=False) for args in args_list]
        index = {f.key: i for i, f in enumerate(futures)}
        results = [None] * len(futures)
        for fut in as_completed(futures):
            results[index[fut.key]] = fut.result()
            bar.update()
        return results
