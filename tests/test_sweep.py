import json
import math
from dataclasses import replace

import pytest

from rqae_pipeline import RQAEError
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.sae import SAEBaseline
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.sweep import (
    SWEEP_FILE,
    SweepConfig,
    best_rate,
    evaluate_seeds,
    format_quality_table,
    ladder_index,
    ladder_rate,
    mean_se,
    plateau_summary,
    run_sweep,
    splits,
)
from rqae_pipeline.train import heldout_split

from helpers import tiny_config


@pytest.fixture(scope="module")
def store_path(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny.zarr"
    harvest(tiny_config(out, tokens=4096), lm=tiny_lm, progress=False)  # 128 contexts of 32 tokens
    return out


def test_mean_and_standard_error_over_seeds():
    mean, se = mean_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1 / math.sqrt(3))  # sample std 1, over sqrt(3)
    assert mean_se([0.5]) == (0.5, pytest.approx(math.nan, nan_ok=True))


def test_plateau_summary_reads_the_last_fifth_of_a_known_series():
    steps = list(range(10, 101, 10))
    falling = [1.0 - 0.001 * s for s in steps]  # slope -1 per 1,000 steps throughout
    p = plateau_summary(steps, falling, total_steps=100)
    assert p["points"] == 3 and p["first_step"] == 80  # steps 80, 90, 100
    assert p["min"] == pytest.approx(0.9) and p["max"] == pytest.approx(0.92)
    assert p["slope_per_1k"] == pytest.approx(-1.0)
    assert p["relative_change"] == pytest.approx(-0.02 / 0.91)
    flat = plateau_summary(steps, [0.5] * 7 + [0.3, 0.3, 0.3], total_steps=100)
    assert flat["slope_per_1k"] == 0.0 and flat["relative_change"] == 0.0 and flat["max"] == 0.3
    assert plateau_summary([100], [0.3], total_steps=100) == {"points": 1}


def test_ladder_and_best_rate():
    assert [ladder_rate(j) for j in (-7, -6, -5, -4)] == [3e-4, 1e-3, 3e-3, 1e-2]
    assert all(ladder_rate(ladder_index(lr)) == lr for lr in (1e-4, 3e-4, 1e-2, 0.3, 3.0))
    rows = [{"lr": 1e-3, "fvu": 0.4}, {"lr": 3e-3, "fvu": 0.2}, {"lr": 1e-2, "fvu": math.inf}]
    assert best_rate(rows)["lr"] == 3e-3 and not best_rate(rows)["at_edge"]
    assert best_rate(rows[:2])["at_edge"]
    with pytest.raises(RQAEError, match="every learning rate diverged"):
        best_rate([{"lr": 1.0, "fvu": math.inf}])


def test_validation_and_test_contexts_are_disjoint(store_path):
    store = ActivationStore.open(store_path)
    val, test = splits(store, 8)
    R = store.spec.rows_per_context
    assert test.eval_rows == 8 * R and val.eval_rows == 8 * R
    # sweep runs evaluate on the 8 contexts before the last 8, which seed runs train on
    assert heldout_split(store, val.fraction)["first_row"] + val.eval_rows == heldout_split(store, test.fraction)[
        "first_row"]
    with pytest.raises(RQAEError, match="too few"):
        splits(store, 64)


def test_sae_windows_scale_with_short_runs():
    spec = ModelSpec(arch="topk-sae", d_in=16, d_sae=32, k=4)
    short = SAEBaseline(spec, total_steps=200).trainer.cfg
    assert (short.dead_feature_window, short.feature_sampling_window) == (10, 20)
    long = SAEBaseline(spec, total_steps=100_000).trainer.cfg
    assert (long.dead_feature_window, long.feature_sampling_window) == (1000, 2000)  # sae-lens's own


