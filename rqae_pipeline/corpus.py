"""Text sources and their packing into fixed-length token contexts.

Every source goes through one code path, a streaming `datasets.IterableDataset` of
documents: the hub (FineWeb-Edu, `sample-10BT`, is the real default for Gemma-2-2B),
local `.txt` / `.jsonl` / `.parquet` files or globs, and an offline corpus of real English
text that every Python install carries (the language reference in `pydoc_data`).

Packing follows the usual activation-cache recipe: documents are concatenated with an
EOS separator and cut into contexts of `context_length` tokens, each starting with BOS.
The position of the next unread token, `(doc_index, token_offset)`, is the whole
iteration state, so a harvest can resume exactly where its last commit ended. Beside it
the stream's own resumable position at the start of that document (the `datasets`
`state_dict()`) is recorded, so a resume seeks there (whole earlier shards and files are
never opened) instead of re-reading every earlier document. Local files are the exception
to "never opened": their whole content is hashed once per harvest start (corpus_files.py), so
a resume refuses files that changed, where the recorded row position would be wrong.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

import numpy as np

from rqae_pipeline import RQAEError
from rqae_pipeline.corpus_files import FILE_BUILDERS, FileIdentity, expand_files, identify

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("python-docs",)
FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"


@dataclass(frozen=True, kw_only=True)
class CorpusSpec:
    """Which documents to read; recorded verbatim in the store manifest. Local files carry
    their identities (size, SHA-256), so a resume refuses files that changed since."""

    kind: Literal["hub", "files", "builtin"]
    name: str
    config: str | None = None
    split: str = "train"
    files: tuple[str, ...] = ()
    text_field: str = "text"
    file_identities: tuple[FileIdentity, ...] = ()  # one per file, in `files` order
    # "<bos>" written in a document is text, not the BOS id (which would give the LM a false
    # document start mid-context). False: how stores from before this flag were tokenised,
    # which their resumes keep (`harvest.plan_harvest` reads the flag from the store).
    literal_special_tokens: bool = False
    # A hub dataset's commit (`pin_revision`): a resume reads the same files, whatever the hub
    # serves by then; a stream position from one commit would index another's files wrongly.
    revision: str | None = None
    # A builtin corpus's texts (`builtin_sha256`): Python's own docs differ between its
    # releases, so a store resumed under another Python would continue a different text.
    content_sha256: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        d["file_identities"] = [asdict(i) for i in self.file_identities]
        if not self.file_identities:  # hub and builtin corpora: their dict is as it always was
            del d["file_identities"]
        if not self.literal_special_tokens:  # a store from before the flag: its dict as it was
            del d["literal_special_tokens"]
        if self.revision is None:  # local and builtin corpora, and hub stores from before pinning
            del d["revision"]
        if self.content_sha256 is None:  # all but builtin corpora, and builtin stores from before it
            del d["content_sha256"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CorpusSpec:
        identities = tuple(FileIdentity(**i) for i in d.get("file_identities", ()))
        return cls(**{**d, "files": tuple(d.get("files", ())), "file_identities": identities})


@dataclass(frozen=True)
class CorpusState:
    """Position of the next token to read: document index and token offset inside it.

    `stream_state` is how to reach that document: the document stream's `state_dict()` as it
    stood just before the document was read (JSON, from `datasets`). It is not part of the
    position (equality ignores it); None, as in stores written before it was recorded, means
    "reach the document by reading and discarding the `doc_index` documents before it".
    """

    doc_index: int = 0
    token_offset: int = 0
    stream_state: dict | None = field(default=None, compare=False)

    def to_manifest(self) -> list:
        """The manifest's `committed.corpus_state`: `[doc_index, token_offset]`, plus the
        stream state when there is one; `CorpusState(*value)` reads either form back."""
        head = [int(self.doc_index), int(self.token_offset)]
        return head if self.stream_state is None else [*head, self.stream_state]


def parse_corpus(
    dataset: str, *, config: str | None = None, split: str = "train", text_field: str = "text",
    revision: str | None = None,
) -> CorpusSpec:
    """Turn the `--dataset` argument into a spec: `builtin:NAME`, a local path/glob, or a hub
    name (at `revision`: a branch, tag or commit; None, the default branch)."""
    if revision is not None and (dataset.startswith(BUILTIN_PREFIX) or _looks_local(dataset)):
        raise RQAEError(f"--dataset-revision is for hub datasets; {dataset!r} is not one")
    if dataset.startswith(BUILTIN_PREFIX):
        name = dataset[len(BUILTIN_PREFIX) :]
        if name not in BUILTIN_CORPORA:
            raise RQAEError(f"unknown builtin corpus {name!r}; available: {', '.join(BUILTIN_CORPORA)}")
        return CorpusSpec(kind="builtin", name=dataset, literal_special_tokens=True, content_sha256=builtin_sha256())
    if _looks_local(dataset):
        files = expand_files(dataset)
        return CorpusSpec(kind="files", name=dataset, files=files, text_field=text_field,
                          file_identities=tuple(identify(f) for f in files), literal_special_tokens=True)
    return CorpusSpec(kind="hub", name=dataset, config=config, split=split, text_field=text_field,
                      literal_special_tokens=True, revision=revision)


def _looks_local(dataset: str) -> bool:
    return (os.path.exists(dataset) or any(ch in dataset for ch in "*?[")
            or os.path.splitext(dataset)[1] in FILE_BUILDERS or dataset.startswith((".", "/", "~")))


def pin_revision(spec: CorpusSpec) -> tuple[CorpusSpec, str | None]:
    """A hub corpus at the commit its revision names now (the default branch's when None), so
    the store records files that stay put, and a note for stderr or None. Offline, the hub
    cannot be asked: the revision stays as given, with a note when none was (the files then
    are the ones the cache holds; the caller shows it once the corpus has opened)."""
    if spec.kind != "hub":
        return spec, None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        commit = HfApi().dataset_info(spec.name, revision=spec.revision).sha
    except OfflineModeIsEnabled:
        note = None if spec.revision is not None else (
            f"note: the hub is offline, so the commit of {spec.name!r} is not recorded; pass --dataset-revision "
            f"to pin it")
        return spec, note
    except Exception as e:  # noqa: BLE001  huggingface_hub raises many types for "not there" / "no access"
        raise RQAEError(f"cannot open dataset {spec.name!r}"
                        f"{f' at revision {spec.revision!r}' if spec.revision else ''}: {_one_line(e)}") from e
    return replace(spec, revision=commit), None


def continued_corpus(corpus: CorpusSpec, recorded: CorpusSpec, out: str,
                     notice: Callable[[str], None] | None) -> CorpusSpec:
    """`corpus` read as the store's rows were: special-token text as then (a store from before
    the flag keeps its old reading) and a hub dataset at the commit the store recorded."""
    if recorded.kind == "hub" and corpus.revision is not None and corpus.revision != recorded.revision:
        raise RQAEError(f"{out} was read at revision {recorded.revision!r} of {recorded.name!r}, not "
                        f"{corpus.revision!r}; drop --dataset-revision to continue it, or use a new --out")
    if recorded.kind == "hub" and recorded.revision is None and notice is not None:
        notice(f"note: {out} recorded no commit of {recorded.name!r}; the resume reads the hub's files as they are now")
    if recorded.kind == "builtin" and recorded.content_sha256 not in (None, corpus.content_sha256):
        raise RQAEError(f"{out} began on another text of {recorded.name} (this Python's copy differs: SHA-256 "
                        f"{corpus.content_sha256[:12]}..., not {recorded.content_sha256[:12]}...); resume it under the "
                        f"Python it began with, or use a new --out")
    if recorded.kind == "builtin" and recorded.content_sha256 is None and notice is not None:
        notice(f"note: {out} recorded no digest of {recorded.name}; the resume reads this Python's copy")
    return replace(corpus, literal_special_tokens=recorded.literal_special_tokens, revision=recorded.revision,
                   content_sha256=recorded.content_sha256)


def _builtin_documents() -> Iterator[dict]:
    # The Python language reference: ~465k characters of real English prose that ships
    # with every CPython, so the offline demo and tests need no download.
    import pydoc_data.topics

    for key in sorted(pydoc_data.topics.topics):
        yield {"text": pydoc_data.topics.topics[key]}


def builtin_sha256() -> str:
    """SHA-256 of the builtin documents in reading order, each length-prefixed."""
    digest = hashlib.sha256()
    for doc in _builtin_documents():
        text = doc["text"].encode()
        digest.update(len(text).to_bytes(8, "little") + text)
    return digest.hexdigest()


def open_documents(spec: CorpusSpec):
    """The spec's documents as a streaming `datasets.IterableDataset` of `{text_field: str}` rows."""
    import datasets

    datasets.disable_progress_bars()
    # datasets logs a reader's failure ("Failed to load JSON ...") and then raises it; the
    # raised error becomes our one `error:` line, so the log line would only be a stray duplicate.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        if spec.kind == "builtin":
            return datasets.IterableDataset.from_generator(_builtin_documents)
        if spec.kind == "files":
            missing = [f for f in spec.files if not os.path.isfile(f)]
            if missing:
                raise RQAEError(f"corpus file is missing: {missing[0]}")
            builder = FILE_BUILDERS[os.path.splitext(spec.files[0])[1]]
            return datasets.load_dataset(builder, data_files=list(spec.files), split="train", streaming=True)
        return datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=True, revision=spec.revision)
    except RQAEError:
        raise
    except Exception as e:  # datasets raises many types for "not there" / "offline"
        raise RQAEError(f"cannot open dataset {spec.name!r}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# Long documents are tokenised in pieces of at most this many characters, cut at a
# whitespace boundary, so memory stays bounded whatever a line's length (one 50 MB line
# made the tokenizer take gigabytes). Documents shorter than this are tokenised whole, so
# ordinary corpora give exactly the tokens they always did.
PIECE_CHARS = 1 << 16
TOKENISE_CHARS = 1 << 20  # text tokenised in one call, at most (plus one piece); 0: a call per piece


def text_pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `limit` characters; each cut falls just before
    a whitespace run (a word keeps its leading space, as whole-text tokenisation gives it), and
    only a piece with no whitespace at all is cut mid-word."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        cut = end
        while cut > start + 1 and not (text[cut].isspace() and not text[cut - 1].isspace()):
            cut -= 1
        if cut <= start + 1:
            cut = end  # no word boundary in the window
        yield text[start:cut]
        start = cut
    yield text[start:]


def iter_contexts(
    spec: CorpusSpec,
    tokenizer,
    *,
    context_length: int,
    state: CorpusState = CorpusState(),
) -> ContextPacker:
    """Iterate `(tokens (context_length,) int32, state after this context)` from `state` on.

    Each context is BOS followed by `context_length - 1` tokens of the EOS-separated
    document stream; a final partial context is dropped. Raises if the corpus is empty.
    The returned packer also says whether the last context held any real text.
    """
    return ContextPacker(spec, tokenizer, context_length=context_length, state=state)


class ContextPacker:
    """Packs the document stream into contexts (see `iter_contexts`). `last_had_text`: whether
    the context just yielded took tokens from a document with non-whitespace text (a corpus of
    empty or blank texts yields only EOS / whitespace tokens, which harvest refuses)."""

    def __init__(self, spec: CorpusSpec, tokenizer, *, context_length: int, state: CorpusState):
        if context_length < 2:
            raise RQAEError(f"context length must be at least 2, got {context_length}")
        if tokenizer.bos_token_id is None:
            raise RQAEError("the tokenizer has no BOS token; contexts must start with one")
        self.spec, self.tokenizer, self.body, self.start = spec, tokenizer, context_length - 1, state
        self.last_had_text = False

    def __iter__(self) -> Iterator[tuple[np.ndarray, CorpusState]]:
        try:
            yield from self._contexts()
        except RQAEError:
            raise
        except Exception as e:
            raise RQAEError(f"error while reading dataset {self.spec.name!r}: {_one_line(e)}") from e

    def _documents(self) -> Iterator[tuple[int, str, dict | None, dict | None]]:
        """(index, text, stream state before it, stream state after it) of each document
        from the start position on."""
        docs = open_documents(self.spec)
        before = self.start.stream_state
        if before is not None:
            docs.load_state_dict(before)  # applied when iteration starts: the stream seeks there
        rows = iter(docs)
        if before is None:
            # A store from before stream states were recorded: read up to the position once;
            # every state recorded from here on lets the next resume seek.
            next(itertools.islice(rows, self.start.doc_index, self.start.doc_index), None)
            before = _portable(docs.state_dict())
        text_field = self.spec.text_field
        for doc_index, row in enumerate(rows, start=self.start.doc_index):
            # Taken before the next row is pulled: the state counts exactly the rows yielded so far.
            after = _portable(docs.state_dict())
            if text_field not in row:
                raise RQAEError(f"dataset {self.spec.name!r} has no field {text_field!r}; use --text-field")
            text = row[text_field]
            if not isinstance(text, str):
                raise RQAEError(f"dataset {self.spec.name!r}: document {doc_index} has {text_field!r} = "
                                f"{'null' if text is None else type(text).__name__}, not a string")
            yield doc_index, text, before, after
            before = after

    def _pieces(self) -> Iterator[tuple[tuple, int, list[int], bool]]:
        """(the document as `_documents` gives it, piece number, the piece's token ids, whether
        it is the document's last piece) for each piece of each document, in order. Pieces
        are read ahead in groups and each group is tokenised in one call, which a fast
        tokenizer spreads over the machine's cores (see docs/benchmarks.md, `bench/pack.py`).
        A group holds at most TOKENISE_CHARS characters plus one piece, whatever the size of a
        document, and the groups grow from 4k characters, so a short harvest or the first
        context of a long one does not wait on text it will not use."""
        group, chars, limit = [], 0, min(1 << 12, TOKENISE_CHARS)
        for doc in self._documents():
            text = doc[1]
            pieces = text_pieces(text) if len(text) > PIECE_CHARS else iter([text])
            piece = next(pieces)
            for number in itertools.count():
                following = next(pieces, None)  # a piece ahead: whether this one is the last
                group.append((doc, number, piece, following is None))
                chars += len(piece)
                if chars >= limit:
                    yield from self._tokenise(group)
                    group, chars, limit = [], 0, min(2 * limit, TOKENISE_CHARS)
                if following is None:
                    break
                piece = following
        yield from self._tokenise(group)

    def _tokenise(self, group: list[tuple]) -> Iterator[tuple[tuple, int, list[int], bool]]:
        if not group:
            return
        ids = self.tokenizer([piece for _, _, piece, _ in group], add_special_tokens=False, verbose=False,
                             split_special_tokens=self.spec.literal_special_tokens)["input_ids"]
        for (doc, number, _, last), piece_ids in zip(group, ids, strict=True):
            yield doc, number, list(piece_ids), last

    def _contexts(self) -> Iterator[tuple[np.ndarray, CorpusState]]:
        bos, eos, body = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.body
        buf: list[int] = []
        pos = None  # (doc_index, token_offset, stream state) of the next token to cut
        # documents with tokens in buf: [tokens left, has text, fully read, stream state after it]
        docs: list[list] = []
        seen_any, skip = False, 0
        for (doc_index, text, before, after), number, ids, last_piece in self._pieces():
            if number == 0:
                pos = pos or (self.start.doc_index, self.start.token_offset, before)
                has_text = bool(text) and not text.isspace()
                seen_any = seen_any or has_text
                docs.append([0, has_text, False, after])
                skip = self.start.token_offset if doc_index == self.start.doc_index else 0  # the resume offset
            # the piece's tokens past the offset, then the document's EOS after its last piece
            lists = [(ids[skip:], eos is None and last_piece)]
            skip = max(0, skip - len(ids))
            if last_piece and eos is not None:
                lists.append(([eos][skip:], True))
            for tokens, last in lists:
                buf.extend(tokens)
                docs[-1][0] += len(tokens)
                docs[-1][2] = last
                while len(buf) >= body:
                    ctx = np.asarray([bos] + buf[:body], dtype=np.int32)
                    del buf[:body]  # buf stays under body + one piece's tokens, so this is cheap
                    pos = self._consume(docs, body, pos)
                    yield ctx, CorpusState(*pos)
        if not seen_any and self.start == CorpusState():
            raise RQAEError(f"dataset {self.spec.name!r} contains no text")

    def _consume(self, docs: list[list], n: int, pos: tuple) -> tuple[int, int, dict | None]:
        """Walk `n` cut tokens across document boundaries; the position after them (a fully
        read document whose tokens are all cut is passed: the position is the next one's start,
        reached by the stream state recorded after the passed document)."""
        doc, off, stream_state = pos
        self.last_had_text = False
        while n or (docs and docs[0][0] == 0 and docs[0][2]):
            take = min(n, docs[0][0])
            self.last_had_text |= take > 0 and docs[0][1]
            docs[0][0] -= take
            n -= take
            off += take
            if docs[0][0] == 0 and docs[0][2]:
                doc, off, stream_state = doc + 1, 0, docs.pop(0)[3]
            elif n:  # only the document still being read can run dry before a cut is done
                raise AssertionError("context cut past the tokens read")
        return doc, off, stream_state


def _portable(state: dict) -> dict | None:
    """The stream state as the manifest will hold it (JSON), or None when it does not survive
    JSON: then a resume reaches the position by reading the earlier documents, as before."""
    try:
        return json.loads(json.dumps(state))
    except (TypeError, ValueError):
        return None
