"""The harvest loop: corpus -> LM forward to the hook -> normalise -> activation store.

The model thread tokenises, runs the forward pass to the hook's block (`forward.py`, under
`inference_mode`) and normalises; encoding, compression and disk writes run on a background
writer thread where the forward is on a GPU, so the forward never waits on I/O, and between
forward passes on a CPU, where a second thread would stall torch's thread team
(`shard_writer.ShardWriter`). A shard is committed (manifest rewritten atomically) only once all its rows are on
disk; `resume=True` truncates whatever an interrupted run left past the last commit and
restarts the corpus at the committed position, so the finished store equals an
uninterrupted run's. What the writer does with a shard lives in shard_writer.py, shared
with the dask workers of harvest_dask.py (`rqae harvest --workers N`).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError, __version__
from rqae_pipeline.codec import STORE_DTYPES, StoreDtype
from rqae_pipeline.corpus import (
    ContextPacker,
    CorpusSpec,
    CorpusState,
    continued_corpus,
    iter_contexts,
    parse_corpus,
    pin_revision,
)
from rqae_pipeline.forward import (
    check_forward_precision,
    cuda_tf32,
    hook_residuals,
    measure_forward_error,
    precision_of,
    record_forward_error,
    residual_stop,
)
from rqae_pipeline.io import empty_except_lock
from rqae_pipeline.lm import (
    MODEL_DTYPES,
    NORMALISATIONS,
    OFFLINE_GEMMA,
    TINY,
    HookSpec,
    LoadedLM,
    Normalisation,
    final_norm_gain,
    load_lm,
    resolve_hook,
)
from rqae_pipeline.lock import take_write_lock
from rqae_pipeline.shard_writer import Batch, ShardWriter
from rqae_pipeline.store import ActivationStore, Flags, StoreLock, StoreSpec
from rqae_pipeline.store_format import tokenizer_name
from rqae_pipeline.urls import location, store_exists

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
    dataset_revision: str | None = None  # a hub dataset's branch, tag or commit; None: its default branch
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
    model_dtype: str = "auto"  # the forward's dtype; "auto": bfloat16 on a GPU with native bf16, else float32
    compile: bool = False  # run the forward through torch.compile (forward.hook_residuals)
    resume: bool = False

    def __post_init__(self):
        location(self.out)  # an unknown or uninstalled URL scheme: refused before the model loads
        if not 0 < self.tokens <= MAX_TOKENS:
            raise RQAEError(f"--tokens must be positive and at most {MAX_TOKENS:.0e}, got {self.tokens}")
        for option, value in (("--batch-size", self.batch_contexts), ("--contexts-per-shard", self.contexts_per_shard),
                              ("--contexts-per-chunk", self.contexts_per_chunk)):
            if value < 1:  # 0 once divided by zero halfway through making the store
                raise RQAEError(f"{option} must be at least 1, got {value}")
        if not 2 <= self.context_length <= 32768:  # BOS and a token; a row's `pos` is an int16
            raise RQAEError(f"--context-length must be in 2..32768 (BOS and one token; positions are stored as "
                            f"int16), got {self.context_length}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; use 'final-norm' or 'rms'")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {self.dtype!r}; use float16, float32 or fp8")
        if self.model_dtype not in MODEL_DTYPES:
            raise RQAEError(f"unknown --model-dtype {self.model_dtype!r}; use one of {', '.join(MODEL_DTYPES)}")


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
    return parse_corpus(dataset, config=config, split=cfg.split, text_field=cfg.text_field,
                        revision=cfg.dataset_revision)


@dataclass(frozen=True)
class ModelFacts:
    """What a store needs of the loaded LM, gathered where the model lives (this process or
    a dask worker), so a client that never loads the model can make the same store."""

    name: str
    hook: HookSpec
    d_model: int
    tokenizer: str
    gain: torch.Tensor | None  # (d,) final-norm gain on the CPU; None in "rms" mode
    provenance: dict
    precision: dict  # the forward's {"model_dtype", "tf32"} (forward.precision_of)


def model_facts(cfg: HarvestConfig, lm: LoadedLM) -> ModelFacts:
    hook = resolve_hook(lm, lm.n_layers // 2 if cfg.hook == "auto" else cfg.hook)
    if cfg.compile and residual_stop(hook.name, hook.layer) is None:
        raise RQAEError(f"--compile harvests a residual stream hook (blocks.L.hook_resid_post or hook_resid_pre), "
                        f"not {hook.name}; leave out --compile for this hook")
    if cfg.context_length > lm.model.cfg.n_ctx:
        raise RQAEError(f"context length {cfg.context_length} exceeds {lm.name}'s n_ctx {lm.model.cfg.n_ctx}")
    check_hook_shape(lm, hook)
    gain = final_norm_gain(lm)[0] if cfg.normalisation == "final-norm" else None  # "rms" stores ones
    tokenizer = getattr(lm.tokenizer, "name_or_path", "") or type(lm.tokenizer).__name__
    return ModelFacts(name=lm.name, hook=hook, d_model=lm.d_model, tokenizer=tokenizer_name(tokenizer),
                      gain=gain, provenance=_provenance(lm), precision=precision_of(lm))


@torch.inference_mode()
def check_hook_shape(lm: LoadedLM, hook) -> None:
    """A hook's activation must be one d_model vector per token, as a store row is: an MLP's
    hidden layer (d_mlp) was stored cut to its first d_model values, attention patterns
    failed mid-harvest. Hooks on the residual stream and the blocks' outputs are; any other
    is probed with a forward of two tokens, before any store is made."""
    if re.fullmatch(r"blocks\.\d+\.hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)", hook.name):
        return
    tokens = torch.full((1, 2), lm.tokenizer.bos_token_id or 0, device=lm.model.cfg.device)
    _, cache = lm.model.run_with_cache(tokens, names_filter=[hook.name], stop_at_layer=hook.layer + 1)
    shape = tuple(cache[hook.name].shape)
    if shape != (1, 2, lm.d_model):
        raise RQAEError(f"{hook.name} gives activations of shape (batch, tokens, ...) = {shape}, not one "
                        f"{lm.d_model}-vector per token; harvest a residual stream, attn_out or mlp_out hook")


def store_spec(cfg: HarvestConfig, facts: ModelFacts, corpus: CorpusSpec) -> StoreSpec:
    try:
        return StoreSpec(
            model=facts.name, hook=facts.hook.name, layer=facts.hook.layer, d_model=facts.d_model,
            corpus=corpus.to_dict(), tokenizer=facts.tokenizer,
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


def existing_store(cfg: HarvestConfig, spec: StoreSpec) -> ActivationStore | None:
    """The store at `cfg.out` to continue (checked against `spec`), or None for a new one."""
    out = location(cfg.out)  # a Path, or a URL: never Path("s3://...") (a local folder "s3:")
    if not store_exists(out):
        if not empty_except_lock(out):
            raise RQAEError(f"{out} exists and is not an activation store; choose another --out")
        return None
    store = ActivationStore.open(out)  # first: --resume is no advice for a Zarr group of another tool
    if not cfg.resume:
        raise RQAEError(f"{out} already holds an activation store; pass --resume to continue it "
                        f"or choose another --out")
    store.check_matches(spec)
    return store


def open_store_for_writing(cfg: HarvestConfig, spec: StoreSpec, facts: ModelFacts, planned: dict | None
                           ) -> tuple[ActivationStore, StoreLock]:
    """The store to write, under its lock. `planned`: the commit record the plan continues
    from (None: a new store); another writer may have committed between the plan and the lock,
    and continuing from the older position would store its contexts a second time."""
    out = location(cfg.out)
    lock = take_write_lock(out)
    try:
        store = existing_store(cfg, spec)
        now = store.manifest["committed"] if store is not None else None
        if now != planned:
            raise RQAEError(f"another harvest wrote to {out} while this one was starting; run this one again"
                            + ("" if cfg.resume else " with --resume"))
        if store is not None:
            store = store.reopen_for_append()
            store.truncate_to_committed()
        else:
            store = ActivationStore.create(out, spec, facts.gain, facts.provenance)
    except BaseException:
        lock.release()
        raise
    return store, lock


Contexts = Iterator[tuple[np.ndarray, CorpusState]]


def take_contexts(source: Contexts, want: int, state: CorpusState | None) -> tuple[list[np.ndarray], CorpusState]:
    """Up to `want` next contexts of `source` and the corpus state after the last of them
    (`state` when the source has run out)."""
    group = []
    for ctx, after in source:
        group.append(ctx)
        state = after
        if len(group) == want:
            break
    return group, state


def harvest(cfg: HarvestConfig, *, lm: LoadedLM | None = None, progress: bool = True,
            notice: Callable[[str], None] | None = None) -> HarvestResult:
    """Run a harvest to `cfg.tokens` committed rows (continuing a store when `cfg.resume`),
    in this process (harvest_dask.harvest_parallel runs it on dask workers).
    Nothing is written until the model has loaded and the corpus has yielded its first
    context. `notice` gets one-line remarks for stderr (`--resume` with no store yet).
    The forward runs with TF32 set for its precision, which a new store records first."""
    lm = replace(lm or load_lm(cfg.model, device=cfg.device, dtype=cfg.model_dtype),
                 compiled_batch=compiled_batch(cfg))
    facts = model_facts(cfg, lm)
    spec, source, planned = plan_harvest(cfg, facts, lm.tokenizer, notice)
    store, lock = open_store_for_writing(cfg, spec, facts, planned)
    try:
        with cuda_tf32(facts.precision["tf32"]):
            source = record_forward_error(store, source, cfg.tokens,
                                          lambda tokens: measure_forward_error(lm, store, tokens))
            return _run(cfg, lm, source, store, progress=progress)
    finally:
        lock.release()


def compiled_batch(cfg: HarvestConfig) -> int:
    """`LoadedLM.compiled_batch` for this harvest: its batch size with --compile, else 0 (eager)."""
    return cfg.batch_contexts if cfg.compile else 0


def plan_harvest(cfg: HarvestConfig, facts: ModelFacts, tokenizer,
                 notice: Callable[[str], None] | None) -> tuple[StoreSpec, Contexts, dict | None]:
    """The store's spec (checked against a store to resume), the contexts still to harvest,
    the first read already (see `_read_ahead`), and the commit record they continue from
    (None for a new store); nothing is written."""
    corpus = resolve_corpus(cfg, facts.name)
    spec = store_spec(cfg, facts, corpus)
    prior = existing_store(cfg, spec)
    if prior is not None:
        check_forward_precision(prior, facts.precision)
    if prior is None and cfg.resume and notice is not None:
        notice(f"note: {cfg.out} holds no store yet; --resume starts a new one")
    committed = prior.manifest["committed"] if prior is not None else {"contexts": 0, "corpus_state": (0, 0)}
    note = None
    if prior is not None:
        corpus = continued_corpus(corpus, CorpusSpec.from_dict(prior.spec.corpus), str(cfg.out), notice)
    else:  # a hub corpus read at the commit its revision names now, recorded with the store
        corpus, note = pin_revision(corpus)
        spec = store_spec(cfg, facts, corpus)
    packer = iter_contexts(corpus, tokenizer, context_length=spec.context_length,
                           state=CorpusState(*committed["corpus_state"]))
    want = -(-cfg.tokens // spec.rows_per_context) - committed["contexts"]
    source = _read_ahead(packer, want, fresh=prior is None, name=corpus.name) if want > 0 else iter(())
    if note is not None and notice is not None:  # the corpus opened: no note beside an error line
        notice(note)
    return spec, source, (prior.manifest["committed"] if prior is not None else None)


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
    spec, R = store.spec, store.spec.rows_per_context
    target_contexts = -(-cfg.tokens // R)
    start_tokens = store.n_tokens
    bar = None  # opened after the first batch, so input errors print no half-drawn bar
    writer = ShardWriter(store, target_rows=target_contexts * R, inline=str(lm.model.cfg.device).startswith("cpu"))
    writer.start()
    t0, interrupted = time.perf_counter(), False
    try:
        contexts, state = store.n_contexts, CorpusState(*store.manifest["committed"]["corpus_state"])
        eps = float(lm.model.cfg.eps)
        while contexts < target_contexts:
            # A batch never crosses a shard boundary, so every shard is committed whole.
            to_boundary = spec.contexts_per_shard - contexts % spec.contexts_per_shard
            want = min(spec.batch_contexts, target_contexts - contexts, to_boundary)
            group, state = take_contexts(source, want, state)
            if not group:
                break
            writer.put((forward_batch(lm, store, np.stack(group), contexts, eps), contexts + len(group), state))
            contexts += len(group)
            if bar is None:
                bar = progress_bar(target_contexts * R, start_tokens, progress)
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


def progress_bar(total_tokens: int, start_tokens: int, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total_tokens, initial=start_tokens, unit="tok", unit_scale=True, desc="harvest",
                disable=not progress, dynamic_ncols=True, smoothing=0.1)


@torch.inference_mode()
def forward_batch(lm: LoadedLM, store: ActivationStore, tokens_np: np.ndarray, first_seq: int, eps: float) -> Batch:
    """The normalised rows of contexts `tokens_np` (B, T), the first being context `first_seq`."""
    model, spec = lm.model, store.spec
    tokens = torch.from_numpy(tokens_np).to(model.cfg.device)
    x = hook_residuals(lm, tokens, spec.hook, spec.layer)  # (B, T, d)
    acts, scale = store.to_normalised(x, eps)
    # A NaN or inf anywhere in a row makes its RMS non-finite, and so does a row too large to
    # square in float32 (whose normalised values would read as zeros): one check of (B, T) scales.
    if not torch.isfinite(scale).all():
        bad = int((~torch.isfinite(scale)).any(-1).nonzero()[0, 0])
        raise RQAEError(f"non-finite activations (NaN/inf, or past float32's range when squared) at {spec.hook} "
                        f"in context {first_seq + bad}; nothing from this batch was written")
    B, T = tokens.shape
    flags = token_flags(tokens, lm.tokenizer).to(scale.device)
    flags |= outlier_flags(scale, flags, spec.outlier_factor)
    seq = np.repeat(np.arange(first_seq, first_seq + B, dtype=np.int64), T).reshape(B, T)
    pos = np.tile(np.arange(T, dtype=np.int16), (B, 1))
    s = slice(1, None) if spec.skip_bos else slice(None)
    d = acts.shape[-1]
    return Batch(
        acts=acts[:, s].reshape(-1, d).float().cpu(), scale=scale[:, s].reshape(-1).float().cpu(),
        tokens=tokens_np[:, s].reshape(-1).astype(np.int32), seq=seq[:, s].reshape(-1), pos=pos[:, s].reshape(-1),
        flags=flags[:, s].reshape(-1).cpu().numpy(),
    )
