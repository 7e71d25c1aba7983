"""RQAE features: query search, vMF features and splitting, and a feature dictionary.

Blog ("Defining a Feature", "Finding New Features", "Feature Splitting"): a feature is a
prefix of a token's code tuple; its intensity on a token t over layers 1..m is

    I(t) = sum_i L_i cos(C[q_i], C[t_i]) / sum_i L_i        (L_i: mean decoder column norm)

and a multi-token feature fits a von Mises-Fisher distribution per layer to the query
tokens' unit codes and scores t by the L_i-weighted log-density

    S(t) = sum_i L_i (log C_4(k_i) + k_i <mu_i, C[t_i]>) / sum_i L_i.

Both are linear in the per-layer unit codes, so both are a `Feature`: weights w (m, 4)
and a bias, score(t) = sum_i <w_i, C[t_i]> + bias. A score is computed from a per-layer
lookup table (m, 544) summed layer by layer in float64, in a fixed order, so a row's score
is bit-identical whatever block it is read in; rankings break ties by row. Search streams
the codes store block by block, keeping a running top-k (bounded memory).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from rqae_pipeline import RQAEError, metrics
from rqae_pipeline.codes import CodesStore, ensure_codes
from rqae_pipeline.store import ActivationStore, Flags

# Past this concentration a layer's vMF is a point mass for every purpose: a neighbouring
# code (cos <= 0.95 on this grid) already scores >= 500 nats below the mean. Identical
# query codes give an infinite MLE, so kappa is capped here.
KAPPA_MAX = 1e4
DEFAULT_EXCLUDE = int(Flags.BOS | Flags.OUTLIER)


@dataclass(frozen=True)
class Feature:
    """score(t) = sum_{i<m} <weights[i], C[t_i]> + bias over the first m = len(weights) layers."""

    weights: np.ndarray  # (m, 4) float64
    bias: float = 0.0

    @property
    def layers(self) -> int:
        return int(self.weights.shape[0])


@dataclass(frozen=True)
class VMF:
    """Per-layer von Mises-Fisher fit on S^3 to the query tokens' unit codes."""

    mean: np.ndarray  # (n_q, 4) unit mean directions
    kappa: np.ndarray  # (n_q,) concentrations, in [0, KAPPA_MAX]
    n: int  # query tokens fitted

    @property
    def at_cap(self) -> np.ndarray:
        """(n_q,) layers whose kappa is the cap, not an estimate: the queries' codes agree there."""
        return np.asarray(self.kappa) >= KAPPA_MAX

    def to_dict(self) -> dict:
        return {"n": self.n, "kappa": self.kappa.tolist(), "mean": self.mean.tolist(),
                "layers_at_cap": int(self.at_cap.sum())}


@dataclass(frozen=True)
class Hit:
    row: int
    score: float


# --------------------------------------------------------------------------- scoring


def codebook64(model) -> np.ndarray:
    """(544, 4) unit codes in float64 (renormalised, so a code's cosine with itself is 1)."""
    return metrics.unit_codebook64(model.codebook)


def check_layers(model, layers: int | None) -> int:
    m = model.n_q if layers is None else int(layers)
    if not 1 <= m <= model.n_q:
        raise RQAEError(f"--layers must be in 1..{model.n_q} (the model's layers), got {m}")
    return m


def layer_weights(model, m: int) -> np.ndarray:
    return metrics.layer_weights(model.layer_norms(), m)


def intensity_feature(model, query_codes: np.ndarray, layers: int | None = None) -> Feature:
    """The blog's intensity of the feature given by the first `layers` codes of a query token."""
    m = check_layers(model, layers)
    return Feature(weights=metrics.intensity_weights(codebook64(model), model.layer_norms(), query_codes, m))


def score_codes(model, feature: Feature, codes: np.ndarray) -> np.ndarray:
    """(n,) float64 scores of rows of codes (n, >= m)."""
    table = feature.weights @ codebook64(model).T  # (m, 544)
    return metrics.table_scores(table, codes, feature.bias)


class TopK:
    """The k best (score, row) seen so far; ties go to the lower row. With `slack`, rows
    within `slack` of the k-th score are kept too (candidates from approximate scores)."""

    def __init__(self, k: int, slack: float = 0.0):
        self.k, self.slack = k, slack
        self.rows, self.scores = np.empty(0, np.int64), np.empty(0, np.float64)

    def push(self, rows: np.ndarray, scores: np.ndarray) -> None:
        if len(scores) > self.k:  # prefilter; keep every tie at the threshold
            kth = np.partition(scores, len(scores) - self.k)[len(scores) - self.k]
            keep = scores >= kth - self.slack
            rows, scores = rows[keep], scores[keep]
        rows, scores = np.concatenate([self.rows, rows]), np.concatenate([self.scores, scores])
        order = np.lexsort((rows, -scores))
        n = self.k
        if self.slack and len(order) > n:
            n += int((scores[order[n:]] >= scores[order[n - 1]] - self.slack).sum())
        self.rows, self.scores = rows[order[:n]], scores[order[:n]]

    def hits(self) -> list[Hit]:
        return [Hit(int(r), float(s)) for r, s in zip(self.rows[: self.k], self.scores[: self.k])]


