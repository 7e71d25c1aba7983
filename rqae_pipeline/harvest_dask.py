"""Parallel harvest on dask: `rqae harvest --workers N` (a LocalCluster of N single-threaded
worker processes) or `--scheduler tcp://HOST:PORT` (an existing cluster, e.g. dask-cuda's
`LocalCUDACluster`, one worker per GPU).

Shards are the unit of work. The client packs the corpus into contexts (cheap: tokenising)
and sends each shard's token ids to a worker; the worker runs the forward pass, normalises,
encodes and writes that whole shard into the store (shard_writer.py, as the single process
does) and returns the shard's per-batch storage-error statistics. The client alone holds
the store lock, sizes the arrays before a shard is sent (so workers never rewrite array
metadata), folds the statistics in store order and commits the longest finished prefix of
shards, with the corpus position after that prefix. So the store 1 or N workers write is the
single-process store, byte for byte (at equal torch thread counts: CPU results can depend
on them): the same batches (a batch never crosses a shard), the same fp8 codec mean (from
the store's first batch, computed by one task before any shard encodes), the same float64
sums, the same manifest.

A worker that dies is dask's to retry (its shard is rewritten whole, elsewhere); a client
killed with -9 takes its LocalCluster's workers with it, and `--resume` truncates the
shards written but not committed and redoes them. Each worker loads the model once and
keeps it, with the TF32 switch set for it (forward.worker_lm). With `--workers N` on a
machine with G GPUs, worker i runs on cuda:(i mod G). The forward's error against float32
(manifest `forward_error`) is measured by one task before any shard is sent, as the single
process measures it before its first batch.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.forward import WorkerModel, measure_forward_error, record_forward_error, worker_lm
from rqae_pipeline.harvest import (
    Contexts,
    HarvestConfig,
    HarvestResult,
    ModelFacts,
    compiled_batch,
    forward_batch,
    model_facts,
    open_store_for_writing,
    plan_harvest,
    progress_bar,
    take_contexts,
)
from rqae_pipeline.shard_writer import (
    BatchError,
    Committed,
    InterruptShield,
    StorageError,
    codec_mean,
    commit,
    disk_error,
    encode_batch,
    reserve_to,
    write_shard,
)
from rqae_pipeline.store import ActivationStore, StoreLock
from rqae_pipeline.tasks import dask_client
from rqae_pipeline.urls import Location, location, scheme_of

TASK_RETRIES = 2  # a task that raises (say a transient object-store error) runs again; dead workers are dask's
WORKER_WAIT_S = 60  # how long a scheduler may take to show a first worker


@dataclass(frozen=True, kw_only=True)
class DaskConfig:
    workers: int = 0  # N: a LocalCluster of N single-threaded worker processes
    scheduler: str | None = None  # or the address of an existing dask scheduler
    # torch threads in each worker; default: the cores shared out among a LocalCluster's
    # workers, a scheduler's workers keep their own setting
    threads_per_worker: int | None = None

    def __post_init__(self):
        if self.workers < 0:
            raise RQAEError(f"--workers must be 0 (this process) or more, got {self.workers}")
        if self.workers and self.scheduler:
            raise RQAEError("give --workers (a local cluster) or --scheduler (an existing one), not both")
        if not self.workers and not self.scheduler:
            raise RQAEError("a parallel harvest needs --workers N or --scheduler ADDRESS")
        if self.threads_per_worker is not None and self.threads_per_worker < 1:
            raise RQAEError(f"threads per worker must be at least 1, got {self.threads_per_worker}")


@dataclass(frozen=True)
class ShardTask:
    index: int  # the shard's number in the store
    start_row: int  # its first row
    first_row: int  # the first row computed here; rows before it are a committed partial shard, carried
    first_seq: int  # context index of tokens[0]
    tokens: np.ndarray  # (contexts, context_length) token ids


@dataclass(frozen=True)
class ShardDone:
    index: int
    rows: int
    errors: list[BatchError]  # per batch, in order: the client folds them in store order


@dataclass(frozen=True)
class ShardFailed:
    """Bad data (non-finite activations, an overflowing dtype): returned, not raised, so
    dask does not retry what would fail the same way."""

    index: int
    message: str


# --------------------------------------------------------------------------- worker side

def describe_model(job: WorkerModel, cfg: HarvestConfig, with_tokenizer: bool) -> tuple[ModelFacts, object | None]:
    """What the client needs to make the store and pack contexts: the model's facts and, unless
    the client holds it already, its tokenizer."""
    lm = worker_lm(job)
    return model_facts(cfg, lm), lm.tokenizer if with_tokenizer else None


def first_batch_mean(job: WorkerModel, store_path: Location, tokens: np.ndarray) -> np.ndarray:
    """The fp8 codec mean of a new store: its first batch's, as the single process fixes it."""
    lm = worker_lm(job)
    return codec_mean(forward_batch(lm, ActivationStore.open(store_path), tokens, 0, float(lm.model.cfg.eps)))


