"""Comparing an RQAE with an SAE: `run_comparison` (what `rqae compare-gemmascope` runs),
and decoder-direction matching between any two dictionaries (Pearson feature matching
lives in `pearson`).

`run_comparison` is one pass over the pieces: reconstruction metrics and CE-delta for both
models (`evaluate`, sharded on dask when asked) on the RQAE's held-out rows, Pearson
feature matching and decoder-direction matching (below); `report.comparison` renders the
result as JSON, PNG plots and one self-contained HTML page. The SAE is a sae-lens
pretrained release/id (Gemma Scope) or any sae-lens directory; both go through the same code.

A dictionary here is a set of unit directions in the residual space: an SAE's decoder
rows, a codebook's codes, or an RQAE's projected codebooks (for each layer i, the 544
codes C pushed through W_out[i], the blog's Fig 2a objects). For every direction of A we
report its best cosine match in B, and a one-to-one assignment maximising the total
cosine (Hungarian). Both run in chunks, so a 16k x 557k comparison (Gemma Scope 16k vs
an RQAE with 1024 layers) never holds the full similarity matrix.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rqae_pipeline import RQAEError
from rqae_pipeline.budget import budget_table, rqae_weight_bytes
from rqae_pipeline.eval_checks import heldout_start, train_json
from rqae_pipeline.evaluate import (
    EvalConfig,
    PretrainedSAE,
    default_prefixes,
    eval_rows,
    evaluate,
    load_model,
    model_kind,
    model_space,
)
from rqae_pipeline.metrics import weight_bytes
from rqae_pipeline.pearson import (
    PearsonConfig,
    pearson_matching,
)
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.tasks import dask_client


def decoder_directions(model) -> torch.Tensor:
    """(n, d) decoder directions of an RQAE, codebook autoencoder or sae-lens SAE."""
    kind = model_kind(model)
    with torch.no_grad():
        if kind == "rqae":
            return torch.einsum("ck,nkd->ncd", model.codebook, model.W_out).reshape(-1, model.cfg.d_in).float()
        if kind == "codebook":
            return model.codebook.detach().float()
        return model.W_dec.detach().float()


@dataclass
class MatchResult:
    best_index: np.ndarray  # (n_a,) index in B of each A direction's best match
    best_cosine: np.ndarray  # (n_a,)
    assignment: np.ndarray  # (n_a,) one-to-one partner in B (-1 where none)
    assignment_cosine: np.ndarray  # (n_a,)

    def summary(self) -> dict[str, float]:
        matched = self.assignment >= 0
        return {"mean_best_cosine": float(self.best_cosine.mean()),
                "median_best_cosine": float(np.median(self.best_cosine)),
                "frac_best_above_0.9": float((self.best_cosine > 0.9).mean()),
                "mean_assignment_cosine": (float(self.assignment_cosine[matched].mean()) if matched.any()
                                           else float("nan")),
                "assigned": int(matched.sum())}


@torch.no_grad()
def top_matches(a: torch.Tensor, b: torch.Tensor, k: int = 1, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest cosines in B for each row of A; memory O(chunk^2)."""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    k = min(k, len(b))
    best_v = torch.full((len(a), k), -2.0)
    best_i = torch.zeros((len(a), k), dtype=torch.long)
    for i in range(0, len(a), chunk):
        va, ia = best_v[i : i + chunk], best_i[i : i + chunk]
        for j in range(0, len(b), chunk):
            sims = a[i : i + chunk] @ b[j : j + chunk].T
            v, idx = sims.topk(min(k, sims.shape[1]), dim=1)
            va, order = torch.cat([va, v], 1).topk(k, dim=1)
            ia = torch.cat([ia, idx + j], 1).gather(1, order)
        best_v[i : i + chunk], best_i[i : i + chunk] = va, ia
    return best_v, best_i


