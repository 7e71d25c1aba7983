import json
import shutil

import numpy as np
import pytest
import torch

from rqae_pipeline import RQAEError
from rqae_pipeline.evaluate import EvalConfig, Stats, evaluate
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.registry import load_model_dir
from rqae_pipeline.store import ActivationStore, Flags

from helpers import raw_space_sae, tiny_config


def test_golden_mean_prediction_is_fvu_1_and_perfect_is_0():
    torch.manual_seed(0)
    x = torch.randn(1000, 16) * torch.linspace(0.1, 5, 16) + 3
    mean = x.double().mean(0).float()
    parts = [Stats().add(x[a:a + 137], {"mean": mean.expand(len(x[a:a + 137]), -1), "perfect": x[a:a + 137]})
             for a in range(0, 1000, 137)]
    total = Stats()
    for p in parts:
        total = total.merge(p)
    m = total.metrics(16)
    assert m["mean"]["fvu"] == pytest.approx(1.0, abs=1e-6) and m["perfect"]["fvu"] == 0.0
    # a per-batch-mean formula (the legacy sae-lens bug) would not give 1 here
    legacy = np.mean([float((x[a:a + 137] - mean).pow(2).sum() / (x[a:a + 137] - x[a:a + 137].mean(0)).pow(2).sum())
                      for a in range(0, 1000, 137)])
    assert abs(legacy - 1.0) > 1e-3


def direct_fvu(store_path, model_dir, start, prefix=None):
    store = ActivationStore.open(store_path)
    rows = store.read(start, store.n_tokens)
    x = rows.acts[torch.from_numpy((rows.flags & int(Flags.BOS | Flags.OUTLIER)) == 0)]
    model = load_model_dir(model_dir)
    with torch.no_grad():
        x_hat = model.decode(model.encode(x), prefix) if prefix else model(x)
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


def test_metrics_equal_a_direct_computation_and_ignore_batching(trained):
    store, runs = trained
    first = json.loads((runs["rqae"] / "train.json").read_text())["heldout"]["first_row"]
    results = [evaluate(EvalConfig(store=store, model=runs["rqae"], batch_size=b), progress=False) for b in (64, 5000)]
    for label in results[0]["metrics"]:
        assert results[0]["metrics"][label]["fvu"] == pytest.approx(results[1]["metrics"][label]["fvu"], rel=1e-9)
    assert results[0]["metrics"]["rqae@8"]["fvu"] == pytest.approx(direct_fvu(store, runs["rqae"], first, 8), rel=1e-6)
    assert results[0]["metrics"]["rqae@2"]["fvu"] == pytest.approx(direct_fvu(store, runs["rqae"], first, 2), rel=1e-6)
    assert results[0]["rows"] == [first, ActivationStore.open(store).n_tokens]
    # the held-out run's training metrics agree with the evaluator
    heldout = json.loads((runs["rqae"] / "train.json").read_text())["heldout_metrics"]
    assert heldout["fvu"] == pytest.approx(results[0]["metrics"]["rqae@8"]["fvu"], rel=1e-6)


def test_sae_metrics_include_l0_and_dead_latents(trained):
    store, runs = trained
    r = evaluate(EvalConfig(store=store, model=runs["topk-sae"], rows="all"), progress=False)
    assert r["kind"] == "sae" and r["latents"] == 128 and 0 <= r["dead_latents"] <= 128
    assert r["l0"] == pytest.approx(8.0, abs=1.0)
    assert r["metrics"]["sae"]["fvu"] == pytest.approx(direct_fvu(store, runs["topk-sae"], 0), rel=1e-5)


def test_dask_local_cluster_equals_the_single_process_path(trained):
    store, runs = trained
    single = evaluate(EvalConfig(store=store, model=runs["rqae"], rows="all"), progress=False)
    dask = evaluate(EvalConfig(store=store, model=runs["rqae"], rows="all", workers=2), progress=False)
    assert dask["tokens"] == single["tokens"]
    for label, m in single["metrics"].items():
        assert dask["metrics"][label]["fvu"] == pytest.approx(m["fvu"], rel=1e-9)
        assert dask["metrics"][label]["mse"] == pytest.approx(m["mse"], rel=1e-9)
    for key in ("perplexity_mean", "dead_codes_mean"):
        assert dask["code_usage"][key] == pytest.approx(single["code_usage"][key], rel=1e-9)


