"""Reconstruction metrics on an activation store for any trained model, exact and parallel.

Each store shard is an independent task that returns float64 sufficient statistics
(token count, Σx, Σ|x|², Σ|x − x̂|² per reconstruction, latent / code usage counts);
the reduction adds them, so FVU uses the per-dimension mean of the whole evaluation set
and no result depends on batch size, shard count or worker count. (sae-lens computed
explained variance from per-batch means for a year; `tests/test_evaluate.py` holds the
golden cases that catch that.) Tasks run in-process or on dask.distributed: a
`LocalCluster` or an existing scheduler. A model directory is loaded once per worker.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from rqae_pipeline import RQAEError

# Stats, default_prefixes, prefix_of and reconstruct are also imported from here by older callers
from rqae_pipeline.metrics import Stats, code_usage_summary, default_prefixes, prefix_of  # noqa: F401
from rqae_pipeline.models.registry import kind_of, load_model_dir, reconstruct
from rqae_pipeline.store import ActivationStore, Flags

RowSelection = Literal["heldout", "all"]
ModelSpace = Literal["auto", "raw", "normalised"]


@dataclass(frozen=True)
class PretrainedSAE:
    """An SAE of sae-lens's pretrained directory (e.g. Gemma Scope), loaded with
    `SAE.from_pretrained(release, sae_id)`; it reads raw residuals."""

    release: str
    sae_id: str

    def __str__(self) -> str:
        return f"{self.release}/{self.sae_id}"


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
    device: str = "cpu"
    ce_contexts: int = 0  # held-out contexts for CE-delta / KL (needs the LM); 0 skips them
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


# --------------------------------------------------------------------------- models

_MODELS: dict[tuple[str, str], Any] = {}  # per process: each dask worker loads a model once


def load_model(ref: Path | str | PretrainedSAE, device: str = "cpu"):
    """A model directory (RQAE, codebook, any sae-lens SAE dir) or a pretrained sae-lens SAE."""
    key = (str(ref) if isinstance(ref, PretrainedSAE) else str(Path(ref).resolve()), device)
    if key not in _MODELS:
        _MODELS[key] = load_pretrained_sae(ref, device) if isinstance(ref, PretrainedSAE) else load_model_dir(ref, device)
    return _MODELS[key]


def load_pretrained_sae(ref: PretrainedSAE, device: str = "cpu"):
    """Look the release and id up in sae-lens's directory first (offline, so a typo is
    reported as such), then download and load the SAE."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if ref.release not in directory:
        near = sorted(r for r in directory if ref.release.split("-")[0] in r)[:5]
        raise RQAEError(f"unknown sae-lens release {ref.release!r}" + (f" (similar: {', '.join(near)})" if near else ""))
    if ref.sae_id not in directory[ref.release].saes_map:
        ids = list(directory[ref.release].saes_map)
        raise RQAEError(f"release {ref.release} has no SAE {ref.sae_id!r} ({len(ids)} ids, e.g. {ids[0]})")
    try:
        return SAE.from_pretrained(ref.release, ref.sae_id, device=device)
    except Exception as e:  # network, hub or cache errors: one line, not a traceback
        raise RQAEError(f"cannot load {ref} through sae-lens: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def pretrained_model_name(ref: PretrainedSAE) -> str | None:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    lookup = get_pretrained_saes_directory().get(ref.release)
    return getattr(lookup, "model", None)


def model_kind(model) -> str:
    from rqae_pipeline.models.codebook import CodebookAE
    from rqae_pipeline.models.rqae import RQAE

    return "rqae" if isinstance(model, RQAE) else "codebook" if isinstance(model, CodebookAE) else "sae"


def default_prefixes(n_q: int) -> tuple[int, ...]:
    m, out = 1, []
    while m < n_q:
        out.append(m)
        m *= 2
    return (*out, n_q)


def prefix_of(label: str) -> int:
    """The prefix length an RQAE metrics label names: 'rqae@16' -> 16 (labels from `reconstruct`)."""
    return int(label.split("@")[1])


@torch.no_grad()
def reconstruct(model, x: torch.Tensor, prefixes: tuple[int, ...] | None) -> tuple[dict, dict]:
    """{label: x_hat} and {label: usage counts} for one batch."""
    kind = model_kind(model)
    if kind == "rqae":
        codes = model.encode(x)
        recons = {f"rqae@{m}": model.decode(codes, m) for m in (prefixes or default_prefixes(model.n_q))}
        usage = torch.zeros(model.n_q, model.codebook.shape[0], dtype=torch.float64)
        usage.scatter_add_(1, codes.long().T, torch.ones(codes.shape[1], codes.shape[0], dtype=torch.float64))
        return recons, {"codes": usage.numpy()}
    if kind == "codebook":
        idx = model.encode(x)
        fired = torch.zeros(model.cfg.n_codes, dtype=torch.float64).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64))
        return {"codebook": model.decode(idx)}, {"latents": fired.numpy()}
    acts = model.encode(x)
    fired = (acts != 0).double()
    return {"sae": model.decode(acts)}, {"latents": fired.sum(0).numpy(), "l0": np.array([float(fired.sum())])}


