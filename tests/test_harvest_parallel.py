"""`rqae harvest --workers N / --scheduler`: shards harvested on dask workers make the store the
single process makes, byte for byte, through worker deaths and a killed client.

Byte-identical is checked on every file of the two store directories; the manifest's
`created` timestamp is the one field masked. CPU results can depend on torch's thread
count, so the single-process references run with one torch thread, as the workers do."""

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from rqae_pipeline import RQAEError, harvest_dask
from rqae_pipeline.forward import worker_device
from rqae_pipeline.harvest import harvest
from rqae_pipeline.harvest_dask import DaskConfig, harvest_parallel
from rqae_pipeline.shard_writer import RESERVE_SHARDS
from rqae_pipeline.store import ActivationStore, StoreLock

from helpers import HANG_GUARD_S, TINY, run_rqae, start_rqae, store_files, tiny_config, wait_until

TWO = DaskConfig(workers=2, threads_per_worker=1)
LONG = 12_000  # tokens: 94 shards of 4 contexts x 32 tokens, long enough to kill something mid-run
SHORT = 3_000
# the short stores' settings: the store dtype, a bfloat16 forward (its forward_error measured by a
# worker), and a torch.compile forward (compiled in each worker)
SHORT_STORES = {"short-float16": {"dtype": "float16"}, "short-fp8": {"dtype": "fp8"},
                "short-bf16-forward": {"dtype": "float16", "model_dtype": "bfloat16"},
                "short-compiled-forward": {"dtype": "float16", "compile": True}}
CLI_ARGS = ["--model", TINY, "--layer", "1", "--context-length", "32", "--batch-size", "2",
            "--contexts-per-shard", "4", "--contexts-per-chunk", "2"]


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of two single-threaded worker processes for the whole file."""
    from dask.distributed import Client

    from rqae_pipeline.tasks import local_cluster

    cluster = local_cluster(2)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_the_local_clusters_workers_ignore_sigint_and_this_process_keeps_its_handler(client):
    """A Ctrl-C reaches the terminal's whole process group: the workers leave it to this
    process (which closes the cluster and prints one line) instead of each printing a
    traceback. This process's own handler is back once the cluster has started."""
    import signal

    assert set(client.run(signal.getsignal, signal.SIGINT).values()) == {signal.SIG_IGN}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.fixture(scope="module")
