"""The matched-budget table: bits per token, weight bytes and who wins at each budget."""

import math

import pytest

from rqae_pipeline.budget import budget_table
from rqae_pipeline.metrics import rqae_bits_per_token, sae_bits_per_token


def test_bits_per_token_formulas():
    assert rqae_bits_per_token(1) == pytest.approx(9.087, abs=1e-3)  # log2(544)
    assert rqae_bits_per_token(16) == pytest.approx(16 * math.log2(544))
    # an SAE: L0 x (index bits + 16-bit value)
    assert sae_bits_per_token(64, 16384) == pytest.approx(64 * (14 + 16))
    assert sae_bits_per_token(10.5, 1000, value_bits=8) == pytest.approx(10.5 * (math.log2(1000) + 8))


def result(fvu: dict[str, float], **extra) -> dict:
    return {"metrics": {k: {"fvu_normalised": v, "fvu_raw": v * 2, "mse_normalised": v, "mse_raw": v}
                        for k, v in fvu.items()}, **extra}


def test_matched_budget_picks_the_rqae_prefix_within_the_sae_budget_and_shows_an_sae_win():
    rqae = result({"rqae@1": 0.5, "rqae@4": 0.2, "rqae@16": 0.05, "rqae@64": 0.01},
                  weight_bytes_per_layer=1000, weight_bytes_shared=10)
    # L0 2 over 1024 latents: 2 x (10 + 16) = 52 bits/token, between rqae@4 (36.3) and rqae@16 (145.4)
    sae = result({"sae": 0.1}, l0=2.0, latents=1024, dead_latents=0, weight_bytes=20_000)
    table = budget_table(rqae, sae)
    bits, weights = table["matched"]
    assert bits["value"] == pytest.approx(52.0)
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
