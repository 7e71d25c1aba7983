"""Store integrity: checksummed chunks, missing shards, `rqae verify`, and an atomic writer lock.

The tiny store has 1024 rows in 8 shards of 128 rows (4 contexts of 32 tokens); a shard of a
2-D array is the file `<array>/c/<i>/0`, of a 1-D array `<array>/c/<i>`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from rqae_pipeline import RQAEError
from rqae_pipeline.harvest import harvest
from rqae_pipeline.store import ActivationStore, StoreLock

from helpers import run_rqae, store_arrays, tiny_config, tiny_rqae


@pytest.fixture(scope="module")
def intact(tmp_path_factory, tiny_lm):
    out = tmp_path_factory.mktemp("integrity") / "store.zarr"
    harvest(tiny_config(out), lm=tiny_lm, progress=False)
    return out


@pytest.fixture()
def copy(intact, tmp_path):
    dst = tmp_path / "store.zarr"
    shutil.copytree(intact, dst)
    return dst


def _one_clean_error(proc, *must_name: str) -> str:
    """The CLI failed with exit 2 and printed exactly one `error:` line naming each of `must_name`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, proc.stderr[-2000:]
    for name in must_name:
        assert name in errors[0], (name, errors[0])
    assert "Traceback" not in proc.stderr and "Task was destroyed" not in proc.stderr
    return errors[0]


def _train(store, out, *extra):
    return run_rqae("train", "--store", str(store), "--out", str(out), "--n-q", "4", "--tokens", "512",
                    "--batch-size", "64", "--device", "cpu", *extra)


# --------------------------------------------------------------------------- item 1: missing shards


def test_a_missing_shard_is_an_error_not_zeros(copy):
    (copy / "acts" / "c" / "3" / "0").unlink()
    store = ActivationStore.open(copy)
    with pytest.raises(RQAEError, match=r"acts.*c/3/0.*missing"):
        store.read()
    with pytest.raises(RQAEError, match=r"c/3/0"):
        store.read_acts(3 * 128 + 5, 3 * 128 + 9)
    with pytest.raises(RQAEError, match=r"c/3/0"):
        list(store.batches(64))
    assert store.read(0, 3 * 128).acts.shape == (384, store.d)  # intact shards still read


def test_the_dask_view_checks_each_chunk_when_it_is_computed(copy):
    """A shard deleted after the dask graph is built is an error when computed, not zeros."""
    store = ActivationStore.open(copy)
    arrays = store.dask()
    np.testing.assert_array_equal(arrays["acts"][:256].compute(), store.read_encoded(0, 256)["acts"])
    (copy / "acts" / "c" / "3" / "0").unlink()
    assert arrays["acts"][:384].compute().shape == (384, store.d)  # the shards before it still read
    with pytest.raises(RQAEError, match=r"acts.*c/3/0.*missing"):
        arrays["acts"].sum().compute()
    with pytest.raises(RQAEError, match=r"acts.*c/3/0.*missing"):
        store.dask()  # and a new view is refused at once


def test_an_empty_shard_file_is_an_error_not_zeros(copy):
    """A shard file with no bytes (a write that never reached the disk) reads as zeros in
    zarr just as a missing one does; reads refuse it and `rqae verify` names it."""
    (copy / "scale" / "c" / "2").write_bytes(b"")
    store = ActivationStore.open(copy)
    with pytest.raises(RQAEError, match=r"array scale: shard file .*scale/c/2 is empty"):
        store.read(2 * 128, 2 * 128 + 4)
    assert store.read(0, 2 * 128).acts.shape == (256, store.d)
    r = run_rqae("verify", str(copy), "--no-progress")
    assert r.returncode == 1 and "scale/c/2: shard file empty" in r.stdout + r.stderr, r.stdout + r.stderr


def test_rows_committed_past_an_arrays_end_are_an_error_not_fewer_rows(copy):
    """A manifest committing more rows than an array holds (a copy taken mid-write): zarr
    would return the shorter array's rows without complaint."""
    import zarr

    n = ActivationStore.open(copy).n_tokens
    zarr.open_group(str(copy), mode="r+")["tokens"].resize((n - 100,))
    store = ActivationStore.open(copy)
    with pytest.raises(RQAEError, match=rf"array tokens holds {n - 100:,} rows, not the {n:,} asked for"):
        store.read()
    with pytest.raises(RQAEError, match="array tokens holds"):
        store.check_shards()
    assert store.read(0, 128).tokens.shape == (128,)


