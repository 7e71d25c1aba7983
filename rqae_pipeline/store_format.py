"""The activation store's format: its identity (`StoreSpec`), its row arrays and their
on-disk layout, the flag bits, and a decoded block of rows. `store.py` reads and writes it;
the table in its docstring describes the arrays.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
import torch

from rqae_pipeline.codec import STORE_DTYPES, StoreDtype
from rqae_pipeline.io import is_a
from rqae_pipeline.lm import NORMALISATIONS, Normalisation

SCHEMA_VERSION = 1
ROW_ARRAYS = ("acts", "scale", "tokens", "seq", "pos", "flags")


class Flags(enum.IntFlag):
    BOS = 1
    EOS = 2
    PAD = 4
    SPECIAL = 8  # any other special token of the tokenizer
    OUTLIER = 16  # raw norm > outlier_factor x the batch median (attention sinks)

    ANY_SPECIAL = 15


SPEC_FIELD_TYPES = {"model": str, "hook": str, "layer": int, "d_model": int, "corpus": dict, "tokenizer": str,
                    "context_length": int, "skip_bos": bool, "normalisation": str, "dtype": str,
                    "contexts_per_shard": int, "contexts_per_chunk": int, "batch_contexts": int,
                    "outlier_factor": (int, float)}


@dataclass(frozen=True, kw_only=True)
class StoreSpec:
    """What makes two harvests the same store. Reopening with any field changed is refused."""

    model: str
    hook: str
    layer: int
    d_model: int
    corpus: dict
    tokenizer: str
    context_length: int
    skip_bos: bool
    normalisation: Normalisation
    dtype: StoreDtype
    contexts_per_shard: int
    contexts_per_chunk: int
    batch_contexts: int
    outlier_factor: float

    def __post_init__(self):
        for name, kind in SPEC_FIELD_TYPES.items():  # a manifest edited by hand: "false" is true
            if not is_a(getattr(self, name), kind):
                names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
                raise ValueError(f"{name} {getattr(self, name)!r} is not of type {names}")
        if min(self.d_model, self.rows_per_context, self.contexts_per_chunk, self.batch_contexts) < 1:
            raise ValueError("d_model, rows per context, contexts_per_chunk and batch_contexts must be positive")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {self.dtype!r}; use float16, float32 or fp8")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalisation!r}; use 'final-norm' or 'rms'")
        if self.contexts_per_shard % self.contexts_per_chunk:
            raise ValueError("contexts_per_shard must be a multiple of contexts_per_chunk")
        if self.contexts_per_shard % self.batch_contexts:
            raise ValueError("contexts_per_shard must be a multiple of the batch size in contexts")

    @property
    def rows_per_context(self) -> int:
        return self.context_length - (1 if self.skip_bos else 0)

    @property
    def shard_rows(self) -> int:
        return self.contexts_per_shard * self.rows_per_context

    @property
    def chunk_rows(self) -> int:
        return self.contexts_per_chunk * self.rows_per_context


@dataclass(frozen=True)
class Rows:
    """A block of store rows, decoded: `acts` is float32 whatever the storage dtype."""

    acts: torch.Tensor  # (n, d) float32
    scale: torch.Tensor  # (n,) float32
    tokens: np.ndarray
    seq: np.ndarray
    pos: np.ndarray
    flags: np.ndarray


def recorded_precision(manifest: dict) -> dict:
    """The precision of the forward that made a store's rows ({"model_dtype", "tf32"[,
    "compiled"]}): its `forward_error`, or for a store from before it, the dtype its load
    record names (TF32 was never on then)."""
    return manifest.get("forward_error") or {
        "model_dtype": manifest["provenance"]["model_load"].get("dtype", "float32"), "tf32": False}


def tokenizer_name(name_or_path: str) -> str:
    """A tokenizer as a store records it: a hub name as it is, a local directory (the tiny
    model's trained tokenizer, the converted offline Gemma's) by its directory name only. Its
    place in a cache differs from machine to machine (and with RQAE_CACHE), and a store's
    identity must not: stores that recorded the whole path compare by this name too."""
    path = PurePath(name_or_path)
    return path.name if path.is_absolute() or name_or_path.startswith(("./", "../", "~")) else name_or_path


def row_arrays(spec: StoreSpec) -> tuple[str, ...]:
    """The arrays with one entry per row: `ROW_ARRAYS`, and `row_scale` for fp8 stores."""
    return ROW_ARRAYS + (("row_scale",) if spec.dtype == "fp8" else ())


def layout_problem(spec: StoreSpec, name: str, arr) -> str | None:
    """What makes array `name` (a row array, or the (d,) float32 `gain` / fp8 `mean`) another
    store's than `spec`'s: its dtype, or its shape past the rows; None when it fits. An edited
    dtype of the same width reads as numbers of another kind (int16 bits as float16 rows)."""
    if name in ("gain", "mean"):
        want_dtype, want_shape, shape, label = "float32", (spec.d_model,), tuple(arr.shape), f"({spec.d_model},)"
    else:
        empty, want_dtype = array_layout(spec)[name][:2]
        want_shape, shape = empty[1:], tuple(arr.shape[1:])
        label = f"(N,{''.join(f' {d}' for d in want_shape)})"
    if str(arr.dtype) != want_dtype:
        return f"{name}: dtype {arr.dtype}, the manifest's {spec.dtype} store holds {want_dtype}"
    if shape != want_shape:
        return f"{name}: shape {tuple(arr.shape)}, expected {label}"
    return None


def array_layout(spec: StoreSpec) -> dict[str, tuple]:
    """Each row array's (empty shape, storage dtype, chunk shape, shard shape)."""
    d, chunk, shard = spec.d_model, spec.chunk_rows, spec.shard_rows
    storage = {"float16": "float16", "float32": "float32", "fp8": "uint8"}[spec.dtype]
    column = {"scale": "float32", "tokens": "int32", "seq": "int64", "pos": "int16", "flags": "uint8",
              "row_scale": "float32"}
    return {name: ((0, d), storage, (chunk, d), (shard, d)) if name == "acts"
            else ((0,), column[name], (chunk,), (shard,)) for name in row_arrays(spec)}
