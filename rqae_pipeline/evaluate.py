"""Reconstruction metrics on an activation store for any trained model, exact and parallel.

Each store shard is an independent task that returns float64 sufficient statistics
(token count, Σx, Σ|x|², Σ|x − x̂|² per reconstruction, latent / code usage counts);
the reduction adds them, so FVU uses the per-dimension mean of the whole evaluation set
and no result depends on batch size, shard count or worker count. (sae-lens computed
explained variance from per-batch means for a year; `tests/test_evaluate.py` holds the
golden cases that catch that.) Every model is measured in both spaces: the store's
normalised rows and the raw residuals rebuilt from them (`reconstruct_both`), each FVU
against the variance of the evaluated rows in its own space, so a model fit in one space is
not favoured by the choice of the other. CE-delta and KL (`ce.py`) are kept per context
and carry bootstrap standard errors. Tasks run in-process or on dask.distributed: a
`LocalCluster` or an existing scheduler. A model directory is loaded once per worker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.ce import (
    BOOTSTRAP_RESAMPLES,
    CE_CONTEXTS_PER_FORWARD,
    ZERO_ALL,
    ZERO_KEPT,
    Splice,
    add_ce_sums,
    ce_bootstrap_info,
    ce_summary,
    default_ce_prefixes,
    residual_start_layer,
)
from rqae_pipeline.eval_checks import (
    ModelSpace,
    PretrainedSAE,
    check_compatible,
    heldout_start,
    space_of,
)
from rqae_pipeline.lm import checked_device
from rqae_pipeline.metrics import Stats, code_usage_summary, default_prefixes
from rqae_pipeline.models.registry import kind_of, load_model_dir, reconstruct
from rqae_pipeline.store import ActivationStore, Flags
from rqae_pipeline.tasks import run_tasks

RowSelection = Literal["heldout", "all"]


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    store: Path
    model: Path | PretrainedSAE
    rows: RowSelection = "heldout"  # "heldout": the training run's held-out contexts; "all": every row
    prefixes: tuple[int, ...] | None = None  # RQAE prefix lengths (default: powers of two and n_q)
    exclude: int = int(Flags.BOS | Flags.OUTLIER)
    batch_size: int = 4096
    workers: int = 0  # 0: this process; N: a dask LocalCluster of N worker processes
    scheduler: str | None = None  # address of an existing dask scheduler
    device: str | None = "cpu"  # None: io.default_device() (cuda when present)
    ce_contexts: int = 0  # held-out contexts for CE-delta / KL (needs the LM); 0 skips them
    ce_prefixes: tuple[int, ...] | None = None  # RQAE prefixes spliced for CE (default 1, 4, 16, n_q)
    ce_resamples: int = BOOTSTRAP_RESAMPLES  # bootstrap resamples of the CE contexts for standard errors
    ce_seed: int = 0  # the bootstrap's seed
    # "auto": models trained here read the store's normalised acts; any other sae-lens
    # directory (e.g. Gemma Scope) reads raw residuals, rebuilt as acts / gain * scale.
    space: ModelSpace = "auto"
    threads_per_worker: int | None = None  # torch threads in each dask task (default: cores / --workers)
    row_range: tuple[int, int] | None = None  # explicit [start, stop) rows, overriding `rows`

    def __post_init__(self):
        # RQAEError, not ValueError: the CLI builds this config from its options directly
        if self.rows not in get_args(RowSelection):
            raise RQAEError(f"unknown row selection {self.rows!r}; use 'heldout' or 'all'")
        if self.space not in get_args(ModelSpace):
            raise RQAEError(f"unknown space {self.space!r}; use auto, raw or normalised")
        if self.workers < 0:  # a LocalCluster of -1 workers waits forever for them
            raise RQAEError(f"--workers must be 0 (this process) or more, got {self.workers}")
        if self.batch_size < 1:
            raise RQAEError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.ce_contexts < 0:
            raise RQAEError(f"--ce-contexts must be 0 (skip) or more, got {self.ce_contexts}")
        object.__setattr__(self, "device", checked_device(self.device))


# --------------------------------------------------------------------------- models

_MODELS: dict[tuple, Any] = {}  # per process: each dask worker loads a model once


def load_model(ref: Path | str | PretrainedSAE, device: str = "cpu"):
    """A model directory (RQAE, codebook, any sae-lens SAE dir) or a pretrained sae-lens SAE.
    A directory is cached with its files' sizes and modification times, so that a worker
    kept from an earlier job never evaluates the weights a run has since replaced."""
    if isinstance(ref, PretrainedSAE):
        key = (str(ref), device)
    else:
        files = sorted(Path(ref).iterdir()) if Path(ref).is_dir() else []
        key = (str(Path(ref).resolve()), device, tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _MODELS:
        pretrained = isinstance(ref, PretrainedSAE)
        _MODELS[key] = load_pretrained_sae(ref, device) if pretrained else load_model_dir(ref, device)
    return _MODELS[key]


def load_pretrained_sae(ref: PretrainedSAE, device: str = "cpu"):
    """Look the release and id up in sae-lens's directory first (offline, so a typo is
    reported as such), then download and load the SAE."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if ref.release not in directory:
        near = sorted(r for r in directory if ref.release.split("-")[0] in r)[:5]
        similar = f" (similar: {', '.join(near)})" if near else ""
        raise RQAEError(f"unknown sae-lens release {ref.release!r}{similar}")
    if ref.sae_id not in directory[ref.release].saes_map:
        ids = list(directory[ref.release].saes_map)
        raise RQAEError(f"release {ref.release} has no SAE {ref.sae_id!r} ({len(ids)} ids, e.g. {ids[0]})")
    try:
        return SAE.from_pretrained(ref.release, ref.sae_id, device=device)
    except Exception as e:  # network, hub or cache errors: one line, not a traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise RQAEError(f"cannot load {ref} through sae-lens: {type(e).__name__}: {first}") from None