def test_a_model_replaced_in_its_directory_is_loaded_anew(trained, tmp_path):
    """Each process (a dask worker kept between jobs) caches the models it loaded; a run
    written again into the same directory must not be evaluated with the old weights."""
    import shutil

    from rqae_pipeline.evaluate import load_model
    from rqae_pipeline.models.rqae import RQAE

    model_dir = tmp_path / "rqae"
    shutil.copytree(trained[1]["rqae"], model_dir)
    first = load_model(model_dir)
    assert load_model(model_dir) is first  # unchanged: the cached instance
    replaced = RQAE.load(model_dir)
    with torch.no_grad():
        replaced.W_in.mul_(2)
    replaced.save(model_dir)
    again = load_model(model_dir)
    assert again is not first and torch.equal(again.W_in, replaced.W_in)


def test_bad_evaluation_input(trained, tmp_path, tiny_lm):
    store, runs = trained
    with pytest.raises(RQAEError, match="cannot reach the dask scheduler"):
        evaluate(EvalConfig(store=store, model=runs["rqae"], scheduler="tcp://127.0.0.1:9"), progress=False)
    other = tmp_path / "other.zarr"
    harvest(tiny_config(other, tokens=1024, hook="0"), lm=tiny_lm, progress=False)
    for rows in ("heldout", "all"):  # rows of another hook mean nothing to the model, whichever are read
        with pytest.raises(RQAEError, match="trained on rows of hook 'blocks.1.hook_resid_post'; the store's hook"):
            evaluate(EvalConfig(store=other, model=runs["rqae"], rows=rows), progress=False)
    # the same LM, hook and normalisation in other contexts: its held-out split is not there
    longer = tmp_path / "longer.zarr"
    harvest(tiny_config(longer, tokens=1024, context_length=64), lm=tiny_lm, progress=False)
    with pytest.raises(RQAEError, match="trained on another store"):
        evaluate(EvalConfig(store=longer, model=runs["rqae"]), progress=False)
    assert evaluate(EvalConfig(store=longer, model=runs["rqae"], rows="all"), progress=False)["rows"] == [0, 1024]
    with pytest.raises(RQAEError, match="not a trained model directory"):
        evaluate(EvalConfig(store=store, model=tmp_path), progress=False)
    for arch in ("rqae", "topk-sae"):  # trained here on the store's rows: raw residuals are not its input
        with pytest.raises(RQAEError, match="trained here on the store's final-norm rows; drop --space raw"):
            evaluate(EvalConfig(store=store, model=runs[arch], space="raw"), progress=False)


def test_an_eval_out_its_plot_would_overwrite_or_that_is_a_directory_is_refused(tmp_path):
    from rqae_pipeline.report.evaluation import check_evaluation_out

    with pytest.raises(RQAEError, match="overwritten by its own plot"):
        check_evaluation_out(tmp_path / "x.png")
    with pytest.raises(RQAEError, match="is a directory"):
        check_evaluation_out(tmp_path)
    check_evaluation_out(tmp_path / "x.json")


