"""The feature `rqae steer` pulls toward: a vMF over an RQAE's layers, with the concept
words its topic measure counts (`steer.py`).

Three sources: a feature-dictionary entry (`DICT.json#ID`: a vMF fitted to the entry's
top examples' codes, checked against the store and the model), a vMF written by
`rqae features --out` (`FEATURE.json[#NAME]`), or query tokens given as `rqae features`
takes them (`query_feature`: fitted once the LM is loaded, concept words from the queries
and the feature's top hits in the store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.feature_checks import check_dictionary
from rqae_pipeline.features import KAPPA_MAX, VMF
from rqae_pipeline.generation import concept_words


@dataclass(frozen=True)
class SteerFeature:
    name: str
    vmf: VMF
    words: tuple[str, ...]  # concept words for the topic measure


def parse_feature_ref(ref: str) -> tuple[Path, str | None]:
    path, sep, key = ref.partition("#")
    return Path(path), (key if sep else None)


def load_feature(ref: str, store, model_dir: Path, model, codes_path: Path | None = None) -> SteerFeature:
    """A feature from a file: `DICT.json#ID` (a feature-dictionary entry: a vMF fitted to its
    top examples' codes) or `FEATURE.json[#NAME]` (a vMF written by `rqae features --out`;
    default the feature fitted on all queries)."""
    path, key = parse_feature_ref(ref)
    if not path.is_file():
        raise RQAEError(f"unknown feature {ref!r}: no feature file {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise RQAEError(f"{path} is not JSON; give a feature dictionary or a `rqae features --out` file") from None
    if isinstance(data, dict) and data.get("kind") == "rqae-feature-dictionary":
        return _dictionary_feature(data, path, key, store, model_dir, model, codes_path)
    features = data.get("features") if isinstance(data, dict) else None
    if isinstance(features, list) and features and isinstance(features[0], dict) and "vmf" in features[0]:
        return _vmf_file_feature(data, path, key, model_dir, model)
    raise RQAEError(f"{path} is neither a feature dictionary nor a `rqae features --out` file")


def _dictionary_feature(data, path, key, store, model_dir, model, codes_path) -> SteerFeature:
    from rqae_pipeline.codes import ensure_codes, model_identity
    from rqae_pipeline.features import fit_vmf

    check_dictionary(data, path, store, model_identity(model_dir), model_dir)  # first: it checks the fields read below
    ids = [f["id"] for f in data["features"]]
    if key is None or key not in ids:
        what = "give one as" if key is None else f"there is no feature {key!r} in it; use"
        raise RQAEError(f"{path} is a feature dictionary: {what} {path}#ID ({ids[0]} .. {ids[-1]})" if ids
                        else f"{path} holds no features")
    feat = data["features"][ids.index(key)]
    rows = np.array([e["row"] for e in feat["examples"]], dtype=np.int64)
    codes = ensure_codes(store, model_dir, codes_path).read_rows(rows)
    words = concept_words([e["token"] for e in feat["examples"]])
    return SteerFeature(name=key, vmf=fit_vmf(model, codes), words=words)


def _vmf_file_feature(data, path, key, model_dir, model) -> SteerFeature:
    from rqae_pipeline.codes import model_identity

    fitted_by = data.get("model")
    if not isinstance(fitted_by, dict) or not isinstance(fitted_by.get("weights_sha256"), str):
        raise RQAEError(f"{path} does not record the model its features were fitted with; refit them with "
                        f"`rqae features --model {model_dir} --out ...`")
    if fitted_by["weights_sha256"] != model_identity(model_dir)["weights_sha256"]:
        raise RQAEError(f"the features in {path} were fitted with model {fitted_by.get('name')!r} "
                        f"(weights {fitted_by['weights_sha256'][:8]}), not {model_dir}; refit them with "
                        f"`rqae features --model {model_dir} --out ...`")
    features = [f for f in data["features"] if isinstance(f, dict)]
    names = [f.get("name") for f in features]
    name = key if key is not None else (names[0] if names else None)
    if len(features) != len(data["features"]) or name not in names:
        raise RQAEError(f"there is no feature {name!r} in {path}; it has {', '.join(map(str, names))}")
    feat = features[names.index(name)]
    vmf = _checked_vmf(feat, path, name, model.n_q)
    queries = data.get("queries") if isinstance(data.get("queries"), list) else []
    # a split's feature was fitted on its own queries: only their tokens are its words
    own = feat.get("queries") if isinstance(feat.get("queries"), list) else range(len(queries))
    try:
        tokens = [queries[i]["token"] for i in own] + [h["token"] for h in feat.get("hits", [])]
    except (IndexError, KeyError, TypeError):
        raise RQAEError(f"the feature {name!r} in {path} names queries or hits without tokens; refit it with "
                        f"`rqae features --out`") from None
    if not all(isinstance(t, str) for t in tokens):
        raise RQAEError(f"the feature {name!r} in {path} has tokens that are not text; refit it")
    return SteerFeature(name=f"{path.name}#{name}", vmf=vmf, words=concept_words(tokens))


def _checked_vmf(feat: dict, path: Path, name: str, n_q: int) -> VMF:
    """The vMF of a `rqae features --out` entry: one unit mean direction on S^3 and one
    concentration in [0, KAPPA_MAX] per layer of the model, all finite."""
    try:
        v = feat["vmf"]
        vmf = VMF(mean=np.asarray(v["mean"], np.float64), kappa=np.asarray(v["kappa"], np.float64), n=int(v["n"]))
    except (KeyError, TypeError, ValueError):
        raise RQAEError(f"the feature {name!r} in {path} has no readable vMF (mean, kappa, n); "
                        f"refit it with `rqae features --out`") from None
    if vmf.mean.shape != (n_q, 4) or vmf.kappa.shape != (n_q,):
        raise RQAEError(f"the feature {name!r} in {path} has {vmf.kappa.size} layers but the model has {n_q}")
    finite = np.isfinite(vmf.mean).all() and np.isfinite(vmf.kappa).all()
    if not finite or not np.allclose(np.linalg.norm(vmf.mean, axis=1), 1, atol=1e-4):
        raise RQAEError(f"the feature {name!r} in {path} has mean directions that are not finite unit vectors")
    if not ((vmf.kappa >= 0) & (vmf.kappa <= KAPPA_MAX)).all() or vmf.n < 1:
        raise RQAEError(f"the feature {name!r} in {path} has concentrations outside 0..{KAPPA_MAX:g} or no query "
                        f"tokens (n {vmf.n})")
    return vmf


def query_feature(cfg, store, model, lm) -> SteerFeature:
    """A vMF fitted to query tokens given like `rqae features` takes them (`cfg`: a
    `steer.SteerRunConfig`: its addresses, texts, token_indices, model and codes); the
    concept words are the query tokens and the feature's top hits in the store."""
    from rqae_pipeline.codes import ensure_codes
    from rqae_pipeline.features import fit_vmf, search, vmf_feature
    from rqae_pipeline.queries import contexts, query_codes_matrix, query_set

    qs = query_set(store, model, addresses=list(cfg.addresses), texts=list(cfg.texts),
                   token_indices=list(cfg.token_indices), lm=lm)
    codes = ensure_codes(store, cfg.model, cfg.codes)
    vmf = fit_vmf(model, query_codes_matrix(qs, codes))
    hits = search(model, codes, vmf_feature(model, vmf), top_k=16, store=store)
    tokens = [q.context.token for q in qs] + [c.token for c in contexts(store, lm.tokenizer, [h.row for h in hits], 0)]
    name = " | ".join(q.context.render() for q in qs[:3]) + (" ..." if len(qs) > 3 else "")
    return SteerFeature(name=name, vmf=vmf, words=concept_words(tokens))
