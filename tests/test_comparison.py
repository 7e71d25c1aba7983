"""`rqae compare-gemmascope`: the report, its numbers and its refusals."""

import json
import math
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rqae_pipeline.cli import app
from rqae_pipeline.evaluate import EvalConfig, PretrainedSAE, evaluate
from rqae_pipeline.harvest import harvest
from rqae_pipeline.models.base import ModelSpec
from rqae_pipeline.models.registry import load_model_dir
from rqae_pipeline.pearson import PearsonConfig, example_tokens, pearson_matching
from rqae_pipeline.store import ActivationStore
from rqae_pipeline.train import TrainConfig, train

from helpers import raw_space_sae, tiny_config


def compare(*args):
    return CliRunner().invoke(app, ["compare-gemmascope", *map(str, args)])


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    """The comparison of the tiny RQAE with a raw-space sae-lens SAE (as Gemma Scope's are)."""
    store, runs = trained
    root = tmp_path_factory.mktemp("compare")
    sae = raw_space_sae(store, root / "sae", ActivationStore.open(store).spec.hook)
    out = root / "report"
    r = compare("--store", store, "--rqae", runs["rqae"], "--sae-path", sae, "--out", out, "--ce-contexts", "4",
                "--features", "8", "--ce-prefixes", "1,3,8")  # 3: not a default reconstruction prefix
    assert r.exit_code == 0, r.output
    return out, sae, r.stdout


def test_report_numbers_are_those_of_evaluate_on_the_rqae_held_out_rows(trained, report):
    store, runs = trained
    out, sae, stdout = report
    rep = json.loads((out / "report.json").read_text())
    rqae = evaluate(EvalConfig(store=store, model=runs["rqae"]), progress=False)
    assert rep["rqae"]["rows"] == rqae["rows"] and rep["sae"]["rows"] == rqae["rows"]
    for label, m in rqae["metrics"].items():
        assert rep["rqae"]["metrics"][label]["fvu"] == pytest.approx(m["fvu"], rel=1e-9)
    sae = evaluate(EvalConfig(store=store, model=sae, row_range=tuple(rqae["rows"])), progress=False)
    assert rep["sae"]["metrics"]["sae"]["fvu"] == pytest.approx(sae["metrics"]["sae"]["fvu"], rel=1e-9)
    assert rep["sae"]["space"] == "raw" and rep["sae"]["l0"] == pytest.approx(16.0)
    assert set(rep["rqae"]["ce"]) >= {"clean", "zero-ablation", "zero-ablation-special-kept", "rqae@1", "rqae@8"}
    assert "sae" in rep["sae"]["ce"] and rep["rqae"]["ce_prefixes"] == [1, 3, 8]
    # both spaces for both models, the same numbers evaluate gives
    for label, m in rqae["metrics"].items():
        assert rep["rqae"]["metrics"][label]["fvu_raw"] == pytest.approx(m["fvu_raw"], rel=1e-9)
    assert rep["sae"]["metrics"]["sae"]["fvu_raw"] == pytest.approx(sae["metrics"]["sae"]["fvu_raw"], rel=1e-9)
    # the budget rows carry what a results table needs
    rows = {r["label"]: r for r in rep["budget"]["models"]}
    assert rows["rqae@8"]["bits_per_token"] == pytest.approx(8 * np.log2(544))
    # a prefix spliced for CE is a row of the tables, with its CE (it was computed, then left out)
    assert rows["rqae@3"]["ce_delta"] == pytest.approx(rep["rqae"]["ce"]["rqae@3"]["ce_delta"])
    l0 = rep["sae"]["l0"]  # TopK: exactly k per token
    assert rows["sae"]["bits_per_token"] == pytest.approx(np.log2(float(math.comb(96, round(l0)))) + 16 * l0)
    assert rows["rqae@8"]["ce_delta_se"] > 0 and rows["sae"]["kl_se"] > 0 and rows["rqae@2"]["ce_delta"] is None
    assert rows["sae"]["weight_bytes"] == 4 * (2 * 64 * 96 + 96 + 64)  # W_enc, W_dec, b_enc, b_dec in float32
    per_layer, shared = rep["rqae"]["weight_bytes_per_layer"], rep["rqae"]["weight_bytes_shared"]
    assert rows["rqae@8"]["weight_bytes"] == 8 * per_layer + shared
    assert rep["rqae"]["weight_bytes_per_layer"] == 4 * (64 * 4 * 2 + 4 + 64)
    # the terminal table shows the same numbers
    line = next(ln for ln in stdout.splitlines() if ln.startswith("rqae@8 "))
    assert float(line.split()[1]) == pytest.approx(rep["rqae"]["metrics"]["rqae@8"]["fvu"], abs=1e-4)


