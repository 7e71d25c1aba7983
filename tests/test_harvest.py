import json
import os
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.harvest import harvest
from rqae_pipeline.lm import load_lm
from rqae_pipeline.store import ActivationStore, Flags, StoreLock

from helpers import HANG_GUARD_S, TINY, run_rqae, start_rqae, store_arrays, tiny_config, tree_digest, wait_until

# Small shards so a subprocess commits many times a second: 4 contexts x 32 tokens.
CLI_ARGS = ["--model", TINY, "--layer", "1", "--context-length", "32", "--batch-size", "2",
            "--contexts-per-shard", "4", "--contexts-per-chunk", "2"]


def committed_tokens(store_path) -> int:
    try:
        return json.loads((store_path / "zarr.json").read_text())["attributes"]["rqae"]["committed"]["tokens"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def start_harvest(out, tokens, *extra):
    return start_rqae("harvest", *CLI_ARGS, "--tokens", str(tokens), "--out", str(out), *extra,
                      stderr=out.parent / f"{out.name}.stderr")


def wait_for_commit(proc, out, at_least):
    wait_until(lambda: committed_tokens(out) >= at_least, proc, out.parent / f"{out.name}.stderr")


REF_TOKENS = 30_720  # whole contexts of 32 tokens (a harvest rounds up to one)


@pytest.fixture(scope="module")
def reference(tiny_lm, tmp_path_factory):
    """An uninterrupted run that interrupted runs must reproduce exactly (REF_TOKENS: ~235
    shards, each its own commit)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    harvest(tiny_config(out, tokens=REF_TOKENS), lm=tiny_lm, progress=False)
    return store_arrays(out)


def assert_same_store(path, reference):
    got = store_arrays(path)
    assert got.keys() == reference.keys()
    for name in reference:
        assert got[name].shape == reference[name].shape, name
        assert np.array_equal(got[name], reference[name]), name
    store = ActivationStore.open(path)
    assert store.group["acts"].shape[0] == store.n_tokens  # no uncommitted tail left behind


def test_kill_9_at_several_points_then_resume_equals_uninterrupted_run(tmp_path, reference, tiny_lm):
    out = tmp_path / "killed.zarr"
    kills = []
    for i, at in enumerate((1, 4_500, 12_500)):
        proc = start_harvest(out, REF_TOKENS, *(["--resume"] if i else []))
        wait_for_commit(proc, out, at)
        if i == 2:
            wait_for_new_shard_file(proc, out)  # land mid-shard as well as right after a commit
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
        kills.append(committed_tokens(out))
        assert StoreLock(out).read()  # the dead writer's lock is left behind...
    assert kills == sorted(kills) and kills[-1] < REF_TOKENS
    # ...and is detected as stale by the resuming writer.
    result = harvest(tiny_config(out, tokens=REF_TOKENS, resume=True), lm=tiny_lm, progress=False)
    assert result.tokens == REF_TOKENS and result.new_tokens == REF_TOKENS - kills[-1]
    assert_same_store(out, reference)
    assert StoreLock(out).read() is None


def wait_for_new_shard_file(proc, out):
    """Until the writer has begun a shard file past those on disk now (its rows are committed
    only when the manifest moves, after the file is written)."""

    def shard_files() -> int:
        return sum(1 for p in (out / "acts").rglob("*") if p.is_file())

    seen = shard_files()
    wait_until(lambda: shard_files() > seen, proc, out.parent / f"{out.name}.stderr")


def test_ctrl_c_commits_whole_batches_and_resume_completes(tmp_path, reference, tiny_lm):
    out = tmp_path / "sigint.zarr"
    # far more than the test waits for, so the run is still going when Ctrl-C lands
    proc = start_harvest(out, 10_000_000)
    try:
        wait_for_commit(proc, out, 1)
        first = committed_tokens(out)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_GUARD_S) == 130
    finally:
        proc.kill()  # a no-op once it has exited
    err = (tmp_path / "sigint.zarr.stderr").read_text()
    assert "rerun with --resume" in err.strip().splitlines()[-1]
    n = committed_tokens(out)
    assert n % 64 == 0  # whole batches of 2 contexts x 32 tokens
    # below the reference's 30k, so resuming to 30k must reproduce it: the Ctrl-C follows the
    # first commit by one 20 ms poll, and 30k tokens take ~20 s on a loaded 2-core machine
    assert first <= n < REF_TOKENS, (first, n)
    harvest(tiny_config(out, tokens=REF_TOKENS, resume=True), lm=tiny_lm, progress=False)
    assert_same_store(out, reference)


def test_second_writer_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "busy.zarr"
    proc = start_harvest(out, 400_000)
    try:
        wait_for_commit(proc, out, 1)
        before = committed_tokens(out)
        r = run_rqae("harvest", *CLI_ARGS, "--tokens", "1000", "--out", str(out), "--resume")
        assert r.returncode == 2
        assert r.stderr.strip().count("\n") == 0 and "being written by another process" in r.stderr
        assert committed_tokens(out) >= before and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path, tiny_lm):
    out = tmp_path / "lock.zarr"
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)
    import psutil

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {"pid": sleeper.pid, "host": os.uname().nodename, "started": psutil.Process(sleeper.pid).create_time()}
        (out / ".lock").write_text(json.dumps(live))
        with pytest.raises(RQAEError, match=f"pid {sleeper.pid}"):
            harvest(tiny_config(out, tokens=512, resume=True), lm=tiny_lm, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert ActivationStore.open(out).n_tokens == 256
    # The same lock, now naming a dead process, is stale.
    result = harvest(tiny_config(out, tokens=512, resume=True), lm=tiny_lm, progress=False)
    assert result.tokens == 512


def test_resume_with_other_settings_names_the_field_and_changes_nothing(tmp_path, tiny_lm):
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=512), lm=tiny_lm, progress=False)
    before = tree_digest(out)
    corpus_file = tmp_path / "c.txt"
    corpus_file.write_text("other text " * 200)
    cases = {
        "hook": dict(hook="0"),
        "normalisation": dict(normalisation="rms"),
        "dtype": dict(dtype="fp8"),
        "corpus": dict(dataset=str(corpus_file)),
        "context_length": dict(context_length=16),
    }
    for field, kw in cases.items():
        with pytest.raises(RQAEError, match=f"harvested with {field}="):
            harvest(tiny_config(out, tokens=1024, resume=True, **kw), lm=tiny_lm, progress=False)
    other = load_lm("tiny-random:1")
    with pytest.raises(RQAEError, match="harvested with model="):
        harvest(tiny_config(out, tokens=1024, resume=True, model="tiny-random:1"), lm=other, progress=False)
    with pytest.raises(RQAEError, match="already holds an activation store"):
        harvest(tiny_config(out, tokens=1024), lm=tiny_lm, progress=False)
    assert tree_digest(out) == before


def test_an_fp8_store_whose_first_batch_is_all_special_tokens_gets_a_finite_mean(tmp_path, tiny_lm):
    """A corpus opening with blank lines: the mean of the batch's ordinary rows was the mean
    of none, NaN, written before the first commit, and every batch of every resume failed."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n" * 40 + "a residual stream has one vector per token and layer. " * 40)
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=256, dtype="fp8", dataset=str(corpus), batch_contexts=1), lm=tiny_lm,
            progress=False)
    store = ActivationStore.open(out)
    first = store.read(0, 32)
    assert (first.flags & int(Flags.ANY_SPECIAL)).all()  # the first batch (one context): special tokens only
    assert store.n_tokens == 256 and np.isfinite(store.codec_mean()).all()
    assert torch.isfinite(store.read().acts).all()