def _keep_mask(store: ActivationStore | None, a: int, b: int, exclude: int) -> np.ndarray | None:
    if store is None or not exclude:
        return None
    return (store.column("flags", slice(a, b)) & exclude) == 0


def search(model, codes: CodesStore, query: np.ndarray | Feature, *, layers: int | None = None, top_k: int = 20,
           store: ActivationStore | None = None, exclude: int = DEFAULT_EXCLUDE, progress: bool = False) -> list[Hit]:
    """Rank every encoded token by a feature (a query token's codes: the blog's 5 steps).

    With `store`, rows whose flags meet `exclude` (BOS and norm outliers by default: every
    BOS has the same activation, so they would all tie) are skipped.
    """
    from tqdm import tqdm

    feature = query if isinstance(query, Feature) else intensity_feature(model, query, layers)
    if top_k < 1:
        raise RQAEError("--top-k must be positive")
    table, top = feature.weights @ codebook64(model).T, TopK(top_k)
    with tqdm(total=codes.n, unit="tok", unit_scale=True, desc="search", disable=not progress) as bar:
        for a, block in codes.blocks():
            scores = metrics.table_scores(table, block[:, : feature.layers], feature.bias)
            rows = np.arange(a, a + len(block))
            keep = _keep_mask(store, a, a + len(block), exclude)
            top.push(rows if keep is None else rows[keep], scores if keep is None else scores[keep])
            bar.update(len(block))
    return top.hits()


# --------------------------------------------------------------------------- vMF


def vmf_log_normaliser(kappa: np.ndarray) -> np.ndarray:
    """log C_4(k) = log k - log(4 pi^2) - log I_1(k) on S^3; -log(2 pi^2) (uniform) at k = 0.
    scipy's exponentially scaled Bessel function keeps it finite for any k."""
    from scipy.special import ive

    k = np.asarray(kappa, dtype=np.float64)
    safe = np.maximum(k, 1e-300)
    out = np.log(safe) - np.log(4 * np.pi**2) - (np.log(ive(1, safe)) + safe)
    return np.where(k < 1e-8, -np.log(2 * np.pi**2), out)


def _mean_resultant_to_kappa(rbar: np.ndarray) -> np.ndarray:
    """MLE of k on S^3: solve A_4(k) = I_2(k)/I_1(k) = rbar (Banerjee et al. 2005 start,
    Newton steps as in Sra 2012), capped at KAPPA_MAX."""
    from scipy.special import ive

    r = np.clip(np.asarray(rbar, dtype=np.float64), 0.0, 1.0)
    inner = r < 1.0 - 1e-12
    rr = np.where(inner, r, 0.5)
    # Iterates stay within the cap: near rbar = 1 the start is ~1e12, and there the Newton
    # denominator is a difference of nearly equal terms (a step to 0, or past the Bessel
    # functions' range: NaN). Such an rbar's MLE is past the cap, where the result ends anyway.
    k = np.minimum(rr * (4 - rr**2) / (1 - rr**2), KAPPA_MAX)
    for _ in range(50):
        with np.errstate(divide="ignore", invalid="ignore"):  # rbar = 0 (k = 0): set to 0 below
            a = ive(2, k) / ive(1, k)
        step = (a - rr) / np.maximum(1 - a**2 - 3 * a / np.maximum(k, 1e-300), 1e-300)
        k = np.clip(k - step, k / 10, KAPPA_MAX)
    k = np.where(r < 1e-12, 0.0, k)
    return np.minimum(np.where(inner, k, KAPPA_MAX), KAPPA_MAX)


