"""Statistics of an encoded store (`rqae codebook-stats`): code usage per layer, distinct
code prefixes (the blog's table of 544 / 234,994 / ... prefixes on 4M tokens), and the
cosines and norms of the projected codebooks (the blog's Fig 2a). Reads a codes store
(`codes.py`); the plots are drawn by `report.codebook`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.codes import CodesStore, ensure_codes, model_identity
from rqae_pipeline.io import atomic_write_text
from rqae_pipeline.metrics import code_counts, usage_perplexity
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.urls import is_remote

# --------------------------------------------------------------------------- statistics


def prefix_keys(codes: np.ndarray, m: int, n_codes: int) -> np.ndarray:
    """One int64 per row naming its first m codes (exact while n_codes**m < 2**63: m <= 6)."""
    key = np.zeros(len(codes), dtype=np.int64)
    for i in range(m):
        key = key * n_codes + codes[:, i].astype(np.int64)
    return key


def codebook_stats(model, codes: CodesStore, *, prefix_layers: int = 4, pairs_sample: int = 4096,
                   seed: int = 0, progress: bool = True) -> dict:
    """Distinct prefixes (layers 1..prefix_layers), code usage per layer, and the projected
    codebooks' pairwise cosines and norms. One pass over the codes; memory is bounded by a
    block plus the set of distinct prefixes (which the count itself needs)."""
    from tqdm import tqdm

    if codes.n == 0:
        raise RQAEError(f"codes store {codes.path} has no committed rows")
    n_codes, n_q = int(model.codebook.shape[0]), model.n_q
    if codes.n_q != n_q:
        raise RQAEError(f"codes have {codes.n_q} layers but the model has {n_q}")
    m_max = min(prefix_layers, n_q, 6)
    usage = np.zeros((n_q, n_codes), dtype=np.int64)
    distinct = [_Distinct() for _ in range(m_max)]
    with tqdm(total=codes.n, unit="tok", unit_scale=True, desc="codebook stats", disable=not progress) as bar:
        for _, block in codes.blocks():
            usage += code_counts(block, n_codes)
            for m in range(1, m_max + 1):
                distinct[m - 1].add(prefix_keys(block, m, n_codes))
            bar.update(len(block))
    N = codes.n
    counts = [d.count() for d in distinct]
    prefixes = [{"layers": m, "distinct": c, "tokens_per_prefix": N / c} for m, c in enumerate(counts, start=1)]
    return {
        "tokens": N, "n_q": n_q, "n_codes": n_codes,
        "prefixes": prefixes,
        "usage": {"used_codes": (usage > 0).sum(1).tolist(), "perplexity": usage_perplexity(usage).tolist(),
                  "counts": usage.tolist()},
        "projected": projected_codebook_stats(model, sample=pairs_sample, seed=seed),
    }


class _Distinct:
    """Exact count of distinct int64 keys: per-block uniques merged once the pending ones
    outgrow the merged set, so the merging work stays O(D log D) overall."""

    def __init__(self):
        self.merged, self.pending, self.pending_size = np.empty(0, np.int64), [], 0

    def add(self, keys: np.ndarray) -> None:
        u = np.unique(keys)
        self.pending.append(u)
        self.pending_size += len(u)
        if self.pending_size >= max(len(self.merged), 1 << 16):
            self._merge()

    def _merge(self) -> None:
        self.merged = np.unique(np.concatenate([self.merged, *self.pending]))
        self.pending, self.pending_size = [], 0

    def count(self) -> int:
        self._merge()
        return int(len(self.merged))


@torch.no_grad()
def projected_codebook_stats(model, *, sample: int = 4096, seed: int = 0, bins: int = 200) -> dict:
    """Fig 2a: the vectors C_c W_out[i] (every code of every layer, in the store's units).
    Norms are exact per layer; the cosine histogram is over all pairs of a seeded sample of
    `sample` (layer, code) vectors (all n_q x 544 would be ~3e11 pairs at n_q=1024)."""
    C = model.codebook.double()
    scale = float(model.input_scale)
    norms = torch.stack([(C @ model.W_out[i].double()).norm(dim=1) * scale for i in range(model.n_q)])  # (n_q, 544)
    total = model.n_q * C.shape[0]
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=g)[: min(sample, total)]
    layer, code = pick // C.shape[0], pick % C.shape[0]
    vecs = torch.einsum("sk,skd->sd", C[code], model.W_out.detach().double()[layer])
    vecs = (vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-30)).float()
    # Histogram of the whole Gram matrix minus its diagonal, halved: each unordered pair once,
    # without materialising (s^2 / 2) pair indices.
    # Pairs inside one layer span its 4-dim subspace (c and -c are antipodal), so they are
    # also counted apart: the blog's near-orthogonality is a statement about the rest.
    hist, within = np.zeros(bins, dtype=np.int64), np.zeros(bins, dtype=np.int64)
    for a in range(0, len(vecs), 1024):
        gram = (vecs[a:a + 1024] @ vecs.T).clamp(-1, 1)
        hist += np.histogram(gram.numpy(), bins=bins, range=(-1.0, 1.0))[0]
        same = layer[a:a + 1024, None] == layer[None, :]
        within += np.histogram(gram[same].numpy(), bins=bins, range=(-1.0, 1.0))[0]
    diagonal = np.histogram(np.ones(len(vecs)), bins=bins, range=(-1.0, 1.0))[0]
    hist, within = (hist - diagonal) // 2, (within - diagonal) // 2
    across = hist - within
    edges = np.linspace(-1.0, 1.0, bins + 1)
    centres, pairs = (edges[1:] + edges[:-1]) / 2, int(hist.sum())
    cdf = np.cumsum(hist) / max(pairs, 1)
    return {
        "layer_norm_L": model.layer_norms().double().mul(scale).tolist(),
        "norm_mean": norms.mean(1).tolist(), "norm_min": norms.min(1).values.tolist(),
        "norm_max": norms.max(1).values.tolist(),
        "cosine": {"sampled_vectors": len(vecs), "pairs": pairs,
                   "abs_below_0.2": float(hist[np.abs(centres) < 0.2].sum() / max(pairs, 1)),
                   "across_layers_pairs": int(across.sum()),
                   "across_layers_abs_below_0.2":
                       float(across[np.abs(centres) < 0.2].sum() / max(int(across.sum()), 1)),
                   "quantiles": {q: float(edges[1:][np.searchsorted(cdf, f)]) for q, f in
                                 (("1%", 0.01), ("50%", 0.5), ("99%", 0.99))},
                   "hist": hist.tolist(), "edges": edges.tolist()},
    }


# --------------------------------------------------------------------------- `rqae codebook-stats`


@dataclass(frozen=True, kw_only=True)
class CodebookStatsConfig:
    store: Path
    model: Path  # an RQAE model directory
    codes: Path | None = None  # default: the one `rqae encode` writes (encoded first if missing)
    out: Path | None = None  # directory; default: beside the codes store
    prefix_layers: int = 4
    pairs_sample: int = 4096

    def __post_init__(self):
        # RQAEError: the CLI builds this from its options. Up to 6 layers: a prefix is packed
        # into one int64 (544**6 < 2**63)
        if not 1 <= self.prefix_layers <= 6:
            raise RQAEError(f"--prefix-layers must be 1..6, got {self.prefix_layers}")
        if self.pairs_sample < 2:
            raise RQAEError(f"--pairs-sample must be at least 2 (cosines need pairs), got {self.pairs_sample}")


@dataclass(frozen=True)
class CodebookStatsResult:
    stats: dict  # `codebook_stats`
    out: Path
    files: list[Path]  # codebook_stats.json and the plots


def write_codebook_stats(cfg: CodebookStatsConfig, *, progress: bool = True) -> CodebookStatsResult:
    """Codebook statistics of the encoded store, written as codebook_stats.json and PNG plots."""
    from rqae_pipeline.models.rqae import RQAE
    from rqae_pipeline.report.codebook import plot_codebook_stats

    store = ActivationStore.open(cfg.store)
    model_identity(cfg.model)  # a clear error for a directory that is not an RQAE
    model = RQAE.load(cfg.model)
    if cfg.prefix_layers > model.n_q:
        raise RQAEError(f"--prefix-layers {cfg.prefix_layers}: the model has {model.n_q} layers")
    codes = ensure_codes(store, cfg.model, cfg.codes, progress=progress)
    if cfg.out is None and is_remote(codes.path):
        raise RQAEError(f"codes store {codes.path} is at a URL; pass a local --out for the statistics and plots")
    stats = codebook_stats(model, codes, prefix_layers=cfg.prefix_layers, pairs_sample=cfg.pairs_sample,
                           progress=progress)
    out = cfg.out or codes.path.with_name(codes.path.name.removesuffix(".zarr") + "-stats")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "codebook_stats.json", json.dumps(stats))
        plots = plot_codebook_stats(stats, out)
    except OSError as e:
        raise RQAEError(f"cannot write {out}: {e.strerror or e}") from None
    return CodebookStatsResult(stats=stats, out=out, files=[out / "codebook_stats.json", *plots])