def test_nan_activations_stop_the_harvest_and_keep_committed_rows(tmp_path):
    out = tmp_path / "nan.zarr"
    lm = load_lm(TINY)
    harvest(tiny_config(out, tokens=512), lm=lm, progress=False)
    before = store_arrays(out)
    with torch.no_grad():
        lm.model.blocks[0].mlp.W_out[0, 0] = float("nan")
    with pytest.raises(RQAEError, match="non-finite activations"):
        harvest(tiny_config(out, tokens=2048, resume=True), lm=lm, progress=False)
    after = store_arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    with pytest.raises(RQAEError, match="non-finite activations"):
        harvest(tiny_config(tmp_path / "new.zarr", tokens=512), lm=lm, progress=False)


def test_residuals_too_large_to_square_stop_the_harvest(tmp_path):
    """Finite residuals past float32's range when squared (|x| > 1.8e19) have an infinite RMS
    and would store as rows of zeros: refused like NaN/inf, with no row committed."""
    lm = load_lm(TINY)
    with torch.no_grad():
        lm.model.embed.W_E.mul_(1e20)  # blocks.0.hook_resid_pre is the embedding itself: finite, ~1e20
    out = tmp_path / "huge.zarr"
    with pytest.raises(RQAEError, match="non-finite activations .* in context 0;"):
        harvest(tiny_config(out, tokens=512, hook="blocks.0.hook_resid_pre"), lm=lm, progress=False)
    assert ActivationStore.open(out).n_tokens == 0


