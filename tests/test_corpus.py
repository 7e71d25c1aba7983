import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rqae_pipeline import RQAEError
from rqae_pipeline.corpus import CorpusSpec, CorpusState, iter_contexts, parse_corpus
from rqae_pipeline.harvest import harvest
from rqae_pipeline.store import ActivationStore

from helpers import TINY, run_rqae, store_arrays, tiny_config, tree_digest

DOCS = [
    "The cat sat on the mat. " * 7,
    "Residual quantisation picks one code per layer and subtracts its reconstruction.",
    "",
    "A short one.",
    "Sparse autoencoders trade reconstruction for sparsity; " * 5,
]


def take(spec, tok, n=None, **kw):
    out = []
    for ctx, state in iter_contexts(spec, tok, **kw):
        out.append((ctx, state))
        if n is not None and len(out) == n:
            break
    return out


@pytest.fixture
def local_files(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(d for d in DOCS if d) + "\n")
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "a.parquet")
    return tmp_path


def test_contexts_start_with_bos_and_separate_documents_with_eos(tiny_lm, local_files):
    spec = parse_corpus(str(local_files / "a.jsonl"))
    ctxs = [c for c, _ in take(spec, tiny_lm.tokenizer, context_length=16)]
    tok = tiny_lm.tokenizer
    assert ctxs and all(c[0] == tok.bos_token_id and len(c) == 16 for c in ctxs)
    stream = np.concatenate([c[1:] for c in ctxs])
    first_doc = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    assert list(stream[: len(first_doc)]) == first_doc
    assert stream[len(first_doc)] == tok.eos_token_id


def test_txt_jsonl_parquet_share_one_streaming_path(tiny_lm, local_files):
    jsonl = take(parse_corpus(str(local_files / "a.jsonl")), tiny_lm.tokenizer, context_length=16)
    parquet = take(parse_corpus(str(local_files / "a.parquet"), text_field="body"), tiny_lm.tokenizer,
                   context_length=16)
    assert len(jsonl) == len(parquet) > 3
    assert all((a == b).all() for (a, _), (b, _) in zip(jsonl, parquet))
    txt = take(parse_corpus(str(local_files / "*.txt")), tiny_lm.tokenizer, context_length=16)
    assert len(txt) > 3  # one document per line: same text, different EOS placement


@pytest.mark.parametrize("split_at", [1, 3, 5])
def test_resuming_from_a_recorded_state_continues_the_same_stream(tiny_lm, local_files, split_at):
    spec = parse_corpus(str(local_files / "a.jsonl"))
    full = take(spec, tiny_lm.tokenizer, context_length=12)
    state = full[split_at - 1][1]
    rest = take(spec, tiny_lm.tokenizer, context_length=12, state=state)
    assert len(rest) == len(full) - split_at
    assert all((a == b).all() for (a, _), (b, _) in zip(full[split_at:], rest))


def test_builtin_corpus_is_real_english_offline(tiny_lm):
    spec = parse_corpus("builtin:python-docs")
    ctxs = take(spec, tiny_lm.tokenizer, n=50, context_length=128)
    assert len(ctxs) == 50
    text = tiny_lm.tokenizer.decode(ctxs[3][0][1:])
    assert sum(w in text.split() for w in ("the", "of", "a", "is", "to", "and")) >= 2


