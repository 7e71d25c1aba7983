"""What becomes of a shard's batches: encoding, the storage-error statistics, the write and
the commit. The single-process writer thread (`ShardWriter`, fed by harvest.py's model
thread) and a dask worker (harvest_dask.py) both go through `encode_batch` and
`write_shard`, and both commits through `commit`, so they write the same bytes.
"""

from __future__ import annotations

import contextlib
import errno
import math
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.codec import StoreDtype, decode_acts, encode_acts
from rqae_pipeline.corpus import CorpusState
from rqae_pipeline.io import sigint_handler
from rqae_pipeline.store import ActivationStore, Flags


@dataclass
class Batch:
    """One forward pass's rows, normalised, before encoding."""

    acts: torch.Tensor  # (n, d) fp32, CPU
    scale: torch.Tensor
    tokens: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    flags: np.ndarray


@dataclass(frozen=True)
class BatchError:
    """float64 sufficient statistics of one batch's storage error (acts vs their decoding)."""

    sse: float
    sumsq: float
    sum: np.ndarray  # (d,) float64
    n: int


@dataclass
class StorageError:
    """The store's running storage-error sums (manifest `storage_error`). Batches are added
    in store order, whoever encoded them, so the float64 sums are the same bits."""

    sse: float = 0.0
    sumsq: float = 0.0
    sum: np.ndarray | None = None
    n: int = 0

    @classmethod
    def from_manifest(cls, manifest: dict) -> StorageError:
        err = manifest.get("storage_error", {})
        total = None if err.get("sum") is None else np.asarray(err["sum"], dtype=np.float64)
        return cls(err.get("sse", 0.0), err.get("sumsq", 0.0), total, err.get("n", 0))

    def add(self, e: BatchError) -> None:
        self.sse += e.sse
        self.sumsq += e.sumsq
        self.sum = e.sum if self.sum is None else self.sum + e.sum
        self.n += e.n

    def to_manifest(self) -> dict:
        return {"sse": self.sse, "sumsq": self.sumsq, "n": self.n,
                "sum": None if self.sum is None else self.sum.tolist()}


@dataclass(frozen=True)
class Committed:
    """What a commit makes visible: rows, contexts and where the corpus continues."""

    tokens: int
    contexts: int
    corpus_state: CorpusState

    @classmethod
    def of(cls, store: ActivationStore) -> Committed:
        c = store.manifest["committed"]
        return cls(c["tokens"], c["contexts"], CorpusState(*c["corpus_state"]))


def codec_mean(b: Batch) -> np.ndarray:
    """The fp8 codec's per-dimension mean, fixed by the store's very first batch: the mean
    of its ordinary rows (no special tokens, no outliers), or of all its rows where it has
    none (a corpus that opens with empty documents): the mean of no rows is NaN, and a NaN
    mean, written before the first commit, would fail every batch of every resume."""
    ordinary = (b.flags & int(Flags.ANY_SPECIAL | Flags.OUTLIER)) == 0
    rows = b.acts[torch.from_numpy(ordinary)] if ordinary.any() else b.acts
    return rows.mean(0).numpy().astype(np.float32)


def encode_batch(b: Batch, dtype: StoreDtype, mean: np.ndarray | None) -> tuple[dict[str, np.ndarray], BatchError]:
    """The batch's columns as stored and its storage-error statistics."""
    cols = encode_acts(b.acts, dtype, mean)
    error = batch_error(b.acts, decode_acts(cols["acts"], dtype, cols.get("row_scale"), mean))
    if not math.isfinite(error.sse):  # a decoded inf (a value past float16's range) makes the sum inf
        raise RQAEError(f"activations overflow {dtype} near context {int(b.seq[0])}; use --dtype float32")
    cols.update(scale=b.scale.numpy(), tokens=b.tokens, seq=b.seq, pos=b.pos, flags=b.flags)
    return cols, error


def batch_error(x: torch.Tensor, x_hat: torch.Tensor) -> BatchError:
    """float64 sums of float32 terms: each difference and square is rounded once (relative
    6e-8; a value minus its float16 rounding is exact) and the sums over the whole store are
    float64, so the storage FVU is exact to ~1e-7 however many rows, without the float64
    copies of every value (it runs on every batch the harvest writes)."""
    x = x.float()
    diff = x - x_hat.float()
    return BatchError(sse=float(diff.mul_(diff).sum(dtype=torch.float64)),
                      sumsq=float((x * x).sum(dtype=torch.float64)), sum=x.sum(0, dtype=torch.float64).numpy(),
                      n=len(x))


# Arrays are grown this many shards ahead of the writes (never past the harvest's target), not
# shard by shard: each growth rewrites every row array's metadata, two round trips an array on
# an object store, and the dask client, which grows them for its workers, did it in series:
# ~255 ms a shard on the S3 test server (bench/client.py). The reserve is cut back at the end.
RESERVE_SHARDS = 64


def reserve_to(spec, stop: int, target_rows: int) -> int:
    """The rows to size the arrays to when a write needs rows up to `stop`."""
    return max(stop, min(stop + RESERVE_SHARDS * spec.shard_rows, target_rows))


def write_shard(store: ActivationStore, start: int, pieces: list[dict[str, np.ndarray]], *,
                grow_to: int | None) -> int:
    """Write the encoded pieces (at most one shard, in order) at rows [start, ...) in one
    write per array; returns the rows written. Arrays too short are grown to `grow_to` rows;
    None (a dask worker): the arrays must already reach that far, so a worker never rewrites
    array metadata under other writers."""
    cols = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    store.write_rows(start, cols, grow_to=grow_to)
    return len(cols["scale"])