def forward_error(job: WorkerModel, store_path: Location, tokens: np.ndarray) -> dict:
    """A new store's `forward_error` (forward.py), measured where its shards will run."""
    return measure_forward_error(worker_lm(job), ActivationStore.open(store_path), tokens)


def harvest_shard(job: WorkerModel, store_path: Location, task: ShardTask, mean: np.ndarray | None,
                  owner: dict) -> ShardDone | ShardFailed:
    """Forward, normalise, encode and write one shard (its committed rows carried as stored),
    unless the store's lock no longer holds `owner`, the record of the client that sent it."""
    lm = worker_lm(job)
    store = ActivationStore.open(store_path).reopen_for_append()
    spec, eps = store.spec, float(lm.model.cfg.eps)
    pieces = [store.read_encoded(task.start_row, task.first_row)] if task.first_row > task.start_row else []
    errors = []
    try:
        for i in range(0, len(task.tokens), spec.batch_contexts):
            batch = forward_batch(lm, store, task.tokens[i:i + spec.batch_contexts], task.first_seq + i, eps)
            cols, err = encode_batch(batch, spec.dtype, mean)
            pieces.append(cols)
            errors.append(err)
    except RQAEError as e:
        return ShardFailed(task.index, str(e))
    # A task an interrupted client left running on a cluster of its own (--scheduler) ends
    # here: the store may be another harvest's by now, or a new store at the same place.
    if StoreLock(store.path).read() != owner:
        return ShardFailed(task.index, f"store {store.path} is no longer held by the harvest that sent shard "
                                       f"{task.index}; nothing written")
    return ShardDone(task.index, write_shard(store, task.start_row, pieces, grow_to=None), errors)


# --------------------------------------------------------------------------- client side


def harvest_parallel(cfg: HarvestConfig, cluster: DaskConfig, *, client=None, progress: bool = True,
                     notice: Callable[[str], None] | None = None) -> HarvestResult:
    """`harvest` on dask workers: on `client` when given (its cluster is left running), else on
    the cluster `cluster` names. An unreachable scheduler is an RQAEError before anything is written."""
    cfg = replace(cfg, out=_for_workers(cfg.out))
    lock, result = None, None
    try:
        with _connected(cluster, client) as c:
            job = WorkerModel(model=cfg.model, dtype=cfg.model_dtype, device=cfg.device,
                              spread_gpus=not cluster.scheduler, torch_threads=_torch_threads(cluster),
                              compiled_batch=compiled_batch(cfg))
            facts, tokenizer = _describe(c, job, cfg)
            spec, source, planned = plan_harvest(cfg, facts, tokenizer, notice)
            store, lock = open_store_for_writing(cfg, spec, facts, planned)
            source = record_forward_error(store, source, cfg.tokens, lambda tokens: c.submit(
                forward_error, job, store.path, tokens, pure=False).result())
            result = _run_parallel(cfg, c, job, store, source, progress=progress, owner=lock.read())
        # Interrupted, a LocalCluster is closed: no worker of it writes any more (a task still
        # running on a --scheduler cluster writes nothing once the lock is gone, and can no
        # longer reach rows past the commit once they are cut); finished, every shard is
        # written. Rows reserved or written past the commit and a killed worker's unfinished
        # writes go.
        store.truncate_to_committed()
        return result
    finally:
        if lock is not None:
            lock.release()