def test_a_report_that_stops_part_way_leaves_no_json_of_the_run_before(tmp_path, monkeypatch):
    """`eval --out` and `compare-gemmascope --out` write their JSON last and remove the
    previous run's first: a run stopped while plotting leaves no JSON beside its new plots."""
    import rqae_pipeline.report.plots as plots
    from rqae_pipeline.report.comparison import write_report
    from rqae_pipeline.report.evaluation import write_evaluation

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "eval.json"
    out.write_text('{"the run before": 1}')
    report = tmp_path / "report"
    report.mkdir()
    for name in ("report.json", "report.html"):
        (report / name).write_text("the run before")
    monkeypatch.setattr(plots, "plot_reconstruction_vs_layers", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_evaluation({"metrics": {}}, out, "model")
    with pytest.raises(KeyboardInterrupt):
        write_report({"rqae": {}, "sae": {}}, report)
    assert not out.exists() and not (report / "report.json").exists() and not (report / "report.html").exists()


def test_eval_cli_prints_a_table_and_writes_json(trained, tmp_path):
    from typer.testing import CliRunner

    from rqae_pipeline.cli import app

    store, runs = trained
    r = CliRunner().invoke(app, ["eval", "--store", str(store), "--model", str(runs["rqae"]),
                                 "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "rqae@1" in r.stdout and "rqae@8" in r.stdout and "code_usage" in r.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.png").stat().st_size > 10_000  # the FVU-vs-layers plot
    assert saved["metrics"]["rqae@8"]["fvu"] < saved["metrics"]["rqae@1"]["fvu"]
    assert "FVU raw" in r.stdout and "ce" not in saved  # CE only when asked for
    r = CliRunner().invoke(app, ["eval", "--store", str(store), "--model", str(runs["rqae"]), "--ce-contexts", "2",
                                 "--ce-prefixes", "2", "--out", str(tmp_path / "ce.json")])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "ce.json").read_text())
    assert saved["ce_prefixes"] == [2] and set(saved["ce"]) == {"clean", "zero-ablation",
                                                                "zero-ablation-special-kept", "rqae@2"}
    assert saved["ce_bootstrap"]["contexts"] == 2 and "± " in r.stdout
    r = CliRunner().invoke(app, ["eval", "--store", str(store), "--model", str(runs["rqae"]), "--ce-contexts", "2",
                                 "--ce-prefixes", "9"])
    assert r.exit_code == 2 and "CE prefixes [9] must lie in 1..8" in r.stderr
    r = CliRunner().invoke(app, ["eval", "--store", str(store), "--model", str(runs["rqae"]), "--rows", "some"])
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown row selection")


def test_a_model_whose_train_json_is_damaged_is_one_error_line(trained, tmp_path):
    """The held-out rows come from the run's train.json: one cut short or without its split is
    one error line naming it (was a JSONDecodeError or KeyError traceback)."""
    from typer.testing import CliRunner

    from rqae_pipeline.cli import app

    store, runs = trained
    run = tmp_path / "rqae"
    shutil.copytree(runs["rqae"], run)
    info = (run / "train.json").read_text()
    for text, needle in ((info[:100], "train.json cannot be read as JSON"),
                         (json.dumps({**json.loads(info), "heldout": {}}),
                          "train.json: heldout.first_row is missing or not of type int")):
        (run / "train.json").write_text(text)
        r = CliRunner().invoke(app, ["eval", "--store", str(store), "--model", str(run)])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
        assert "use --rows all" in lines[0]


def test_ce_delta_kl_and_zero_ablation_agree_with_sae_lens_evals(trained, tmp_path, tiny_lm):
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    store_path, _ = trained
    store = ActivationStore.open(store_path)
    sae_dir = raw_space_sae(store_path, tmp_path / "sae", store.spec.hook)
    cfg = EvalConfig(store=store_path, model=sae_dir, rows="all", ce_contexts=6, exclude=int(Flags.BOS))
    ours = evaluate(cfg, progress=False)["ce"]
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(sae_dir))
    tokens = torch.from_numpy(store.read(0, 6 * 32).tokens.astype(np.int64)).reshape(6, 32)
    with torch.no_grad():
        ref = get_recons_loss(sae, tiny_lm.model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True,
                              ignore_tokens=[tiny_lm.tokenizer.bos_token_id], hook_name=store.spec.hook)
    clean, zero = float(ref["ce_loss_without_sae"].mean()), float(ref["ce_loss_with_ablation"].mean())
    with_sae = float(ref["ce_loss_with_sae"].mean())
    assert ours["clean"]["ce"] == pytest.approx(clean, rel=1e-4)
    assert ours["sae"]["ce"] == pytest.approx(with_sae, rel=1e-3)
    assert ours["sae"]["kl"] == pytest.approx(float(ref["kl_div_with_sae"][:, :-1].mean()), rel=1e-3, abs=1e-5)
    assert ours["sae"]["kl"] > 0  # the SAE changes the next-token distribution
    # zero-ablation as sae-lens computes it: every position zeroed, BOS included
    assert ours["zero-ablation"]["ce"] == pytest.approx(zero, rel=1e-4)
    assert ours["zero-ablation"]["kl"] == pytest.approx(float(ref["kl_div_with_ablation"][:, :-1].mean()), rel=1e-3)
    assert ours["sae"]["ce_recovered"] == pytest.approx((zero - with_sae) / (zero - clean), rel=1e-3)
    # keeping BOS clean is a different (labelled) measure, not the sae-lens one
    kept = ours["zero-ablation-special-kept"]["ce"]
    assert abs(kept - zero) > 1e-3 * abs(zero)
    assert all(ours[label][f"{m}_se"] > 0 for label in ("sae", "zero-ablation") for m in ("ce_delta", "kl"))


