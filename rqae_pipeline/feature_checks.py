"""Checks of the tools' inputs against the store and the model: a model trained on another
store, a feature dictionary built with another model or store, or an entry edited into a
feature nobody built are refused with one line naming what differs, before any work."""

from __future__ import annotations

from pathlib import Path

from rqae_pipeline import RQAEError
from rqae_pipeline.io import checked_fields, read_json
from rqae_pipeline.store import ActivationStore


def first_difference(a: dict, b: dict) -> str | None:
    """The first key (sorted) whose values differ between two store specs, if any."""
    for key in sorted(set(a) | set(b)):
        if key != "tokenizer" and a.get(key) != b.get(key):  # the tokenizer path is machine-specific
            return key
    return None


def check_model_store(model_dir: Path, d_in: int, store: ActivationStore) -> None:
    """The model must read this store's activations: same width, and (when the run recorded
    it) trained on a store with the same spec."""
    if d_in != store.d:
        raise RQAEError(f"model {model_dir} reads d={d_in} but the store holds d={store.d}")
    run = Path(model_dir) / "train.json"
    spec = read_json(run, {"store_spec": (dict, type(None))}).get("store_spec") if run.exists() else None
    if spec:
        key = first_difference(spec, store.manifest["spec"])
        if key is not None:
            raise RQAEError(f"model {model_dir} was trained on another store ({key}: {spec.get(key)!r}, "
                            f"this store: {store.manifest['spec'].get(key)!r})")


# What `rqae steer` and `rqae dashboard` read of a dictionary entry and of each of its examples
ENTRY_FIELDS = {"id": str, "layers": int, "prefix": list, "seed.left": str, "seed.token": str, "seed.right": str,
                "examples": list}
EXAMPLE_FIELDS = {"row": int, "score": (int, float), "token": str}


def check_entries(data: dict, path: Path) -> None:
    """Every entry holds what its readers use: a hand-edited or cut-down dictionary is one
    error line naming the field, not a KeyError deep inside steering or rendering."""
    fix = "; rebuild it with `rqae feature-dictionary`"
    for i, f in enumerate(checked_fields(data, path, {"features": list}, fix=fix)["features"]):
        checked_fields(data, path, {f"features.{i}.{k}": t for k, t in ENTRY_FIELDS.items()}, fix=fix)
        for j in range(len(f["examples"])):
            checked_fields(data, path, {f"features.{i}.examples.{j}.{k}": t for k, t in EXAMPLE_FIELDS.items()},
                           fix=fix)


def check_prefix(entry: dict, path: Path, n_q: int, n_codes: int = 544) -> None:
    """An entry's feature is the first `layers` codes of its seed: exactly that many codes, each
    one of the codebook's. A shorter prefix would be broadcast over the layers and a negative
    code would index from the codebook's end, each a feature nobody built, silently."""
    m, prefix = entry["layers"], entry["prefix"]
    where = f"{path}: feature {entry['id']!r}"
    if type(m) is not int or not 1 <= m <= n_q:
        raise RQAEError(f"{where} uses {m!r} layers; the model has 1..{n_q}")
    if len(prefix) != m or not all(type(c) is int and 0 <= c < n_codes for c in prefix):
        raise RQAEError(f"{where}: its prefix must be {m} codes in 0..{n_codes - 1}, one per layer; rebuild it with "
                        f"`rqae feature-dictionary`")


def check_dictionary(data: dict, path: Path, store: ActivationStore, identity: dict, model_dir: Path) -> None:
    """A feature dictionary must come from this model (`codes.model_identity`) and this store,
    and its entries hold what steering and the dashboard read."""
    check_entries(data, path)
    for f in data["features"]:
        check_prefix(f, path, identity["n_q"])
    try:
        built_by, built_from = data["model"]["weights_sha256"], data["store_spec"]
    except (KeyError, TypeError):
        raise RQAEError(f"{path} does not record the model and store it was built from; rebuild it with "
                        f"`rqae feature-dictionary`") from None
    if built_by != identity["weights_sha256"]:
        raise RQAEError(f"{path} was built with another model ({data['model'].get('name')}), not {model_dir}")
    key = first_difference(built_from, store.manifest["spec"])
    if key is not None:
        raise RQAEError(f"{path} was built from another store than {store.path} ({key} differs)")
    if data.get("store_tokens", 0) > store.n_tokens:
        raise RQAEError(f"{path} ranked {data['store_tokens']:,} tokens, but {store.path} commits {store.n_tokens:,}: "
                        f"it was built from a longer copy of the store; rebuild it with `rqae feature-dictionary`")


def dictionary_coverage_note(data: dict, store: ActivationStore) -> str | None:
    """A note when the store has grown since the dictionary ranked it: the new rows are in
    none of its top examples. None for a dictionary from before the count was recorded."""
    ranked = data.get("store_tokens")
    if not isinstance(ranked, int) or ranked >= store.n_tokens:
        return None
    return (f"The feature dictionary ranked the store's first {ranked:,} tokens; the {store.n_tokens - ranked:,} "
            f"harvested since are in none of its examples (rebuild it with `rqae feature-dictionary`).")
