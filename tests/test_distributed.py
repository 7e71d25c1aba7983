"""Data-parallel training (`rqae train --nproc 2`: torchrun, 2 gloo ranks on CPU) ends with the
weights of one process on the same global batch; a kill -9 of the whole job then --resume ends
where an uninterrupted run ends; the resumed reader starts at the recorded position; a
few steps and an encode on cuda match the CPU (skipped without a GPU)."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.distributed import Ranks
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.reader import DataPosition, ReadPosition, shuffled_batches
from rqae_pipeline.run_dir import CHECKPOINT
from rqae_pipeline.store import ActivationStore, Flags
from rqae_pipeline.train import TrainConfig, heldout_split, position_of_step, positioned_batches, train

from helpers import HANG_GUARD_S, REPO, command_env, rqae_cmd, run_rqae, tiny_config

BATCH = 128


@pytest.fixture(scope="module")
def store_path(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "tiny.zarr"
    harvest(tiny_config(out, tokens=8192), lm=tiny_lm, progress=False)
    return out


def cfg_for(store_path, out, arch="rqae", steps=12, **kw):
    model = ModelSpec(arch=arch, d_in=64, n_q=8, d_sae=128, k=8, lr=3e-3, **kw.pop("model", {}))
    base = dict(store=store_path, out=out, model=model, batch_size=BATCH, tokens=BATCH * steps,
                checkpoint_every=5, eval_every=1000, log_every=5)
    return TrainConfig(**{**base, **kw})


def cli_args(cfg, nproc, *extra):
    m = cfg.model
    opts = [x for k, v in m.options.items() for x in ("--option", f"{k}={v}")]
    return ["train", "--store", str(cfg.store), "--out", str(cfg.out), "--arch", m.arch, "--n-q", str(m.n_q),
            "--d-sae", str(m.d_sae), "--k", str(m.k), "--lr", str(m.lr), "--batch-size", str(cfg.batch_size),
            "--tokens", str(cfg.tokens), "--checkpoint-every", str(cfg.checkpoint_every), "--eval-every", "1000",
            "--device", "cpu", "--nproc", str(nproc), *opts, *extra]


def saved_weights(out):
    from safetensors.torch import load_file

    name = "model.safetensors" if (out / "model.safetensors").exists() else "sae_weights.safetensors"
    return load_file(out / name)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        # a mean of two per-rank means vs one mean: equal up to float rounding, which Adam carries on
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch,options", [("rqae", {}), ("topk-sae", {"dead_feature_window": 2})])
def test_two_gloo_ranks_end_with_the_single_process_weights(store_path, tmp_path, arch, options):
    # topk with a 2-step dead window: its auxiliary loss reads the dead-latent mask, which is
    # only the single-process one if the ranks share their firing statistics
    # one process reading 2 streams: the global batches of 2 ranks (each reads one of them)
    one = cfg_for(store_path, tmp_path / "one", arch, model={"options": options}, streams=2)
    train(one, progress=False)
    two = cfg_for(store_path, tmp_path / "two", arch, model={"options": options})
    proc = run_rqae(*cli_args(two, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert_same_weights(saved_weights(tmp_path / "two"), saved_weights(tmp_path / "one"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").open()]
    assert steps == [10, 12]  # rank 0 alone writes the log (every 10 steps and the last)


def test_batch_that_does_not_split_over_the_ranks_is_refused(store_path, tmp_path):
    cfg = cfg_for(store_path, tmp_path / "odd", batch_size=BATCH + 1, tokens=(BATCH + 1) * 4)
    proc = run_rqae(*cli_args(cfg, 2))
    # every rank refuses it: one error line and status 2, as in one process (not each rank's
    # line, torchrun's logs and its ChildFailedError traceback, status 1)
    assert proc.returncode == 2, proc.stderr
    want = f"error: --batch-size {BATCH + 1} does not split evenly over 2 processes; use a multiple of 2"
    assert proc.stderr.strip().splitlines() == [want]
    assert not (tmp_path / "odd" / CHECKPOINT).exists()


def test_rank_errors_are_printed_once_each_and_named_by_rank_only_where_they_differ(tmp_path):
    from rqae_pipeline.launch import rank_errors

    for rank in range(3):
        (tmp_path / f"rank-{rank}.error").write_text("bad batch")
    assert rank_errors(tmp_path) == ["error: bad batch"]
    (tmp_path / "rank-2.error").write_text("row 7 is damaged")
    assert rank_errors(tmp_path) == ["error: bad batch (rank 0)", "error: row 7 is damaged (rank 2)"]
    assert rank_errors(tmp_path / "none") == []


def test_a_nan_row_is_found_by_the_rank_that_reads_it(store_path, tmp_path):
    import zarr

    damaged = tmp_path / "nan.zarr"
    shutil.copytree(store_path, damaged)
    zarr.open_group(str(damaged), mode="r+", zarr_format=3)["acts"][1000, 3] = np.nan
    store = ActivationStore.open(damaged)
    outcomes = []
    for r in range(2):
        reader = shuffled_batches(store, BATCH, shuffle=True, seed=0, start=0, stop=None, exclude=int(Flags.BOS),
                                  buffer_rows=None, drop_last=True, streams=2, rank=r, world_size=2,
                                  check_finite=True)
        try:
            next(reader)
            outcomes.append("batch")
        except RQAEError as e:
            assert re.search(r"non-finite \(NaN/inf\) activations in row\(s\) 1000;", str(e))
            outcomes.append("error")
    assert sorted(outcomes) == ["batch", "error"]  # only the rank whose stream holds row 1000 decodes it


def _next_on_two_ranks(rank: int, port: int, out: str) -> None:
    """Rank 1's reader fails at its 4th batch; what each rank's `next_on_every_rank` gives."""
    import torch.distributed as dist

    from rqae_pipeline.distributed import next_on_every_rank

    def reader():
        for k in range(10):
            if rank == 1 and k == 3:
                raise RQAEError("row 7 is damaged")
            yield k

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    batches, got = reader(), []
    try:
        for _ in range(10):
            got.append(next_on_every_rank(batches, Ranks(rank=rank, world_size=2)))
    except RQAEError as e:
        got.append(f"error: {e}")
    finally:
        dist.destroy_process_group()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(got, f)


def test_a_reader_error_on_one_rank_stops_every_rank_with_it(tmp_path):
    """Ranks read disjoint streams: the rank that does not read the damaged row must stop with
    the error at the same step, not wait in the gradient all_reduce for a peer that has gone."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_next_on_two_ranks, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [0, 1, 2, "error: row 7 is damaged"]