def test_ce_is_taken_only_on_whole_contexts_inside_the_evaluated_rows(trained):
    store_path, runs = trained  # 32-token contexts
    cfg = EvalConfig(store=store_path, model=runs["rqae"], row_range=(6144 + 16, 6144 + 5 * 32), ce_contexts=16)
    result = evaluate(cfg, progress=False)
    assert result["rows"] == [6160, 6304] and result["ce_contexts"] == [193, 197]
    assert len(result["ce_per_context"]["ce_tokens"]) == 4
    with pytest.raises(RQAEError, match=r"no whole context in rows \[6160, 6180\)"):
        evaluate(EvalConfig(store=store_path, model=runs["rqae"], row_range=(6160, 6180), ce_contexts=4),
                 progress=False)


def test_outlier_positions_left_clean_in_ce_are_counted_and_said(trained, tmp_path, tiny_lm):
    """Norm outliers keep their clean activation in the spliced runs (as BOS does); sae-lens
    splices them, so how many there were is part of the result."""
    from rqae_pipeline.report.evaluation import evaluation_lines

    _, runs = trained
    flagged = tmp_path / "flagged.zarr"  # a low outlier factor: many rows flagged
    harvest(tiny_config(flagged, tokens=1024, outlier_factor=1.1), lm=tiny_lm, progress=False)
    rows = ActivationStore.open(flagged).read(0, 4 * 32)
    outliers = int((((rows.flags & int(Flags.OUTLIER)) > 0) & ((rows.flags & int(Flags.BOS)) == 0)).sum())
    assert outliers > 0
    default = evaluate(EvalConfig(store=flagged, model=runs["rqae"], rows="all", ce_contexts=4), progress=False)
    assert default["ce_clean_positions_not_bos"] == outliers
    assert f"{outliers:,} positions besides BOS (norm outliers) kept their clean activation" in \
        "\n".join(evaluation_lines(default, runs["rqae"]))
    spliced = evaluate(EvalConfig(store=flagged, model=runs["rqae"], rows="all", ce_contexts=4,
                                  exclude=int(Flags.BOS)), progress=False)
    assert spliced["ce_clean_positions_not_bos"] == 0
    assert spliced["ce"]["rqae@8"]["ce"] != default["ce"]["rqae@8"]["ce"]
    assert "besides BOS" not in "\n".join(evaluation_lines(spliced, runs["rqae"]))


def test_ce_from_the_hook_layer_equals_a_full_forward_with_a_hook(trained, monkeypatch):
    """The CE path that starts the LM at the hook's block must equal splicing by a forward
    hook on a full run (the path every other hook takes)."""
    from rqae_pipeline import evaluate as ev

    store_path, runs = trained
    cfg = EvalConfig(store=store_path, model=runs["rqae"], rows="all", ce_contexts=5, prefixes=(1, 8))
    assert ev.residual_start_layer(ActivationStore.open(store_path).spec.hook) == 2
    fast_run = evaluate(cfg, progress=False)
    monkeypatch.setattr(ev, "residual_start_layer", lambda hook: None)
    slow_run = evaluate(cfg, progress=False)
    fast, slow = fast_run["ce"], slow_run["ce"]
    # both read the clean run's activation at the hook, and both find it the stored rows (fp16)
    assert 0 < fast_run["ce_lm_error"] < 1e-6
    assert fast_run["ce_lm_error"] == pytest.approx(slow_run["ce_lm_error"], rel=1e-3)
    assert set(fast) == {"clean", "zero-ablation", "zero-ablation-special-kept", "rqae@1", "rqae@8"}
    assert fast.keys() == slow.keys()
    for label in fast:
        for key, value in fast[label].items():
            assert value == pytest.approx(slow[label][key], rel=1e-4, abs=1e-6), (label, key)
    assert fast["rqae@1"]["kl"] > 0