def fit_vmf(model, codes: np.ndarray) -> VMF:
    """Per layer: mean direction and MLE concentration of the query tokens' codes (k, n_q)."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0:
        raise RQAEError("no query tokens to fit a feature to; give at least one")
    x = codebook64(model)[codes.astype(np.int64)]  # (k, n_q, 4)
    s = x.sum(0)
    length = np.linalg.norm(s, axis=1)
    # A zero resultant (codes cancelling out) has no direction: kappa is 0 there, any mean will do.
    mean = np.where(length[:, None] > 1e-12, s / np.maximum(length, 1e-300)[:, None], x[0])
    return VMF(mean=mean, kappa=_mean_resultant_to_kappa(length / len(codes)), n=len(codes))


def vmf_feature(model, vmf: VMF, layers: int | None = None) -> Feature:
    m = check_layers(model, layers)
    w = layer_weights(model, m)
    return Feature(weights=(w * vmf.kappa[:m])[:, None] * vmf.mean[:m],
                   bias=float((w * vmf_log_normaliser(vmf.kappa[:m])).sum()))


def vmf_scores(model, vmf: VMF, codes: np.ndarray, layers: int | None = None) -> np.ndarray:
    """L_i-weighted mean log-density (nats) of rows of codes under the per-layer vMFs."""
    return score_codes(model, vmf_feature(model, vmf, layers), codes)


def split_feature(model, codes: np.ndarray, subsets: list[list[int]]) -> list[VMF]:
    """Sub-features ("Feature Splitting"): one vMF per chosen subset of the query tokens."""
    out = []
    for subset in subsets:
        if not subset:
            raise RQAEError("a split needs at least one query token")
        bad = [i for i in subset if not 0 <= i < len(codes)]
        if bad:
            raise RQAEError(f"split index {bad[0]} is out of range: there are {len(codes)} query tokens")
        out.append(fit_vmf(model, np.asarray(codes)[list(subset)]))
    return out


# --------------------------------------------------------------------------- dictionary


# "unique-tokens": a distinct token id uniformly, then one of its ordinary rows uniformly (the
# write-up: "we select uniformly from unique tokens"); "occurrences": ordinary rows uniformly,
# so frequent tokens (" the", ",") are seeded in proportion to their count.
SeedDraw = Literal["unique-tokens", "occurrences"]


@dataclass(frozen=True, kw_only=True)
class DictionaryConfig:
    store: Path
    model: Path
    out: Path  # JSON file
    codes: Path | None = None
    seeds: int = 64  # seed tokens, sampled from the store's ordinary tokens
    seed_draw: SeedDraw = "unique-tokens"  # the write-up's: a token id uniformly, then one of its rows
    layers: tuple[int, ...] = (16, 64, 256)  # prefix lengths, capped at n_q
    top_k: int = 16
    context: int = 8  # tokens of text either side of an example
    seed: int = 0
    exclude: int = DEFAULT_EXCLUDE

    def __post_init__(self):
        if self.seeds < 1 or self.top_k < 1 or not self.layers or min(self.layers) < 1:
            raise ValueError("seeds, top_k and every prefix length must be positive")
        if self.seed_draw not in get_args(SeedDraw):
            raise ValueError(f"unknown seed_draw {self.seed_draw!r}; use 'unique-tokens' or 'occurrences'")


def top_examples(model, codes: CodesStore, features: list[Feature], top_k: int, *, store: ActivationStore | None = None,
                 exclude: int = DEFAULT_EXCLUDE, progress: bool = False) -> list[list[Hit]]:
    """Top-k rows of many features of one prefix length in one pass: the scores of a block
    for all features are one float32 GEMM (rows' unit codes x feature weights). Candidates
    within the float32 error bound of the k-th score are kept and rescored exactly, so the
    result equals `search` for each feature."""
    from tqdm import tqdm

    m = features[0].layers
    C = torch.from_numpy(codebook64(model)).float()
    W = torch.from_numpy(np.stack([f.weights.reshape(-1) for f in features])).float()  # (F, 4m)
    bias = np.array([f.bias for f in features])
    # |error| of a float32 dot product of 4m terms <= 4m * 2^-24 * sum |w_ik| (unit codes)
    tops = [TopK(top_k, slack=8 * m * 2.0**-24 * float(np.abs(f.weights).sum()) + 1e-12) for f in features]
    with tqdm(total=codes.n, unit="tok", unit_scale=True, desc=f"dictionary@{m}", disable=not progress) as bar:
        for a, block in codes.blocks():
            for s in range(0, len(block), 4096):
                part = block[s : s + 4096, :m]
                unit_codes = C[torch.from_numpy(part.astype(np.int64))].reshape(len(part), -1)
                scores = (unit_codes @ W.T).double().numpy() + bias
                rows = np.arange(a + s, a + s + len(part))
                keep = _keep_mask(store, rows[0], rows[-1] + 1, exclude)
                if keep is not None:
                    rows, scores = rows[keep], scores[keep]
                for j, top in enumerate(tops):
                    top.push(rows, scores[:, j])
            bar.update(len(block))
    out = []
    for f, top in zip(features, tops):
        exact = score_codes(model, f, codes.read_rows(top.rows)[:, :m]) if len(top.rows) else np.empty(0)
        order = np.lexsort((top.rows, -exact))[:top_k]
        out.append([Hit(int(top.rows[i]), float(exact[i])) for i in order])
    return out


def sample_seed_rows(store: ActivationStore, n: int, seed: int, exclude: int,
                     draw: SeedDraw = "occurrences") -> np.ndarray:
    """`n` distinct ordinary rows, seeded, sorted. "occurrences": rows uniformly, reading the
    flags of 4n candidates only. "unique-tokens": n distinct token ids uniformly among those
    with an ordinary row, each with one of its ordinary rows uniformly (reads the tokens and
    flags columns once, block by block: O(N) int32 memory)."""
    rng = np.random.default_rng(seed)
    if draw == "unique-tokens":
        rows, tokens = _ordinary_rows(store, exclude)
        first_in_random_order = np.unique(tokens[order := rng.permutation(len(rows))], return_index=True)[1]
        one_row_per_token = rows[order[first_in_random_order]]
        return np.sort(rng.permutation(one_row_per_token)[:n])
    cand = np.sort(rng.choice(store.n_tokens, size=min(store.n_tokens, 4 * n), replace=False))
    flags = store.column("flags", cand) if len(cand) else np.empty(0, np.uint8)
    good = cand[(flags & exclude) == 0]
    return np.sort(rng.permutation(good)[:n])


def _ordinary_rows(store: ActivationStore, exclude: int, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(rows, token ids) of every row without an `exclude` flag."""
    rows, tokens = [], []
    for a in range(0, store.n_tokens, block):
        cols = store.columns(slice(a, min(store.n_tokens, a + block)), "tokens", "flags")
        keep = np.flatnonzero((cols["flags"] & exclude) == 0)
        rows.append(keep + a)
        tokens.append(cols["tokens"][keep])
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.int32)
    return np.concatenate(rows), np.concatenate(tokens)