def test_float16_overflow_is_refused_not_stored_as_inf():
    from rqae_pipeline.shard_writer import Batch, encode_batch

    n, d = 4, 8
    acts = torch.ones(n, d)
    acts[2, 3] = 7e4  # past float16's 65504
    batch = Batch(acts=acts, scale=torch.ones(n), tokens=np.zeros(n, np.int32), seq=np.full(n, 5, np.int64),
                  pos=np.arange(n, dtype=np.int16), flags=np.zeros(n, np.uint8))
    with pytest.raises(RQAEError, match="activations overflow float16 near context 5"):
        encode_batch(batch, "float16", None)
    cols, err = encode_batch(batch, "float32", None)
    assert err.sse == 0 and err.sumsq == pytest.approx(n * d - 1 + 7e4**2) and err.n == n


def _limit_file_size():
    # Files may not grow past 4 KiB: writes of a new shard then fail as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_full_disk_is_one_clear_line_and_committed_rows_survive(tmp_path, tiny_lm):
    out = tmp_path / "full.zarr"
    harvest(tiny_config(out, tokens=512), lm=tiny_lm, progress=False)
    before = store_arrays(out)
    r = run_rqae("harvest", *CLI_ARGS, "--tokens", "4096", "--out", str(out), "--resume",
                 preexec_fn=_limit_file_size)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: out of disk space")
    after = store_arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert harvest(tiny_config(out, tokens=1024, resume=True), lm=tiny_lm, progress=False).tokens == 1024


@pytest.mark.parametrize("out", ["/proc/rqae-test.zarr", "FILE/sub.zarr"])
def test_unwritable_output_is_a_clear_error(tmp_path, tiny_lm, out):
    if out.startswith("FILE"):
        (tmp_path / "FILE").write_text("x")
        out = str(tmp_path / out)
    with pytest.raises(RQAEError, match="cannot write to|exists and is not"):
        harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)


def test_resume_of_a_finished_store_to_more_tokens_extends_it(tmp_path, tiny_lm, reference):
    out = tmp_path / "grow.zarr"
    harvest(tiny_config(out, tokens=9_000), lm=tiny_lm, progress=False)  # ends mid-shard
    harvest(tiny_config(out, tokens=REF_TOKENS, resume=True), lm=tiny_lm, progress=False)
    got = store_arrays(out)
    for name in ("tokens", "seq", "pos", "flags"):
        assert np.array_equal(got[name], reference[name]), name
    # Acts may differ in the last bits where a batch was split differently.
    np.testing.assert_allclose(got["acts"].astype(np.float32), reference["acts"].astype(np.float32), atol=2e-2)


def test_resume_deletes_the_unfinished_writes_of_a_killed_writer(tmp_path, tiny_lm):
    """A local zarr write goes to `<key>.<uuid>.partial` and is renamed over the key when
    whole; a writer killed in between leaves the temporary file, which --resume deletes (and
    nothing else of the store's)."""
    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=512), lm=tiny_lm, progress=False)
    left = [out / "acts" / "c" / "1" / f"0.{'ab' * 16}.partial", out / "flags" / "c" / f"1.{'cd' * 16}.partial"]
    for p in left:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a shard")
    kept = out / "acts" / "c" / "not-zarrs.partial"  # not zarr's temporary name: left alone
    kept.write_bytes(b"x")
    harvest(tiny_config(out, tokens=1024, resume=True), lm=tiny_lm, progress=False)
    assert not any(p.exists() for p in left) and kept.exists()
    assert ActivationStore.open(out).n_tokens == 1024