# The tokenizers the client packs with, by model name, kept for the process as each worker
# keeps its model: a large one is costly to send (Gemma-3's pickles to 28 MB, ~4 CPU-seconds
# to dump and load on 2 cores, the length of two shards), so it comes once, not every harvest.
_CLIENT_TOKENIZERS: dict[str, object] = {}


def _describe(client, job: WorkerModel, cfg: HarvestConfig) -> tuple[ModelFacts, object]:
    kept = _CLIENT_TOKENIZERS.get(cfg.model)
    facts, sent = client.submit(describe_model, job, cfg, kept is None, pure=False).result()
    if kept is None:
        kept = _CLIENT_TOKENIZERS[cfg.model] = sent
    return facts, kept


def _for_workers(out) -> Location:
    """The store's location as every worker can reach it: a path made absolute (a worker
    may run in another directory, or on another host sharing the file system)."""
    where = location(out)
    if isinstance(where, Path):
        return where.absolute()
    if scheme_of(where) == "memory":
        raise RQAEError(f"{where}: a memory:// store lives in one process; dask workers cannot write it "
                        f"(harvest it without --workers/--scheduler, or use a path or an object store)")
    return where


def _torch_threads(cluster: DaskConfig) -> int | None:
    if cluster.threads_per_worker or cluster.scheduler:
        return cluster.threads_per_worker
    return max(1, (os.cpu_count() or 1) // cluster.workers)


@contextlib.contextmanager
def _connected(cluster: DaskConfig, client):
    if client is not None:
        yield client
        return
    with dask_client(cluster) as c:
        try:
            c.wait_for_workers(1, timeout=WORKER_WAIT_S)
        except TimeoutError:
            raise RQAEError(f"the dask scheduler {cluster.scheduler!r} has no workers (waited "
                            f"{WORKER_WAIT_S} s)") from None
        yield c


def plan_shards(source: Contexts, at: Committed, target_contexts: int, spec) -> Iterator[tuple[ShardTask, Committed]]:
    """The shard tasks from the committed position on, each with the commit it completes.
    The first may finish a committed partial shard; the last is short when the target or
    the corpus ends inside it."""
    contexts, per, R = at.contexts, spec.contexts_per_shard, spec.rows_per_context
    while contexts < target_contexts:
        group, state = take_contexts(source, min(per - contexts % per, target_contexts - contexts), None)
        if not group:
            return
        task = ShardTask(index=contexts // per, start_row=contexts // per * spec.shard_rows, first_row=contexts * R,
                         first_seq=contexts, tokens=np.stack(group))
        contexts += len(group)
        yield task, Committed(contexts * R, contexts, state)


def _run_parallel(cfg: HarvestConfig, c, job: WorkerModel, store: ActivationStore, source: Contexts, *,
                  progress: bool, owner: dict) -> HarvestResult:
    R = store.spec.rows_per_context
    target_contexts = -(-cfg.tokens // R)
    start_tokens, t0 = store.n_tokens, time.perf_counter()
    run = _Commits(c, job, store, plan_shards(source, Committed.of(store), target_contexts, store.spec),
                   progress_bar(target_contexts * R, start_tokens, progress), target_rows=target_contexts * R,
                   owner=owner)
    interrupted = False
    try:
        # the corpus ran out when the last shard ends short of the target (recorded in the manifest)
        run.run(lambda at: {"requested_tokens": cfg.tokens} if at.contexts < target_contexts else None)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        run.cancel()  # a no-op once every shard is committed
        run.bar.close()
    return HarvestResult(store.path, store.n_tokens, store.n_tokens - start_tokens, time.perf_counter() - t0,
                         interrupted, exhausted=run.exhausted is not None, requested_tokens=cfg.tokens)


class _Commits:
    """Keeps a bounded window of shard tasks in flight and commits finished shards in order."""

    def __init__(self, c, job: WorkerModel, store: ActivationStore, plan: Iterator, bar, *, target_rows: int,
                 owner: dict):
        from dask.distributed import as_completed

        self.c, self.job, self.store, self.plan, self.bar, self.owner = c, job, store, plan, bar, owner
        self.at = Committed.of(store)  # the last commit
        self.target_rows, self.reserved = target_rows, 0  # the rows the arrays are sized to, once known
        self.error = StorageError.from_manifest(store.manifest)
        self.window = 2 * max(1, sum(c.nthreads().values())) + 1  # shards submitted but not committed
        self.order: deque[int] = deque()  # submitted shards, in store order
        self.futures: dict[int, object] = {}
        self.after: dict[int, Committed] = {}  # the commit each shard completes
        self.finished: dict[int, ShardDone] = {}
        self.completed = as_completed()
        self.mean = store.codec_mean()
        self.mean_future = None
        self.exhausted: dict | None = None

    def run(self, exhausted: Callable[[Committed], dict | None]) -> None:
        """Every shard, committed in order; the last commit says `complete` and `exhausted(at)`."""
        shield = InterruptShield()
        with shield.installed():
            with shield.writing():
                self._submit()
            if self.mean_future is not None:  # fixed before any commit, as the single process does
                mean = self.mean_future.result()
                with shield.writing():
                    self.mean = mean
                    self.store.set_array("mean", mean)
            for future in self.completed:
                done = self._result(future)
                with shield.writing():
                    self.finished[done.index] = done
                    ready = []
                    while self.order and self.order[0] in self.finished:
                        ready.append(self.order.popleft())
                    if ready:  # the longest finished prefix, in one commit
                        self._commit(ready)
                    self._submit()
            with shield.writing():
                self.exhausted = exhausted(self.at)
                commit(self.store, self.at, self.error, complete=True, exhausted=self.exhausted)

    def cancel(self) -> None:
        pending = [f for f in [*self.futures.values(), self.mean_future] if f is not None and not f.done()]
        if pending:
            with contextlib.suppress(Exception):
                self.c.cancel(pending)

    def _submit(self) -> None:
        while len(self.order) < self.window and (item := next(self.plan, None)) is not None:
            task, after = item
            if self.store.spec.dtype == "fp8" and self.mean is None and self.mean_future is None:
                self.mean_future = self.c.submit(first_batch_mean, self.job, self.store.path,
                                                 task.tokens[:self.store.spec.batch_contexts], pure=False)
            if after.tokens > self.reserved:  # before the task exists: workers never resize
                self.reserved = reserve_to(self.store.spec, after.tokens, self.target_rows)
                self.store.reserve_rows(self.reserved)
            mean = self.mean if self.mean is not None else self.mean_future
            future = self.c.submit(harvest_shard, self.job, self.store.path, task, mean, self.owner, pure=False,
                                   retries=TASK_RETRIES)
            self.order.append(task.index)
            self.futures[task.index], self.after[task.index] = future, after
            self.completed.add(future)

    def _result(self, future) -> ShardDone:
        from dask.distributed import KilledWorker

        try:
            done = future.result()
        except KilledWorker as e:
            raise RQAEError(f"dask workers kept dying while harvesting a shard ({e}); committed rows are intact, "
                            f"rerun with --resume") from None
        except OSError as e:
            raise disk_error(e) from None
        if isinstance(done, ShardFailed):
            raise RQAEError(done.message)
        return done

    def _commit(self, indices: list[int]) -> None:
        before = self.at.tokens
        for index in indices:  # in store order, so the error sums are the single process's bits
            for err in self.finished.pop(index).errors:
                self.error.add(err)
            del self.futures[index]
            self.at = self.after.pop(index)
        commit(self.store, self.at, self.error, complete=False, exhausted=None)
        self.bar.update(self.at.tokens - before)