def model_kind(model) -> str:
    """The kind of a loaded model, rqae / codebook / sae (`registry.kind_of`: an object of
    no known architecture is an error, not an SAE)."""
    return kind_of(model)


def model_space(cfg: EvalConfig) -> str:
    """The space `cfg.model` reads ("normalised": the store's rows, or "raw")."""
    return space_of(cfg.model, cfg.space)


@torch.no_grad()
def reconstruct_both(model, store: ActivationStore, acts: torch.Tensor, scale: torch.Tensor, cfg: EvalConfig):
    """(raw rows, {label: x_hat in the stored space}, {label: x_hat in raw space}, usage counts).

    The model reads one space and its reconstruction is mapped to the other with each row's
    own scale and the store's gain: raw = acts / gain * scale (`store.to_raw`), stored =
    raw / scale * gain (`raw_to_stored`)."""
    raw = store.to_raw(acts, scale)
    if model_space(cfg) == "normalised":
        recons, counts = reconstruct(model, acts, cfg.prefixes)
        return raw, recons, {label: store.to_raw(x_hat, scale) for label, x_hat in recons.items()}, counts
    recons_raw, counts = reconstruct(model, raw, cfg.prefixes)
    return raw, {label: raw_to_stored(store, x_hat, scale) for label, x_hat in recons_raw.items()}, recons_raw, counts