def test_a_store_names_its_tokenizer_without_a_machine_path(tmp_path, tiny_lm):
    """The tiny model's tokenizer lives in a cache directory that differs per machine (and
    with RQAE_CACHE): a store records its name, and one that recorded the whole path (before
    this) still resumes on a machine with the tokenizer elsewhere."""
    import zarr

    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)
    recorded = ActivationStore.open(out).spec.tokenizer
    assert recorded == "tiny-bpe-512-v2" and "/" not in recorded
    group = zarr.open_group(str(out), mode="r+", zarr_format=3)
    manifest = dict(group.attrs["rqae"])
    group.attrs["rqae"] = {**manifest, "spec": {**manifest["spec"], "tokenizer": "/elsewhere/cache/tiny-bpe-512-v2"}}
    harvest(tiny_config(out, tokens=512, resume=True), lm=tiny_lm, progress=False)
    assert ActivationStore.open(out).n_tokens == 512
    group.attrs["rqae"] = {**dict(group.attrs["rqae"]),
                           "spec": {**manifest["spec"], "tokenizer": "/elsewhere/cache/other-tokenizer"}}
    with pytest.raises(RQAEError, match="harvested with tokenizer="):
        harvest(tiny_config(out, tokens=768, resume=True), lm=tiny_lm, progress=False)


def test_a_run_that_planned_before_another_writer_committed_is_refused(tmp_path, tiny_lm):
    """Where to continue is read before the lock is taken (the corpus's first contexts are
    read meanwhile): a writer that commits and lets go in between must not have its contexts
    stored a second time under new numbers (was exit 0, contexts 8-11 copies of 4-7)."""
    from dataclasses import replace

    from rqae_pipeline.harvest import model_facts, open_store_for_writing, plan_harvest

    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=128), lm=tiny_lm, progress=False)
    late = tiny_config(out, tokens=512, resume=True)
    facts = model_facts(late, replace(tiny_lm, compiled_batch=0))
    spec, _, planned = plan_harvest(late, facts, tiny_lm.tokenizer, None)
    harvest(tiny_config(out, tokens=256, resume=True), lm=tiny_lm, progress=False)  # commits meanwhile
    before = tree_digest(out)
    with pytest.raises(RQAEError, match="another harvest wrote to .* while this one was starting"):
        open_store_for_writing(late, spec, facts, planned)
    assert tree_digest(out) == before and not (out / ".lock").exists()


def test_a_hook_that_is_not_a_d_model_vector_per_token_is_refused_before_any_store(tmp_path, tiny_lm):
    """An MLP hidden layer (d_mlp values a token) was stored cut to its first d_model values,
    exit 0; refused before the store exists."""
    out = tmp_path / "s.zarr"
    with pytest.raises(RQAEError, match=r"blocks.1.mlp.hook_post gives activations of shape .* not one 64-vector"):
        harvest(tiny_config(out, hook="blocks.1.mlp.hook_post", normalisation="rms"), lm=tiny_lm, progress=False)
    assert not out.exists()


def test_final_norm_mode_needs_an_rms_norm(tmp_path, tiny_lm, monkeypatch):
    """A LayerNorm also centres and adds a bias: rows labelled "final-norm" would not be its output."""
    monkeypatch.setattr(tiny_lm.model.cfg, "normalization_type", "LN")
    out = tmp_path / "s.zarr"
    with pytest.raises(RQAEError, match="final norm is LN, not an RMSNorm with a gain; use --normalisation rms"):
        harvest(tiny_config(out), lm=tiny_lm, progress=False)
    assert not out.exists()
    harvest(tiny_config(out, normalisation="rms", tokens=64), lm=tiny_lm, progress=False)  # rms mode needs no gain


def test_an_unavailable_device_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "s.zarr"
    for device, message in (("cuda:7", "--device cuda:7: no CUDA device"), ("foo", "unknown device 'foo'")):
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        proc = run_rqae("harvest", "--model", TINY, "--layer", "1", "--tokens", "64", "--context-length", "32",
                        "--device", device, "--out", str(out))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not out.exists()