def build_feature_dictionary(cfg: DictionaryConfig, *, progress: bool = True) -> dict:
    """Features from seed tokens' prefixes at each prefix length, with their top examples in
    context, written as one JSON file for a dashboard to browse."""
    from rqae_pipeline.io import atomic_write_json
    from rqae_pipeline.models.rqae import RQAE
    from rqae_pipeline.queries import contexts, load_tokenizer

    store = ActivationStore.open(cfg.store)
    model = RQAE.load(cfg.model)
    codes = ensure_codes(store, cfg.model, cfg.codes, progress=progress)
    rows = sample_seed_rows(store, cfg.seeds, cfg.seed, cfg.exclude, cfg.seed_draw)
    if len(rows) == 0:
        raise RQAEError("the store has no ordinary tokens to seed features from")
    tokenizer = load_tokenizer(store.spec.model)
    seed_codes = codes.read_rows(rows)
    seed_ctx = {c.row: c for c in contexts(store, tokenizer, rows, cfg.context)}
    features = []
    for m in sorted({min(m, model.n_q) for m in cfg.layers}):
        # one feature per distinct prefix: seeds sharing their first m codes are one feature
        _, first = np.unique(seed_codes[:, :m], axis=0, return_index=True)
        picked = rows[np.sort(first)]
        feats = [intensity_feature(model, seed_codes[np.searchsorted(rows, r)], m) for r in picked]
        hits = top_examples(model, codes, feats, cfg.top_k, store=store, exclude=cfg.exclude, progress=progress)
        for j, (r, h) in enumerate(zip(picked, hits)):
            ex = contexts(store, tokenizer, [x.row for x in h], cfg.context)
            features.append({
                "id": f"m{m}-{j:04d}", "layers": m, "seed": seed_ctx[int(r)].to_dict(),
                "prefix": seed_codes[np.searchsorted(rows, r), :m].tolist(),
                "examples": [{**c.to_dict(), "score": x.score} for c, x in zip(ex, h)],
            })
    result = {
        "schema": 1, "kind": "rqae-feature-dictionary",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "store": str(store.path), "store_spec": store.manifest["spec"], "store_tokens": store.n_tokens,
        "codes": str(codes.path),
        "model": codes.meta["model"],
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "score": "intensity: sum_i L_i cos(C[seed_i], C[t_i]) / sum_i L_i over the feature's layers",
        "features": features,
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    return result



def dictionary_summary(result: dict) -> str:
    """'N features (a at 16 layers, b at 64 layers)' for a feature dictionary."""
    by_m: dict[int, int] = {}
    for f in result["features"]:
        by_m[f["layers"]] = by_m.get(f["layers"], 0) + 1
    return (f"{len(result['features'])} features (" +
            ", ".join(f"{n} at {m} layers" for m, n in sorted(by_m.items())) + ")")
