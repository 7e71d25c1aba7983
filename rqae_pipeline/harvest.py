"""The harvest loop: corpus -> LM forward to the hook -> normalise -> activation store.

The model thread only tokenises, runs the forward pass (`run_with_cache` with a names
filter and `stop_at_layer`, under `inference_mode`) and normalises; encoding, compression
and disk writes run on a background writer thread, so the forward pass never waits on
I/O. A shard is committed (manifest rewritten atomically) only once all its rows are on
disk; `resume=True` truncates whatever an interrupted run left past the last commit and
restarts the corpus at the committed position, so the finished store equals an
uninterrupted run's.
"""

from __future__ import annotations

import errno
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError, __version__
from rqae_pipeline.corpus import ContextPacker, CorpusSpec, CorpusState, iter_contexts, parse_corpus
from rqae_pipeline.io import empty_except_lock
from rqae_pipeline.lm import OFFLINE_GEMMA, TINY, LoadedLM, final_norm_gain, load_lm, resolve_hook
from rqae_pipeline.store import (
    NORMALISATIONS,
    STORE_DTYPES,
    ActivationStore,
    Flags,
    Normalisation,
    StoreDtype,
    StoreLock,
    StoreSpec,
    decode_acts,
    encode_acts,
    store_exists,
)
from rqae_pipeline.urls import is_remote, location

DEFAULT_DATASET = "auto"  # builtin corpus for offline/test models, FineWeb-Edu for hub models
# --tokens above this is a typo, not a plan (the blog's whole run is 1e9 tokens; 1e12 fp16
# Gemma-2-2B rows would be 4.6 PB).
MAX_TOKENS = 10**12


@dataclass(frozen=True, kw_only=True)
class HarvestConfig:
    out: str | Path  # a directory or a store URL (urls.py)
    model: str = OFFLINE_GEMMA
    hook: str = "auto"  # layer number, full hook name, or "auto" (the model's centre layer)
    dataset: str = DEFAULT_DATASET
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    tokens: int = 20_000
    context_length: int = 128
    batch_contexts: int = 8
    contexts_per_shard: int = 128
    contexts_per_chunk: int = 8
    dtype: StoreDtype = "float16"
    normalisation: Normalisation = "final-norm"
    skip_bos: bool = False
    outlier_factor: float = 10.0
    device: str | None = None
    model_dtype: str = "float32"
    resume: bool = False

    def __post_init__(self):
        location(self.out)  # an unknown or uninstalled URL scheme: refused before the model loads
        if not 0 < self.tokens <= MAX_TOKENS:
            raise RQAEError(f"--tokens must be positive and at most {MAX_TOKENS:.0e}, got {self.tokens}")
        for option, value in (("--batch-size", self.batch_contexts), ("--contexts-per-shard", self.contexts_per_shard),
                              ("--contexts-per-chunk", self.contexts_per_chunk)):
            if value < 1:  # 0 once divided by zero halfway through making the store
                raise RQAEError(f"{option} must be at least 1, got {value}")
        if self.context_length < 2:
            raise RQAEError(f"--context-length must be at least 2 (BOS and one token), got {self.context_length}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; use 'final-norm' or 'rms'")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {self.dtype!r}; use float16, float32 or fp8")


@dataclass(frozen=True)
class HarvestResult:
    store: Path
    tokens: int  # committed rows in the store
    new_tokens: int  # rows added by this run
    seconds: float
    interrupted: bool = False
    exhausted: bool = False  # the corpus ran out before `requested_tokens`
    requested_tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def resolve_corpus(cfg: HarvestConfig, lm_name: str) -> CorpusSpec:
    dataset, config = cfg.dataset, cfg.dataset_config
    if dataset == DEFAULT_DATASET:
        offline = lm_name == OFFLINE_GEMMA or lm_name.startswith(TINY)
        dataset, config = (("builtin:python-docs", None) if offline
                           else ("HuggingFaceFW/fineweb-edu", config or "sample-10BT"))
    return parse_corpus(dataset, config=config, split=cfg.split, text_field=cfg.text_field)


