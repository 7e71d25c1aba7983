"""The codes store: an activation store encoded once by an RQAE, and codebook statistics.

Query search, vMF features and the feature dictionary (`features.py`) only need each
token's code tuple (c_1..c_n_q), never the activations, so a store is encoded once into a
sibling Zarr v3 group and every later tool reads int16 codes (n_q x 2 bytes a token
instead of d x 2):

```
CODES/            attrs["rqae_codes"] = {schema, model identity, store identity, committed}
  codes  (N, n_q) int16   chunked and sharded like the store's rows
```
The default place is beside the store: `<store>.codes/<model dir name>-<hash>.zarr`.
Shards are encoded in order and the committed row count is rewritten after each one
(zarr writes `zarr.json` by temp file + rename), so a kill leaves a valid prefix and the
next run resumes from it. The attrs name the model (sha256 of its config and weights) and
the store (its manifest spec and creation time): a codes store is never read against
another model or store by mistake.

Codebook statistics follow the RQAE write-up: the distinct-prefix table ("Defining a
Feature": 544 / 234,994 / 3,279,894 / 4,383,319 prefixes of 1-4 layers on 4M tokens), per
layer code usage, and the projected codebooks C_c W_out[i] (Fig 2a: pairwise cosine
similarity, norms by layer).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rqae_pipeline import RQAEError, codec
from rqae_pipeline.integrity import dask_rows, read_checked
from rqae_pipeline.io import checked_fields, default_device, empty_except_lock
from rqae_pipeline.lock import take_write_lock
from rqae_pipeline.models.base import read_config
from rqae_pipeline.models.registry import architecture_of
from rqae_pipeline.run_dir import check_trained_on
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.urls import is_file, join, location, name_of, sibling, zarr_location

CODES_SCHEMA = 1
ATTR = "rqae_codes"


@dataclass(frozen=True, kw_only=True)
class EncodeConfig:
    store: Path
    model: Path  # an RQAE model directory written by `rqae train`
    out: Path | None = None  # default: default_codes_path(store, model)
    batch_size: int = 4096
    device: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError("batch_size must be positive")


# --------------------------------------------------------------------------- identities


def model_identity(model_dir: Path) -> dict:
    """What makes two RQAE directories the same model: sha256 of config.json and the weights."""
    model_dir = Path(model_dir)
    cfg_path, weights = model_dir / "config.json", model_dir / "model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise RQAEError(f"{model_dir} is not an RQAE model directory (config.json + model.safetensors)")
    arch = architecture_of(model_dir)
    if arch != "rqae":
        raise RQAEError(f"{model_dir} holds a {arch!r} model; codes need an RQAE")
    cfg = read_config(model_dir, ("n_q", "d_in"))
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"name": model_dir.name, "n_q": int(cfg["n_q"]), "d_in": int(cfg["d_in"]),
            "config_sha256": hashlib.sha256(cfg_path.read_bytes()).hexdigest(), "weights_sha256": h.hexdigest()}


def store_identity(store: ActivationStore) -> dict:
    # The spec says how the rows were made; the creation time tells two harvests with equal
    # specs apart. The row count is not identity: a store may grow and its codes follow.
    return {"spec": store.manifest["spec"], "created": store.manifest.get("created")}


def default_codes_path(store_path: Path, model_dir: Path, identity: dict | None = None) -> Path:
    identity = identity or model_identity(model_dir)
    codes_dir = sibling(location(store_path), f"{name_of(location(store_path)).removesuffix('.zarr')}.codes")
    return join(codes_dir, f"{Path(model_dir).name}-{identity['weights_sha256'][:8]}.zarr")


# --------------------------------------------------------------------------- reading


class CodesStore:
    """A committed prefix of rows of (N, n_q) int16 codes; open with `open_codes`."""

    def __init__(self, path: Path, group, meta: dict):
        self.path, self.group, self.meta = path, group, meta
        self.codes = group["codes"]  # checked by open_codes

    @property
    def n(self) -> int:
        return int(self.meta["committed"])

    @property
    def n_q(self) -> int:
        return int(self.codes.shape[1])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def block_rows(self) -> int:
        """Rows per read in chunked loops: one store shard (whole Zarr shard files)."""
        return int(self.meta["store"]["spec"]["contexts_per_shard"] * _rows_per_context(self.meta["store"]["spec"]))

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        stop = self.n if stop is None else min(stop, self.n)
        if not 0 <= start <= stop:
            raise RQAEError(f"row range [{start}, {stop}) is outside the {self.n} encoded rows")
        return np.asarray(self._rows(slice(start, stop)))

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n):
            raise RQAEError(f"row {int(rows.max() if rows.max() >= self.n else rows.min())} is outside the "
                            f"{self.n} encoded rows")
        order = np.argsort(rows)
        out = np.empty((len(rows), self.n_q), dtype=np.int16)
        out[order] = self._rows(rows[order])
        return out

    def _rows(self, rows: slice | np.ndarray) -> np.ndarray:
        """Every read of the codes: a missing shard file (zarr would read it as code 0) or a
        damaged one is an RQAEError naming it, as for the activation store."""
        return read_checked(self.path, self.codes, "codes", rows)

    def blocks(self, start: int = 0, stop: int | None = None):
        """(start, codes) for consecutive blocks of `block_rows` rows: bounded memory."""
        stop = self.n if stop is None else min(stop, self.n)
        step = self.block_rows
        for a in range(start, stop, step):
            yield a, self.read(a, min(a + step, stop))

    def dask(self):
        """The committed codes as a dask array chunked by store shard, each chunk read checked."""
        return dask_rows(self.path, self.codes, "codes", self.n, self.block_rows)

    def check(self, *, store: ActivationStore | None = None, model_dir: Path | None = None,
              identity: dict | None = None) -> None:
        """Refuse codes made from another store or by another model (naming which)."""
        if store is not None and self.meta["store"] != store_identity(store):
            raise RQAEError(f"codes at {self.path} were encoded from another store than {store.path} "
                            f"(created {self.meta['store'].get('created')}); encode this store with `rqae encode`")
        if model_dir is not None or identity is not None:
            identity = identity or model_identity(model_dir)
            if self.meta["model"]["weights_sha256"] != identity["weights_sha256"]:
                raise RQAEError(f"codes at {self.path} were encoded by another model ({self.meta['model']['name']}, "
                                f"weights {self.meta['model']['weights_sha256'][:8]}), not {identity['name']} "
                                f"({identity['weights_sha256'][:8]}); encode with this model")


def _rows_per_context(spec: dict) -> int:
    return int(spec["context_length"]) - (1 if spec["skip_bos"] else 0)


def open_codes(path: Path) -> CodesStore:
    import zarr

    path = location(path)
    if not is_file(path, "zarr.json"):
        raise RQAEError(f"no codes store at {path}; make one with `rqae encode`")
    try:
        group = zarr.open_group(zarr_location(path), mode="r", zarr_format=3)
    except Exception as e:  # zarr raises several types for "not a group"
        raise RQAEError(f"{path} is not a codes store ({type(e).__name__})") from e
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict) or meta.get("schema") != CODES_SCHEMA:
        raise RQAEError(f"{path} is a Zarr group but not a codes store (schema {CODES_SCHEMA})")
    checked_fields(meta, f"{path} ({ATTR})", META_FIELDS, fix="; encode the store again with `rqae encode`")
    try:
        codes = group["codes"]
    except KeyError:
        raise RQAEError(f"{path} is a Zarr group but not a codes store (no codes array)") from None
    except Exception as e:  # damaged array metadata: zarr raises several types
        raise RQAEError(f"{path}: the codes array cannot be opened ({type(e).__name__}); encode the store "
                        f"again with `rqae encode`") from None
    _check_codes_array(path, codes, meta)
    return CodesStore(path, group, meta)


# the attribute fields every reader relies on, and their types (io.checked_fields)
META_FIELDS = {"committed": int, "store.spec.contexts_per_shard": int, "store.spec.context_length": int,
               "store.spec.skip_bos": bool, "model.name": str, "model.n_q": int, "model.weights_sha256": str}


def _check_codes_array(path: Path, codes, meta: dict) -> None:
    """The codes array is what the attributes say: (rows, n_q) int16, one shard across its
    width (a shard that is never written would read as code 0), holding the committed rows."""
    import zarr

    n_q, committed = meta["model"]["n_q"], meta["committed"]
    if not isinstance(codes, zarr.Array) or codes.ndim != 2 or codes.dtype != np.int16:
        raise RQAEError(f"{path}: codes is not a 2-d int16 array; encode the store again with `rqae encode`")
    if codes.shape[1] != n_q or (codes.shards or codes.chunks)[1] != n_q:
        raise RQAEError(f"{path}: the codes array is {codes.shape[1]} codes wide (shards of "
                        f"{(codes.shards or codes.chunks)[1]}), but its model has n_q = {n_q}; encode the "
                        f"store again with `rqae encode`")
    if not 0 <= committed <= codes.shape[0]:
        raise RQAEError(f"{path}: {committed} committed rows, but the codes array holds {codes.shape[0]}; "
                        f"encode the store again with `rqae encode`")


def open_codes_for(store: ActivationStore, model_dir: Path, path: Path | None = None) -> CodesStore:
    """The codes of `store` under `model_dir`, checked against both and complete."""
    identity = model_identity(model_dir)
    codes = open_codes(path or default_codes_path(store.path, model_dir, identity))
    codes.check(store=store, identity=identity)
    if codes.n < store.n_tokens:
        raise RQAEError(f"codes at {codes.path} cover {codes.n:,} of the store's {store.n_tokens:,} rows; "
                        f"finish them with `rqae encode`")
    if codes.n > store.n_tokens:  # codes of a longer copy of this store: rows it does not commit
        raise RQAEError(f"codes at {codes.path} cover {codes.n:,} rows, but the store commits only "
                        f"{store.n_tokens:,}; encode this store into a new --out")
    return codes


def ensure_codes(store: ActivationStore, model_dir: Path, path: Path | None = None, *, progress: bool = True,
                 device: str | None = None) -> CodesStore:
    """Codes at `path`, checked; without a path, the default codes store, encoded (or
    finished) first when it is missing or behind the store."""
    check_trained_on(model_dir, store)  # codes of another LM's rows would rank and score as any
    if path is None:
        path = default_codes_path(store.path, model_dir)
        if not is_file(path, "zarr.json") or open_codes(path).n < store.n_tokens:  # path may be a URL
            encode_store(EncodeConfig(store=store.path, model=model_dir, out=path, device=device), progress=progress)
    return open_codes_for(store, model_dir, path)


# --------------------------------------------------------------------------- writing


def encode_store(cfg: EncodeConfig, *, progress: bool = True) -> Path:
    """Encode every committed store row with the RQAE, shard by shard; resumes a partial run."""
    from tqdm import tqdm

    from rqae_pipeline.models.rqae import RQAE

    store = ActivationStore.open(cfg.store)
    store.check_shards()  # a missing shard is an error before any output exists
    if store.n_tokens == 0:
        raise RQAEError(f"store {store.path} commits no tokens yet: nothing to encode")
    identity = model_identity(cfg.model)
    if identity["d_in"] != store.d:
        raise RQAEError(f"model {cfg.model} reads d={identity['d_in']} but the store holds d={store.d}")
    check_trained_on(cfg.model, store)
    out = location(cfg.out) if cfg.out else default_codes_path(store.path, cfg.model, identity)
    device = cfg.device or default_device()
    model = RQAE.load(cfg.model, device)
    group, lock = _open_for_writing(out, store, identity)
    try:
        meta = dict(group.attrs[ATTR])
        arr, done, n = group["codes"], int(meta["committed"]), store.n_tokens
        if done > n:  # resizing would cut committed codes under their commit
            raise RQAEError(f"codes at {out} cover {done:,} rows, but the store commits only {n:,}: they were "
                            f"encoded from a longer copy of it; encode into a new --out")
        if arr.shape[0] != n:
            arr.resize((n, identity["n_q"]))
        # every shard is written, all-zero ones too, so that a missing shard file means damage
        arr = arr.with_config({"write_empty_chunks": True})
        shard = store.spec.shard_rows
        with tqdm(total=n, initial=done, unit="tok", unit_scale=True, desc="encode", disable=not progress,
                  dynamic_ncols=True) as bar:
            # Restart at the committed row's shard: a shard is the unit written and committed.
            for a in range(done - done % shard, n, shard):
                b = min(a + shard, n)
                arr[a:b] = _encode_rows(model, store, a, b, cfg.batch_size, device)
                meta.update(committed=b, complete=b == n, updated=_now())
                group.attrs[ATTR] = meta  # the commit: one atomic rewrite of zarr.json
                bar.update(b - max(a, done))
        if n == done and not meta.get("complete"):
            meta.update(complete=True)
            group.attrs[ATTR] = meta
    finally:
        lock.release()
    return out


@torch.no_grad()
def _encode_rows(model, store: ActivationStore, a: int, b: int, batch: int, device: str) -> np.ndarray:
    parts = []
    for s in range(a, b, batch):
        acts = store.read(s, min(s + batch, b)).acts
        parts.append(model.encode(acts.to(device)).cpu().numpy())
    return np.concatenate(parts).astype(np.int16)


def _open_for_writing(out: Path, store: ActivationStore, identity: dict):
    import zarr

    exists = is_file(out, "zarr.json")
    if exists:
        codes = open_codes(out)
        codes.check(store=store, identity=identity)  # never append another model's codes
    elif not empty_except_lock(out):
        raise RQAEError(f"{out} exists and is not a codes store; choose another --out")
    lock = take_write_lock(out)
    try:
        group = zarr.open_group(zarr_location(out), mode="a", zarr_format=3)
        if not exists:
            spec = store.spec
            group.create_array("codes", shape=(0, identity["n_q"]), dtype="int16",
                               chunks=(spec.chunk_rows, identity["n_q"]), shards=(spec.shard_rows, identity["n_q"]),
                               compressors=codec.compressors("int16"), fill_value=0)
            group.attrs[ATTR] = {"schema": CODES_SCHEMA, "model": identity, "store": store_identity(store),
                                 "store_path": str(store.path), "committed": 0, "complete": False, "created": _now()}
    except BaseException:
        lock.release()
        raise
    return group, lock


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