def test_missing_and_empty_inputs_are_clear_errors(tiny_lm, tmp_path):
    with pytest.raises(RQAEError, match="no files match"):
        parse_corpus(str(tmp_path / "nothing-*.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(RQAEError, match="empty"):
        parse_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(RQAEError, match="no text"):
        take(parse_corpus(str(tmp_path / "blank.jsonl")), tiny_lm.tokenizer, context_length=8)
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(RQAEError, match="no field 'text'"):
        take(parse_corpus(str(tmp_path / "other.jsonl")), tiny_lm.tokenizer, context_length=8)
    with pytest.raises(RQAEError, match="unknown builtin"):
        parse_corpus("builtin:nope")


def test_hub_dataset_that_cannot_be_reached_is_one_clear_error(tiny_lm):
    spec = parse_corpus("HuggingFaceFW/fineweb-edu", config="sample-10BT")
    assert spec.kind == "hub"
    with pytest.raises(RQAEError, match="cannot open dataset|error while reading"):
        take(spec, tiny_lm.tokenizer, n=1, context_length=8)


def test_a_hub_corpus_records_its_revision_and_stores_before_it_read_as_they_were(local_files):
    pinned = parse_corpus("HuggingFaceFW/fineweb-edu", config="sample-10BT", revision="a1b2c3")
    assert pinned.to_dict()["revision"] == "a1b2c3" and CorpusSpec.from_dict(pinned.to_dict()) == pinned
    unpinned = parse_corpus("HuggingFaceFW/fineweb-edu", config="sample-10BT")
    assert "revision" not in unpinned.to_dict()  # the dict a store from before pinning holds
    assert CorpusSpec.from_dict(unpinned.to_dict()).revision is None
    for local in ("builtin:python-docs", str(local_files / "a.txt")):
        with pytest.raises(RQAEError, match="--dataset-revision is for hub datasets"):
            parse_corpus(local, revision="main")


def test_offline_the_revision_stays_as_given_and_a_missing_one_is_noted(monkeypatch):
    """The commit is asked of the hub (HfApi.dataset_info); in offline mode it cannot be."""
    from huggingface_hub import constants

    from rqae_pipeline.corpus import pin_revision

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets at import
    given = parse_corpus("HuggingFaceFW/fineweb-edu", revision="v1.2.0")
    assert pin_revision(given) == (given, None)
    spec, note = pin_revision(parse_corpus("HuggingFaceFW/fineweb-edu"))
    assert spec.revision is None and "--dataset-revision" in note
    local = parse_corpus("builtin:python-docs")
    assert pin_revision(local) == (local, None)


def test_a_resume_reads_the_hub_commit_its_store_recorded():
    from rqae_pipeline.corpus import continued_corpus

    recorded = parse_corpus("org/corpus", revision="c0ffee")
    notes = []
    # no --dataset-revision on the resume: the store's commit, whatever the hub serves now
    assert continued_corpus(parse_corpus("org/corpus"), recorded, "s.zarr", notes.append).revision == "c0ffee"
    assert continued_corpus(parse_corpus("org/corpus", revision="c0ffee"), recorded, "s.zarr", notes.append) == recorded
    with pytest.raises(RQAEError, match="read at revision 'c0ffee' of 'org/corpus', not 'main'"):
        continued_corpus(parse_corpus("org/corpus", revision="main"), recorded, "s.zarr", notes.append)
    assert notes == []
    # a store from before pinning: resumed as before, with a note that the files may have moved
    before = parse_corpus("org/corpus")
    assert continued_corpus(parse_corpus("org/corpus"), before, "s.zarr", notes.append).revision is None
    assert len(notes) == 1 and "recorded no commit" in notes[0]


def test_a_builtin_store_resumes_only_on_the_text_it_began_with(tiny_lm, tmp_path):
    """Python's own docs (the builtin corpus) differ between its releases: a store begun
    under one Python and resumed under another would continue a different text."""
    import zarr

    from rqae_pipeline.corpus import builtin_sha256, continued_corpus

    now = parse_corpus("builtin:python-docs")
    assert now.content_sha256 == builtin_sha256() and CorpusSpec.from_dict(now.to_dict()) == now
    other = CorpusSpec.from_dict({**now.to_dict(), "content_sha256": "0" * 64})
    with pytest.raises(RQAEError, match="began on another text of builtin:python-docs"):
        continued_corpus(now, other, "s.zarr", None)
    notes = []  # a store from before the digest: resumed on this Python's copy, said so
    before = CorpusSpec.from_dict({k: v for k, v in now.to_dict().items() if k != "content_sha256"})
    assert continued_corpus(now, before, "s.zarr", notes.append) == before and "no digest" in notes[0]
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=512, dataset="builtin:python-docs"), lm=tiny_lm, progress=False)
    assert ActivationStore.open(out).spec.corpus["content_sha256"] == builtin_sha256()
    group = zarr.open_group(str(out), mode="r+", zarr_format=3)
    manifest = json.loads(json.dumps(group.attrs["rqae"]))
    manifest["spec"]["corpus"]["content_sha256"] = "0" * 64  # begun under another Python
    group.attrs["rqae"] = manifest
    before_resume = tree_digest(out)
    with pytest.raises(RQAEError, match="this Python's copy differs"):
        harvest(tiny_config(out, tokens=1024, dataset="builtin:python-docs", resume=True), lm=tiny_lm, progress=False)
    assert tree_digest(out) == before_resume