def match_dictionaries(a: torch.Tensor, b: torch.Tensor, *, candidates: int = 16, chunk: int = 4096,
                       dense_limit: int = 25_000_000) -> MatchResult:
    """Best match and one-to-one assignment of A's directions to B's.

    Small problems use `scipy.optimize.linear_sum_assignment` on the full cosine matrix.
    Large ones keep each A direction's `candidates` best B partners and solve the same
    maximum-weight matching on that sparse graph (`min_weight_full_bipartite_matching`);
    directions the sparse graph cannot place stay unassigned (-1).
    """
    from scipy.optimize import linear_sum_assignment

    values, index = top_matches(a, b, k=max(1, candidates), chunk=chunk)
    best_index, best_cos = index[:, 0].numpy(), values[:, 0].numpy()
    assignment = np.full(len(a), -1)
    assignment_cos = np.full(len(a), np.nan)
    if len(a) * len(b) <= dense_limit:
        sims = (F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T).numpy()
        rows, cols = linear_sum_assignment(sims, maximize=True)
        assignment[rows], assignment_cos[rows] = cols, sims[rows, cols]
    else:
        rows, cols = _sparse_assignment(values.numpy(), index.numpy(), len(b))
        assignment[rows] = cols
        assignment_cos[rows] = (F.normalize(a[rows].float(), dim=1)
                                * F.normalize(b[cols].float(), dim=1)).sum(1).numpy()
    return MatchResult(best_index, best_cos, assignment, assignment_cos)


