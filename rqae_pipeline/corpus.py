"""Text sources and their packing into fixed-length token contexts.

Every source goes through one code path, a streaming `datasets.IterableDataset` of
documents: the hub (FineWeb-Edu, `sample-10BT`, is the real default for Gemma-2-2B),
local `.txt` / `.jsonl` / `.parquet` files or globs, and an offline corpus of real English
text that every Python install carries (the language reference in `pydoc_data`).

Packing follows the usual activation-cache recipe: documents are concatenated with an
EOS separator and cut into contexts of `context_length` tokens, each starting with BOS.
The position of the next unread token, `(doc_index, token_offset)`, is the whole
iteration state, so a harvest can resume exactly where its last commit ended.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from rqae_pipeline import RQAEError

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("python-docs",)
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """Which documents to read; recorded verbatim in the store manifest."""

    kind: Literal["hub", "files", "builtin"]
    name: str
    config: str | None = None
    split: str = "train"
    files: tuple[str, ...] = ()
    text_field: str = "text"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CorpusSpec:
        return cls(**{**d, "files": tuple(d.get("files", ()))})


@dataclass(frozen=True)
class CorpusState:
    """Position of the next token to read: document index and token offset inside it."""

    doc_index: int = 0
    token_offset: int = 0


def parse_corpus(
    dataset: str, *, config: str | None = None, split: str = "train", text_field: str = "text"
) -> CorpusSpec:
    """Turn the `--dataset` argument into a spec: `builtin:NAME`, a local path/glob, or a hub name."""
    if dataset.startswith(BUILTIN_PREFIX):
        name = dataset[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_CORPORA:
            raise RQAEError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
        return CorpusSpec(kind="builtin", name=dataset)
    looks_local = (
        os.path.exists(dataset)
        or any(ch in dataset for ch in "*?[")
        or os.path.splitext(dataset)[1] in FILE_BUILDERS
        or dataset.startswith((".", "/", "~"))
    )
    if looks_local:
        files = _expand_files(dataset)
        return CorpusSpec(kind="files", name=dataset, files=files, text_field=text_field)
    return CorpusSpec(kind="hub", name=dataset, config=config, split=split, text_field=text_field)


def _expand_files(pattern: str) -> tuple[str, ...]:
    pattern = os.path.expanduser(pattern)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*")
    files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not files:
        raise RQAEError(f"no files match {pattern!r}")
    exts = {os.path.splitext(f)[1] for f in files}
    unknown = exts - set(FILE_BUILDERS)
    if unknown:
        raise RQAEError(f"unsupported file type(s) {sorted(unknown)}; use .txt, .jsonl or .parquet")
    if len({FILE_BUILDERS[e] for e in exts}) > 1:
        raise RQAEError(f"mixed file types {sorted(exts)} in {pattern!r}; give one type per corpus")
    if all(os.path.getsize(f) == 0 for f in files):
        raise RQAEError(f"all files matching {pattern!r} are empty")
    return tuple(os.path.abspath(f) for f in files)


def _builtin_documents() -> Iterator[dict]:
    # The Python language reference: ~465k characters of real English prose that ships
    # with every CPython, so the offline demo and tests need no download.
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield {"text": pydoc_data.topics.topics[key]}


def open_documents(spec: CorpusSpec):
    """The spec's documents as a streaming `datasets.IterableDataset` of `{text_field: str}` rows."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.kind == "builtin":
            return datasets.IterableDataset.from_generator(_builtin_documents)
        if spec.kind == "files":
            missing = [f for f in spec.files if not os.path.isfile(f)]
            if missing:
                raise RQAEError(f"corpus file is missing: {missing[0]}")
            builder = FILE_BUILDERS[os.path.splitext(spec.files[0])[1]]
            return datasets.load_dataset(builder, data_files=list(spec.files), split="train", streaming=True)
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True)
    except RQAEError:
        raise
    except Exception as e:  # datasets raises many types for "not there" / "offline"
        raise RQAEError(f"cannot open dataset {spec.name!r}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def iter_contexts(
    spec: CorpusSpec,
    tokenizer,
    *,
    context_length: int,
    state: CorpusState = CorpusState(),
) -> Iterator[tuple[np.ndarray, CorpusState]]:
    """Yield `(tokens (context_length,) int32, state after this context)` from `state` on.

    Each context is BOS followed by `context_length - 1` tokens of the EOS-separated
    document stream; a final partial context is dropped. Raises if the corpus is empty.
    """
    if context_length < 2:
        raise RQAEError(f"context length must be at least 2, got {context_length}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None:
        raise RQAEError("the tokenizer has no BOS token; contexts must start with one")
    body = context_length - 1
    docs = open_documents(spec)
    if state.doc_index:
        docs = docs.skip(state.doc_index)
    buf: list[int] = []
    # (doc index, offset) of buf[0]; advanced as contexts are cut from the buffer.
    buf_doc, buf_off = state.doc_index, state.token_offset
    doc_lengths: list[int] = []  # token counts of the documents currently in buf
    seen_any = False
    try:
        for doc_index, row in enumerate(docs, start=state.doc_index):
            text = row.get(spec.text_field)
            if text is None:
                raise RQAEError(f"dataset {spec.name!r} has no field {spec.text_field!r}; use --text-field")
            ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            doc = list(ids) + ([eos] if eos is not None else [])
            if doc_index == state.doc_index:
                doc = doc[state.token_offset :]
            seen_any = seen_any or bool(ids)
            buf.extend(doc)
            doc_lengths.append(len(doc))
            while len(buf) >= body:
                ctx = np.asarray([bos] + buf[:body], dtype=np.int32)
                del buf[:body]
                # Walk the consumed tokens across document boundaries to get the new state.
                consumed = body
                while consumed or (doc_lengths and doc_lengths[0] == 0):
                    take = min(consumed, doc_lengths[0])
                    doc_lengths[0] -= take
                    consumed -= take
                    buf_off += take
                    if doc_lengths[0] == 0:
                        doc_lengths.pop(0)
                        buf_doc, buf_off = buf_doc + 1, 0
                yield ctx, CorpusState(buf_doc, buf_off)
    except RQAEError:
        raise
    except Exception as e:
        raise RQAEError(f"error while reading dataset {spec.name!r}: {_one_line(e)}") from e
    if not seen_any and state == CorpusState():
        raise RQAEError(f"dataset {spec.name!r} contains no text")