def test_report_has_pearson_and_decoder_matching_for_every_prefix(report):
    out, _, _ = report
    rep = json.loads((out / "report.json").read_text())
    assert list(rep["pearson"]["summary"]["a"]) == ["1", "2", "3", "4", "8"]  # every scored prefix, 3 for CE
    scored = len(rep["pearson"]["features"])
    assert 0 < scored <= 8 and rep["pearson"]["features_scored"] == scored
    assert rep["pearson"]["features_requested"] == 8 and (rep["pearson"]["shortfall"] is None) == (scored == 8)
    for f in rep["pearson"]["features"]:
        assert all(-1 <= v <= 1 for v in f["b"].values() if np.isfinite(v))
    dm = rep["decoder_matching"]
    assert dm["sae_features"] == 96 and dm["rqae_directions"] == 8 * 544
    assert dm["assigned"] == 96 and sum(dm["best_cosine_histogram"]) == 96
    assert sum(dm["best_match_layer_counts"]) == 96 and len(dm["best_match_layer_counts"]) == 8
    assert -1 <= dm["mean_assignment_cosine"] <= dm["mean_best_cosine"] <= 1


def test_html_report_is_self_contained(report):
    out, _, _ = report
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "</html>" in page
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)) == 3
    assert not re.search(r'(src|href)="(http|file|/)', page)  # nothing outside the file
    assert "Pearson feature matching" in page and "Decoder-direction matching" in page
    assert "Matched budgets" in page and "FVU raw" in page and "bootstrap standard error" in page
    for png in ("reconstruction.png", "pearson.png", "decoder_matching.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_sae_trained_here_is_compared_in_the_normalised_space(trained, tmp_path):
    store, runs = trained
    r = compare("--store", store, "--rqae", runs["rqae"], "--sae-path", runs["topk-sae"], "--out", tmp_path / "r",
                "--ce-contexts", "0", "--features", "4")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["sae"]["space"] == "normalised" and "ce" not in rep["sae"]
    direct = evaluate(EvalConfig(store=store, model=runs["topk-sae"]), progress=False)
    assert rep["sae"]["metrics"]["sae"]["fvu"] == pytest.approx(direct["metrics"]["sae"]["fvu"], rel=1e-9)


def test_an_sae_trained_on_part_of_the_rqae_held_out_rows_is_compared_only_past_them(trained, tmp_path, tiny_lm):
    """An SAE trained here with a smaller held-out split saw the first of the RQAE's held-out
    rows: both are measured on the rows neither saw. (So few rows that no SAE feature fires
    often enough for Pearson matching: the report says so and still renders.)"""
    store, runs = trained
    sae = tmp_path / "sae"
    train(TrainConfig(store=store, out=sae, model=ModelSpec(arch="topk-sae", d_in=64, d_sae=128, k=8, lr=1e-3),
                      batch_size=256, tokens=256 * 4, heldout_fraction=0.05), progress=False)
    first = json.loads((sae / "train.json").read_text())["heldout"]["first_row"]
    n = ActivationStore.open(store).n_tokens
    rqae_rows = evaluate(EvalConfig(store=store, model=runs["rqae"], prefixes=(8,)), progress=False)["rows"]
    assert rqae_rows[0] < first < n
    r = compare("--store", store, "--rqae", runs["rqae"], "--sae-path", sae, "--out", tmp_path / "r",
                "--ce-contexts", "0", "--features", "4")
    assert r.exit_code == 0, r.output
    assert f"compared on rows {first:,}..{n:,}, held out from both" in r.stderr
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["rqae"]["rows"] == rep["sae"]["rows"] == rep["pearson"]["rows"] == [first, n]
    direct = evaluate(EvalConfig(store=store, model=sae, row_range=(first, n)), progress=False)
    assert rep["sae"]["metrics"]["sae"]["fvu"] == pytest.approx(direct["metrics"]["sae"]["fvu"], rel=1e-9)
    assert rep["pearson"]["features_scored"] == 0 and "scored 0 of 4 requested" in rep["pearson"]["shortfall"]
    assert "warning: Pearson matching scored 0 of 4" in r.stderr and "Pearson: Pearson matching scored 0" in r.stdout
    assert (tmp_path / "r" / "pearson.png").read_bytes()[:4] == b"\x89PNG"

    # trained on a longer harvest with the same settings, so on every row this store has
    longer = tmp_path / "longer.zarr"
    harvest(tiny_config(longer, tokens=16384, contexts_per_shard=8), lm=tiny_lm, progress=False)
    train(TrainConfig(store=longer, out=tmp_path / "all", model=ModelSpec(arch="topk-sae", d_in=64, d_sae=128, k=8),
                      batch_size=256, tokens=256), progress=False)
    r = compare("--store", store, "--rqae", runs["rqae"], "--sae-path", tmp_path / "all", "--out", tmp_path / "r2",
                "--ce-contexts", "0")
    assert r.exit_code == 2 and "was trained on every held-out row of the RQAE" in r.stderr, r.output


class IntensitySAE:
    """A stand-in with the SAE interface whose feature 0 *is* an RQAE intensity: its
    activation on x is relu(intensity of the codes `q` on encode(x)). The (b) query must
    then recover `q`'s feature exactly: correlation 1 at every prefix length."""

    def __init__(self, rqae, q):
        self.rqae, self.q = rqae, q
        self.W_enc = torch.zeros(rqae.cfg.d_in, 2)

    def encode(self, x):
        inten = self.rqae.intensity(self.q, self.rqae.encode(x))
        return torch.stack([inten.clamp(min=0), torch.zeros_like(inten)], 1)


def test_pearson_b_recovers_a_feature_that_is_an_rqae_intensity(trained):
    store_path, runs = trained
    store = ActivationStore.open(store_path)
    rqae = load_model_dir(runs["rqae"])
    q = rqae.encode(store.read(100, 101).acts)[0]
    out = pearson_matching(rqae, IntensitySAE(rqae, q), store, PearsonConfig(features=(0,)), sae_space="normalised",
                           prefixes=(8,), exclude=1)
    (f,) = out["features"]
    assert f["b"]["8"] == pytest.approx(1.0, abs=1e-6)
    assert f["tokens"] > 20


def test_examples_come_from_top_median_and_bottom_contexts():
    # 9 contexts of 4 tokens; context c peaks at c + 1 (context 4 never fires)
    ctx = torch.arange(9).repeat_interleave(4)
    a = torch.zeros(36)
    for c in range(9):
        if c != 4:
            a[4 * c + 1] = c + 1
            a[4 * c + 2] = 0.5
    tok = example_tokens(a, ctx, per_group=1)
    # firing contexts by max: 8,7,6,5,3,2,1,0 -> top 8, median (index 4) 3, bottom 0
    assert sorted(set((tok // 4).tolist())) == [0, 3, 8]
    assert (a[tok] > 0).all() and len(tok) == 6


def test_bad_comparison_input(trained, tmp_path, tiny_lm):
    store, runs = trained
    base = ["--store", store, "--rqae", runs["rqae"], "--out", tmp_path / "r", "--ce-contexts", "0"]

    def refused(*extra, match):
        r = compare(*base, *extra)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and re.search(match, lines[-1]), lines
        assert not (tmp_path / "r" / "report.json").exists()

    refused("--release", "gemma-scope-9b-nope", "--sae-id", "x", match="unknown sae-lens release 'gemma-scope-9b-nope'")
    refused("--release", "gemma-scope-2b-pt-res-canonical", "--sae-id", "layer_99/width_16k/canonical",
            match="has no SAE 'layer_99/width_16k/canonical'")
    refused(match="either --release and --sae-id")
    refused("--release", "gemma-scope-2b-pt-res-canonical", match="go together")
    refused("--sae-path", runs["topk-sae"], "--release", "r", "--sae-id", "i", match="either")
    wide = raw_space_sae(store, tmp_path / "other-hook", "blocks.0.hook_resid_post")
    refused("--sae-path", wide, match="reads blocks.0.hook_resid_post, the store holds blocks.1.hook_resid_post")
    refused("--sae-path", runs["topk-sae"], "--scheduler", "tcp://127.0.0.1:9", match="cannot reach the dask scheduler")
    refused("--sae-path", tmp_path, match="not a trained model directory")
    # an RQAE trained on another store
    other = tmp_path / "other.zarr"
    harvest(tiny_config(other, tokens=2048, context_length=16), lm=tiny_lm, progress=False)
    train(TrainConfig(store=other, out=tmp_path / "other-rqae", model=ModelSpec(arch="rqae", d_in=64, n_q=2),
                      batch_size=128, tokens=128 * 2), progress=False)
    r = compare("--store", store, "--rqae", tmp_path / "other-rqae", "--sae-path", runs["topk-sae"], "--out",
                tmp_path / "r")
    assert r.exit_code == 2 and "was trained on another store" in r.stderr


def test_a_known_release_is_looked_up_before_any_download(monkeypatch):
    """A valid release and id reach sae-lens's `SAE.from_pretrained` with exactly those names
    (here the hub is unreachable, so its failure must come back as one line)."""
    from sae_lens import SAE

    from rqae_pipeline import RQAEError
    from rqae_pipeline.evaluate import load_pretrained_sae

    seen = []

    def offline(release, sae_id, **kw):
        seen.append((release, sae_id))
        raise OSError("hub unreachable\nsecond line")

    monkeypatch.setattr(SAE, "from_pretrained", offline)
    with pytest.raises(RQAEError, match=r"^cannot load gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical "
                                        r"through sae-lens: OSError: hub unreachable$"):
        load_pretrained_sae(PretrainedSAE("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical"))
    assert seen == [("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")]


def test_pearson_means_say_when_they_cover_fewer_features_than_were_scored():
    """A feature with a constant RQAE intensity over its examples has no correlation (NaN) at
    that prefix and is left out of that prefix's mean only: the line says over how many."""
    from rqae_pipeline.pearson import pearson_summary
    from rqae_pipeline.report.comparison import pearson_lines

    per_feature = [{"a": {"1": 0.5, "8": 0.25}, "b": {"1": 0.1, "8": 0.3}},
                   {"a": {"1": float("nan"), "8": 0.75}, "b": {"1": 0.3, "8": 0.5}}]
    summary = pearson_summary(per_feature, (1, 8))
    line = pearson_lines({"summary": summary, "features_scored": 2, "features_requested": 2})[1]
    assert "1: (a) 0.50 (of 1) (b) 0.20" in line and "8: (a) 0.50 (b) 0.40" in line


def test_a_report_folder_with_other_files_is_refused_and_left_alone(trained, tmp_path):
    """`--out` of a model directory, a store or a home folder: refused, not filled with a report."""
    store, runs = trained
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / ".DS_Store").write_text("")  # hidden: not counted
    (out / "report.json").write_text("a report of mine")
    r = compare("--store", store, "--rqae", runs["rqae"], "--sae-path", runs["topk-sae"], "--out", out,
                "--ce-contexts", "0")
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.output
    assert "holds files that are not a comparison report (notes.txt)" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [".DS_Store", "notes.txt", "report.json"]
    assert (out / "report.json").read_text() == "a report of mine"