# what an SAE's cfg.json names, against a store of tiny-random:0 at blocks.1.hook_resid_post
SAE_FACTS = {
    "another hook": (lambda c: c["metadata"].update(hook_name="blocks.0.hook_resid_post"),
                     "reads blocks.0.hook_resid_post, the store holds blocks.1.hook_resid_post", True),
    "another LM": (lambda c: c["metadata"].update(model_name="gemma-2-2b"),
                   "was trained on gemma-2-2b, the store holds tiny-random:0", True),
    "one head": (lambda c: c["metadata"].update(hook_head_index=3), "reads one attention head", True),
    # a scale sae-lens keeps beside the weights and does not apply: every number would be off by it
    "unapplied scale": (lambda c: c.update(normalize_activations="expected_average_only_in"),
                        "does not apply at inference", True),
    # without these it would be scored on whichever hook / LM the store holds
    "no hook": (lambda c: c["metadata"].pop("hook_name"), "names no hook", False),
    "no LM": (lambda c: c["metadata"].pop("model_name"), "names no model", False),
}


@pytest.mark.parametrize("edit, message, in_any_space", SAE_FACTS.values(), ids=SAE_FACTS)
def test_an_sae_whose_cfg_json_disagrees_with_the_store_is_refused(trained, tmp_path, edit, message, in_any_space):
    store_path, _ = trained
    sae_dir = raw_space_sae(store_path, tmp_path / "sae", "blocks.1.hook_resid_post")
    evaluate(EvalConfig(store=store_path, model=sae_dir, rows="all", batch_size=8192), progress=False)  # as saved
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    edit(cfg)
    (sae_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(RQAEError, match=message):
        evaluate(EvalConfig(store=store_path, model=sae_dir, rows="all"), progress=False)
    if in_any_space:  # --space normalised says how to read the rows, not which rows the SAE was trained on
        with pytest.raises(RQAEError, match=message):
            evaluate(EvalConfig(store=store_path, model=sae_dir, rows="all", space="normalised"), progress=False)


def raw_reconstruction(model, raw: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(model.encode(raw))


def fvu64(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x64 = x.double()
    return float((x64 - x_hat.double()).pow(2).sum() / (x64 - x64.mean(0)).pow(2).sum())


def kept_rows(store: ActivationStore, start: int):
    rows = store.read(start, store.n_tokens)
    keep = torch.from_numpy((rows.flags & int(Flags.BOS | Flags.OUTLIER)) == 0)
    return rows.acts[keep], rows.scale[keep]


def test_no_ce_is_taken_from_an_lm_that_does_not_reproduce_the_stored_rows(trained, monkeypatch):
    """A store names its LM; if the weights loaded under that name are not the ones it was
    harvested with (a hub revision changed, a name edited), CE would mix two models."""
    from rqae_pipeline import evaluate as ev
    from rqae_pipeline.lm import load_lm

    store_path, runs = trained
    cfg = EvalConfig(store=store_path, model=runs["rqae"], ce_contexts=2, prefixes=(8,))
    evaluate(cfg, progress=False)  # the LM the store names
    monkeypatch.setitem(ev._LMS, "tiny-random:0", load_lm("tiny-random:1", device="cpu"))  # other weights
    with pytest.raises(RQAEError, match=r"the LM does not reproduce the store's rows at blocks.1.hook_resid_post "
                                        r"\(relative squared error [0-9.]+"):
        evaluate(cfg, progress=False)


def test_raw_space_fvu_of_a_stored_space_model_equals_a_direct_float64_computation(trained):
    store_path, runs = trained
    store = ActivationStore.open(store_path)
    r = evaluate(EvalConfig(store=store_path, model=runs["rqae"], prefixes=(2, 8)), progress=False)
    acts, scale = kept_rows(store, r["rows"][0])
    model = load_model_dir(runs["rqae"])
    raw = acts.double() / store.gain.double() * scale.double()[:, None]  # the raw residuals, in float64
    for m in (2, 8):
        with torch.no_grad():
            x_hat = model.decode(model.encode(acts), m)
        direct = fvu64(raw, x_hat.double() / store.gain.double() * scale.double()[:, None])
        assert r["metrics"][f"rqae@{m}"]["fvu_raw"] == pytest.approx(direct, rel=1e-5)
        assert r["metrics"][f"rqae@{m}"]["fvu_normalised"] == pytest.approx(fvu64(acts, x_hat), rel=1e-5)
        assert r["metrics"][f"rqae@{m}"]["mse_raw"] == pytest.approx(
            float((raw - x_hat.double() / store.gain.double() * scale.double()[:, None]).pow(2).mean()), rel=1e-5)
    # the two spaces weigh tokens differently (per-token scale), so the FVUs differ
    assert r["metrics"]["rqae@2"]["fvu_raw"] != pytest.approx(r["metrics"]["rqae@2"]["fvu_normalised"], rel=1e-3)


def test_stored_space_fvu_of_a_raw_space_sae_equals_a_direct_float64_computation(trained, tmp_path):
    from sae_lens import SAE

    store_path, _ = trained
    store = ActivationStore.open(store_path)
    sae_dir = raw_space_sae(store_path, tmp_path / "sae", store.spec.hook)
    r = evaluate(EvalConfig(store=store_path, model=sae_dir, rows="all"), progress=False)
    assert r["space"] == "raw"
    acts, scale = kept_rows(store, 0)
    raw = store.to_raw(acts, scale)
    x_hat_raw = raw_reconstruction(SAE.load_from_disk(str(sae_dir)), raw)
    # into the stored space with each row's own scale: x_hat_stored = x_hat_raw / scale * gain
    x_hat_stored = x_hat_raw.double() / scale.double()[:, None] * store.gain.double()
    assert r["metrics"]["sae"]["fvu_normalised"] == pytest.approx(fvu64(acts, x_hat_stored), rel=1e-5)
    assert r["metrics"]["sae"]["fvu_raw"] == pytest.approx(fvu64(raw, x_hat_raw), rel=1e-5)
    assert r["metrics"]["sae"]["fvu"] == r["metrics"]["sae"]["fvu_normalised"]
    # dead latents are counted over every evaluated row, and the result says how many
    assert r["dead_window_tokens"] == r["tokens"] == len(acts)
    assert r["dead_window_firings_per_latent"] == pytest.approx(r["l0"] * len(acts) / 96)


def test_bootstrap_standard_error_is_zero_for_equal_contexts_and_the_analytic_one_otherwise():
    from rqae_pipeline.metrics import bootstrap_se

    assert bootstrap_se(np.full(64, 3.25), resamples=500) == pytest.approx(0.0, abs=1e-12)
    x = np.random.default_rng(1).normal(2.0, 0.7, size=64)
    analytic = x.std(ddof=0) / np.sqrt(len(x))  # the bootstrap's SE of the mean
    assert bootstrap_se(x, resamples=20_000, seed=3) == pytest.approx(analytic, rel=0.03)
    assert bootstrap_se(x, resamples=500, seed=3) == bootstrap_se(x, resamples=500, seed=3)  # seeded


def test_ce_summary_standard_errors_come_from_per_context_sums():
    from rqae_pipeline.ce import ce_summary

    n, tokens = 64, 31.0
    rng = np.random.default_rng(0)
    counts = {"ce_tokens": np.full(n, tokens), "ce:clean": np.full(n, 2.0 * tokens),
              "ce:zero-ablation": np.full(n, 5.0 * tokens), "kl:zero-ablation": np.full(n, 3.0 * tokens),
              "ce:rqae@1": np.full(n, 2.5 * tokens), "kl:rqae@1": np.full(n, 0.4 * tokens)}
    delta = rng.normal(0.5, 0.2, size=n)  # a per-context CE-delta with a known spread
    counts["ce:rqae@4"] = (2.0 + delta) * tokens
    counts["kl:rqae@4"] = np.full(n, 0.1 * tokens)
    out = ce_summary(Stats(counts=counts), resamples=20_000, seed=0)
    one = out["rqae@1"]
    assert one["ce_delta"] == pytest.approx(0.5) and one["ce_delta_se"] == pytest.approx(0, abs=1e-9)
    assert one["ce_recovered"] == pytest.approx(2.5 / 3) and one["kl_se"] == pytest.approx(0, abs=1e-9)
    assert out["rqae@4"]["ce_delta"] == pytest.approx(delta.mean())
    assert out["rqae@4"]["ce_delta_se"] == pytest.approx(delta.std(ddof=0) / np.sqrt(n), rel=0.03)


BAD_DEVICES = [
    ("gpu", "unknown device 'gpu'; use cpu, cuda or cuda:N"),
    ("cuda:64", "--device cuda:64: "),  # no machine has 65 GPUs; without CUDA, "no CUDA device"
    ("meta", "--device meta: only cpu and cuda devices are supported"),
]


def test_eval_device_option_runs_on_cpu_and_refuses_a_bad_device(trained, tmp_path):
    from typer.testing import CliRunner

    from rqae_pipeline.cli import app

    store, runs = trained
    base = ["eval", "--store", str(store), "--model", str(runs["rqae"])]
    for device, message in BAD_DEVICES:
        r = CliRunner().invoke(app, [*base, "--device", device, "--out", str(tmp_path / "bad.json")])
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), r.stderr
        assert not list(tmp_path.iterdir())
    r = CliRunner().invoke(app, [*base, "--device", "cpu", "--out", str(tmp_path / "cpu.json")])
    assert r.exit_code == 0, r.output
    direct = evaluate(EvalConfig(store=store, model=runs["rqae"]), progress=False)  # the library's default: cpu
    assert json.loads((tmp_path / "cpu.json").read_text())["metrics"]["rqae@8"]["fvu"] == pytest.approx(
        direct["metrics"]["rqae@8"]["fvu"], rel=1e-9)


def test_a_model_with_nan_weights_is_an_error_not_a_table_of_nan(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    store, runs = trained
    run = tmp_path / "rqae"
    shutil.copytree(runs["rqae"], run)
    weights = load_file(run / "model.safetensors")
    weights["W_out"] = weights["W_out"].clone()
    weights["W_out"].view(-1)[0] = float("nan")
    save_file(weights, run / "model.safetensors")
    with pytest.raises(RQAEError, match="reconstruction is not finite"):
        evaluate(EvalConfig(store=store, model=run), progress=False)


def test_an_fvu_needs_two_rows_that_vary():
    from rqae_pipeline.metrics import Stats

    def stats(x):
        s = Stats(n=len(x), sumsq=float((x.double() ** 2).sum()), sum=x.double().sum(0).numpy())
        s.sse["model"] = 1.0
        return s

    for rows, needle in ((torch.ones(1, 4), "1 row"), (torch.ones(5, 4), "do not vary")):
        with pytest.raises(RQAEError, match=needle):
            stats(rows).metrics(4)
    assert stats(torch.arange(8.0).reshape(2, 4)).metrics(4)["model"]["fvu"] == pytest.approx(1 / 32)


def test_one_context_gives_no_standard_error_not_zero():
    from rqae_pipeline.ce import ce_summary

    def summary(contexts):
        s = Stats()
        s.counts = {"ce_tokens": np.full(contexts, 10.0), "ce:clean": 30.0 + np.arange(contexts),
                    "ce:model": 31.0 + 2 * np.arange(contexts), "kl:model": np.full(contexts, 0.5)}
        return ce_summary(s)["model"]

    one, two = summary(1), summary(2)
    assert one["ce_delta"] == pytest.approx(0.1) and np.isnan(one["ce_delta_se"])  # was 0.0: "± 0.0000"
    assert two["ce_delta_se"] > 0


def test_an_error_in_a_task_ends_the_progress_bar_line_first(capsys):
    """The CLI prints an error as one line starting `error:`: the bar's line must be ended
    before the error leaves `run_tasks`, not when the bar is garbage-collected."""
    from rqae_pipeline.tasks import run_tasks

    def shard(i):
        if i == 2:
            raise RQAEError("shard 2 is damaged")
        return i

    cfg = EvalConfig(store="unused", model="unused")
    try:
        run_tasks(shard, [(i,) for i in range(4)], cfg, "evaluate", progress=True)
    except RQAEError:
        err = capsys.readouterr().err  # while the error is being handled, as the CLI prints it
    assert "evaluate" in err and err.endswith("\n")