def test_a_revision_for_a_local_corpus_is_one_error_line(tmp_path):
    r = run_rqae("harvest", "--model", TINY, "--dataset", "builtin:python-docs", "--dataset-revision", "main",
                 "--tokens", "64", "--out", str(tmp_path / "s.zarr"))
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --dataset-revision is for hub datasets; 'builtin:python-docs' is not one")
    assert not (tmp_path / "s.zarr").exists()


def test_state_is_a_plain_position(tiny_lm, local_files):
    spec = parse_corpus(str(local_files / "a.jsonl"))
    states = [s for _, s in take(spec, tiny_lm.tokenizer, context_length=16)]
    assert states == sorted(states, key=lambda s: (s.doc_index, s.token_offset))
    assert all(isinstance(s, CorpusState) for s in states)


WORDS = ("the cat sat on a mat while residual codes picked one vector per layer and sparse "
         "features fired for rare tokens in long documents about rivers mountains and trains").split()


@pytest.fixture
def sharded_corpus(tmp_path):
    """A hub-like corpus: a folder of eight JSONL shards of ten short varied documents each."""
    root = tmp_path / "shards"
    root.mkdir()
    rng = np.random.default_rng(0)
    for shard in range(8):
        with open(root / f"part-{shard:02d}.jsonl", "w") as f:
            for doc in range(10):
                words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
                f.write(json.dumps({"text": f"Document {shard}.{doc}: " + " ".join(words) + "."}) + "\n")
    return root


def hub_like(root):
    """The folder as the hub path opens it: `load_dataset(<folder>, streaming=True)`."""
    return CorpusSpec(kind="hub", name=str(root))


@pytest.mark.parametrize("kind", ["hub", "files"])
def test_every_recorded_state_resumes_the_same_stream(tiny_lm, sharded_corpus, kind):
    spec = hub_like(sharded_corpus) if kind == "hub" else parse_corpus(str(sharded_corpus))
    full = take(spec, tiny_lm.tokenizer, context_length=12)
    assert len(full) > 60 and all(s.stream_state is not None for _, s in full)
    for split_at in range(1, len(full), 7):
        state = CorpusState(*json.loads(json.dumps(full[split_at - 1][1].to_manifest())))  # as the manifest holds it
        rest = take(spec, tiny_lm.tokenizer, context_length=12, state=state)
        assert [list(c) for c, _ in rest] == [list(c) for c, _ in full[split_at:]], split_at
        assert [s for _, s in rest] == [s for _, s in full[split_at:]]


@pytest.mark.parametrize("kind", ["hub", "files"])
def test_resume_seeks_past_earlier_shards_without_reading_them(tiny_lm, sharded_corpus, kind):
    """The resumed stream starts at the recorded shard: earlier shards, here made unreadable
    after the state was recorded, are never opened (skipping would parse every one of them).
    Shard 0 stays readable: `load_dataset` infers the features from it. (A harvest would refuse
    the changed local files before reading: their identities differ from the store's.)"""
    spec = hub_like(sharded_corpus) if kind == "hub" else parse_corpus(str(sharded_corpus))
    full = take(spec, tiny_lm.tokenizer, context_length=12)
    at = next(i for i, (_, s) in enumerate(full) if s.doc_index >= 45)  # in shard 4 of 0..7
    for shard in (1, 2):
        (sharded_corpus / f"part-{shard:02d}.jsonl").write_text("{ not json\n" * 10)
    rest = take(spec, tiny_lm.tokenizer, context_length=12, state=full[at][1])
    assert [list(c) for c, _ in rest] == [list(c) for c, _ in full[at + 1:]]
    # A position without a stream state (a store written before they were recorded) is still
    # reached, by reading the earlier documents: here that meets the damaged shards.
    with pytest.raises(RQAEError, match="error while reading"):
        take(spec, tiny_lm.tokenizer, context_length=12, state=CorpusState(full[at][1].doc_index,
                                                                          full[at][1].token_offset))


