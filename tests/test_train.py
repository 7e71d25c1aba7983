import json
import signal

import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.registry import build_trainable
from rqae_pipeline.run_dir import CHECKPOINT
from rqae_pipeline.store import ActivationStore, StoreLock
from rqae_pipeline.train import TrainConfig, evaluate, heldout_rows, heldout_split, train

from helpers import HANG_GUARD_S, start_rqae, tiny_config, untrained_heldout_fvu, wait_until


@pytest.fixture(scope="module")
def store_path(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "tiny.zarr"
    harvest(tiny_config(out, tokens=16384), lm=tiny_lm, progress=False)
    return out


def rqae_cfg(store_path, out, **kw):
    model = kw.pop("model", ModelSpec(arch="rqae", d_in=64, n_q=8, lr=3e-3))
    base = dict(store=store_path, out=out, model=model, batch_size=256, tokens=256 * 40, eval_every=20,
                checkpoint_every=10, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


def weights(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def test_rqae_trains_and_writes_its_run_directory(store_path, tmp_path):
    cfg = rqae_cfg(store_path, tmp_path / "run")
    store = ActivationStore.open(store_path)
    split = heldout_split(store, cfg.heldout_fraction)
    x = heldout_rows(store, cfg, split)
    untrained = build_trainable(cfg.model, total_steps=1, batch_size=256, device="cpu", seed=0)
    untrained.init_from_data(x)
    before = evaluate(untrained, x)["fvu"]
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    assert result.steps == 40 and result.heldout["fvu"] < 0.8 * before
    for name in ("config.json", "model.safetensors", "train.json", "metrics.jsonl", "loss_curve.png",
                 "fvu_vs_prefix.png", CHECKPOINT):
        assert (out / name).exists(), name
    run = json.loads((out / "train.json").read_text())
    assert run["status"] == "done" and run["heldout"] == split and run["store_spec"]["hook"] == store.spec.hook
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert all({"loss", "fvu", "tok_per_s"} <= set(r) for r in rows)
    health = rows[-1]["heldout"]["health"]
    assert health["perplexity_mean"] > 1 and 0 <= health["dead_codes_mean"] <= 544
    assert set(rows[-1]["heldout"]["fvu_by_prefix"]) == {"1", "2", "4", "8"}


def test_every_evaluation_step_is_evaluated_whatever_the_log_interval(store_path, tmp_path):
    """Evaluations ran only on log steps: eval_every 15 with log_every 10 evaluated at 30 and
    60, not 15, 30, 45, 60 (a sweep's plateau check then had two points, 10 steps apart)."""
    train(rqae_cfg(store_path, tmp_path / "run", tokens=256 * 60, eval_every=15, log_every=10), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout" in r] == [15, 30, 45, 60]
    assert [r["step"] for r in rows] == [10, 15, 20, 30, 40, 45, 50, 60]


def test_throughput_after_a_resume_counts_only_the_tokens_since_it(monkeypatch):
    from rqae_pipeline import train as train_module

    clock = iter([100.0, 102.0])
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: next(clock))
    # resumed at 75 steps of 256 tokens, first log at step 80: 5 steps in 2 s (was 80 steps in 2 s)
    assert train_module._Throughput(75 * 256).tokens_per_second(80 * 256) == 5 * 256 / 2


@pytest.mark.parametrize("arch", ["rqae", "topk-sae"])
def test_steps_without_metrics_train_the_same_weights(store_path, arch):
    """The loop asks for a step's metrics (batch FVU, ...) only on the steps it logs: leaving
    them out must not change what is trained."""
    store = ActivationStore.open(store_path)
    x = store.read(0, 4 * 256).acts
    size = {"n_q": 4} if arch == "rqae" else {"d_sae": 64, "k": 4}
    spec = ModelSpec(arch=arch, d_in=store.d, **size)
    runs = []
    for with_metrics in (True, False):
        m = build_trainable(spec, total_steps=4, batch_size=256, device="cpu", seed=0)
        m.init_from_data(x)
        stats = [m.train_step(x[i * 256 : (i + 1) * 256], metrics=with_metrics) for i in range(4)]
        runs.append((stats, m.checkpoint_state()))
    (full, a), (lean, b) = runs
    assert all("fvu" in s for s in full) and all(set(s) == {"loss"} for s in lean)
    assert [s["loss"].item() for s in full] == [s["loss"].item() for s in lean]
    weights = (a["model"], b["model"]) if arch == "rqae" else (a["sae"], b["sae"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_heldout_split_is_by_context_and_never_trained_on(store_path):
    store = ActivationStore.open(store_path)
    split = heldout_split(store, 0.1)
    R = store.spec.rows_per_context
    assert split["first_row"] % R == 0 and split["contexts"] == round(store.n_contexts * 0.1)
    held = store.read(split["first_row"], store.n_tokens)
    assert held.seq.min() == split["first_context"]
    from rqae_pipeline.train import train_batches

    cfg = TrainConfig(store=store_path, out=store_path, model=ModelSpec(arch="rqae", d_in=64), batch_size=128,
                      tokens=128, heldout_fraction=0.1)
    # Early positions repeat across contexts (same token after BOS), so compare against
    # the rows that only the held-out contexts contain.
    train_keys = {r.tobytes() for r in store.read(0, split["first_row"]).acts.numpy()}
    held_only = {r.tobytes() for r in held.acts.numpy()} - train_keys
    assert len(held_only) > 0.9 * len(held.acts)
    gen = train_batches(store, cfg, split, skip=0)
    for _ in range((split["first_row"] - store.n_contexts) // 128):
        keys = {r.tobytes() for r in next(gen).numpy()}
        assert keys <= train_keys and not keys & held_only


CLI_TRAIN = ["--arch", "rqae", "--n-q", "8", "--lr", "0.003", "--batch-size", "256", "--tokens", str(256 * 1000),
             "--checkpoint-every", "7", "--eval-every", "1000"]


def start_train(store_path, out, *extra):
    return start_rqae("train", "--store", str(store_path), "--out", str(out), *CLI_TRAIN, *extra,
                      stderr=out.parent / "train.stderr")


def cli_cfg(store_path, out, resume=False):
    return TrainConfig(store=store_path, out=out, model=ModelSpec(arch="rqae", d_in=64, n_q=8, lr=0.003),
                       batch_size=256, tokens=256 * 1000, checkpoint_every=7, eval_every=1000, resume=resume)


@pytest.fixture(scope="module")
def uninterrupted(store_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train(cli_cfg(store_path, out), progress=False)
    return weights(out)


@pytest.mark.parametrize("how", ["kill-9", "ctrl-c"])
def test_interrupted_training_resumes_to_the_same_weights(store_path, tmp_path, uninterrupted, how):
    out = tmp_path / "run"
    proc = start_train(store_path, out)
    try:
        # the first checkpoint (step 7 of 1000): the run is far from its end when the signal lands
        wait_until(lambda: (out / CHECKPOINT).exists(), proc, tmp_path / "train.stderr")
        if how == "kill-9":
            proc.kill()
            proc.wait()
        else:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=HANG_GUARD_S) == 130
            assert "rerun with --resume" in (tmp_path / "train.stderr").read_text()
    finally:
        proc.kill()  # a no-op once it has exited
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    assert 7 <= ckpt["step"] < 1000 and ckpt["step"] % 7 == 0
    if how == "kill-9":  # as if the kill had landed mid-way through writing a metrics row
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 999999, "loss": 0.')
    result = train(cli_cfg(store_path, out, resume=True), progress=False)
    assert result.steps == 1000
    got = weights(out)
    for name, ref in uninterrupted.items():
        torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated log rows after the resume


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store_path, tmp_path):
    cfg = rqae_cfg(store_path, tmp_path / "run", model=ModelSpec(arch="rqae", d_in=64, n_q=8, lr=1e30),
                   checkpoint_every=1, tokens=256 * 200)
    with pytest.raises(RQAEError, match="loss became .* checkpoint of step"):
        train(cfg, progress=False)
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state"]["model"].values())
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_bad_training_input_is_refused(store_path, tmp_path, tiny_lm):
    with pytest.raises(RQAEError, match="no activation store"):
        train(rqae_cfg(tmp_path / "missing.zarr", tmp_path / "a"), progress=False)
    with pytest.raises(RQAEError, match="does not match the store's d_model"):
        train(rqae_cfg(store_path, tmp_path / "b", model=ModelSpec(arch="rqae", d_in=32, n_q=4)), progress=False)
    # an empty store: created, never committed
    empty = tmp_path / "empty.zarr"
    harvest(tiny_config(empty, tokens=64), lm=tiny_lm, progress=False)
    store = ActivationStore.open(empty)
    store.reopen_for_append().commit(tokens=0, contexts=0, corpus_state=(0, 0))
    with pytest.raises(RQAEError, match="is empty"):
        train(rqae_cfg(empty, tmp_path / "c"), progress=False)
    # a store whose harvest is still running
    busy = tmp_path / "busy.zarr"
    harvest(tiny_config(busy, tokens=2048), lm=tiny_lm, progress=False)
    lock = StoreLock(busy)
    lock.acquire()
    try:
        with pytest.raises(RQAEError, match="still being written"):
            train(rqae_cfg(busy, tmp_path / "d"), progress=False)
    finally:
        lock.release()


def test_out_dir_of_another_run_and_changed_hyperparameters(store_path, tmp_path, tiny_lm):
    out = tmp_path / "run"
    train(rqae_cfg(store_path, out, tokens=256 * 10), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RQAEError, match="already holds a training run"):
        train(rqae_cfg(store_path, out, tokens=256 * 10), progress=False)
    with pytest.raises(RQAEError, match="model.lr was 0.003, now 0.01"):
        train(rqae_cfg(store_path, out, tokens=256 * 10, resume=True,
                       model=ModelSpec(arch="rqae", d_in=64, n_q=8, lr=0.01)), progress=False)
    with pytest.raises(RQAEError, match="batch_size was 256, now 128"):
        train(rqae_cfg(store_path, out, tokens=256 * 10, resume=True, batch_size=128), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # another store of the same width: refused from train.json, and from the checkpoint alone
    other_store = tmp_path / "other.zarr"
    harvest(tiny_config(other_store, tokens=2048, context_length=16), lm=tiny_lm, progress=False)
    for damaged in (False, True):
        if damaged:  # train.json lost or unreadable: the checkpoint still names the store it trained on
            (out / "train.json").write_text("{not json")
            with pytest.raises(RQAEError, match="train.json is not JSON"):
                train(rqae_cfg(store_path, out, tokens=256 * 20, resume=True), progress=False)
            (out / "train.json").unlink()
        with pytest.raises(RQAEError, match="trained on another store"):
            train(rqae_cfg(other_store, out, tokens=256 * 20, resume=True), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RQAEError, match="not a training run directory"):
        train(rqae_cfg(store_path, tmp_path / "other"), progress=False)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_and_finite_is_refused(lr):
    with pytest.raises(RQAEError, match="--lr must be a positive finite number"):
        ModelSpec(arch="rqae", d_in=8, n_q=2, lr=lr)


def test_a_run_directory_has_one_writer_at_a_time(store_path, tmp_path):
    """The run directory's lock: a second train on it, fresh or resumed, is refused while the
    first holds it, and changes nothing; a finished run leaves no lock, a refused fresh run
    no directory."""
    out = tmp_path / "run"
    train(rqae_cfg(store_path, out, tokens=256 * 10), progress=False)
    assert not (out / ".lock").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    lock = StoreLock(out)
    lock.acquire()  # this process's record: live, as a running `rqae train` would hold it
    try:
        with pytest.raises(RQAEError, match="is being written by another process"):
            train(rqae_cfg(store_path, out, tokens=256 * 10, resume=True), progress=False)
        with pytest.raises(RQAEError, match="is being written by another process"):
            train(rqae_cfg(store_path, out, tokens=256 * 10), progress=False)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"} == before
    finally:
        lock.release()
    with pytest.raises(RQAEError, match="no activation store"):
        train(rqae_cfg(tmp_path / "missing.zarr", tmp_path / "fresh"), progress=False)
    assert not (tmp_path / "fresh").exists()
    train(rqae_cfg(store_path, out, tokens=256 * 10, resume=True), progress=False)  # the lock released: resumes
    assert json.loads((out / "train.json").read_text())["status"] == "done" and not (out / ".lock").exists()


def test_a_checkpoint_without_a_readable_data_position_is_refused_unchanged(store_path, tmp_path):
    """--resume starts reading where the checkpoint's data position says: a record lacking a
    field, holding a non-integer or the wrong number of streams is one error line, before
    train.json or the metrics are rewritten (was a KeyError or TypeError part-way in)."""
    out = tmp_path / "run"
    train(rqae_cfg(store_path, out, tokens=256 * 10), progress=False)
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    data = ckpt["data"]
    assert set(data) == {"epoch", "buffer", "row"}
    for bad in ({k: v for k, v in data.items() if k != "row"}, {**data, "row": str(data["row"])},
                {**data, "buffer": -1}, {"epoch": data["epoch"], "streams": [[0, 0], [0, 0]]}, None):
        torch.save({**ckpt, "data": bad}, out / CHECKPOINT)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        with pytest.raises(RQAEError, match="checkpoint.pt records no readable data position"):
            train(rqae_cfg(store_path, out, tokens=256 * 10, resume=True), progress=False)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_codebook_baseline_trains_through_the_same_loop(store_path, tmp_path):
    cfg = rqae_cfg(store_path, tmp_path / "cb", model=ModelSpec(arch="codebook", d_in=64, d_sae=128, k=4, lr=3e-3))
    result = train(cfg, progress=False)
    # measured: 0.61 untrained, 0.54 after these 40 steps
    assert result.heldout["fvu"] < untrained_heldout_fvu(cfg) - 0.035
    from rqae_pipeline.models.registry import load_model_dir

    model = load_model_dir(tmp_path / "cb")
    x = heldout_rows(ActivationStore.open(store_path), cfg, heldout_split(ActivationStore.open(store_path), 0.05))
    assert model(x).shape == x.shape


def test_bfloat16_training_and_unknown_dtype(store_path, tmp_path):
    spec = ModelSpec(arch="codebook", d_in=64, d_sae=64, k=4, lr=3e-3, dtype="bfloat16")
    cfg = rqae_cfg(store_path, tmp_path / "bf16", model=spec, tokens=256 * 10)
    result = train(cfg, progress=False)
    # measured: 0.648 untrained, 0.619 after these 10 steps
    assert result.heldout["fvu"] < untrained_heldout_fvu(cfg) - 0.01
    assert json.loads((tmp_path / "bf16" / "train.json").read_text())["config"]["model.dtype"] == "bfloat16"
    with pytest.raises(RQAEError, match="unknown training dtype 'fp4'"):
        train(rqae_cfg(store_path, tmp_path / "x", model=ModelSpec(arch="rqae", d_in=64, n_q=4, dtype="fp4")),
              progress=False)


def test_a_checkpoint_step_position_or_state_out_of_range_is_refused_unchanged(store_path, tmp_path):
    """A position past its buffer or pass (or a step past the run) read as the pass's end, or
    as a finished run: a damaged checkpoint trained on other rows, exit 0. Damaged weights
    are one error line too (were a traceback)."""
    out = tmp_path / "run"
    train(rqae_cfg(store_path, out, tokens=256 * 20), progress=False)
    ckpt = torch.load(out / CHECKPOINT, weights_only=False)
    data = ckpt["data"]
    for bad, needle in (({**ckpt, "data": {**data, "buffer": 10**6}}, "is not in its pass"),
                        ({**ckpt, "data": {**data, "buffer": 0, "row": 10**6}}, "is not in its pass"),
                        ({**ckpt, "step": 10**6}, "records step 1000000, not one of this run's 0..20"),
                        ({**ckpt, "step": -5}, "records step -5"),
                        # its weights: one missing, one of another shape, the optimiser's gone
                        ({**ckpt, "state": {**ckpt["state"], "model": {k: v for k, v in list(
                            ckpt["state"]["model"].items())[1:]}}}, "its weights or optimiser state cannot be loaded"),
                        ({**ckpt, "state": {**ckpt["state"], "model": {k: v.reshape(-1)[:1] for k, v in
                                                                       ckpt["state"]["model"].items()}}},
                         "its weights or optimiser state cannot be loaded"),
                        ({**ckpt, "state": {"model": ckpt["state"]["model"]}}, "cannot be loaded \\(KeyError")):
        torch.save(bad, out / CHECKPOINT)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        with pytest.raises(RQAEError, match=needle):
            train(rqae_cfg(store_path, out, tokens=256 * 20, resume=True), progress=False)
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_refuses_a_store_that_grew_or_was_harvested_again(store_path, tmp_path, tiny_lm):
    """The held-out split and the shuffle order follow the store's committed rows: a resume
    on a store that grew (or a new harvest at the same path) trained on other rows, exit 0."""
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(store_path, store)
    out = tmp_path / "run"
    train(rqae_cfg(store, out, tokens=256 * 20), progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    harvest(tiny_config(store, tokens=16384 + 2048, resume=True), lm=tiny_lm, progress=False)
    with pytest.raises(RQAEError, match="was trained on 16,384 committed rows"):
        train(rqae_cfg(store, out, tokens=256 * 20, resume=True), progress=False)
    shutil.rmtree(store)
    harvest(tiny_config(store, tokens=16384), lm=tiny_lm, progress=False)
    with pytest.raises(RQAEError, match="another harvest"):
        train(rqae_cfg(store, out, tokens=256 * 20, resume=True), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_without_a_checkpoint_is_held_to_the_settings_in_train_json(store_path, tmp_path):
    out = tmp_path / "run"
    train(rqae_cfg(store_path, out, tokens=256 * 10), progress=False)
    (out / CHECKPOINT).unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(RQAEError, match="seed was 0, now 7"):
        train(rqae_cfg(store_path, out, tokens=256 * 10, resume=True, seed=7), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("bad", ["5", '"x"', "[1, 2]", '{"step": "7"}', '{"step": null}', "{not json"])
def test_a_damaged_metrics_row_before_the_last_is_one_error_and_the_file_is_kept(tmp_path, bad):
    from rqae_pipeline.run_dir import keep_metrics_up_to

    path = tmp_path / "metrics.jsonl"
    text = '{"step": 5, "loss": 1.0}\n' + bad + '\n{"step": 10, "loss": 0.5}\n'
    path.write_text(text)
    with pytest.raises(RQAEError, match="line 2 is not a metrics row"):
        keep_metrics_up_to(path, 10)
    assert path.read_text() == text
    path.write_text('{"step": 5}\n{"step": 15}\n{"step": 2')  # a last row cut short by a kill: dropped
    keep_metrics_up_to(path, 10)
    assert path.read_text() == '{"step": 5}\n'


def test_a_run_stopped_while_plotting_is_not_done_and_resume_finishes_it(store_path, tmp_path, monkeypatch):
    """train.json is marked done after the plots: a stop while plotting leaves a run that
    `--resume` finishes, never one marked done without its PNGs."""
    import rqae_pipeline.report.plots as plots

    out = tmp_path / "run"
    real_plot = plots.plot_training

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_training", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(rqae_cfg(store_path, out), progress=False)
    assert json.loads((out / "train.json").read_text())["status"] != "done"
    monkeypatch.setattr(plots, "plot_training", real_plot)
    resumed_at = torch.load(out / CHECKPOINT, weights_only=False)["step"]
    result = train(rqae_cfg(store_path, out, resume=True), progress=False)
    run = json.loads((out / "train.json").read_text())
    assert result.steps == 40 and run["status"] == "done"
    assert (out / "loss_curve.png").exists() and (out / "fvu_vs_prefix.png").exists()
    assert run["starts"] == [{"step": 0, "processes": 1}, {"step": resumed_at, "processes": 1}] and resumed_at > 0