def test_train_and_encode_refuse_a_store_with_a_missing_shard(copy, tmp_path):
    model = tiny_rqae(copy, tmp_path / "rqae", n_q=4, init_rows=256)
    (copy / "flags" / "c" / "5").unlink()
    run = tmp_path / "run"
    _one_clean_error(_train(copy, run), str(copy), "flags", "c/5")
    assert not run.exists()  # no half-made run directory
    _one_clean_error(run_rqae("encode", "--store", str(copy), "--model", str(model), "--device", "cpu",
                              "--out", str(tmp_path / "codes.zarr")), str(copy), "flags", "c/5")


# --------------------------------------------------------------------------- item 2: checksums


def _scribble(path, offset: int, n: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def test_garbage_inside_a_chunk_is_detected(copy, tmp_path):
    _scribble(copy / "acts" / "c" / "2" / "0", 200)  # inside the first chunk; the index at the end is intact
    store = ActivationStore.open(copy)
    with pytest.raises(RQAEError, match=r"acts.*c/2/0.*checksum"):
        store.read()
    with pytest.raises(RQAEError, match=r"c/2/0"):
        store.read_rows(np.array([1, 2 * 128 + 3, 900]))
    run = tmp_path / "run"
    _one_clean_error(_train(copy, run), str(copy), "acts", "c/2/0")
    assert not run.exists()


def _in_memory_fs(local, name: str) -> str:
    """A copy of a local store in fsspec's in-memory object store (no rename, like a bucket)."""
    import fsspec

    fsspec.filesystem("memory").put(str(local), f"/{name}", recursive=True)
    return f"memory://{name}"


def test_an_object_store_reader_reads_the_local_batches(intact):
    """From an object store a reader requests a buffer's chunk spans concurrently
    (`ActivationStore.read_spans_encoded`); the batches are the local store's, row for row."""
    url = _in_memory_fs(intact, "integrity-intact")
    local, remote = ActivationStore.open(intact), ActivationStore.open(url)
    pairs = zip(local.batches(64, seed=1, buffer_rows=256, return_rows=True),
                remote.batches(64, seed=1, buffer_rows=256, return_rows=True), strict=True)
    for (a, rows_a), (b, rows_b) in pairs:
        assert np.array_equal(rows_a.numpy(), rows_b.numpy()) and np.array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("damage", ["missing", "checksum"])
def test_an_object_store_reader_names_a_missing_or_damaged_shard(intact, damage):
    import fsspec

    fs, url = fsspec.filesystem("memory"), _in_memory_fs(intact, f"integrity-{damage}")
    key = f"/integrity-{damage}/acts/c/3/0"
    if damage == "missing":
        fs.rm(key)
    else:  # garbage inside the first chunk; the shard index at the end stays intact
        data = bytearray(fs.cat(key))
        data[200:240] = np.random.default_rng(0).integers(0, 256, 40, dtype=np.uint8).tobytes()
        fs.pipe(key, bytes(data))
    with pytest.raises(RQAEError, match=rf"acts.*c/3/0.*{damage}"):
        list(ActivationStore.open(url).batches(64, seed=1, buffer_rows=256))


@pytest.mark.parametrize("rows,lists", [(10 * 16384, True), (2 * 10**9, False)])
def test_a_remote_shard_check_lists_only_when_that_takes_fewer_requests(monkeypatch, rows, lists):
    """Five shards of a 10-shard array: one listing. Five of a 2B-row array (122k shards, a
    122-page listing): a request each, as a reader's shuffle buffer of a large store asks."""
    import zarr

    from rqae_pipeline import integrity

    name = f"listing-{rows}"
    arr = zarr.create_array(store=f"memory://{name}", name="acts", shape=(rows, 4), chunks=(1024, 4),
                            shards=(16384, 4), dtype="float16")
    arr[: 2 * 16384] = 1  # shards 0 and 1 exist
    listed = []
    real = integrity.sizes_under
    monkeypatch.setattr(integrity, "sizes_under", lambda *a: listed.append(a) or real(*a))
    missing = integrity.missing_shards(f"memory://{name}", arr, "acts", [0, 1, 5, 6, 7])
    assert missing == [f"acts/c/{i}/0" for i in (5, 6, 7)]
    assert bool(listed) == lists


def test_an_all_zero_shard_is_written_not_skipped(copy):
    store = ActivationStore.open(copy).reopen_for_append()
    cols = store.read_encoded(0, 128)
    store.write_rows(0, {**cols, "flags": np.zeros(128, np.uint8)})  # zarr skips all-fill shards by default
    assert (copy / "flags" / "c" / "0").is_file()
    assert (ActivationStore.open(copy).read(0, 128).flags == 0).all()


def test_every_row_array_is_checksummed(intact):
    for name in ("acts", "scale", "tokens", "seq", "pos", "flags", "gain"):
        meta = json.loads((intact / name / "zarr.json").read_text())
        assert "crc32c" in json.dumps(meta["codecs"]), name


def test_a_store_written_without_checksums_still_reads_identically(intact, tmp_path, tiny_lm, monkeypatch):
    from zarr.codecs import BloscCodec

    from rqae_pipeline import codec

    old = tmp_path / "old.zarr"
    without_crc = [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")]  # the codecs before checksums
    monkeypatch.setattr(codec, "compressors", lambda dtype: without_crc)
    harvest(tiny_config(old), lm=tiny_lm, progress=False)
    monkeypatch.undo()
    assert "crc32c" not in json.dumps(json.loads((old / "acts" / "zarr.json").read_text())["codecs"][0]
                                      ["configuration"]["codecs"])
    want, got = store_arrays(intact), store_arrays(old)
    assert all(np.array_equal(want[k], got[k]) for k in want)
    from rqae_pipeline.verify import verify_store

    report = verify_store(ActivationStore.open(old))
    assert report.ok and "acts" in report.unchecksummed


# --------------------------------------------------------------------------- item 3: rqae verify


def test_verify_passes_an_intact_store(intact):
    proc = run_rqae("verify", str(intact))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout.lower() and "1,024" in proc.stdout


def test_verify_names_every_damaged_shard_and_exits_1(copy):
    (copy / "acts" / "c" / "3" / "0").unlink()
    _scribble(copy / "scale" / "c" / "6", 20)
    shard = copy / "tokens" / "c" / "1"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = run_rqae("verify", str(copy))
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    for bad in ("acts/c/3/0", "scale/c/6", "tokens/c/1"):
        assert bad in proc.stdout, (bad, proc.stdout)
    assert "Traceback" not in proc.stderr and "Task was destroyed" not in proc.stderr


def test_verify_checks_counts_finiteness_and_flags(copy):
    import zarr

    from rqae_pipeline.verify import verify_store

    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    group["acts"][10, 3] = np.inf  # rewritten with a valid checksum: damage only the content check sees
    group["flags"][40] = 128  # an undefined bit
    group["pos"][70] = 5  # pos must be the row's place in its context
    report = verify_store(ActivationStore.open(copy))
    text = "\n".join(report.problems)
    assert not report.ok
    assert "non-finite" in text and "acts" in text
    assert "flags" in text and "pos" in text


@pytest.mark.parametrize("edit, message", [
    ({"committed.contexts": 31}, "commits 1,024 rows as 31 contexts of 32 rows"),  # a held-out split mid-context
    ({"committed.tokens": -32, "committed.contexts": -1}, "commits -32 rows as -1 contexts"),
    ({"committed.tokens": True, "committed.contexts": True}, "committed.tokens is missing or not of type int"),
    ({"spec.skip_bos": "false"}, "skip_bos 'false' is not of type bool"),  # a string: true, 31 rows a context
    ({"spec.context_length": 32.0}, "context_length 32.0 is not of type int"),
])
def test_a_commit_record_or_spec_edited_out_of_shape_is_one_error_line_for_every_reader(copy, edit, message):
    import zarr

    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    manifest = json.loads(json.dumps(group.attrs["rqae"]))
    for key, value in edit.items():
        block, field = key.split(".")
        manifest[block][field] = value
    group.attrs["rqae"] = manifest
    with pytest.raises(RQAEError, match=message):
        ActivationStore.open(copy)
    _one_clean_error(run_rqae("verify", str(copy)), message.split(" is ")[0])
    _one_clean_error(_train(copy, copy.parent / "run"), message.split(" is ")[0])


@pytest.mark.parametrize("array, dtype", [("acts", "int16"), ("scale", "int32"), ("gain", "int32")])
def test_an_array_whose_dtype_was_edited_to_one_of_the_same_width_is_refused_not_read(copy, array, dtype):
    """int16 bits read as float16 rows (or an int32 scale or gain) are numbers with exit 0:
    every reader compares an array's dtype with the manifest's, and verify says which."""
    meta = copy / array / "zarr.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "data_type": dtype}))
    if array == "gain":  # read for raw-space numbers (eval, steer), not by train
        with pytest.raises(RQAEError, match="gain: dtype int32, the manifest's float16 store holds float32"):
            ActivationStore.open(copy).gain.sum()
    else:
        assert "holds float" in _one_clean_error(_train(copy, copy.parent / "run"), f"{array}: dtype {dtype}")
    proc = run_rqae("verify", str(copy))
    assert proc.returncode == 1 and f"{array}: dtype {dtype}" in proc.stdout, proc.stdout


def test_an_arrays_metadata_cut_short_is_one_error_line_for_a_reader(copy):
    meta = copy / "flags" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    _one_clean_error(_train(copy, copy.parent / "run"), "array 'flags' metadata cannot be read")


def test_resume_refuses_a_commit_past_an_arrays_end_and_changes_nothing(copy, tiny_lm):
    """Growing the arrays to the manifest's count would commit their fill value, zeros, as rows."""
    import zarr

    from helpers import tree_digest

    n = ActivationStore.open(copy).n_tokens
    acts = zarr.open_group(str(copy), mode="r+")["acts"]
    acts.resize((n - 64,) + acts.shape[1:])
    before = tree_digest(copy)
    with pytest.raises(RQAEError, match=rf"commits {n:,} rows but acts \({n - 64:,}\) hold fewer"):
        harvest(tiny_config(copy, tokens=n + 256, resume=True), lm=tiny_lm, progress=False)
    assert tree_digest(copy) == before


def test_verify_checks_each_arrays_dtype_and_readable_metadata(copy):
    """A manifest edited to another dtype would read float16 rows as float32 ones (all of
    verify's other checks pass); an array's zarr.json cut short is a problem, not a traceback."""
    import zarr

    from rqae_pipeline.verify import verify_store

    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    manifest = dict(group.attrs["rqae"])
    group.attrs["rqae"] = {**manifest, "spec": {**manifest["spec"], "dtype": "float32"}}
    problems = verify_store(ActivationStore.open(copy)).problems
    assert problems == ["acts: dtype float16, the manifest's float32 store holds float32"], problems
    group.attrs["rqae"] = manifest
    meta = copy / "scale" / "zarr.json"
    meta.write_text(meta.read_text()[:40])
    proc = run_rqae("verify", str(copy))
    assert proc.returncode == 1 and "scale: array metadata cannot be read" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr


def test_inspect_counts_the_committed_rows_bytes_and_names_the_rest(copy):
    """Shards past the commit (a killed writer's, a copy's) are not the store's B/token, and a
    non-finite scale makes raw rows non-finite: `inspect` must not say "all finite"."""
    import json

    import zarr

    from rqae_pipeline.summary import summarise

    before = summarise(ActivationStore.open(copy))
    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    manifest = dict(group.attrs["rqae"])
    group.attrs["rqae"] = {**manifest, "committed": {**manifest["committed"], "tokens": 512, "contexts": 16}}
    half = summarise(ActivationStore.open(copy))
    assert half["bytes_per_token"] == pytest.approx(before["bytes_per_token"], rel=0.1)  # was about 2x
    assert half["bytes_uncommitted"] > 0.4 * before["bytes_on_disk"] and before["bytes_uncommitted"] == 0
    group.attrs["rqae"] = manifest
    group["scale"][5] = np.inf
    assert not summarise(ActivationStore.open(copy), sample_rows=1024)["sample"]["finite"]
    shown = json.loads(run_rqae("inspect", "--json", str(copy)).stdout)  # strict JSON: no bare NaN/Infinity
    assert shown["sample"]["finite"] is False


def test_a_store_missing_an_array_or_its_commit_record_is_one_error_line(copy):
    import zarr

    shutil.rmtree(copy / "acts")
    shown = run_rqae("inspect", str(copy))  # what it can show, then exit 1 (damaged), as verify
    assert shown.returncode == 1 and "unreadable: " in shown.stdout and "array 'acts' is missing" in shown.stdout
    assert "Traceback" not in shown.stderr
    _one_clean_error(_train(copy, copy.parent / "run"), "array 'acts' is missing")
    group = zarr.open_group(str(copy), mode="r+", zarr_format=3)
    manifest = dict(group.attrs["rqae"])
    group.attrs["rqae"] = {k: v for k, v in manifest.items() if k != "committed"}
    _one_clean_error(run_rqae("inspect", str(copy)), "committed.tokens is missing")


def test_verify_help_states_the_exit_status():
    proc = run_rqae("verify", "--help")
    assert proc.returncode == 0 and "exit" in proc.stdout.lower() and "1" in proc.stdout


def test_a_shard_rebuilt_from_a_scratch_harvest_repairs_the_store(copy, tmp_path, tiny_lm):
    """The documented repair: the settings `inspect` prints, harvested up to the damaged shard
    into a scratch store, and that shard's file of every row array copied over."""
    import json
    import shlex

    from rqae_pipeline.verify import verify_store

    want = store_arrays(copy)
    (copy / "acts" / "c" / "3" / "0").unlink()
    inspected = run_rqae("inspect", "--json", str(copy))
    shown = json.loads(inspected.stdout)  # a damaged store still shows its settings, and exits 1
    assert inspected.returncode == 1 and "acts/c/3/0 is missing" in shown["sample_error"]
    scratch = tmp_path / "scratch.zarr"
    command = shlex.split(shown["harvest_command"])[1:]  # after "rqae"
    proc = run_rqae(*command, "--out", str(scratch), "--tokens", str(4 * shown["rows_per_shard"]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("acts", "scale", "tokens", "seq", "pos", "flags"):
        shard = "3/0" if name == "acts" else "3"
        shutil.copyfile(scratch / name / "c" / shard, copy / name / "c" / shard)
    assert verify_store(ActivationStore.open(copy)).ok
    got = store_arrays(copy)
    assert all(np.array_equal(want[k], got[k]) for k in want)
    # a shard copied to the wrong place: its seq/pos say so
    for name in ("acts", "scale", "tokens", "seq", "pos", "flags"):
        shard, other = ("3/0", "2/0") if name == "acts" else ("3", "2")
        shutil.copyfile(scratch / name / "c" / other, copy / name / "c" / shard)
    assert not verify_store(ActivationStore.open(copy)).ok


# --------------------------------------------------------------------------- item 4: truncated shard


def test_a_truncated_shard_is_one_line_and_no_run_directory(copy, tmp_path):
    shard = copy / "acts" / "c" / "1" / "0"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run = tmp_path / "run"
    _one_clean_error(_train(copy, run), str(copy), "acts", "c/1/0")
    assert not run.exists()


# --------------------------------------------------------------------------- item 5: the lock


def _race(root: str, barrier, done, results) -> None:
    from pathlib import Path

    barrier.wait()
    try:
        StoreLock(Path(root)).acquire()
        results.put(1)
    except RQAEError:
        results.put(0)
    done.wait()  # the winner stays alive (its lock live) until everyone has tried


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock"])
def test_exactly_one_of_many_racing_processes_gets_the_lock(tmp_path, stale):
    ctx = mp.get_context("fork")
    n_proc, trials = 6, 12
    dead = _dead_pid()
    for trial in range(trials):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        if stale:
            (root / ".lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": 0.0}))
        barrier, done, results = ctx.Barrier(n_proc), ctx.Barrier(n_proc), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(root), barrier, done, results)) for _ in range(n_proc)]
        for p in procs:
            p.start()
        won = sum(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        assert won == 1, f"trial {trial}: {won} processes hold the lock"
        assert [p.name for p in root.iterdir()] == [".lock"]  # no temp files left behind


def test_a_lock_that_is_not_json_is_refused(tmp_path):
    (tmp_path / ".lock").write_text("{not json")
    with pytest.raises(RQAEError, match="not valid JSON"):
        StoreLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == "{not json"


def test_release_leaves_a_lock_it_does_not_own(tmp_path):
    lock = StoreLock(tmp_path)
    lock.acquire()
    other = {"pid": os.getpid(), "host": socket.gethostname(), "started": 1.0}  # same pid, another process
    (tmp_path / ".lock").write_text(json.dumps(other))
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text()) == other


def test_a_cache_that_two_processes_want_at_once_is_built_once(tmp_path):
    """The converted Gemma (minutes) and the tiny tokenizer are built through ensure_built: a
    second caller, e.g. a parallel test worker on a fresh machine, waits for the first's build
    instead of converting again and racing it to the swap."""
    import threading
    import time

    from rqae_pipeline.io import ensure_built, staging_dir, swap_in

    builds = []

    def build(out):
        builds.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other caller to arrive while this one builds
        tmp = staging_dir(out)
        (tmp / "weights").write_text(str(len(builds)))
        swap_in(tmp, out)

    callers = [threading.Thread(target=ensure_built, args=(tmp_path / "cache", "weights", build)) for _ in range(2)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert len(builds) == 1
    assert (tmp_path / "cache" / "weights").read_text() == "1"
    ensure_built(tmp_path / "cache", "weights", build)  # built: nothing to do
    assert len(builds) == 1