def _sparse_assignment(values: np.ndarray, index: np.ndarray, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    n_a, k = index.shape
    # weights must be positive for the solver; 2 - cos keeps the order (maximising cos)
    graph = csr_matrix(((2.0 - values).ravel(), (np.repeat(np.arange(n_a), k), index.ravel())), shape=(n_a, n_b))
    try:
        rows, cols = min_weight_full_bipartite_matching(graph)
        return np.asarray(rows), np.asarray(cols)
    except ValueError:  # no full matching in the candidate graph: match greedily instead
        taken, rows, cols = set(), [], []
        for r in np.argsort(-values[:, 0]):
            for c in index[r]:
                if c not in taken:
                    taken.add(c)
                    rows.append(r)
                    cols.append(c)
                    break
        return np.array(rows, dtype=int), np.array(cols, dtype=int)


# --------------------------------------------------------------------------- the comparison run


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    store: Path
    rqae: Path
    sae: Path | PretrainedSAE
    out: Path
    prefixes: tuple[int, ...] | None = None  # RQAE prefix lengths (default: powers of two and n_q)
    ce_contexts: int = 64  # held-out contexts for CE-delta / KL; 0 skips them (no LM needed)
    ce_prefixes: tuple[int, ...] | None = None  # RQAE prefixes spliced for CE (default 1, 4, 16, n_q)
    workers: int = 0
    scheduler: str | None = None
    device: str = "cpu"
    batch_size: int = 4096
    pearson: PearsonConfig = PearsonConfig()
    match_candidates: int = 16
    match_layers: int | None = None  # RQAE layers whose projected codebooks enter decoder matching


def run_comparison(cfg: CompareConfig, *, progress: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Evaluate both models on the RQAE's held-out rows, match their features and decoder
    directions, and write the report (report.json, report.html, PNGs) into `cfg.out`."""
    from rqae_pipeline.report.comparison import check_report_dir, jsonable, write_report

    store = ActivationStore.open(cfg.store)
    rqae = load_model(cfg.rqae, cfg.device)
    if model_kind(rqae) != "rqae":
        raise RQAEError(f"{cfg.rqae} is not an RQAE model directory")
    check_report_dir(cfg.out)
    # a prefix spliced for CE is scored for reconstruction too: the tables list scored prefixes only
    spliced = {m for m in cfg.ce_prefixes or () if 1 <= m <= rqae.n_q}
    prefixes = set(cfg.prefixes or default_prefixes(rqae.n_q)) | spliced
    base = EvalConfig(store=cfg.store, model=cfg.rqae, workers=cfg.workers, scheduler=cfg.scheduler,
                      device=cfg.device, ce_contexts=cfg.ce_contexts, ce_prefixes=cfg.ce_prefixes,
                      batch_size=cfg.batch_size, prefixes=tuple(sorted(prefixes)))
    rows = heldout_from_both(eval_rows(base, store), cfg.sae, store, echo)  # both models on the same rows
    sae_cfg = replace(base, model=cfg.sae, row_range=rows)
    sae = load_model(cfg.sae, cfg.device)  # errors (unknown release, bad dir) before any work
    if model_kind(sae) != "sae":
        raise RQAEError(f"{cfg.sae} is not a sae-lens SAE")
    t0 = time.perf_counter()
    with dask_client(base) as client:
        echo(f"evaluating {cfg.rqae.name} and {cfg.sae} on rows {rows[0]:,}..{rows[1]:,}"
             + (f" (dask: {client.dashboard_link or client.scheduler.address})" if client else ""))
        results = {"rqae": evaluate(replace(base, row_range=rows), progress=progress, client=client),
                   "sae": evaluate(sae_cfg, progress=progress, client=client)}
    space = model_space(sae_cfg)
    echo("Pearson feature matching")
    pearson = pearson_matching(rqae, sae, store, cfg.pearson, sae_space=space, prefixes=base.prefixes,
                               rows=rows, exclude=base.exclude)
    for note in (pearson["shortfall"], pearson["signed"]):
        if note:
            echo(f"warning: {note}")
    echo("decoder-direction matching")
    matching = decoder_matching(rqae, sae, store, space, cfg)
    report = {
        "store": {"path": str(cfg.store), "model": store.spec.model, "hook": store.spec.hook, "d": store.d,
                  "normalisation": store.spec.normalisation},
        "rqae": {"path": str(cfg.rqae), "n_q": rqae.n_q, **rqae_weight_bytes(rqae), **results["rqae"]},
        "sae": {"source": str(cfg.sae), "space": space, "d_sae": int(sae.cfg.d_sae),
                "architecture": sae.cfg.architecture(), "weight_bytes": weight_bytes(sae.state_dict().values()),
                **results["sae"]},
        "pearson": pearson,
        "decoder_matching": matching,
        "config": jsonable(asdict(cfg)),
        "seconds": time.perf_counter() - t0,
    }
    report["budget"] = budget_table(report["rqae"], report["sae"])
    write_report(report, cfg.out)
    return report


def heldout_from_both(rows: tuple[int, int], sae_ref, store: ActivationStore,
                      echo: Callable[[str], None]) -> tuple[int, int]:
    """The RQAE's held-out rows less those an SAE trained here trained on (its own held-out
    split may start later): every number then comes from rows neither model was fit to."""
    if train_json(sae_ref) is None:  # Gemma Scope or another sae-lens SAE: not fit to this store
        return rows
    first = heldout_start(sae_ref, store)  # refuses an SAE trained on another store
    if first <= rows[0]:
        return rows
    if first >= rows[1]:
        raise RQAEError(f"SAE {sae_ref} was trained on every held-out row of the RQAE (it trained on rows up to "
                        f"{first:,}; the store has {rows[1]:,}); train it with a held-out split at least the RQAE's")
    echo(f"SAE {sae_ref} was trained on rows up to {first:,}: both models are compared on rows "
         f"{first:,}..{rows[1]:,}, held out from both")
    return first, rows[1]


def decoder_matching(rqae, sae, store, sae_space: str, cfg: CompareConfig) -> dict:
    """Each SAE decoder direction's best match among the RQAE's projected codebooks, and a
    one-to-one assignment. RQAE directions live in the normalised space; for an SAE on raw
    residuals they are mapped to raw space (x_norm = x_raw / scale * gain, so a direction v
    becomes v / gain; the per-token scale does not change a direction)."""
    layers = min(rqae.n_q, cfg.match_layers or rqae.n_q)
    dirs = decoder_directions(rqae)[: layers * rqae.codebook.shape[0]]
    if sae_space == "raw":
        dirs = dirs / store.gain  # ones in "rms" mode
    sae_dirs = decoder_directions(sae)
    result = match_dictionaries(sae_dirs, dirs, candidates=cfg.match_candidates)
    per_layer = np.bincount(result.best_index // rqae.codebook.shape[0], minlength=layers)
    return {**result.summary(), "sae_features": len(sae_dirs), "rqae_directions": len(dirs), "rqae_layers": layers,
            "best_cosine_histogram": np.histogram(result.best_cosine, bins=20, range=(-1, 1))[0].tolist(),
            "assignment_cosine_histogram": np.histogram(result.assignment_cosine[result.assignment >= 0], bins=20,
                                                        range=(-1, 1))[0].tolist(),
            "best_match_layer_counts": per_layer.tolist()}
