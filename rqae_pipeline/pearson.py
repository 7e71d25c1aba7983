"""Pearson feature matching (blog Fig 5a): does an SAE feature exist in the RQAE?

For an SAE feature f, the tokens where it fires in a few of its contexts are scored by two
RQAE features: (a) the SAE encoder column of f passed through the LM's final norm and
encoded, and (b) the codes of f's top-activating token. The Pearson r between f's
activation and each RQAE feature's intensity, per RQAE prefix length, says how alike the
two rank those tokens.

This follows the reference's script (harish-kamath/rqae `scripts/misc/pearson.py`, with
the feature pool of `scripts/2_compile_gemmascope_features.py`):

* pool: features with >= `min_firing` firing tokens (BOS excluded) whose top-5 activations
  are not on BOS tokens; the reference takes feature ids 0..74, we take a seeded sample;
* contexts: those holding the feature's top / middle / bottom 100 firing tokens (by
  activation); of these, ranked by their maximum activation, the top / middle / bottom 10;
* tokens: every token of those contexts where the feature fires;
* (a): `norm(W_enc[:, f])` encoded, where `norm` is the LM's final norm (x / rms(x) * g);
* summary: mean and spread over features, with and without the 5 features worst at the
  middle prefix length (the reference plots only the latter).

Spaces. The reference's SAE reads raw residuals and its RQAE reads `norm(x_raw)`. An SAE
trained here on a final-norm store reads x_s = x_raw / rms * g, so its encoder column v
reads x_raw . (v * g) / rms: its raw-space equivalent is w = v * g, and the query the
reference would build from it is norm(w), i.e. v * g**2 rescaled. In "rms" mode g = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rqae_pipeline.store import Flags


@dataclass(frozen=True, kw_only=True)
class PearsonConfig:
    features: tuple[int, ...] | None = None  # SAE features; default: a seeded sample of the eligible ones
    n_features: int = 75  # the reference ran features 0..74
    contexts_per_group: int = 10  # top, middle and bottom contexts by max activation (the reference's 10/10/10)
    tokens_per_group: int = 100  # contexts are drawn from those of the top/middle/bottom 100 firing tokens
    min_firing: int = 300  # a sampled feature fires on at least this many (non-excluded) tokens
    top_not_bos: int = 5  # ... and none of its top-5 activations (BOS rows included) is on a BOS row
    drop_worst: int = 5  # summary_drop_worst leaves out the features worst at (a)'s middle prefix
    max_tokens: int = 200_000  # rows of the store scanned
    chunk: int = 4096
    seed: int = 0

    def __post_init__(self):
        if min(self.n_features, self.contexts_per_group, self.tokens_per_group, self.chunk) < 1:
            raise ValueError("n_features, contexts_per_group, tokens_per_group and chunk must be positive")
        if min(self.min_firing, self.top_not_bos, self.drop_worst) < 0:
            raise ValueError("min_firing, top_not_bos and drop_worst must be >= 0")


def normalise_like_store(v: torch.Tensor, store) -> torch.Tensor:
    """Pass vectors through the store's normalisation (the LM's final norm, with its gain in
    final-norm mode), as the reference passes W_enc[:, f] through the final norm."""
    v = v.float()
    v = v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return v * store.gain  # ones in "rms" mode


def encoder_query(sae, feature: int, store, sae_space: str) -> torch.Tensor:
    """The stored-space vector the RQAE encodes for query (a): the reference's
    norm(W_enc[:, f]) for a raw-space SAE; for a stored-space SAE, norm of its raw-space
    equivalent W_enc[:, f] * g (module docstring)."""
    column = sae.W_enc[:, feature] if hasattr(sae, "W_enc") else sae.W_dec[feature]
    column = column.detach().float()
    if sae_space == "normalised":
        column = column * store.gain
    return normalise_like_store(column[None], store)[0]


def _sae_input(store, rows, sae_space: str) -> torch.Tensor:
    return rows.acts if sae_space == "normalised" else store.raw(rows)


def _spans(rows: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    start, stop = rows
    return [(a, min(stop, a + chunk)) for a in range(start, stop, chunk)]


@torch.no_grad()
def eligible_features(sae, store, rows: tuple[int, int], cfg: PearsonConfig, sae_space: str,
                      exclude: int) -> torch.Tensor:
    """SAE features in the reference's pool over rows [start, stop): at least `min_firing`
    firing non-excluded tokens, and no BOS row among the `top_not_bos` largest activations
    taken over all rows (a feature whose top examples are BOS is "likely not a covered
    feature", the reference says)."""
    fired = top_v = top_bos = None
    for a, b in _spans(rows, cfg.chunk):
        r = store.read(a, b)
        e = sae.encode(_sae_input(store, r, sae_space)).float()
        keep = torch.from_numpy((r.flags & exclude) == 0)
        f = (e[keep] > 0).sum(0)
        fired = f if fired is None else fired + f
        if cfg.top_not_bos:
            bos = torch.from_numpy((r.flags & Flags.BOS) != 0)[:, None].expand_as(e)
            v = e if top_v is None else torch.cat([top_v, e])
            flag = bos if top_bos is None else torch.cat([top_bos, bos])
            top_v, idx = v.topk(min(cfg.top_not_bos, len(v)), dim=0)
            top_bos = flag.gather(0, idx)
    ok = fired >= max(1, cfg.min_firing)
    if cfg.top_not_bos:
        ok &= ~(top_bos & (top_v > 0)).any(0)
    return ok.nonzero()[:, 0]


@torch.no_grad()
def feature_activations(sae, store, features: torch.Tensor | None, rows: tuple[int, int], cfg: PearsonConfig,
                        sae_space: str, exclude: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(features, activations (n, k), context index (n,)) over rows [start, stop), in chunks;
    excluded rows (BOS, outliers) read as 0. Without `features`, a seeded sample of
    `eligible_features` (one extra pass)."""
    if features is None:
        pool = eligible_features(sae, store, rows, cfg, sae_space, exclude)
        g = torch.Generator().manual_seed(cfg.seed)
        features = pool[torch.randperm(len(pool), generator=g)[: cfg.n_features]].sort().values
    acts, seq = [], []
    for a, b in _spans(rows, cfg.chunk):
        r = store.read(a, b)
        e = sae.encode(_sae_input(store, r, sae_space))[:, features].float()
        e[torch.from_numpy((r.flags & exclude) != 0)] = 0
        acts.append(e)
        seq.append(r.seq)
    return features, torch.cat(acts), np.concatenate(seq)


def _top_middle_bottom(order: torch.Tensor, k: int) -> torch.Tensor:
    """The first k, middle k and last k entries of `order` (the reference's slices)."""
    mid = len(order) // 2
    return torch.cat([order[:k], order[max(0, mid - k // 2): mid + k - k // 2], order[-k:]])


def example_tokens(a: torch.Tensor, ctx: torch.Tensor, per_group: int, tokens_per_group: int | None = None
                   ) -> torch.Tensor:
    """Row indices where the feature fires within its top, middle and bottom `per_group`
    contexts ranked by their maximum activation. With `tokens_per_group`, the contexts ranked
    are only those holding the top / middle / bottom `tokens_per_group` firing tokens (the
    reference's feature files); otherwise every context where it fires."""
    firing_rows = (a > 0).nonzero()[:, 0]
    if len(firing_rows) == 0:
        return torch.empty(0, dtype=torch.long)
    if tokens_per_group is None:
        pool = torch.unique(ctx[firing_rows])
    else:
        by_act = firing_rows[a[firing_rows].argsort(descending=True, stable=True)]
        pool = torch.unique(ctx[_top_middle_bottom(by_act, tokens_per_group)])
    ctx_max = torch.zeros(int(ctx.max()) + 1).scatter_reduce(0, ctx, a, "amax")
    order = pool[ctx_max[pool].argsort(descending=True, stable=True)]
    chosen = torch.unique(_top_middle_bottom(order, per_group))
    return (torch.isin(ctx, chosen) & (a > 0)).nonzero()[:, 0]


def _example_codes(rqae, store, picked: dict, start: int, chunk: int) -> dict[int, torch.Tensor]:
    """RQAE codes of every example token and top token, keyed by row offset from `start`."""
    parts = [t.numpy() for _, t, _ in picked.values()] + [np.array([top for *_, top in picked.values()])]
    needed = np.unique(np.concatenate(parts).astype(np.int64)) if picked else np.empty(0, np.int64)
    codes_of = {}
    for i in range(0, len(needed), chunk):
        part = needed[i : i + chunk]
        codes_of.update(zip(part.tolist(), rqae.encode(store.read_rows(part + start).acts)))
    return codes_of


@torch.no_grad()
def pearson_matching(rqae, sae, store, cfg: PearsonConfig, *, sae_space: str, prefixes: tuple[int, ...],
                     rows: tuple[int, int] | None = None, exclude: int = 0) -> dict:
    """Pearson correlation between SAE feature activations and RQAE intensities (blog Fig 5a).

    For each feature, the tokens where it fires in its top / middle / bottom contexts
    (`example_tokens`); RQAE feature (a) is `encoder_query` encoded, (b) the codes of the
    feature's top-activating token. Features with fewer than 3 such tokens are skipped.
    Returns per-feature and per-prefix correlations. Memory: the chosen features'
    activations over the scanned rows, and codes of only the example tokens.
    """
    start, stop = rows if rows is not None else (0, store.n_tokens)
    stop = min(stop, start + cfg.max_tokens)
    features = None if cfg.features is None else torch.tensor(cfg.features)
    requested = cfg.n_features if features is None else len(features)
    features, acts, seq = feature_activations(sae, store, features, (start, stop), cfg, sae_space, exclude)
    ctx = torch.from_numpy(seq.astype(np.int64) - int(seq.min()))
    picked = {}
    for j, f in enumerate(features.tolist()):
        tok = example_tokens(acts[:, j], ctx, cfg.contexts_per_group, cfg.tokens_per_group)
        if len(tok) >= 3:
            picked[f] = (j, tok, int(acts[:, j].argmax()))
    codes_of = _example_codes(rqae, store, picked, start, cfg.chunk)
    per_feature = []
    for f, (j, tok, top) in picked.items():
        query = {"a": rqae.encode(encoder_query(sae, f, store, sae_space)[None])[0], "b": codes_of[top]}
        tok_codes = torch.stack([codes_of[t] for t in tok.tolist()])
        row = {"feature": f, "tokens": len(tok), "a": {}, "b": {}}
        for m in prefixes:
            for name, q in query.items():
                row[name][str(m)] = _pearson(rqae.intensity(q, tok_codes, m), acts[tok, j])
        per_feature.append(row)
    negative, nonzero = int((acts < 0).sum()), int((acts != 0).sum())
    ranked_at = middle_prefix(prefixes, rqae.n_q)
    kept = drop_worst(per_feature, ranked_at, cfg.drop_worst)
    return {"features": per_feature, "summary": pearson_summary(per_feature, prefixes),
            "summary_drop_worst": {"dropped": cfg.drop_worst, "ranked_at": ranked_at,
                                   **pearson_summary(kept, prefixes)},
            "rows": [start, stop], "sae_space": sae_space,
            # fewer than requested: too few eligible features in the rows scanned, or too few example tokens
            "features_requested": requested, "features_scored": len(per_feature),
            "shortfall": shortfall(requested, len(per_feature), stop - start, cfg),
            "negative_activations": negative, "nonzero_activations": nonzero, "signed": signed_note(negative, nonzero)}


def shortfall(requested: int, scored: int, rows: int, cfg: PearsonConfig) -> str | None:
    """Why fewer features were scored than requested (None when none is missing)."""
    if scored >= requested:
        return None
    return (f"Pearson matching scored {scored} of {requested} requested SAE features (a feature is left out "
            f"if it fires on fewer than {cfg.min_firing} of the {rows:,} rows scanned, has a BOS token among its "
            f"top {cfg.top_not_bos} or fires on fewer than 3 tokens of its example contexts); more held-out rows "
            f"(--pearson-tokens, a larger store) give more")


def signed_note(negative: int, nonzero: int) -> str | None:
    """Why a signed SAE's (AbsTopK's) matching reads only half of its firings, or None.

    Matching follows the reference, written for SAEs whose activations are >= 0: a feature
    fires where its activation is positive (its pool, example tokens and top token), so a
    negative activation is read as not firing."""
    if not negative:
        return None
    return (f"the SAE's activations are negative on {negative:,} of the {nonzero:,} non-zero activations of the "
            f"sampled features (a signed SAE, e.g. AbsTopK): Pearson matching takes a feature's positive "
            f"activations as its firings, so its negative firings count as not firing and each correlation is "
            f"of the feature's positive side only")


def middle_prefix(prefixes: tuple[int, ...], n_q: int) -> int:
    """The prefix nearest half the RQAE's layers (the reference ranks at layer 512 of 1024)."""
    return min(prefixes, key=lambda m: (abs(m - (n_q // 2 + 1)), -m))


def drop_worst(per_feature: list[dict], prefix: int, n: int) -> list[dict]:
    """`per_feature` without the n features of lowest (a) correlation at `prefix` (NaN counts
    as lowest), as the reference's plot drops its 5 worst features."""
    score = [r["a"][str(prefix)] for r in per_feature]
    order = sorted(range(len(per_feature)), key=lambda i: score[i] if np.isfinite(score[i]) else -np.inf)
    dropped = set(order[:n])
    return [r for i, r in enumerate(per_feature) if i not in dropped]


def pearson_summary(per_feature: list[dict], prefixes: tuple[int, ...]) -> dict:
    """Mean, spread and count of the finite correlations, per RQAE feature kind and prefix."""
    summary = {}
    for name in ("a", "b"):
        summary[name] = {}
        for m in prefixes:
            vals = np.array([r[name][str(m)] for r in per_feature], dtype=float)
            vals = vals[np.isfinite(vals)]
            summary[name][str(m)] = {"mean": float(vals.mean()) if len(vals) else float("nan"),
                                     "std": float(vals.std()) if len(vals) else float("nan"),
                                     "q25": float(np.quantile(vals, 0.25)) if len(vals) else float("nan"),
                                     "q75": float(np.quantile(vals, 0.75)) if len(vals) else float("nan"),
                                     "n": len(vals)}
    return summary


def _pearson(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double() - u.double().mean(), v.double() - v.double().mean()
    den = float(u.norm() * v.norm())
    return float((u @ v) / den) if den > 0 else float("nan")