def _store_spec(cfg: HarvestConfig, lm: LoadedLM, corpus: CorpusSpec) -> StoreSpec:
    hook = resolve_hook(lm, lm.n_layers // 2 if cfg.hook == "auto" else cfg.hook)
    if cfg.context_length > lm.model.cfg.n_ctx:
        raise RQAEError(f"context length {cfg.context_length} exceeds {lm.name}'s n_ctx {lm.model.cfg.n_ctx}")
    try:
        return StoreSpec(
            model=lm.name, hook=hook.name, layer=hook.layer, d_model=lm.d_model, corpus=corpus.to_dict(),
            tokenizer=getattr(lm.tokenizer, "name_or_path", "") or type(lm.tokenizer).__name__,
            context_length=cfg.context_length, skip_bos=cfg.skip_bos, normalisation=cfg.normalisation,
            dtype=cfg.dtype, contexts_per_shard=cfg.contexts_per_shard, contexts_per_chunk=cfg.contexts_per_chunk,
            batch_contexts=cfg.batch_contexts, outlier_factor=cfg.outlier_factor,
        )
    except ValueError as e:
        raise RQAEError(str(e)) from None


def _provenance(lm: LoadedLM) -> dict:
    import sys

    import numcodecs
    import zarr

    return {
        "model_load": lm.load_info,
        "norm_eps": float(lm.model.cfg.eps),  # the normalisation's eps, for SAEs that redo it (models/sae_format.py)
        "rqae_pipeline": __version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "python": sys.version.split()[0],
    }


def token_flags(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Flags for special tokens (BOS/EOS/PAD/other) of a (B, T) token tensor."""
    flags = torch.zeros_like(tokens, dtype=torch.uint8)
    for tid in set(getattr(tokenizer, "all_special_ids", []) or []):
        flags[tokens == tid] |= int(Flags.SPECIAL)
    for tid, bit in ((tokenizer.bos_token_id, Flags.BOS), (tokenizer.eos_token_id, Flags.EOS),
                     (tokenizer.pad_token_id, Flags.PAD)):
        if tid is not None:
            hit = tokens == tid
            flags[hit] = (flags[hit] & ~int(Flags.SPECIAL)) | int(bit)
    return flags


def outlier_flags(scale: torch.Tensor, flags: torch.Tensor, factor: float) -> torch.Tensor:
    """OUTLIER where the raw norm exceeds `factor` x the median over this batch's ordinary tokens."""
    ordinary = scale[(flags & int(Flags.ANY_SPECIAL)) == 0]
    ref = ordinary.median() if ordinary.numel() else scale.median()
    return torch.where(scale > factor * ref, int(Flags.OUTLIER), 0).to(torch.uint8)


@dataclass
class _Batch:
    acts: torch.Tensor  # (n, d) fp32, CPU
    scale: torch.Tensor
    tokens: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    flags: np.ndarray
    contexts_after: int
    corpus_state: CorpusState


@dataclass
class _WriterState:
    tokens: int
    contexts: int
    corpus_state: CorpusState


class ShardWriter(threading.Thread):
    """Encodes, writes and commits whole shards from a bounded queue of batches."""

    def __init__(self, store: ActivationStore, *, on_commit=None):
        super().__init__(daemon=True, name="rqae-shard-writer")
        self.store, self.spec = store, store.spec
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.on_commit = on_commit
        c = store.manifest["committed"]
        self.state = _WriterState(c["tokens"], c["contexts"], CorpusState(*c["corpus_state"]))
        err = store.manifest.get("storage_error", {})
        self.sse, self.sum, self.sumsq, self.n = err.get("sse", 0.0), None, err.get("sumsq", 0.0), err.get("n", 0)
        if err.get("sum") is not None:
            self.sum = np.asarray(err["sum"], dtype=np.float64)
        self.mean = store.codec_mean()  # None until the first fp8 batch fixes it
        self.exhausted: dict | None = None  # {"requested_tokens": N} once the corpus has run out
        # Rows of a committed partial shard are carried, as stored, into the rewrite of that shard.
        self.shard_start = self.state.tokens - self.state.tokens % self.spec.shard_rows
        carried = (store.read_encoded(self.shard_start, self.state.tokens)
                   if self.state.tokens > self.shard_start else None)
        self.pending: list[dict] = [carried] if carried else []
        self.pending_rows = self.state.tokens - self.shard_start
        self.pending_contexts, self.pending_state = self.state.contexts, self.state.corpus_state

    def put(self, batch: _Batch | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(batch, timeout=0.5)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self._add(item)
                if self.pending_rows >= self.spec.shard_rows:
                    self._flush()
        except BaseException as e:  # handed to the model thread, which reports it
            self.error = _disk_error(e)

    def finish(self, *, complete: bool) -> None:
        """Drain the queue, write the partial last shard, commit. Raises the writer's error."""
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error
        if self.pending_rows:
            self._flush(complete=complete)
        elif complete:
            self._commit(complete=True)

    def abort(self) -> None:
        """Stop after the shards already queued; the uncommitted tail is left for --resume to drop."""
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self.join(timeout=120)

    def _add(self, b: _Batch) -> None:
        if self.spec.dtype == "fp8" and self.mean is None:
            # The compact codec centres rows on a per-dimension mean, fixed by the first batch.
            ordinary = (b.flags & int(Flags.ANY_SPECIAL | Flags.OUTLIER)) == 0
            self.mean = b.acts[torch.from_numpy(ordinary)].mean(0).numpy().astype(np.float32)
            self.store.set_array("mean", self.mean)
        cols = encode_acts(b.acts, self.spec.dtype, self.mean)
        decoded = decode_acts(cols["acts"], self.spec.dtype, cols.get("row_scale"), self.mean)
        if not torch.isfinite(decoded).all():
            raise RQAEError(f"activations overflow {self.spec.dtype} near context {int(b.seq[0])}; use --dtype float32")
        self._track_error(b.acts, decoded)
        cols.update(scale=b.scale.numpy(), tokens=b.tokens, seq=b.seq, pos=b.pos, flags=b.flags)
        self.pending.append(cols)
        self.pending_rows += len(b.seq)
        self.pending_contexts, self.pending_state = b.contexts_after, b.corpus_state

    def _track_error(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        # float64 sufficient statistics, so the storage FVU is exact over the whole store.
        x64 = x.double()
        self.sse += float((x64 - x_hat.double()).pow(2).sum())
        self.sumsq += float(x64.pow(2).sum())
        s = x64.sum(0).numpy()
        self.sum = s if self.sum is None else self.sum + s
        self.n += len(x)

    def _flush(self, complete: bool = False) -> None:
        cols = {k: np.concatenate([p[k] for p in self.pending]) for k in self.pending[0]}
        rows = len(cols["scale"])
        take = rows  # batches never cross a shard boundary, so this is at most one shard
        self.store.write_rows(self.shard_start, cols)
        self.state = _WriterState(self.shard_start + take, self.pending_contexts, self.pending_state)
        self._commit(complete=complete)
        if take == self.spec.shard_rows:
            self.shard_start += take
            self.pending, self.pending_rows = [], 0

    def _commit(self, *, complete: bool) -> None:
        extra = {"storage_error": {"sse": self.sse, "sumsq": self.sumsq, "n": self.n,
                                   "sum": None if self.sum is None else self.sum.tolist()},
                 "corpus_exhausted": self.exhausted}
        self.store.commit(tokens=self.state.tokens, contexts=self.state.contexts,
                          corpus_state=self.state.corpus_state.to_manifest(),
                          complete=complete, extra=extra)
        if self.on_commit:
            self.on_commit(self.state.tokens)


def _disk_error(e: BaseException) -> BaseException:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return RQAEError(f"out of disk space while writing a shard ({e.strerror}); committed rows are intact, "
                         f"free space and rerun with --resume")
    if isinstance(e, OSError):
        return RQAEError(f"cannot write the store: {e.strerror or e}; committed rows are intact")
    return e


def existing_store(cfg: HarvestConfig, spec: StoreSpec) -> ActivationStore | None:
    """The store at `cfg.out` to continue (checked against `spec`), or None for a new one."""
    out = location(cfg.out)  # a Path, or a URL: never Path("s3://...") (a local folder "s3:")
    exists = store_exists(out)
    if exists and not cfg.resume:
        raise RQAEError(f"{out} already holds an activation store; pass --resume to continue it "
                        f"or choose another --out")
    if not exists and not empty_except_lock(out):
        raise RQAEError(f"{out} exists and is not an activation store; choose another --out")
    if not exists:
        return None
    store = ActivationStore.open(out)
    store.check_matches(spec)
    return store


def open_store_for_writing(cfg: HarvestConfig, spec: StoreSpec, lm: LoadedLM) -> tuple[ActivationStore, StoreLock]:
    out = location(cfg.out)
    store = existing_store(cfg, spec)
    lock = StoreLock(out)
    try:
        if not is_remote(out):  # an object store has no directories to make
            out.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        raise RQAEError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        if store is not None:
            store = store.reopen_for_append()
            store.truncate_to_committed()
        else:
            gain = final_norm_gain(lm)[0] if spec.normalisation == "final-norm" else None  # "rms" stores ones
            store = ActivationStore.create(out, spec, gain, _provenance(lm))
    except BaseException:
        lock.release()
        raise
    return store, lock


Contexts = Iterator[tuple[np.ndarray, CorpusState]]


def harvest(cfg: HarvestConfig, *, lm: LoadedLM | None = None, progress: bool = True,
            notice: Callable[[str], None] | None = None) -> HarvestResult:
    """Run a harvest to `cfg.tokens` committed rows (continuing a store when `cfg.resume`).
    Nothing is written until the model has loaded and the corpus has yielded its first
    context. `notice` gets one-line remarks for stderr (`--resume` with no store yet)."""
    lm = lm or load_lm(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    corpus = resolve_corpus(cfg, lm.name)
    spec = _store_spec(cfg, lm, corpus)
    prior = existing_store(cfg, spec)
    if prior is None and cfg.resume and notice is not None:
        notice(f"note: {cfg.out} holds no store yet; --resume starts a new one")
    committed = prior.manifest["committed"] if prior is not None else {"contexts": 0, "corpus_state": (0, 0)}
    packer = iter_contexts(corpus, lm.tokenizer, context_length=spec.context_length,
                           state=CorpusState(*committed["corpus_state"]))
    want = -(-cfg.tokens // spec.rows_per_context) - committed["contexts"]
    source = _read_ahead(packer, want, fresh=prior is None, name=corpus.name) if want > 0 else iter(())
    store, lock = open_store_for_writing(cfg, spec, lm)
    try:
        return _run(cfg, lm, source, store, progress=progress)
    finally:
        lock.release()


def _read_ahead(packer: ContextPacker, want: int, *, fresh: bool, name: str) -> Contexts:
    """The packer's contexts, the first ones read now, before any store is made: at least one
    (a corpus that cannot be read fails here), and for a new store up to the first that holds
    real text (at most `want`), so a corpus of empty or blank texts is refused, not stored."""
    it = iter(packer)
    ahead, had_text = [], False
    for item in it:
        ahead.append(item)
        had_text = packer.last_had_text
        if had_text or not fresh or len(ahead) >= want:
            break
    if fresh and not ahead:
        raise RQAEError(f"dataset {name!r} has fewer tokens than one context")
    if fresh and not had_text:
        raise RQAEError(f"dataset {name!r} yields no text in its first {len(ahead)} context(s): its documents "
                        f"are empty or whitespace only (or check --text-field)")
    return itertools.chain(ahead, it)


def _run(cfg: HarvestConfig, lm: LoadedLM, source: Contexts, store: ActivationStore, *,
         progress: bool) -> HarvestResult:
    from tqdm import tqdm

    spec, R = store.spec, store.spec.rows_per_context
    target_contexts = -(-cfg.tokens // R)
    start_tokens = store.n_tokens
    bar = None  # opened after the first batch, so input errors print no half-drawn bar
    writer = ShardWriter(store)
    writer.start()
    t0, interrupted = time.perf_counter(), False
    try:
        contexts, state = store.n_contexts, CorpusState(*store.manifest["committed"]["corpus_state"])
        eps = float(lm.model.cfg.eps)
        while contexts < target_contexts:
            # A batch never crosses a shard boundary, so every shard is committed whole.
            to_boundary = spec.contexts_per_shard - contexts % spec.contexts_per_shard
            want = min(spec.batch_contexts, target_contexts - contexts, to_boundary)
            group = []
            for ctx, st in source:
                group.append(ctx)
                state = st
                if len(group) == want:
                    break
            if not group:
                break
            writer.put(_forward_batch(lm, store, np.stack(group), contexts, state, eps))
            contexts += len(group)
            if bar is None:
                bar = tqdm(total=target_contexts * R, initial=start_tokens, unit="tok", unit_scale=True,
                           desc="harvest", disable=not progress, dynamic_ncols=True, smoothing=0.1)
            bar.update(len(group) * R)
        if contexts < target_contexts:  # recorded in the manifest; `inspect` shows it
            writer.exhausted = {"requested_tokens": cfg.tokens}
        writer.finish(complete=True)
    except KeyboardInterrupt:
        interrupted = True
        writer.finish(complete=False)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    return HarvestResult(store.path, store.n_tokens, store.n_tokens - start_tokens, seconds, interrupted,
                         exhausted=writer.exhausted is not None, requested_tokens=cfg.tokens)


@torch.inference_mode()
def _forward_batch(lm: LoadedLM, store: ActivationStore, tokens_np: np.ndarray, first_seq: int,
                   state_after: CorpusState, eps: float) -> _Batch:
    model, spec = lm.model, store.spec
    tokens = torch.from_numpy(tokens_np).to(model.cfg.device)
    _, cache = model.run_with_cache(tokens, names_filter=[spec.hook], stop_at_layer=spec.layer + 1)
    x = cache[spec.hook]  # (B, T, d)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(-1).any(-1).nonzero()[0, 0])
        raise RQAEError(f"non-finite activations (NaN/inf) at {spec.hook} in context {first_seq + bad}; nothing "
                        f"from this batch was written")
    acts, scale = store.to_normalised(x, eps)
    B, T = tokens.shape
    flags = token_flags(tokens, lm.tokenizer).to(scale.device)
    flags |= outlier_flags(scale, flags, spec.outlier_factor)
    seq = np.repeat(np.arange(first_seq, first_seq + B, dtype=np.int64), T).reshape(B, T)
    pos = np.tile(np.arange(T, dtype=np.int16), (B, 1))
    s = slice(1, None) if spec.skip_bos else slice(None)
    d = acts.shape[-1]
    return _Batch(
        acts=acts[:, s].reshape(-1, d).float().cpu(), scale=scale[:, s].reshape(-1).float().cpu(),
        tokens=tokens_np[:, s].reshape(-1).astype(np.int32), seq=seq[:, s].reshape(-1), pos=pos[:, s].reshape(-1),
        flags=flags[:, s].reshape(-1).cpu().numpy(), contexts_after=first_seq + B, corpus_state=state_after,
    )