def raw_to_stored(store: ActivationStore, raw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Raw vectors (n, d) into the stored space with the rows' own scales (n,): raw / scale *
    gain, the inverse of `store.to_raw` (not `store.to_normalised`, which would divide a
    reconstruction by its own RMS instead of its row's)."""
    return raw / scale.to(raw.device)[:, None] * store.gain.to(raw.device)


# --------------------------------------------------------------------------- CE-delta

_LMS: dict[str, Any] = {}


def _lm(name: str, device: str):
    from rqae_pipeline.lm import load_lm

    if name not in _LMS:  # once per worker process
        _LMS[name] = load_lm(name, device=device)
    return _LMS[name]


def ce_labels(model, cfg: EvalConfig) -> tuple[int, ...] | None:
    """The RQAE prefixes spliced into the LM (`cfg.ce_prefixes`, default `default_ce_prefixes`)."""
    if model_kind(model) != "rqae":
        return None
    prefixes = cfg.prefixes or default_prefixes(model.n_q)
    chosen = cfg.ce_prefixes or default_ce_prefixes(prefixes, model.n_q)
    if not all(1 <= m <= model.n_q for m in chosen):
        raise RQAEError(f"CE prefixes {list(chosen)} must lie in 1..{model.n_q} (the RQAE's layers)")
    return chosen


CLEAN_NOT_BOS = "clean_positions_not_bos"


@torch.no_grad()
def ce_stats(store_path: str, model_ref, first_ctx: int, stop_ctx: int, window: tuple[int, int],
             cfg: EvalConfig) -> Stats:
    """Per-context next-token CE of the LM with each reconstruction spliced in at the store's
    hook, contexts [first_ctx, stop_ctx) of the CE `window` (`ce.add_ce_sums`).

    Reconstructions are mapped to raw space with the stored per-token scale (and the
    final-norm gain) and replace the activation at every position the evaluation keeps;
    excluded positions (BOS, norm outliers) keep their clean activation, as the reference
    evaluation keeps BOS. Also the clean run, both zero-ablations and KL(clean || spliced)."""
    store = ActivationStore.open(store_path)
    spec, R = store.spec, store.spec.rows_per_context
    lm = _lm(spec.model, cfg.device)
    model = load_model(model_ref, cfg.device)
    rows = store.read(first_ctx * R, stop_ctx * R)
    tokens = torch.from_numpy(rows.tokens.astype(np.int64)).reshape(-1, R)
    if spec.skip_bos:
        tokens = torch.cat([torch.full((len(tokens), 1), lm.tokenizer.bos_token_id), tokens], 1)
    keep = torch.from_numpy((rows.flags & cfg.exclude) == 0).reshape(len(tokens), R)
    # positions kept clean other than BOS (norm outliers): sae-lens's get_recons_loss splices them
    not_bos = torch.from_numpy((rows.flags & int(Flags.BOS)) == 0).reshape(len(tokens), R)
    raw, replacements = ce_replacements(model, store, rows, replace(cfg, prefixes=ce_labels(model, cfg)))
    stored = raw.cpu().reshape(len(tokens), R, -1)  # the stored rows as residuals: what the clean run must give
    splice = Splice(lm=lm, hook=spec.hook, start=residual_start_layer(spec.hook), offset=1 if spec.skip_bos else 0)
    stats, n_contexts = Stats(), window[1] - window[0]
    stats.counts[CLEAN_NOT_BOS] = np.zeros(n_contexts)
    stats.counts[CLEAN_NOT_BOS][first_ctx - window[0]: stop_ctx - window[0]] = (~keep & not_bos).sum(1).numpy()
    # A few contexts per forward pass: log-probabilities over a 256k vocabulary are ~1 MB a
    # token, so whole tasks at once would spend their time allocating, not computing.
    for c in range(0, len(tokens), CE_CONTEXTS_PER_FORWARD):
        sl = slice(c, c + CE_CONTEXTS_PER_FORWARD)
        block = {label: r if isinstance(r, str) else r.reshape(-1, R, r.shape[-1])[sl]
                 for label, r in replacements.items()}
        slots = slice(first_ctx - window[0] + c, first_ctx - window[0] + min(c + CE_CONTEXTS_PER_FORWARD, len(tokens)))
        add_ce_sums(stats, splice, tokens[sl].to(cfg.device), keep[sl], stored[sl], block, slots, n_contexts)
    return stats


def ce_replacements(model, store: ActivationStore, rows, cfg: EvalConfig
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | str]]:
    """(the rows as raw residuals (n, d), the raw activations to splice in by label: both
    zero-ablations and each reconstruction)."""
    raw, _, recons_raw, _ = reconstruct_both(model, store, rows.acts.to(cfg.device), rows.scale, cfg)
    replacements: dict[str, torch.Tensor | str] = {ZERO_ALL: ZERO_ALL, ZERO_KEPT: torch.zeros_like(rows.acts)}
    replacements.update({label: x_hat.cpu() for label, x_hat in recons_raw.items()})
    return raw, replacements


def ce_results(cfg: EvalConfig, model, store: ActivationStore, rows: tuple[int, int], progress: bool,
               client) -> dict:
    """CE-delta and KL with standard errors over the first `cfg.ce_contexts` whole contexts of
    the evaluated `rows` (never past them: rows after a range may be ones the model trained on)."""
    if cfg.ce_resamples < 2:
        raise RQAEError(f"--ce-resamples must be at least 2 for a standard error, got {cfg.ce_resamples}")
    R = store.spec.rows_per_context
    first = -(-rows[0] // R)  # whole contexts only
    window = (first, min(rows[1] // R, first + cfg.ce_contexts))
    if window[1] <= window[0]:
        raise RQAEError(f"no whole context in rows [{rows[0]}, {rows[1]}) for CE-delta")
    per_task = max(1, store.spec.contexts_per_shard // 4)
    tasks = [(str(cfg.store), cfg.model, c, min(c + per_task, window[1]), window, cfg)
             for c in range(window[0], window[1], per_task)]
    ce = Stats()
    for p in run_tasks(ce_stats, tasks, cfg, f"CE-delta {model_name(cfg.model)}", progress, client):
        ce = ce.merge(p)
    return {"ce": ce_summary(ce, cfg.ce_resamples, cfg.ce_seed), "ce_contexts": list(window),
            "ce_bootstrap": ce_bootstrap_info(ce, cfg.ce_resamples, cfg.ce_seed),
            "ce_prefixes": list(ce_labels(model, cfg) or []),
            # how closely the LM's clean run reproduced the stored rows (`ce.check_reproduced`)
            "ce_lm_error": float(ce.counts["lm:sq_err"].sum() / ce.counts["lm:sq_norm"].sum()),
            "ce_clean_positions_not_bos": int(ce.counts[CLEAN_NOT_BOS].sum()),
            # per-context CE sums: two models measured on the same contexts are compared paired
            # (`budget.paired_ce_delta_se`), not as if their errors were independent
            "ce_per_context": {k: ce.counts[k].tolist() for k in sorted(ce.counts)
                               if k == "ce_tokens" or k.startswith("ce:")}}


# --------------------------------------------------------------------------- tasks


def shard_stats(store_path: str, model_ref, start: int, stop: int, cfg: EvalConfig) -> dict[str, Stats]:
    """The sufficient statistics of rows [start, stop) in both spaces: one task. The rows
    and reconstructions in the stored (normalised) space under "normalised" (with the usage
    counts), the same rows rebuilt as raw residuals and the reconstructions mapped there
    under "raw" (`reconstruct_both`)."""
    store = ActivationStore.open(store_path)
    model = load_model(model_ref, cfg.device)
    stats = {"normalised": Stats(), "raw": Stats()}
    for a in range(start, stop, cfg.batch_size):
        rows = store.read(a, min(stop, a + cfg.batch_size))
        keep = torch.from_numpy((rows.flags & cfg.exclude) == 0)
        x = rows.acts[keep].to(cfg.device)
        if len(x):
            raw, recons, recons_raw, counts = reconstruct_both(model, store, x, rows.scale[keep], cfg)
            stats["normalised"].add(x, recons, counts)
            stats["raw"].add(raw, recons_raw)
    return stats


def merge_spaces(parts: list[dict[str, Stats]]) -> dict[str, Stats]:
    total = {"normalised": Stats(), "raw": Stats()}
    for part in parts:
        total = {space: total[space].merge(part[space]) for space in total}
    return total


def eval_rows(cfg: EvalConfig, store: ActivationStore) -> tuple[int, int]:
    if cfg.row_range is not None:
        start, stop = cfg.row_range
        if not 0 <= start < stop <= store.n_tokens:
            raise RQAEError(f"rows [{start}, {stop}) are outside the store's {store.n_tokens} rows")
        return start, stop
    if cfg.rows == "all":
        return 0, store.n_tokens
    return heldout_start(cfg.model, store), store.n_tokens


def shard_ranges(store: ActivationStore, start: int, stop: int) -> list[tuple[int, int]]:
    shard = store.spec.shard_rows
    first = start - start % shard
    return [(max(a, start), min(a + shard, stop)) for a in range(first, stop, shard)
            if min(a + shard, stop) > max(a, start)]


def evaluate(cfg: EvalConfig, *, progress: bool = True, client=None) -> dict:
    """Reconstruction metrics of `cfg.model` on the store's held-out (or all) rows, in the
    stored and the raw space; CE-delta and KL when `cfg.ce_contexts`."""
    store = ActivationStore.open(cfg.store)
    model = load_model(cfg.model, cfg.device)
    check_compatible(model, store, cfg.model, cfg.space)
    start, stop = eval_rows(cfg, store)
    ranges = shard_ranges(store, start, stop)
    parts = run_tasks(shard_stats, [(str(cfg.store), cfg.model, a, b, cfg) for a, b in ranges], cfg,
                      f"evaluate {model_name(cfg.model)}", progress, client)
    result = summarise(merge_spaces(parts), model, store.d, rows=(start, stop))
    result["space"] = model_space(cfg)
    if cfg.ce_contexts:
        result.update(ce_results(cfg, model, store, (start, stop), progress, client))
    return result


def model_name(ref) -> str:
    return str(ref) if isinstance(ref, PretrainedSAE) else Path(ref).name


def summarise(stats: dict[str, Stats], model, d: int, rows: tuple[int, int]) -> dict:
    """FVU and MSE per reconstruction in both spaces, each against the variance of the
    evaluated rows in that space ("fvu"/"mse" repeat the stored-space values for older
    readers); SAE L0 and dead latents, RQAE code usage, all over every evaluated row."""
    norm, raw = stats["normalised"], stats["raw"]
    in_norm, in_raw = norm.metrics(d), raw.metrics(d)
    metrics = {label: {**m, "fvu_normalised": m["fvu"], "mse_normalised": m["mse"],
                       "fvu_raw": in_raw[label]["fvu"], "mse_raw": in_raw[label]["mse"]}
               for label, m in in_norm.items()}
    out = {"rows": list(rows), "tokens": norm.n, "kind": model_kind(model), "metrics": metrics}
    if "latents" in norm.counts:
        fired = norm.counts["latents"]
        # the window is every evaluated row: a latent is dead if it never fires on them
        out.update(dead_latents=int((fired == 0).sum()), latents=int(fired.size), dead_window_tokens=norm.n)
        if "l0" in norm.counts:
            out["l0"] = float(norm.counts["l0"][0] / norm.n)
            # firings a latent would get in the window if the L0 were spread evenly over the width
            out["dead_window_firings_per_latent"] = out["l0"] * norm.n / fired.size
    if "codes" in norm.counts:
        out["code_usage"] = {**code_usage_summary(norm.counts["codes"]), "window_tokens": norm.n}
    return out