def single(tiny_lm, tmp_path_factory):
    """Single-process stores (one torch thread) that the parallel runs must reproduce."""
    root = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        harvest(tiny_config(root / "long", tokens=LONG), lm=tiny_lm, progress=False)
        for name, settings in SHORT_STORES.items():
            lm = None if "model_dtype" in settings else tiny_lm  # the bfloat16 model is loaded by harvest
            harvest(tiny_config(root / name, tokens=SHORT, **settings), lm=lm, progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def assert_identical(path: Path, reference: Path) -> None:
    got, want = store_files(path), store_files(reference)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, differ[:5]


def committed_tokens(path: Path) -> int:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"]["rqae"]["committed"]["tokens"]
    except (FileNotFoundError, KeyError, ValueError):
        return 0


@pytest.mark.parametrize("name", list(SHORT_STORES))
def test_two_workers_write_the_single_process_store_byte_for_byte(tmp_path, client, single, name):
    out = tmp_path / "par.zarr"
    result = harvest_parallel(tiny_config(out, tokens=SHORT, **SHORT_STORES[name]), TWO, client=client,
                              progress=False)
    assert result.tokens == result.new_tokens == ActivationStore.open(out).n_tokens >= SHORT
    assert not (out / ".lock").exists()
    assert_identical(out, single / name)
    forward = ActivationStore.open(out).manifest["forward_error"]
    assert forward["model_dtype"] == SHORT_STORES[name].get("model_dtype", "float32")
    assert forward.get("compiled", False) == SHORT_STORES[name].get("compile", False)


def test_the_client_keeps_the_tokenizer_between_harvests(tmp_path, client, single):
    """A second harvest of one model in the process packs with the tokenizer the first one
    received (it is not sent again), and its store is still the single process's."""
    harvest_parallel(tiny_config(tmp_path / "first.zarr", tokens=256, dtype="float16"), TWO, client=client,
                     progress=False)
    kept = harvest_dask._CLIENT_TOKENIZERS[TINY]
    assert kept is not None
    harvest_parallel(tiny_config(tmp_path / "second.zarr", tokens=SHORT, dtype="float16"), TWO, client=client,
                     progress=False)
    assert harvest_dask._CLIENT_TOKENIZERS[TINY] is kept
    assert_identical(tmp_path / "second.zarr", single / "short-float16")


def test_a_worker_killed_mid_run_is_retried_and_the_store_is_unchanged(tmp_path, client, single):
    client.wait_for_workers(2)
    out = tmp_path / "worker-killed.zarr"
    before = client.run(os.getpid)
    killed = {}

    def kill_one_worker():
        while committed_tokens(out) < 128:  # the first shard is committed: the run is under way
            time.sleep(0.01)
        killed["at"] = committed_tokens(out)
        os.kill(next(iter(before.values())), signal.SIGKILL)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    result = harvest_parallel(tiny_config(out, tokens=LONG), TWO, client=client, progress=False)
    killer.join(timeout=5)
    assert 0 < killed["at"] < LONG  # the worker died mid-run...
    client.wait_for_workers(2)
    assert set(client.run(os.getpid).values()) != set(before.values())  # ...and its nanny started a new one
    assert result.tokens == result.new_tokens >= LONG
    assert_identical(out, single / "long")


def test_client_killed_with_kill_9_resumes_and_redoes_only_uncommitted_shards(tmp_path, client, single):
    out = tmp_path / "client-killed.zarr"
    stderr = tmp_path / "client.stderr"
    proc = start_rqae("harvest", *CLI_ARGS, "--tokens", str(LONG), "--out", str(out), "--workers", "2",
                      stderr=stderr)
    try:
        wait_until(lambda: committed_tokens(out) >= 1024, proc, stderr)
        workers = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    finally:
        proc.kill()
    at_kill = committed_tokens(out)
    assert 1024 <= at_kill < LONG
    # The client sized the arrays RESERVE_SHARDS shards ahead at its first shard, not a shard
    # at a time (each growth rewrites every array's metadata); the resume cuts them back.
    assert ActivationStore.open(out).group["acts"].shape[0] >= min(LONG, (1 + RESERVE_SHARDS) * 128)
    # The LocalCluster's workers die with their client: nothing writes the store behind the resume.
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive
    assert StoreLock(out).read()  # the dead client's lock, stale now
    result = harvest_parallel(tiny_config(out, tokens=LONG, resume=True), TWO, client=client, progress=False)
    assert result.new_tokens == result.tokens - at_kill  # only the uncommitted shards were redone
    assert_identical(out, single / "long")


def test_ctrl_c_on_the_client_keeps_the_finished_prefix_and_resume_completes(tmp_path, client, single):
    """`rqae harvest --workers 2` run from its own directory with a relative --out, then Ctrl-C;
    `--resume --scheduler` on the file's cluster (its workers in another directory) completes it."""
    out = tmp_path / "sigint.zarr"
    stderr = tmp_path / "sigint.stderr"
    proc = start_rqae("harvest", *CLI_ARGS, "--tokens", str(LONG), "--out", out.name, "--workers", "2",
                      stderr=stderr, cwd=tmp_path)
    try:
        wait_until(lambda: committed_tokens(out) >= 128, proc, stderr)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=HANG_GUARD_S) == 130
    finally:
        proc.kill()
    assert "rerun with --resume" in stderr.read_text().strip().splitlines()[-1]
    store = ActivationStore.open(out)
    assert 128 <= store.n_tokens < LONG and store.n_tokens % 128 == 0  # whole shards
    assert store.group["acts"].shape[0] == store.n_tokens  # written past the commit: dropped
    assert StoreLock(out).read() is None
    workers_cwd = set(client.run(os.getcwd).values())
    assert str(tmp_path) not in workers_cwd  # the relative --out reaches them made absolute
    r = run_rqae("harvest", *CLI_ARGS, "--tokens", str(LONG), "--out", out.name, "--resume",
                 "--scheduler", client.scheduler.address, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{LONG:,} tokens committed ({LONG - store.n_tokens:,} new" in r.stdout  # only the missing shards
    assert_identical(out, single / "long")
    assert not any((Path(d) / out.name).exists() for d in workers_cwd)


def test_a_shard_task_whose_client_let_the_store_go_writes_nothing(tmp_path, tiny_lm):
    """Ctrl-C on a client of a --scheduler cluster leaves its running tasks running: by the
    time one ends, the store may be another harvest's. It writes only under its client's lock."""
    from rqae_pipeline.forward import WorkerModel
    from rqae_pipeline.harvest_dask import ShardDone, ShardFailed, ShardTask, harvest_shard

    out = tmp_path / "s.zarr"
    harvest(tiny_config(out, tokens=256), lm=tiny_lm, progress=False)  # shards 0 and 1
    ActivationStore.open(out).reopen_for_append().reserve_rows(384)
    tokens = ActivationStore.open(out).read(0, 128).tokens.reshape(4, 32)  # any 4 contexts will do
    task = ShardTask(index=2, start_row=256, first_row=256, first_seq=8, tokens=tokens)
    job = WorkerModel(model=TINY, dtype="float32", device=None, spread_gpus=False, torch_threads=1)
    lock = StoreLock(out)
    lock.acquire()  # this process is the store's writer now
    try:
        gone = harvest_shard(job, out, task, None, owner={**lock.read(), "pid": 1})  # another client's task
        assert isinstance(gone, ShardFailed) and "no longer held" in gone.message
        assert not (out / "acts" / "c" / "2").exists()
        assert isinstance(harvest_shard(job, out, task, None, owner=lock.read()), ShardDone)
        assert (out / "acts" / "c" / "2" / "0").exists()
    finally:
        lock.release()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "never.zarr"
    proc = run_rqae("harvest", *CLI_ARGS, "--tokens", "512", "--out", str(out),
                    "--scheduler", f"tcp://127.0.0.1:{closed_port()}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach the dask scheduler"), proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_relative_out_is_made_absolute_for_workers_in_another_directory(tmp_path, monkeypatch, client, single):
    workers_cwd = set(client.run(os.getcwd).values())
    assert str(tmp_path) not in workers_cwd  # the workers run elsewhere: a relative path would miss
    monkeypatch.chdir(tmp_path)
    result = harvest_parallel(tiny_config(Path("rel.zarr"), tokens=SHORT), TWO, client=client, progress=False)
    assert result.store == tmp_path / "rel.zarr"
    assert_identical(tmp_path / "rel.zarr", single / "short-float16")
    assert not any((Path(d) / "rel.zarr").exists() for d in workers_cwd)


def test_local_workers_spread_over_the_gpus():
    assert [worker_device(None, i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_device("cuda", 3, 4) == "cuda:3"
    assert worker_device("cuda:1", 0, 2) == "cuda:1"  # an explicit device stays
    assert worker_device("cpu", 1, 2) == "cpu"
    assert worker_device(None, 1, 0) is None  # no GPU: the default device


def test_cluster_options_are_checked():
    with pytest.raises(RQAEError, match="not both"):
        DaskConfig(workers=2, scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(RQAEError, match="--workers must be"):
        DaskConfig(workers=-1)
    with pytest.raises(RQAEError, match="memory://"):
        harvest_parallel(tiny_config("memory://x.zarr"), TWO)
