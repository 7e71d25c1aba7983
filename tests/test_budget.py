"""The matched-budget table: bits per token, weight bytes and who wins at each budget."""

import math

import pytest

from rqae_pipeline import RQAEError
from rqae_pipeline.budget import budget_table
from rqae_pipeline.metrics import rqae_bits_per_token, sae_bits_per_token


def test_bits_per_token_formulas():
    assert rqae_bits_per_token(1) == pytest.approx(9.087, abs=1e-3)  # log2(544)
    assert rqae_bits_per_token(16) == pytest.approx(16 * math.log2(544))
    # an SAE: which 64 of 16,384 latents fire (an unordered set), and a 16-bit value each
    assert sae_bits_per_token(64, 16384) == pytest.approx(math.log2(math.comb(16384, 64)) + 64 * 16)
    assert sae_bits_per_token(64, 16384) < 64 * (14 + 16) - 290  # not log2(64!) = 296 bits for their order
    assert sae_bits_per_token(0, 1000) == 0 and sae_bits_per_token(1000, 1000) == pytest.approx(1000 * 16)
    # a mean L0 between two counts costs between their costs
    assert sae_bits_per_token(10, 1000, 8) < sae_bits_per_token(10.5, 1000, 8) < sae_bits_per_token(11, 1000, 8)
    assert math.isnan(sae_bits_per_token(math.nan, 1000))
    with pytest.raises(RQAEError, match="outside"):
        sae_bits_per_token(1001, 1000)


def result(fvu: dict[str, float], **extra) -> dict:
    return {"metrics": {k: {"fvu_normalised": v, "fvu_raw": v * 2, "mse_normalised": v, "mse_raw": v}
                        for k, v in fvu.items()}, **extra}


def test_matched_budget_picks_the_rqae_prefix_within_the_sae_budget_and_shows_an_sae_win():
    rqae = result({"rqae@1": 0.5, "rqae@4": 0.2, "rqae@16": 0.05, "rqae@64": 0.01},
                  weight_bytes_per_layer=1000, weight_bytes_shared=10)
    # L0 2 over 1024 latents: log2 C(1024, 2) + 2 x 16 = 51.0 bits/token, between rqae@4 (36.3) and rqae@16 (145.4)
    sae = result({"sae": 0.1}, l0=2.0, latents=1024, dead_latents=0, weight_bytes=20_000)
    table = budget_table(rqae, sae)
    bits, weights = table["matched"]
    assert bits["value"] == pytest.approx(math.log2(1024 * 1023 / 2) + 32)
    assert bits["rqae_within"] == "rqae@4" and bits["rqae_nearest"] == "rqae@4"
    assert bits["winner_fvu_normalised"] == "sae" and bits["winner_fvu_raw"] == "sae"  # 0.1 < 0.2: the SAE wins
    # 20,000 bytes hold rqae@16 (16,010) but not rqae@64
    assert weights["rqae_within"] == "rqae@16" and weights["winner_fvu_normalised"] == "rqae"
    assert bits["winner_ce_delta"] is None  # no CE measured
    assert [r["label"] for r in table["models"]] == ["rqae@1", "rqae@4", "rqae@16", "rqae@64", "sae"]


def test_ce_delta_within_two_standard_errors_is_a_tie():
    ce = {"rqae@4": {"ce_delta": 0.30, "ce_delta_se": 0.05}}
    rqae = result({"rqae@4": 0.2}, weight_bytes_per_layer=1, weight_bytes_shared=0, ce=ce)
    sae = result({"sae": 0.1}, l0=2.0, latents=1024, dead_latents=0, weight_bytes=10,
                 ce={"sae": {"ce_delta": 0.25, "ce_delta_se": 0.05}})
    assert budget_table(rqae, sae)["matched"][0]["winner_ce_delta"] == "tie (within 2 SE)"
    sae["ce"]["sae"]["ce_delta_se"] = 0.001
    ce["rqae@4"]["ce_delta_se"] = 0.001
    assert budget_table(rqae, sae)["matched"][0]["winner_ce_delta"] == "sae"


def _ce_result(per_context_ce: dict[str, list[float]], tokens: list[float], **metrics) -> dict:
    """An evaluation's CE entries from per-context CE sums (as `evaluate` records them)."""
    import numpy as np

    from rqae_pipeline.ce import ce_summary
    from rqae_pipeline.metrics import Stats

    stats = Stats()
    stats.counts = {"ce_tokens": np.asarray(tokens, float),
                    **{f"ce:{k}": np.asarray(v, float) for k, v in per_context_ce.items()},
                    **{f"kl:{k}": np.zeros(len(tokens)) for k in per_context_ce if k != "clean"}}
    n = len(tokens)
    return result({k: 0.2 for k in per_context_ce if k != "clean"}, ce=ce_summary(stats), ce_contexts=[0, n],
                  ce_bootstrap={"contexts": n, "predictions": int(sum(tokens)), "resamples": 1000, "seed": 0,
                                "unit": "context"},
                  ce_per_context={k: v.tolist() for k, v in stats.counts.items() if not k.startswith("kl:")},
                  **metrics)


def test_a_ce_delta_difference_is_judged_by_its_paired_standard_error():
    """Both models are measured on the same contexts: hard contexts are hard for both, so the
    difference of their CE-deltas varies far less than either. An RQAE worse by 0.01 nats in
    every one of 64 contexts of widely varying difficulty loses (combined as if independent,
    the two standard errors called it a tie)."""
    import numpy as np

    rng = np.random.default_rng(0)
    tokens = [127.0] * 64
    clean = 127 * (3 + rng.normal(0, 0.5, 64))
    hard = 127 * rng.gamma(2.0, 0.3, 64)  # per-context difficulty both models share
    rqae = _ce_result({"clean": clean, "rqae@4": clean + hard + 127 * 0.01}, tokens, weight_bytes_per_layer=1,
                      weight_bytes_shared=0)
    sae = _ce_result({"clean": clean, "sae": clean + hard}, tokens, l0=2.0, latents=1024, dead_latents=0,
                     weight_bytes=10)
    table = budget_table(rqae, sae)
    row = next(r for r in table["models"] if r["label"] == "rqae@4")
    assert row["ce_delta_diff_se"] == pytest.approx(0.0, abs=1e-12)  # the same difference in every context
    independent = math.hypot(row["ce_delta_se"], table["models"][-1]["ce_delta_se"])
    assert abs(row["ce_delta"] - table["models"][-1]["ce_delta"]) < 2 * independent  # what called it a tie
    assert table["matched"][0]["winner_ce_delta"] == "sae"


def test_no_standard_error_calls_no_ce_winner_and_equal_fvus_are_a_tie():
    one = {"rqae@4": {"ce_delta": 0.30, "ce_delta_se": float("nan")}}
    rqae = result({"rqae@4": 0.1}, weight_bytes_per_layer=1, weight_bytes_shared=0, ce=one)
    sae = result({"sae": 0.1}, l0=2.0, latents=1024, dead_latents=0, weight_bytes=10,
                 ce={"sae": {"ce_delta": 0.25, "ce_delta_se": float("nan")}})  # one CE context: no SE
    bits = budget_table(rqae, sae)["matched"][0]
    assert bits["winner_ce_delta"] == "undecided (no standard error)"  # was "sae": NaN compared as a number
    assert bits["winner_fvu_normalised"] == "tie" and bits["winner_fvu_raw"] == "tie"  # was "sae"