def _bound_threads(rank: int, out: str) -> None:
    """The cores of this rank before `bind_to_own_cores`, and after it of the main thread,
    of a thread started before it (as gloo's are) and of one started after it."""
    import os
    import threading

    from rqae_pipeline.distributed import bind_to_own_cores

    os.environ["LOCAL_WORLD_SIZE"] = "2"
    cores, hold = {"before": sorted(os.sched_getaffinity(0))}, threading.Event()
    early = threading.Thread(target=hold.wait)
    early.start()
    share = bind_to_own_cores(Ranks(rank=rank, world_size=2, local_rank=rank))
    cores["main"] = sorted(os.sched_getaffinity(0))  # 0: the calling thread
    cores["early"] = sorted(os.sched_getaffinity(early.native_id))
    after = threading.Thread(target=lambda: cores.__setitem__("after", sorted(os.sched_getaffinity(0))))
    after.start()
    after.join()
    hold.set()
    early.join()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump({"share": sorted(share), **cores}, f)


@pytest.mark.skipif(len(__import__("os").sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_cpu_ranks_bind_their_threads_to_disjoint_equal_shares_of_the_cores(tmp_path):
    import os

    import torch.multiprocessing as mp

    mp.start_processes(_bound_threads, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    got = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    allowed = os.sched_getaffinity(0)
    for g in got:
        assert g["main"] == g["after"] == g["share"]  # the binding thread and those it starts later
        assert g["before"] == g["early"] == sorted(allowed)  # threads already running (gloo's) stay unbound
        assert len(g["share"]) == len(allowed) // 2
    assert not set(got[0]["share"]) & set(got[1]["share"]) and set(got[0]["share"]) | set(got[1]["share"]) <= allowed


def _descendants(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            children = open(f"/proc/{pid}/task/{task}/children").read().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            out += [child, *_descendants(child)]
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads the process tree from /proc")
def test_kill_9_of_the_job_then_resume_ends_where_an_uninterrupted_run_ends(store_path, tmp_path):
    steps = 150  # far more than the time to the first checkpoint: the kill lands mid-run
    ref = cfg_for(store_path, tmp_path / "ref", steps=steps, checkpoint_every=7)
    assert run_rqae(*cli_args(ref, 2)).returncode == 0  # the uninterrupted 2-rank run
    cfg = cfg_for(store_path, tmp_path / "run", steps=steps, checkpoint_every=7)
    env = command_env()
    with open(tmp_path / "stderr", "w") as err:  # its own session: killpg reaches launcher and torchrun
        job = subprocess.Popen(rqae_cmd(*cli_args(cfg, 2)), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=err, start_new_session=True)
    t0 = time.monotonic()
    try:
        while not (cfg.out / CHECKPOINT).exists():
            assert job.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() - t0 < HANG_GUARD_S
            time.sleep(0.05)
        tree = _descendants(job.pid)  # torchrun and its two ranks (each in a session of its own)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        while any(_alive(p) for p in tree):  # the ranks die with torchrun (PR_SET_PDEATHSIG)
            assert time.monotonic() - t0 < HANG_GUARD_S, "a rank outlived kill -9 of its launcher"
            time.sleep(0.05)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    ckpt = torch.load(cfg.out / CHECKPOINT, weights_only=False)
    assert 7 <= ckpt["step"] < steps and "data" in ckpt
    proc = run_rqae(*cli_args(cfg, 2, "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = saved_weights(cfg.out), saved_weights(ref.out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ctrl_c_of_the_job_stops_every_rank_with_one_line_and_status_130(store_path, tmp_path):
    """Ctrl-C reaches the launcher's process group; torchrun's launcher passes it to the ranks
    (each in a session of its own). They stop at different points of a step: a closing barrier
    paired with a peer's unfinished all_reduce, hung until the launcher's 30 s timeout killed
    it, and printed a rank's gloo traceback."""
    cfg = cfg_for(store_path, tmp_path / "run", steps=100_000, checkpoint_every=7)
    env = command_env()
    with open(tmp_path / "stderr", "w") as err:  # its own group, as a terminal's foreground job
        job = subprocess.Popen(rqae_cmd(*cli_args(cfg, 2)), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=err, start_new_session=True)
    try:
        t0 = time.monotonic()
        while not (cfg.out / CHECKPOINT).exists():
            assert job.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
            assert time.monotonic() - t0 < HANG_GUARD_S
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGINT)
        code = job.wait(timeout=HANG_GUARD_S)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    stderr = (tmp_path / "stderr").read_text().replace("\r", "\n")
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("train ")]  # progress bar
    assert code == 130 and lines == [f"interrupted: resume from the checkpoint in {cfg.out}; rerun with --resume"], \
        (code, stderr[-3000:])
    assert 7 <= torch.load(cfg.out / CHECKPOINT, weights_only=False)["step"] < 100_000


@pytest.mark.parametrize("streams", [1, 2])
def test_resumed_reader_starts_at_the_recorded_position(store_path, tmp_path, streams):
    """Batch k from its position (one buffer read) is batch k of the uninterrupted stream,
    across a pass boundary too, and the flag count finds the same position."""
    cfg = cfg_for(store_path, tmp_path / "x", steps=200, streams=streams)
    store = ActivationStore.open(store_path)
    split = heldout_split(store, cfg.heldout_fraction)
    stream = positioned_batches(store, cfg, split, position_of_step(store, cfg, split, 0))
    seen = [next(stream) for _ in range(150)]  # the store holds ~58 batches a pass
    per_pass = next(k for k, (_, at) in enumerate(seen, 1) if at.epoch == 1)
    assert seen[-1][1].epoch == 2
    for k in (1, 7, per_pass - 1, per_pass, per_pass + 1, 2 * per_pass + 3):
        position = seen[k - 1][1]
        assert position_of_step(store, cfg, split, k) == position
        resumed = positioned_batches(store, cfg, split, position)
        for j in range(3):
            torch.testing.assert_close(next(resumed)[0], seen[k + j][0], rtol=0, atol=0)


def rank_batches(store, streams, world_size=1, rank=0, first=None):
    """Batches of 2-chunk shuffle buffers per stream (~124 kept rows: each stream's parts
    straddle buffers at every phase), as (acts, rows, position)."""
    stream = shuffled_batches(store, BATCH, shuffle=True, seed=3, start=0, stop=None, exclude=int(Flags.BOS),
                              buffer_rows=2 * store.spec.chunk_rows, drop_last=True, return_rows=True,
                              with_position=True, first=first, streams=streams, rank=rank, world_size=world_size)
    return [(acts, rows, at) for (acts, rows), at in stream]


@pytest.mark.parametrize("streams,world_size", [(2, 2), (4, 2), (4, 4)])
def test_each_rank_reads_its_slice_of_the_global_batches_and_only_its_chunks(store_path, streams, world_size):
    """Rank r's batches are rows [r b, (r + 1) b) of the one-process batches of as many streams,
    with the same positions, from the start and from resume positions inside a pass; the ranks
    decompress disjoint chunks."""
    store = ActivationStore.open(store_path)
    whole = rank_batches(store, streams)
    assert len({tuple(p.buffer for p in at) for *_, at in whole}) > 10  # many buffers of each stream
    part = BATCH // world_size
    for k in (0, 1, 2, 3, len(whole) // 2, len(whole) - 4):
        first = whole[k - 1][2] if k else None
        decoded = []
        for r in range(world_size):
            store.read_spans_encoded = _recording(ActivationStore.read_spans_encoded.__get__(store), decoded, r)
            for (acts, rows, at), (w_acts, w_rows, w_at) in zip(rank_batches(store, streams, world_size, r, first),
                                                                whole[k:]):
                assert at == w_at and acts.shape == (part, store.d)
                torch.testing.assert_close(rows, w_rows[r * part : (r + 1) * part], rtol=0, atol=0)
                torch.testing.assert_close(acts, w_acts[r * part : (r + 1) * part], rtol=0, atol=0)
        rows_of = [{row for rank, a, b in decoded if rank == r for row in range(a, b)} for r in range(world_size)]
        assert all(rows_of) and sum(map(len, rows_of)) == len(set().union(*rows_of))  # disjoint


def _recording(read, record, rank):
    def recorded(spans):
        record.extend((rank, start, stop) for start, stop in spans)
        return read(spans)
    return recorded


def test_a_pass_of_several_streams_ends_with_its_shortest_and_covers_each_row_at_most_once(store_path):
    store = ActivationStore.open(store_path)
    whole = rank_batches(store, 4)
    rows = torch.cat([r for _, r, _ in whole])
    kept = int(((store.column("flags", slice(0, store.n_tokens)) & int(Flags.BOS)) == 0).sum())
    assert len(set(rows.tolist())) == len(rows) > kept - 4 * store.spec.chunk_rows


def test_training_ranks_step_through_the_one_process_batches(store_path, tmp_path):
    """`positioned_batches` of rank r are slices of the one-process batches across a pass boundary."""
    cfg = cfg_for(store_path, tmp_path / "x", steps=200, streams=2)
    store = ActivationStore.open(store_path)
    split = heldout_split(store, cfg.heldout_fraction)
    stream = positioned_batches(store, cfg, split, DataPosition(0, (ReadPosition(),) * 2))
    seen = [next(stream) for _ in range(150)]
    per_pass = next(k for k, (_, at) in enumerate(seen, 1) if at.epoch == 1)
    start = seen[per_pass - 3][1]
    ranks = [positioned_batches(store, cfg, split, start, Ranks(rank=r, world_size=2)) for r in range(2)]
    for k in range(per_pass - 2, per_pass + 3):
        (a, at_a), (b, at_b) = next(ranks[0]), next(ranks[1])
        assert at_a == at_b == seen[k][1]
        torch.testing.assert_close(torch.cat([a, b]), seen[k][0], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_and_encoding_on_cuda_match_the_cpu(store_path, tmp_path):
    from rqae_pipeline.models.registry import build_trainable

    store = ActivationStore.open(store_path)
    x = store.read(0, 2048).acts
    models = {}
    for device in ("cpu", "cuda"):
        spec = ModelSpec(arch="rqae", d_in=64, n_q=8, lr=3e-3)
        m = build_trainable(spec, total_steps=5, batch_size=256, device=device, seed=0)
        m.init_from_data(x[:256])
        for i in range(5):
            m.train_step(x[i * 256 : (i + 1) * 256])
        models[device] = m
    for name, p in models["cpu"].module.state_dict().items():
        torch.testing.assert_close(models["cuda"].module.state_dict()[name].cpu(), p, rtol=1e-3, atol=1e-4, msg=name)
    codes = {d: m.module.encode(x.to(d)).cpu().numpy() for d, m in models.items()}
    assert np.mean(codes["cpu"] == codes["cuda"]) > 0.99  # ties and float rounding may flip a few codes


def test_a_resumed_run_keeps_its_streams_and_a_bad_count_is_one_error_line(store_path, tmp_path):
    first = cfg_for(store_path, tmp_path / "run", steps=10, streams=2)
    train(first, progress=False)
    assert json.loads((tmp_path / "run" / "train.json").read_text())["config"]["streams"] == 2
    longer = cfg_for(store_path, tmp_path / "run", steps=12, resume=True)  # streams not given: the run's own
    with pytest.raises(RQAEError, match="cannot resume: tokens was"):  # only the longer budget differs
        train(longer, progress=False)
    with pytest.raises(RQAEError, match="cannot resume: streams was 2, now 4"):
        train(cfg_for(store_path, tmp_path / "run", steps=10, resume=True, streams=4), progress=False)
    proc = run_rqae(*cli_args(cfg_for(store_path, tmp_path / "odd", steps=4), 1, "--streams", "3"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --batch-size 128 does "
                                                                                   "not split evenly over 3 streams")
    assert not (tmp_path / "odd").exists()
