"""Ranking stored tokens against query tokens: the runs behind `rqae search` and `rqae features`.

Each run opens the store and the RQAE, turns the query texts / addresses into code tuples
(`queries.query_set`), makes sure the store is encoded (`codes.ensure_codes`), ranks every
encoded token with `features.search`, and returns the hits with the text around them. The
scoring itself (intensity, vMF fits, splits) lives in `features.py`; the CLI only prints
the result (`search_lines`, `features_lines`) and writes its `to_dict()` as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.features import DEFAULT_EXCLUDE, VMF, Hit
from rqae_pipeline.queries import Context


@dataclass(frozen=True, kw_only=True)
class QueryConfig:
    store: Path
    model: Path  # an RQAE model directory
    addresses: tuple[str, ...] = ()  # stored query tokens, SEQ:POS
    texts: tuple[str, ...] = ()  # query texts, run through the store's LM
    token_indices: tuple[int, ...] = ()  # the token of each text (one value applies to all)
    layers: int | None = None  # prefix length scored (default: all layers)
    top_k: int = 20
    context: int = 8  # tokens shown either side of a hit
    codes: Path | None = None  # codes store (default: the one `rqae encode` writes)
    include_special: bool = False  # search: also rank BOS and norm-outlier tokens
    splits: tuple[tuple[int, ...], ...] = ()  # features: sub-features fitted on these query numbers

    def __post_init__(self):
        # RQAEError: the CLI builds this from its options; checked before any codes are encoded
        if self.top_k < 1:
            raise RQAEError(f"--top-k must be at least 1, got {self.top_k}")
        if self.context < 0:
            raise RQAEError(f"--context must be 0 or more, got {self.context}")


@dataclass(frozen=True)
class RankedHit:
    rank: int
    score: float
    context: Context

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": self.score, **self.context.to_dict()}


@dataclass(frozen=True)
class SearchResult:
    query: Context
    codes: np.ndarray  # (n_q,) the query token's codes
    layers: int  # prefix length scored
    n_q: int
    tokens: int  # encoded tokens ranked
    hits: list[RankedHit]

    def to_dict(self) -> dict:
        return {"query": self.query.to_dict(), "codes": self.codes.tolist(), "layers": self.layers,
                "hits": [h.to_dict() for h in self.hits]}


@dataclass(frozen=True)
class FittedFeature:
    name: str  # "all", or the split's query numbers
    queries: list[int]  # the query tokens it was fitted on
    vmf: VMF
    hits: list[RankedHit]


@dataclass(frozen=True)
class FeaturesResult:
    layers: int
    queries: list[Context]
    features: list[FittedFeature]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "queries": [q.to_dict() for q in self.queries],
                "features": [{"name": f.name, "queries": f.queries, "vmf": f.vmf.to_dict(),
                              "hits": [h.to_dict() for h in f.hits]} for f in self.features]}


def open_rqae_store(store: Path, model: Path):
    """(store, RQAE), with a clear error for a directory that is not an RQAE."""
    from rqae_pipeline.codes import model_identity
    from rqae_pipeline.models.rqae import RQAE
    from rqae_pipeline.run_dir import check_trained_on
    from rqae_pipeline.store import ActivationStore

    st = ActivationStore.open(store)
    model_identity(model)
    check_trained_on(model, st)  # before a query's LM loads
    return st, RQAE.load(model)


def open_queries(cfg: QueryConfig):
    """(store, RQAE, prefix length scored, query set) of a search or features run."""
    from rqae_pipeline.features import check_layers
    from rqae_pipeline.queries import query_set

    st, rq = open_rqae_store(cfg.store, cfg.model)
    m = check_layers(rq, cfg.layers)
    qs = query_set(st, rq, addresses=list(cfg.addresses), texts=list(cfg.texts),
                   token_indices=list(cfg.token_indices), width=cfg.context)
    return st, rq, m, qs


def ranked(store, hits: list[Hit], width: int) -> list[RankedHit]:
    """The hits with the text around them, ranked from 1."""
    from rqae_pipeline.queries import contexts, load_tokenizer

    ctx = contexts(store, load_tokenizer(store.spec.model), [h.row for h in hits], width)
    return [RankedHit(rank, h.score, c) for rank, (h, c) in enumerate(zip(hits, ctx), start=1)]


def search_tokens(cfg: QueryConfig, *, progress: bool = True) -> SearchResult:
    """Rank every stored token by its intensity against one query token (`rqae search`)."""
    from rqae_pipeline.codes import ensure_codes
    from rqae_pipeline.features import search
    from rqae_pipeline.queries import query_codes_matrix

    if len(cfg.addresses) + len(cfg.texts) != 1:
        raise RQAEError("give one query: --query TEXT [--token-index I] or --address SEQ:POS")
    st, rq, m, qs = open_queries(cfg)
    cs = ensure_codes(st, cfg.model, cfg.codes)
    q = query_codes_matrix(qs, cs)[0]
    hits = search(rq, cs, q, layers=m, top_k=cfg.top_k, store=st,
                  exclude=0 if cfg.include_special else DEFAULT_EXCLUDE, progress=progress)
    return SearchResult(query=qs[0].context, codes=q, layers=m, n_q=rq.n_q, tokens=cs.n,
                        hits=ranked(st, hits, cfg.context))


def check_splits(splits: tuple[tuple[int, ...], ...], n_queries: int) -> None:
    for s in splits:
        bad = [i for i in s if not 0 <= i < n_queries] or ([] if s else ["(empty)"])
        if bad:
            raise RQAEError(f"--split {','.join(map(str, s))}: query {bad[0]} does not exist; there are {n_queries} "
                            f"query tokens (0..{n_queries - 1})")


def fit_features(cfg: QueryConfig, *, progress: bool = True) -> FeaturesResult:
    """A vMF feature fitted to all query tokens, one per split, each with its top tokens (`rqae features`)."""
    from rqae_pipeline.codes import ensure_codes
    from rqae_pipeline.features import fit_vmf, search, split_feature, vmf_feature
    from rqae_pipeline.queries import query_codes_matrix

    st, rq, m, qs = open_queries(cfg)
    check_splits(cfg.splits, len(qs))  # before any encoding starts
    cs = ensure_codes(st, cfg.model, cfg.codes)
    qc = query_codes_matrix(qs, cs)
    subsets = [list(s) for s in cfg.splits]
    fits = [fit_vmf(rq, qc), *split_feature(rq, qc, subsets)]
    names = ["all", *(",".join(map(str, s)) for s in subsets)]
    features = []
    for name, subset, vmf in zip(names, [list(range(len(qs))), *subsets], fits):
        hits = search(rq, cs, vmf_feature(rq, vmf, m), top_k=cfg.top_k, store=st, progress=progress)
        features.append(FittedFeature(name=name, queries=subset, vmf=vmf, hits=ranked(st, hits, cfg.context)))
    return FeaturesResult(layers=m, queries=[q.context for q in qs], features=features)


# --------------------------------------------------------------------------- terminal output


def hit_lines(title: str, hits: list[RankedHit]) -> list[str]:
    lines = [title, f"{'rank':>4s} {'score':>10s} {'seq:pos':>10s}  context"]
    for h in hits:
        lines.append(f"{h.rank:4d} {h.score:10.4f} {f'{h.context.seq}:{h.context.pos}':>10s}  {h.context.render()}")
    return lines


def search_lines(result: SearchResult) -> list[str]:
    return hit_lines(f"query {result.query.render()}   (layers 1..{result.layers} of {result.n_q}, "
                     f"{result.tokens:,} tokens)", result.hits)


def features_lines(result: FeaturesResult) -> list[str]:
    lines = [f"{len(result.queries)} query tokens:"]
    lines += [f"  {i:3d}  {q.render()}" for i, q in enumerate(result.queries)]
    m = result.layers
    for f in result.features:
        k = f.vmf.kappa[:m]
        top = np.argsort(-k, kind="stable")[:5]
        capped = int(f.vmf.at_cap[:m].sum())
        title = (f"\nfeature [{f.name}]: vMF on {f.vmf.n} tokens, layers 1..{m}; kappa median {np.median(k):.3g}, "
                 f"highest at layers " + ", ".join(f"{i + 1} ({k[i]:.3g})" for i in top) +
                 (f"; {capped} of {m} layers at the cap (every query shares its code there)" if capped else "") +
                 "\nscore = L_i-weighted mean log-density (nats)")
        lines += hit_lines(title, f.hits)
    return lines