def test_a_state_without_stream_state_resumes_by_reading_up_to_it(tiny_lm, sharded_corpus):
    spec = parse_corpus(str(sharded_corpus))
    full = take(spec, tiny_lm.tokenizer, context_length=12)
    old = CorpusState(*full[30][1].to_manifest()[:2])  # [doc_index, token_offset]: an old manifest
    assert old.stream_state is None
    rest = take(spec, tiny_lm.tokenizer, context_length=12, state=old)
    assert [list(c) for c, _ in rest] == [list(c) for c, _ in full[31:]]
    assert all(s.stream_state is not None for _, s in rest)  # the next commit can seek


def test_resumed_harvest_of_a_sharded_corpus_is_byte_identical(tmp_path, tiny_lm, sharded_corpus):
    whole, part = tmp_path / "whole.zarr", tmp_path / "part.zarr"
    kw = dict(dataset=str(sharded_corpus), context_length=16)
    harvest(tiny_config(whole, tokens=3072, **kw), lm=tiny_lm, progress=False)
    harvest(tiny_config(part, tokens=2048, **kw), lm=tiny_lm, progress=False)  # ends on a shard boundary
    committed = ActivationStore.open(part).manifest["committed"]
    assert len(committed["corpus_state"]) == 3 and committed["corpus_state"][0] >= 30
    harvest(tiny_config(part, tokens=3072, resume=True, **kw), lm=tiny_lm, progress=False)
    assert_same_arrays(part, whole)


def assert_same_arrays(got_path, want_path):
    got, want = store_arrays(got_path), store_arrays(want_path)
    assert got.keys() == want.keys()
    for name in want:
        assert np.array_equal(got[name], want[name]), name


def test_store_records_size_and_sha256_of_every_corpus_file(tmp_path, tiny_lm, sharded_corpus):
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=256, dataset=str(sharded_corpus / "*.jsonl"), context_length=16),
            lm=tiny_lm, progress=False)
    corpus = ActivationStore.open(out).manifest["spec"]["corpus"]
    files = sorted(sharded_corpus.glob("*.jsonl"))
    assert corpus["files"] == [str(f) for f in files]
    sha256 = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert corpus["file_identities"] == [{"size": f.stat().st_size, "sha256": h} for f, h in zip(files, sha256)]
    assert CorpusSpec.from_dict(corpus).to_dict() == corpus


def _rewrite(path, change):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(change(lines)))


# Each changes the corpus after a store was started; the part of the message that names what changed.
CORPUS_CHANGES = {
    # rows of a file before the resume position in another order: the same bytes, resumed at the same
    # row number, would give other documents (datasets reported nothing)
    "rows reordered": (lambda root: _rewrite(root / "part-01.jsonl", lambda ls: ls[::-1]),
                       "part-01.jsonl changed contents"),
    "edited in place, same size": (lambda root: _rewrite(root / "part-06.jsonl",
                                                         lambda ls: [ls[0].replace("Document", "DOCUMENT")] + ls[1:]),
                                   "part-06.jsonl changed contents"),
    "a document appended": (lambda root: _rewrite(root / "part-02.jsonl", lambda ls: ls + ls[:1]),
                            "part-02.jsonl changed size"),
    "truncated": (lambda root: _rewrite(root / "part-03.jsonl", lambda ls: ls[:5]), "part-03.jsonl changed size"),
    "two files swapped": (lambda root: [(root / "part-04.jsonl").rename(root / "tmp.jsonl"),
                                        (root / "part-05.jsonl").rename(root / "part-04.jsonl"),
                                        (root / "tmp.jsonl").rename(root / "part-05.jsonl")],
                          "part-04.jsonl changed"),
    "a file removed": (lambda root: (root / "part-07.jsonl").unlink(), "part-07.jsonl is missing"),
    "a file added": (lambda root: (root / "part-08.jsonl").write_text('{"text": "late"}\n'),
                     "new corpus file .*part-08.jsonl matches"),
}


@pytest.mark.parametrize("change", CORPUS_CHANGES)
def test_resume_refuses_a_corpus_file_that_changed(tmp_path, tiny_lm, sharded_corpus, change):
    part = tmp_path / "part.zarr"
    kw = dict(dataset=str(sharded_corpus / "*.jsonl"), context_length=16)
    harvest(tiny_config(part, tokens=2048, **kw), lm=tiny_lm, progress=False)
    before = tree_digest(part)
    alter, message = CORPUS_CHANGES[change]
    alter(sharded_corpus)
    with pytest.raises(RQAEError, match=f"cannot resume: corpus file .*{message}|cannot resume: {message}"):
        harvest(tiny_config(part, tokens=3072, resume=True, **kw), lm=tiny_lm, progress=False)
    assert tree_digest(part) == before