def test_sweep_keeps_the_lowest_validation_fvu_and_a_diverging_rate_loses(store_path, tmp_path):
    spec = ModelSpec(arch="topk-sae", d_in=64, d_sae=128, k=4)
    cfg = SweepConfig(store=store_path, out=tmp_path / "q", models={"topk": spec}, tokens=128 * 20, batch_size=128,
                      grid=(3e-3, 1e4), extend=1, seeds=(0, 1), heldout_contexts=8, evaluations=5, progress=False)
    result = run_sweep(cfg, echo=lambda _: None)
    entry = result["models"]["topk"]
    rows = {r["lr"]: r for r in entry["sweep"]}
    # lr 1e4 turns the loss NaN; 3e-3 is then the best at the grid's lower edge, so the
    # next rate down (1e-3) is tried once (extend=1)
    assert set(rows) == {1e-3, 3e-3, 1e4} and "diverged" in rows[1e4] and rows[1e4]["fvu"] == math.inf
    assert entry["chosen_lr"] == min((1e-3, 3e-3), key=lambda lr: rows[lr]["fvu"])
    val_rows = result["validation"]["eval_rows"]
    for r in rows.values():
        if "plateau" in r:
            assert r["plateau"]["points"] >= 2
            final = json.loads((tmp_path / "q" / "sweep" / "topk" / f"lr-{r['lr']:g}" / "train.json").read_text())
            assert final["heldout_metrics"]["tokens"] <= val_rows and final["heldout_metrics"]["fvu"] == r["fvu"]
    assert [s["seed"] for s in entry["seeds"]] == [0, 1]
    saved = json.loads((tmp_path / "q" / SWEEP_FILE).read_text())
    assert saved["models"]["topk"]["chosen_lr"] == entry["chosen_lr"]
    assert next(r for r in saved["models"]["topk"]["sweep"] if r["lr"] == 1e4)["fvu"] is None  # JSON has no inf
    # a diverged run is reused only for the settings it diverged with
    import dataclasses

    with pytest.raises(RQAEError, match="diverged with other settings"):
        run_sweep(dataclasses.replace(cfg, grid=(1e4,), tokens=128 * 30), echo=lambda _: None)

    evaluated = evaluate_seeds(cfg, result, ce_contexts=0, echo=lambda _: None)
    fvus = [r["fvu"] for r in evaluated["topk"]]
    assert len(fvus) == 2 and fvus[0] != fvus[1]  # the seed changes init and batch order
    table = format_quality_table(evaluated)
    mean, se = mean_se(fvus)
    assert f"{mean:.4f} ± {se:.4f}" in table
    dead, dead_se = mean_se([r["dead"] for r in evaluated["topk"]])  # 0 and 1 dead latents read 0.5 ± 0.5
    assert f"{dead:.1f} ± {dead_se:.1f}" in table
    # a rate chosen at the edge of those tried is marked, so the reader knows the search may be short
    assert ("* the chosen rate is at the edge" in table) == entry["chosen_at_edge"]