def model_space(cfg: EvalConfig) -> str:
    if cfg.space != "auto":
        if cfg.space not in ("raw", "normalised"):
            raise RQAEError(f"unknown space {cfg.space!r}; use auto, raw or normalised")
        return cfg.space
    if isinstance(cfg.model, PretrainedSAE):
        return "raw"
    if (Path(cfg.model) / "cfg.json").exists():  # a sae-lens SAE saved here says what it reads
        from rqae_pipeline.models.sae_format import recorded_normalisation

        if recorded_normalisation(cfg.model):
            return "normalised"
    # directories saved before that: trained here (train.json beside it) or a raw-residual SAE
    return "normalised" if (Path(cfg.model) / "train.json").exists() else "raw"


@torch.no_grad()
def reconstruct_rows(model, store: ActivationStore, acts: torch.Tensor, scale: torch.Tensor, cfg: EvalConfig):
    """Reconstructions in the store's normalised space, whatever space the model reads."""
    if model_space(cfg) == "normalised":
        return reconstruct(model, acts, cfg.prefixes)
    factor = store.to_raw_factor(scale, acts.device)  # normalised -> raw
    recons, counts = reconstruct(model, acts * factor, cfg.prefixes)
    return {label: x_hat / factor for label, x_hat in recons.items()}, counts


# --------------------------------------------------------------------------- CE-delta

_LMS: dict[str, Any] = {}


def _lm(name: str, device: str):
    from rqae_pipeline.lm import load_lm

    if name not in _LMS:  # once per worker process
        _LMS[name] = load_lm(name, device=device)
    return _LMS[name]


@torch.no_grad()
def ce_stats(store_path: str, model_ref, first_ctx: int, stop_ctx: int, cfg: EvalConfig) -> Stats:
    """Next-token CE of the LM with each reconstruction spliced in at the store's hook.

    Reconstructions are mapped back to raw space with the stored per-token scale (and the
    final-norm gain) and replace the activation at every position the evaluation keeps;
    excluded positions (BOS, norm outliers) keep their clean activation, as the reference
    evaluation keeps BOS. Also the clean run, zero-ablation and KL(clean || spliced).
    Sums go in `Stats.sse` under "ce:<label>" / "kl:<label>", the count in `counts["ce_n"]`.
    """
    store = ActivationStore.open(store_path)
    spec, R = store.spec, store.spec.rows_per_context
    lm = _lm(spec.model, cfg.device)
    model = load_model(model_ref, cfg.device)
    rows = store.read(first_ctx * R, stop_ctx * R)
    tokens = torch.from_numpy(rows.tokens.astype(np.int64)).reshape(-1, R)
    if spec.skip_bos:
        tokens = torch.cat([torch.full((len(tokens), 1), lm.tokenizer.bos_token_id), tokens], 1)
    keep = torch.from_numpy((rows.flags & cfg.exclude) == 0).reshape(len(tokens), R)
    replacements = ce_replacements(model, store, rows, cfg)
    splice = _Splice(lm=lm, hook=spec.hook, start=residual_start_layer(spec.hook), offset=1 if spec.skip_bos else 0)
    stats = Stats()
    # A few contexts per forward pass: log-probabilities over a 256k vocabulary are ~1 MB a
    # token, so whole tasks at once would spend their time allocating, not computing.
    for c in range(0, len(tokens), CE_CONTEXTS_PER_FORWARD):
        sl = slice(c, c + CE_CONTEXTS_PER_FORWARD)
        block = {label: r.reshape(-1, R, r.shape[-1])[sl] for label, r in replacements.items()}
        _add_ce_sums(stats, splice, tokens[sl].to(cfg.device), keep[sl], block)
    stats.counts["ce_n"] = np.array([float(tokens[:, 1:].numel())])
    return stats


