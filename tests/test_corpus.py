import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rqae_pipeline import RQAEError
from rqae_pipeline.corpus import CorpusState, iter_contexts, parse_corpus

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


def test_state_is_a_plain_position(tiny_lm, local_files):
    spec = parse_corpus(str(local_files / "a.jsonl"))
    states = [s for _, s in take(spec, tiny_lm.tokenizer, context_length=16)]
    assert states == sorted(states, key=lambda s: (s.doc_index, s.token_offset))
    assert all(isinstance(s, CorpusState) for s in states)