def test_rqae_sweep_command_writes_the_sweep_and_the_table(store_path, tmp_path):
    from typer.testing import CliRunner

    from rqae_pipeline.cli import app

    out = tmp_path / "cli"
    args = ["sweep", "--store", str(store_path), "--out", str(out), "--arch", "rqae", "--n-q", "4", "--tokens",
            "2560", "--batch-size", "128", "--rates", "1", "--extend", "0", "--seeds", "2", "--heldout-contexts", "8",
            "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / SWEEP_FILE).read_text())["models"]["rqae-4"]
    assert [r["lr"] for r in saved["sweep"]] == [1e-2] and len(saved["seeds"]) == 2  # the family default alone
    fvus = [r["fvu"] for r in json.loads((out / "quality.json").read_text())["rqae-4"]]
    assert "rqae-4" in result.output and f"{mean_se(fvus)[0]:.4f} ±" in result.output


def test_a_run_finished_before_a_setting_existed_is_reused_and_one_with_other_settings_refused(store_path, tmp_path):
    from rqae_pipeline.sweep import train_run

    spec, out = ModelSpec(arch="rqae", d_in=64, n_q=4, lr=1e-2), tmp_path / "run"
    cfg = SweepConfig(store=store_path, out=tmp_path / "q", models={"rqae": spec}, tokens=128 * 4, batch_size=128,
                      heldout_contexts=8, evaluations=2, progress=False)
    split = splits(ActivationStore.open(store_path), cfg.heldout_contexts)[0]
    first = train_run(cfg, spec, seed=0, out=out, split=split)
    info = json.loads((out / "train.json").read_text())
    del info["config"]["streams"]  # as written before `streams` was a setting (one stream)
    (out / "train.json").write_text(json.dumps(info))
    assert train_run(cfg, spec, seed=0, out=out, split=split)["fvu"] == first["fvu"]  # reused, not retrained
    info["config"]["streams"] = 2
    (out / "train.json").write_text(json.dumps(info))
    with pytest.raises(RQAEError, match="holds a finished run with other settings"):
        train_run(cfg, spec, seed=0, out=out, split=split)


def test_a_damaged_run_record_is_one_error_line(store_path, tmp_path):
    """A sweep reuses a finished or diverged run from its train.json or diverged.json: one cut
    short or without its result, or a damaged row of its metrics, is one error line naming it
    (was a JSONDecodeError or KeyError)."""
    from rqae_pipeline.sweep import DIVERGED_FILE, train_run

    spec, out = ModelSpec(arch="rqae", d_in=64, n_q=4, lr=1e-2), tmp_path / "run"
    cfg = SweepConfig(store=store_path, out=tmp_path / "q", models={"rqae": spec}, tokens=128 * 4, batch_size=128,
                      heldout_contexts=8, evaluations=2, progress=False)
    split = splits(ActivationStore.open(store_path), cfg.heldout_contexts)[0]
    train_run(cfg, spec, seed=0, out=out, split=split)
    info = (out / "train.json").read_text()
    no_result = json.dumps({k: v for k, v in json.loads(info).items() if k != "heldout_metrics"})
    for name, text, needle in (("train.json", info[:100], "train.json cannot be read as JSON"),
                               ("train.json", no_result, "train.json: heldout_metrics.fvu is missing"),
                               (DIVERGED_FILE, '{"diverged": "loss bec', "diverged.json cannot be read as JSON")):
        (out / name).write_text(text)
        with pytest.raises(RQAEError, match=needle) as e:
            train_run(cfg, spec, seed=0, out=out, split=split)
        assert f"delete {out} to train the run again" in str(e.value)
        (out / "train.json").write_text(info)
    (out / DIVERGED_FILE).unlink()
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([metrics[0][:20]] + metrics[1:]) + "\n")  # a damaged first row
    with pytest.raises(RQAEError, match=r"metrics.jsonl line 1 is not a metrics row; delete .* to train the run again"):
        train_run(cfg, spec, seed=0, out=out, split=split)


def test_a_finished_run_is_not_reused_on_another_store_and_a_diverged_one_needs_its_settings(store_path, tmp_path,
                                                                                              tiny_lm):
    """Runs are reused by their directory: one trained on another harvest with the same
    settings (its FVU another store's) was taken as this store's, and a diverged.json
    without the settings it diverged with was taken for any."""
    from rqae_pipeline.sweep import DIVERGED_FILE, train_run

    spec, out = ModelSpec(arch="rqae", d_in=64, n_q=4, lr=1e-2), tmp_path / "run"
    cfg = SweepConfig(store=store_path, out=tmp_path / "q", models={"rqae": spec}, tokens=128 * 4, batch_size=128,
                      heldout_contexts=8, evaluations=2, progress=False)
    split = splits(ActivationStore.open(store_path), cfg.heldout_contexts)[0]
    train_run(cfg, spec, seed=0, out=out, split=split)
    again = tmp_path / "again.zarr"  # the same settings, harvested again: another store
    harvest(tiny_config(again, tokens=4096), lm=tiny_lm, progress=False)
    with pytest.raises(RQAEError, match="holds a finished run on another store"):
        train_run(replace(cfg, store=again), spec, seed=0, out=out, split=split)
    (out / DIVERGED_FILE).write_text(json.dumps({"diverged": "loss became nan by step 3"}))
    with pytest.raises(RQAEError, match="diverged.json: config is missing"):
        train_run(cfg, spec, seed=0, out=out, split=split)