def commit(store: ActivationStore, to: Committed, error: StorageError, *, complete: bool,
           exhausted: dict | None) -> None:
    extra = {"storage_error": error.to_manifest(), "corpus_exhausted": exhausted}
    store.commit(tokens=to.tokens, contexts=to.contexts, corpus_state=to.corpus_state.to_manifest(),
                 complete=complete, extra=extra)


def disk_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RQAEError(f"out of disk space while writing a shard ({e.strerror}); committed rows are intact, "
                         f"free space and rerun with --resume")
    if isinstance(e, OSError):
        return RQAEError(f"cannot write the store: {e.strerror or e}; committed rows are intact")
    return e


class ShardWriter(threading.Thread):
    """Encodes, writes and commits whole shards from a bounded queue of
    `(batch, contexts after it, corpus state after it)`.

    `inline=True` does the same work on the caller's thread, between forward passes. A CPU
    forward keeps every core busy in torch's thread team, and another thread running
    beside it stalls the whole team while it holds a core: measured on the 2-core machine
    (bench/harvest.py), the writer thread's ~0.2 s of CPU per 16k rows cost ~1 s of
    forward wall time (harvest 0.92 of a bare forward; 0.99 with the writer's work
    removed). With a GPU forward the cores are free, and the thread overlaps the writes
    with the GPU."""

    def __init__(self, store: ActivationStore, *, target_rows: int, inline: bool = False):
        super().__init__(daemon=True, name="rqae-shard-writer")
        self.inline, self.target_rows = inline, target_rows
        self.shield = InterruptShield()  # the inline writer's commits are not cut by Ctrl-C
        self.store, self.spec = store, store.spec
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.state = Committed.of(store)
        self.storage_error = StorageError.from_manifest(store.manifest)
        self.mean = store.codec_mean()  # None until the first fp8 batch fixes it
        self.exhausted: dict | None = None  # {"requested_tokens": N} once the corpus has run out
        # Rows of a committed partial shard are carried, as stored, into the rewrite of that shard.
        self.shard_start = self.state.tokens - self.state.tokens % self.spec.shard_rows
        carried = (store.read_encoded(self.shard_start, self.state.tokens)
                   if self.state.tokens > self.shard_start else None)
        self.pending: list[dict] = [carried] if carried else []
        self.pending_rows = self.state.tokens - self.shard_start
        self.pending_contexts, self.pending_state = self.state.contexts, self.state.corpus_state

    def start(self) -> None:
        if not self.inline:
            super().start()

    def put(self, item: tuple[Batch, int, CorpusState] | None) -> None:
        if self.inline:
            if item is not None:
                with self.shield.installed(), self.shield.writing():
                    self._take(*item)
            return
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self._take(*item)
        except BaseException as e:  # handed to the model thread, which reports it
            self.error = disk_error(e)

    def _take(self, b: Batch, contexts_after: int, state_after: CorpusState) -> None:
        try:
            self._add(b, contexts_after, state_after)
            if self.pending_rows >= self.spec.shard_rows:
                self._flush()
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            if not self.inline:
                raise
            raise disk_error(e) from e

    def finish(self, *, complete: bool) -> None:
        """Drain the queue, write the partial last shard, commit, and cut the arrays back to
        the commit (their reserve). Raises the writer's error."""
        if not self.inline:
            self.put(None)
            self.join()
        if self.error is not None:
            raise self.error
        with self.shield.installed(), self.shield.writing():
            if self.pending_rows:
                self._flush(complete=complete)
            elif complete:
                self._commit(complete=True)
            self.store.shrink_to_committed()

    def abort(self) -> None:
        """Stop after the shards already queued; the uncommitted tail is left for --resume to drop."""
        if self.inline:
            return
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.join(timeout=120)

    def _add(self, b: Batch, contexts_after: int, state_after: CorpusState) -> None:
        if self.spec.dtype == "fp8" and self.mean is None:
            self.mean = codec_mean(b)
            self.store.set_array("mean", self.mean)
        cols, err = encode_batch(b, self.spec.dtype, self.mean)
        self.storage_error.add(err)
        self.pending.append(cols)
        self.pending_rows += len(b.seq)
        self.pending_contexts, self.pending_state = contexts_after, state_after

    def _flush(self, complete: bool = False) -> None:
        # batches never cross a shard boundary, so this is at most one shard
        stop = self.shard_start + self.pending_rows
        take = write_shard(self.store, self.shard_start, self.pending,
                           grow_to=reserve_to(self.spec, stop, self.target_rows))
        self.state = Committed(self.shard_start + take, self.pending_contexts, self.pending_state)
        self._commit(complete=complete)
        if take == self.spec.shard_rows:
            self.shard_start += take
            self.pending, self.pending_rows = [], 0

    def _commit(self, *, complete: bool) -> None:
        commit(self.store, self.state, self.storage_error, complete=complete, exhausted=self.exhausted)


class InterruptShield:
    """Ctrl-C must not land inside a write or a commit. One it cut short would go on in
    zarr's I/O thread (zarr runs its writes on an event loop and only waits for them here),
    behind the manifest this process holds: the truncation after an interrupt would then
    drop rows the manifest on disk names. Inside `writing()` a SIGINT is held until the
    write is done (the dask client, and the inline writer of a CPU harvest)."""

    def __init__(self):
        self.busy = self.held = False

    def installed(self):
        return sigint_handler(self._on_sigint)  # signals reach only the main thread: nothing to hold elsewhere

    @contextlib.contextmanager
    def writing(self):
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
        if self.held:
            self.held = False
            raise KeyboardInterrupt

    def _on_sigint(self, signum, frame):
        if self.busy:
            self.held = True
        else:
            raise KeyboardInterrupt