def test_a_changed_corpus_file_is_one_error_line_and_exit_2(tmp_path, sharded_corpus):
    out = tmp_path / "s.zarr"
    args = ["harvest", "--out", str(out), "--model", TINY, "--layer", "1", "--context-length", "16",
            "--batch-size", "2", "--contexts-per-shard", "4", "--contexts-per-chunk", "2",
            "--dataset", str(sharded_corpus)]
    assert run_rqae(*args, "--tokens", "480").returncode == 0
    before = tree_digest(out)
    _rewrite(sharded_corpus / "part-00.jsonl", lambda ls: ls[1:] + ls[:1])
    r = run_rqae(*args, "--tokens", "960", "--resume")
    assert r.returncode == 2, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        f"error: store {out} cannot resume: corpus file {sharded_corpus / 'part-00.jsonl'} changed contents "
        f"(same size, {(sharded_corpus / 'part-00.jsonl').stat().st_size:,} bytes; its SHA-256 differs); "
        f"restore the corpus or use a new --out"]
    assert tree_digest(out) == before


def test_a_store_without_file_identities_resumes_as_before(tmp_path, tiny_lm, sharded_corpus):
    """A store written before identities were recorded: its files are not checked beyond the list."""
    import zarr

    whole, part = tmp_path / "whole.zarr", tmp_path / "part.zarr"
    kw = dict(dataset=str(sharded_corpus), context_length=16)
    harvest(tiny_config(whole, tokens=3072, **kw), lm=tiny_lm, progress=False)
    harvest(tiny_config(part, tokens=2048, **kw), lm=tiny_lm, progress=False)
    group = zarr.open_group(part, mode="r+")
    manifest = group.attrs["rqae"]
    del manifest["spec"]["corpus"]["file_identities"]
    group.attrs["rqae"] = manifest
    harvest(tiny_config(part, tokens=3072, resume=True, **kw), lm=tiny_lm, progress=False)
    assert_same_arrays(part, whole)
    assert "file_identities" not in ActivationStore.open(part).manifest["spec"]["corpus"]


def test_special_token_text_in_a_document_is_text_not_a_document_boundary(tmp_path, tiny_lm):
    """'<bos>' written in a web page was tokenised to the BOS id: a false document start
    mid-context for the LM, and rows flagged BOS (dropped from training). A store from before
    keeps its old reading when resumed, so one store never mixes the two."""
    import zarr

    from rqae_pipeline.store import ActivationStore, Flags

    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(f"line {i}: the tokens <bos> and <eos> are markup here" for i in range(200)) + "\n")
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=256, dataset=str(docs), context_length=32), lm=tiny_lm, progress=False)
    store = ActivationStore.open(out)
    rows = store.read()
    bos, eos = tiny_lm.tokenizer.bos_token_id, tiny_lm.tokenizer.eos_token_id
    assert (rows.tokens[rows.pos == 0] == bos).all() and not (rows.tokens[rows.pos > 0] == bos).any()
    assert ((rows.flags & int(Flags.BOS)) != 0).sum() == store.n_contexts  # one BOS a context
    assert store.spec.corpus["literal_special_tokens"] is True
    # a store from before the flag: resumed with the reading its rows have
    group = zarr.open_group(str(out), mode="r+", zarr_format=3)
    manifest = dict(group.attrs["rqae"])
    old_corpus = {k: v for k, v in manifest["spec"]["corpus"].items() if k != "literal_special_tokens"}
    group.attrs["rqae"] = {**manifest, "spec": {**manifest["spec"], "corpus": old_corpus}}
    harvest(tiny_config(out, tokens=512, dataset=str(docs), context_length=32, resume=True), lm=tiny_lm,
            progress=False)
    appended = ActivationStore.open(out).read(256, 512)
    assert (appended.tokens[appended.pos > 0] == bos).any() and (appended.tokens == eos).sum() > 8
