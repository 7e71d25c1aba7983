"""Bad inputs through the real CLI (issue #10, items 6-14): every refusal is exit 2, one
`error:` line, no traceback, and leaves every file that was there byte-identical."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from rqae_pipeline.corpus import CorpusState, iter_contexts, parse_corpus
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.store import ROW_ARRAYS, ActivationStore
from rqae_pipeline.train import TrainConfig, train

from helpers import REPO, TINY, command_env, rqae_cmd, run_rqae, tiny_config, tree_digest

SMALL = ["--model", TINY, "--layer", "1", "--context-length", "32", "--batch-size", "2",
         "--contexts-per-shard", "4", "--contexts-per-chunk", "2", "--tokens", "256"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_lm):
    """Shared inputs: a store, a trained run, broken copies of both, and bad corpora."""
    import shutil

    root = tmp_path_factory.mktemp("attacks")
    harvest(tiny_config(root / "s.zarr", tokens=1024), lm=tiny_lm, progress=False)
    spec = ModelSpec(arch="rqae", d_in=64, n_q=4, lr=3e-3)
    train(TrainConfig(store=root / "s.zarr", out=root / "run", model=spec, batch_size=64, tokens=64 * 4,
                      heldout_fraction=0.25, checkpoint_every=2), progress=False)
    for name in ("corrupt_ckpt", "wrong_d_in", "truncated"):
        shutil.copytree(root / "run", root / name)
    (root / "corrupt_ckpt/checkpoint.pt").write_bytes((root / "run/checkpoint.pt").read_bytes()[:100])
    cfg = json.loads((root / "wrong_d_in/config.json").read_text())
    (root / "wrong_d_in/config.json").write_text(json.dumps({**cfg, "d_in": 32}))
    (root / "truncated/model.safetensors").write_bytes((root / "run/model.safetensors").read_bytes()[:300])
    harvest(tiny_config(root / "nan.zarr", tokens=1024, dtype="float32"), lm=tiny_lm, progress=False)
    nan = ActivationStore.open(root / "nan.zarr").reopen_for_append()
    cols = nan.read_encoded(0, 64)
    cols["acts"][[5, 40]] = np.nan
    nan.write_rows(0, cols)
    (root / "blank.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", "\n\n"] * 300))
    (root / "null.jsonl").write_text(json.dumps({"text": None}) + "\n" + json.dumps({"text": "some words"}) + "\n")
    (root / "garbage.jsonl").write_text("this is {not json\n")
    shutil.copytree(root / "s.zarr", root / "damaged.zarr")
    shard = root / "damaged.zarr/acts/c/1/0"
    data = bytearray(shard.read_bytes())
    data[100:140] = bytes(b ^ 0xFF for b in data[100:140])  # inside a chunk; the shard index intact
    shard.write_bytes(bytes(data))
    return root


PROGRESS = re.compile(r"^[\w ]+: +\d+%\|")  # a tqdm bar drawn before the bad rows were reached

ROWS = {  # id: (arguments, words the error line must contain); "{r}" is the shared root
    "batch-size-0": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--batch-size", "0"], "--batch-size"),
    "contexts-per-shard-0": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--contexts-per-shard", "0"],
                             "--contexts-per-shard"),
    "tokens-1e23": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--tokens", "1e23"], "--tokens"),
    "tokens-huge": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--tokens", str(10**17)], "--tokens"),
    "blank-corpus": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--dataset", "{r}/blank.jsonl"], "no text"),
    "null-text": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--dataset", "{r}/null.jsonl"], "null"),
    "garbage-jsonl": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--dataset", "{r}/garbage.jsonl"], "JSON"),
    "dataset-wont-open": (["harvest", "--out", "{r}/new.zarr", *SMALL, "--dataset", "no-such-org/no-such-set"],
                          "cannot open dataset"),
    "corrupt-checkpoint": (["train", "--store", "{r}/s.zarr", "--out", "{r}/corrupt_ckpt", "--n-q", "4",
                            "--batch-size", "64", "--tokens", "512", "--heldout", "0.25", "--checkpoint-every",
                            "2", "--lr", "3e-3", "--resume"], "checkpoint.pt is damaged"),
    "wrong-d-in": (["eval", "--store", "{r}/s.zarr", "--model", "{r}/wrong_d_in"], "does not fit its config.json"),
    "truncated-weights": (["eval", "--store", "{r}/s.zarr", "--model", "{r}/truncated"], "truncated"),
    "workers-negative": (["eval", "--store", "{r}/s.zarr", "--model", "{r}/run", "--workers", "-1"], "--workers"),
    "nan-rows": (["train", "--store", "{r}/nan.zarr", "--out", "{r}/nan_run", "--n-q", "4", "--batch-size", "64",
                  "--tokens", "2048"], "row(s) 5, 40"),  # two epochs: the bad rows are drawn
    "damaged-shard-train": (["train", "--store", "{r}/damaged.zarr", "--out", "{r}/damaged_run", "--n-q", "4",
                             "--batch-size", "64", "--tokens", "512"], "acts/c/1/0 is damaged"),
    # the worker's own error log must not print the traceback beside the client's one line
    "damaged-shard-eval-on-dask": (["eval", "--store", "{r}/damaged.zarr", "--model", "{r}/run", "--rows", "all",
                                    "--workers", "1"], "acts/c/1/0 is damaged"),
    "layers-not-ints": (["feature-dictionary", "--store", "{r}/s.zarr", "--model", "{r}/run", "--out",
                         "{r}/d.json", "--layers", "a,b"], "--layers"),
    "search-layers-not-int": (["search", "--store", "{r}/s.zarr", "--model", "{r}/run", "--address", "0:1",
                               "--layers", "a,b"], "--layers"),
}


@pytest.mark.parametrize("row", list(ROWS))
def test_attack_is_refused_cleanly(root, row):
    args, needle = ROWS[row]
    before = tree_digest(root)
    r = run_rqae(*(a.replace("{r}", str(root)) for a in args), timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert lines == errors, r.stderr[-3000:]  # nothing but the one line (no stray log lines)
    after = tree_digest(root)
    assert {k: after.get(k) for k in before} == before
    assert not (root / "new.zarr").exists()  # a refused harvest makes no store


def test_corpus_that_runs_out_exits_3_and_the_store_says_so(tmp_path):
    (tmp_path / "short.txt").write_text("hello world " * 60 + "\n")
    out = tmp_path / "s.zarr"
    r = run_rqae("harvest", "--out", str(out), *SMALL[:-1], "1024", "--dataset", str(tmp_path / "short.txt"))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "the corpus ran out" in r.stderr
    store = ActivationStore.open(out)
    assert 0 < store.n_tokens < 1024 and store.manifest["corpus_exhausted"] == {"requested_tokens": 1024}
    # the arrays were sized for the 1,024 tokens asked for, then cut back to what was committed
    assert all(store.group[name].shape[0] == store.n_tokens for name in ROW_ARRAYS)
    shown = run_rqae("inspect", str(out))
    assert shown.returncode == 0 and "ran out before the 1,024 tokens" in shown.stdout


def test_resume_without_a_store_says_it_starts_one(tmp_path):
    out = tmp_path / "s.zarr"
    r = run_rqae("harvest", "--out", str(out), *SMALL[:-1], "128", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"note: {out} holds no store yet; --resume starts a new one" in r.stderr
    assert ActivationStore.open(out).n_tokens == 128


def _whole_document_contexts(spec, tok, context_length):
    """The packing as it was before documents were tokenised in pieces (each document whole)."""
    from rqae_pipeline.corpus import open_documents

    body, buf, lengths, doc, off = context_length - 1, [], [], 0, 0
    for row in open_documents(spec):
        ids = tok(row[spec.text_field], add_special_tokens=False, verbose=False)["input_ids"]
        buf += list(ids) + [tok.eos_token_id]
        lengths.append(len(ids) + 1)
        while len(buf) >= body:
            ctx, buf, n = [tok.bos_token_id] + buf[:body], buf[body:], body
            while n or (lengths and lengths[0] == 0):
                take = min(n, lengths[0])
                lengths[0], n, off = lengths[0] - take, n - take, off + take
                if lengths[0] == 0:
                    lengths.pop(0)
                    doc, off = doc + 1, 0
            yield ctx, CorpusState(doc, off)


@pytest.mark.parametrize("context_length", [32, 128])
def test_ordinary_documents_pack_exactly_as_before(tmp_path, tiny_lm, context_length):
    """Same contexts and the same resume positions as whole-document tokenisation, so an
    ordinary corpus still gives a byte-identical store (blank lines and short docs included)."""
    (tmp_path / "c.txt").write_text("A first line.\n\n  indented\nlast words here\n" * 40)
    for name in ("builtin:python-docs", str(tmp_path / "c.txt")):
        spec = parse_corpus(name)
        new = list(iter_contexts(spec, tiny_lm.tokenizer, context_length=context_length))
        old = list(_whole_document_contexts(spec, tiny_lm.tokenizer, context_length))
        assert len(new) == len(old) > 5
        assert all(list(a) == b and s == t for (a, s), (b, t) in zip(new, old, strict=True))


def _peak_rss_mb(*args: str) -> float:
    env = command_env()
    proc = subprocess.Popen(rqae_cmd(*args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()[-2000:]
    return usage.ru_maxrss / 1024  # KiB on Linux


def test_one_huge_line_does_not_grow_memory(tmp_path):
    """A 24 MB single-line document: peak RSS stays within a small margin of a short line's
    (whole-document tokenisation took gigabytes and minutes for such a line)."""
    words = np.random.default_rng(0).choice(["alpha", "beta", "gamma", "delta", "epsilon"], 4_000_000)
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": " ".join(words)}) + "\n")
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": " ".join(words[:20_000])}) + "\n")
    peaks = {name: _peak_rss_mb("harvest", "--out", str(tmp_path / f"{name}.zarr"), *SMALL, "--dataset",
                                str(tmp_path / f"{name}.jsonl")) for name in ("small", "big")}
    assert peaks["big"] - peaks["small"] < 200, peaks