def ce_replacements(model, store: ActivationStore, rows, cfg: EvalConfig) -> dict[str, torch.Tensor]:
    """(n, d) raw activations to splice in, by label: zeros ("zero") and each reconstruction."""
    recons, _ = reconstruct_rows(model, store, rows.acts.to(cfg.device), rows.scale, cfg)
    replacements = {"zero": torch.zeros_like(rows.acts)}
    replacements.update({label: store.to_raw(x_hat.cpu(), rows.scale) for label, x_hat in recons.items()})
    return replacements


@dataclass(frozen=True)
class _Splice:
    """Forward passes of the LM with an activation spliced in at `hook`.

    At a residual-stream hook the clean run's residual there is computed once and each
    spliced run starts from it (TransformerLens `start_at_layer`), skipping the layers
    below the hook; any other hook splices through a forward hook on a full run."""

    lm: Any
    hook: str
    start: int | None  # `residual_start_layer(hook)`
    offset: int  # 1 when the store skipped BOS: stored rows start at position 1

    def log_probs(self, toks: torch.Tensor, resid: torch.Tensor | None, new: torch.Tensor | None,
                  keep: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities with `new` (B, R, d) written where `keep` (B, R); None: clean."""
        def splice(act, hook=None):
            act[:, self.offset:][keep] = new.to(act.device, act.dtype)[keep]
            return act

        if resid is not None:
            logits = self.lm.model(resid if new is None else splice(resid.clone()), start_at_layer=self.start)
        else:
            hooks = [] if new is None else [(self.hook, splice)]
            logits = self.lm.model.run_with_hooks(toks, fwd_hooks=hooks)
        return logits[:, :-1].float().log_softmax(-1)


def _add_ce_sums(stats: Stats, splice: _Splice, toks: torch.Tensor, keep: torch.Tensor,
                 replacements: dict[str, torch.Tensor]) -> None:
    """CE sums of the clean run and of each replacement, and KL(clean || spliced), on a block of contexts."""
    def ce_sum(logp: torch.Tensor) -> float:
        return -float(logp.gather(-1, toks[:, 1:, None]).double().sum())

    resid = None if splice.start is None else splice.lm.model(toks, stop_at_layer=splice.start)
    clean = splice.log_probs(toks, resid, None, keep)
    stats.add_sum("ce:clean", ce_sum(clean))
    for label, new in replacements.items():
        logp = splice.log_probs(toks, resid, new, keep)
        stats.add_sum(f"ce:{label}", ce_sum(logp))
        if label != "zero":
            kl = torch.nn.functional.kl_div(logp, clean, log_target=True, reduction="none").sum(-1)
            stats.add_sum(f"kl:{label}", float(kl.double().sum()))
        del logp


CE_CONTEXTS_PER_FORWARD = 2


def residual_start_layer(hook: str) -> int | None:
    """The block a forward pass can start at with the activation of `hook` as its residual
    input: L + 1 for blocks.L.hook_resid_post, L for blocks.L.hook_resid_pre; else None."""
    import re

    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(post|pre)", hook)
    return None if m is None else int(m.group(1)) + (m.group(2) == "post")


def ce_summary(stats: Stats) -> dict[str, dict[str, float]]:
    n = float(stats.counts["ce_n"][0])
    clean, zero = stats.sse["ce:clean"] / n, stats.sse["ce:zero"] / n
    out = {"clean": {"ce": clean}, "zero-ablation": {"ce": zero, "ce_delta": zero - clean}}
    for key, value in stats.sse.items():
        if key.startswith("ce:") and key not in ("ce:clean", "ce:zero"):
            label = key[3:]
            ce = value / n
            out[label] = {"ce": ce, "ce_delta": ce - clean, "kl": stats.sse[f"kl:{label}"] / n,
                          "ce_recovered": (zero - ce) / (zero - clean) if zero != clean else float("nan")}
    return out


# --------------------------------------------------------------------------- tasks


def shard_stats(store_path: str, model_ref, start: int, stop: int, cfg: EvalConfig) -> Stats:
    """The sufficient statistics of rows [start, stop): one task."""
    store = ActivationStore.open(store_path)
    model = load_model(model_ref, cfg.device)
    stats = Stats()
    for a in range(start, stop, cfg.batch_size):
        rows = store.read(a, min(stop, a + cfg.batch_size))
        keep = torch.from_numpy((rows.flags & cfg.exclude) == 0)
        x = rows.acts[keep].to(cfg.device)
        if len(x):
            recons, counts = reconstruct_rows(model, store, x, rows.scale[keep], cfg)
            stats.add(x, recons, counts)
    return stats


def eval_rows(cfg: EvalConfig, store: ActivationStore) -> tuple[int, int]:
    if cfg.row_range is not None:
        start, stop = cfg.row_range
        if not 0 <= start < stop <= store.n_tokens:
            raise RQAEError(f"rows [{start}, {stop}) are outside the store's {store.n_tokens} rows")
        return start, stop
    if cfg.rows == "all":
        return 0, store.n_tokens
    run = None if isinstance(cfg.model, PretrainedSAE) else Path(cfg.model) / "train.json"
    if run is None or not run.exists():
        raise RQAEError(f"{cfg.model} has no train.json with a held-out split (not trained here); use --rows all")
    info = json.loads(run.read_text())
    if info.get("store_spec") != store.manifest["spec"]:
        raise RQAEError(f"{cfg.model} was trained on another store (model/hook/corpus/settings differ)")
    return int(info["heldout"]["first_row"]), store.n_tokens


def shard_ranges(store: ActivationStore, start: int, stop: int) -> list[tuple[int, int]]:
    shard = store.spec.shard_rows
    first = start - start % shard
    return [(max(a, start), min(a + shard, stop)) for a in range(first, stop, shard) if min(a + shard, stop) > max(a, start)]


def _in_worker(fn, torch_threads: int | None, *args):
    # dask's nanny starts workers with OMP_NUM_THREADS=1; give each local worker its
    # share of the cores instead, so 1 worker matches the single-process path.
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return fn(*args)


@contextmanager
def dask_client(cfg: EvalConfig):
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
    this process (bench/eval.py). The workers here keep glibc's default instead."""
    import dask.config
    from dask.distributed import LocalCluster

    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items()
               if k != "MALLOC_TRIM_THRESHOLD_"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def run_tasks(fn, args_list: list[tuple], cfg: EvalConfig, desc: str, progress: bool, client=None) -> list:
    """Run fn(*args) for each args, in this process or on dask.distributed (on `client`, or
    on a cluster made for this call from `cfg`)."""
    from tqdm import tqdm

    if client is None and (cfg.workers or cfg.scheduler):
        with dask_client(cfg) as own:
            return run_tasks(fn, args_list, cfg, desc, progress, client=own)
    if client is None:
        return [fn(*args) for args in tqdm(args_list, desc=desc, unit="shard", disable=not progress)]
    from dask.distributed import as_completed

    threads = cfg.threads_per_worker or (None if cfg.scheduler else max(1, (os.cpu_count() or 1) // max(1, cfg.workers)))
    futures = [client.submit(_in_worker, fn, threads, *args, pure=False) for args in args_list]
    index = {f.key: i for i, f in enumerate(futures)}
    results = [None] * len(futures)
    for fut in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="shard", disable=not progress):
        results[index[fut.key]] = fut.result()
    return results


def evaluate(cfg: EvalConfig, *, progress: bool = True, client=None) -> dict:
    """Reconstruction metrics of `cfg.model` on the store's held-out (or all) rows."""
    store = ActivationStore.open(cfg.store)
    model = load_model(cfg.model, cfg.device)
    check_compatible(model, store, cfg)
    start, stop = eval_rows(cfg, store)
    ranges = shard_ranges(store, start, stop)
    parts = run_tasks(shard_stats, [(str(cfg.store), cfg.model, a, b, cfg) for a, b in ranges], cfg,
                      f"evaluate {model_name(cfg.model)}", progress, client)
    total = Stats()
    for p in parts:
        total = total.merge(p)
    result = summarise(total, model, store.d, rows=(start, stop))
    if cfg.ce_contexts:
        R = store.spec.rows_per_context
        first = start // R
        stop_ctx = min(store.n_contexts, first + cfg.ce_contexts)
        per_task = max(1, store.spec.contexts_per_shard // 4)
        tasks = [(str(cfg.store), cfg.model, c, min(c + per_task, stop_ctx), cfg)
                 for c in range(first, stop_ctx, per_task)]
        ce = Stats()
        for p in run_tasks(ce_stats, tasks, cfg, f"CE-delta {model_name(cfg.model)}", progress, client):
            ce = ce.merge(p)
        result["ce"] = ce_summary(ce)
        result["ce_contexts"] = [first, stop_ctx]
    return result


def model_name(ref) -> str:
    return str(ref) if isinstance(ref, PretrainedSAE) else Path(ref).name


def check_compatible(model, store: ActivationStore, cfg: EvalConfig) -> None:
    """Width and hook must match the store; say which differs."""
    d_in = model.cfg.d_in
    if d_in != store.d:
        raise RQAEError(f"model {cfg.model} has d_in {d_in}, the store has d_model {store.d}")
    recorded = None  # the store normalisation a saved SAE's cfg.json names
    if model_kind(model) == "sae" and not isinstance(cfg.model, PretrainedSAE):
        from rqae_pipeline.models.sae_format import recorded_normalisation

        recorded = recorded_normalisation(cfg.model)
    if recorded and model_space(cfg) == "raw":
        raise RQAEError(f"SAE {cfg.model} reads the store's {recorded} rows (its cfg.json says so); drop --space raw")
    if recorded and recorded != store.spec.normalisation:
        raise RQAEError(f"SAE {cfg.model} was trained on {recorded} rows, the store's are {store.spec.normalisation}")
    checked = model_kind(model) == "sae" and (model_space(cfg) == "raw" or recorded)  # metadata it can trust
    hook = getattr(getattr(model.cfg, "metadata", None), "hook_name", None)
    if checked and hook and hook != store.spec.hook:
        raise RQAEError(f"SAE {cfg.model} reads {hook}, the store holds {store.spec.hook}")
    sae_lm = getattr(getattr(model.cfg, "metadata", None), "model_name", None)
    if checked and sae_lm and _lm_key(sae_lm) != _lm_key(store.spec.model):
        raise RQAEError(f"SAE {cfg.model} was trained on {sae_lm}, the store holds {store.spec.model}")


def _lm_key(name: str) -> str:
    # "google/gemma-2-2b" and sae-lens's "gemma-2-2b" are the same model; so are the
    # offline packaged copy and its hub name
    return name.lower().rsplit("/", 1)[-1].removesuffix("-offline")


def summarise(stats: Stats, model, d: int, rows: tuple[int, int]) -> dict:
    out = {"rows": list(rows), "tokens": stats.n, "kind": model_kind(model), "metrics": stats.metrics(d)}
    if "latents" in stats.counts:
        fired = stats.counts["latents"]
        out["dead_latents"] = int((fired == 0).sum())
        out["latents"] = int(fired.size)
        if "l0" in stats.counts:
            out["l0"] = float(stats.counts["l0"][0] / stats.n)
    if "codes" in stats.counts:
        out["code_usage"] = code_usage_summary(stats.counts["codes"])
    return out
